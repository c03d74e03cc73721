"""Everything that touches ``torch.library``: the schemas of :mod:`.schemas` defined
under ``elra_fused::`` (and ``elra_fused::triton_*``), their fake (meta) implementations,
and registration of Python implementations.

The dispatcher accepts the C++ implementations before or after the schema appears, so
the order in which this module and ``elra_fused._C`` are imported does not matter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .schemas import NAMESPACE, OP_NAMES, REDUCTIONS, SCHEMAS, TRITON_PREFIX
from .validation import VALIDATORS

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")


def _already_registered(exc: RuntimeError) -> bool:
    """The module was imported again (importlib.reload): keep the first registration."""
    return "already" in str(exc) or "multiple times" in str(exc)


def _define_all() -> None:
    for name, signature in SCHEMAS.items():
        for op_name in (name, TRITON_PREFIX + name):
            try:
                _lib.define(op_name + signature)
            except RuntimeError as exc:
                if not _already_registered(exc):
                    raise


def _fake(name: str) -> Callable[..., torch.Tensor | None]:
    """Shapes only, so torch.compile / FakeTensor can trace; the same validation as the
    real kernels (without the overlap check: fake tensors have no storage)."""
    validate = VALIDATORS[name]

    def fake(*args: object) -> torch.Tensor | None:
        validate(*args)
        if name not in REDUCTIONS:
            return None
        first = args[0]
        like = first[0] if isinstance(first, (list, tuple)) else first
        return like.new_empty((2,), dtype=torch.float64)

    fake.__name__ = fake.__qualname__ = f"fake_{name}"
    return fake


def _register_fakes() -> None:
    for name in OP_NAMES:
        for op_name in (name, TRITON_PREFIX + name):
            try:
                torch.library.register_fake(f"{NAMESPACE}::{op_name}", _fake(name), lib=_lib)
            except RuntimeError as exc:
                if not _already_registered(exc):
                    raise


def register_impls(
    prefix: str, impls: Mapping[str, Callable[..., object]], dispatch_keys: tuple[str, ...]
) -> None:
    """Register ``impls[name]`` as ``elra_fused::{prefix}{name}`` for ``dispatch_keys``;
    every op of the schema table must be given (no backend half-registered)."""
    if set(impls) != set(OP_NAMES):
        raise ValueError(f"implementations for {sorted(impls)}, the schemas define {OP_NAMES}")
    for name in OP_NAMES:
        for key in dispatch_keys:
            try:
                _lib.impl(prefix + name, impls[name], key)
            except RuntimeError as exc:
                if not _already_registered(exc):
                    raise


_define_all()
_register_fakes()
