"""One table of op cases: inputs, float64 oracle and memory traffic of every ELRA op.

Shared by the op tests (``python_tests/test_ops_*.py``) and the kernel benchmark
(``benchmarks/bench_kernels.py``) so that both call each op with the same arguments,
check / score it against the same oracle and count the same bytes::

    from elra_fused.ops.cases import OP_CASES

    case = OP_CASES["update_"]
    gen = torch.Generator().manual_seed(0)
    args = case.make_inputs(1 << 20, torch.float32, "cuda", gen, accept=False)
    expected = clone_args(args)
    case.reference(*expected)                    # float64 math, in place
    getattr(kernels, case.name)(*args)           # the backend under test
    case.bytes_moved(1 << 20, torch.float32, accept=False)   # 12 MiB: read x, G_prev; write x

The math (``reference_ops`` has the full statement; coefficients are float64 tensors):

* ``dots(G, G_prev) = [<G, G>, <G_prev, G>]``
* ``dots_recover(x_prev, x, G, [decay, 1/alpha_prev]) = [<G, G>, <G_prev, G>]`` with
  ``G_prev = (decay x_prev - x) / alpha_prev`` recovered per element
* ``update_(x, G, G_prev, [accept, decay, step, back])``:
  accept: ``x <- decay x - step G; G_prev <- G``; retrace: ``x <- x + back G_prev``
* ``update_recover_(x, G, x_prev, c)``: accept: ``x_prev <- x; x <- decay x - step G``;
  retrace: ``x <- x + back (decay x_prev - x)``
* ``update_swap_(x, G, G_prev, c)``: accept: ``x <- decay x - step G`` (nothing else
  written); retrace: ``x <- x + back G_prev; G <- G_prev``
* ``dots_list`` / ``update_list_`` / ``update_swap_list_``: the single op on element i of
  every list (any shapes); ``dots_list`` adds the per-tensor results in list order.

Inputs are exactly representable in the storage dtype: each vector is float64 ``randn``
drawn from the caller's generator and rounded once. The points of the recover ops are
consistent with one step of the method (``x = decay x_prev - alpha_prev G_prev``, or
``x_prev`` close to ``x``), so the recovered gradients have realistic magnitudes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from elra_fused import reference_ops as ref

from .lists import with_list_ops
from .schemas import LIST_OPS, OP_NAMES, parse

__all__ = [
    "ALPHA_PREV",
    "BACK",
    "DECAY",
    "OP_CASES",
    "STEP",
    "OpCase",
    "Traffic",
    "clone_args",
    "list_shapes",
    "rand",
    "recover_coeffs",
    "update_coeffs",
]

#: The paper's multiplicative weight decay.
DECAY = 0.9997
#: alpha_t, the step along -G on an accept.
STEP = 1e-3
#: alpha_{t-1} - alpha_t, the length back along G_{t-1} on a retrace (standard mode).
BACK = 5e-4
#: alpha_{t-1} of ``dots_recover`` (its coefficient is ``1 / ALPHA_PREV``).
ALPHA_PREV = 1e-2

Device = torch.device | str
Args = tuple  # the op's arguments in schema order (tensors, tensor lists, coefficients)


def rand(
    n: int,
    dtype: torch.dtype,
    device: Device,
    generator: torch.Generator,
    scale: float = 1.0,
    shift: float = 0.0,
) -> torch.Tensor:
    """``n`` fresh values ``randn * scale + shift``, exactly representable in ``dtype``.

    Drawn in float64 on the generator's device and rounded once, so a CPU generator gives
    the same values whatever ``device`` is.
    """
    t = torch.randn(n, generator=generator, dtype=torch.float64, device=generator.device)
    return (t * scale + shift).to(dtype).to(device)


def update_coeffs(accept: bool | float, device: Device) -> torch.Tensor:
    """``[accept, decay, step, back]`` (float64) for the update ops."""
    return torch.tensor([float(accept), DECAY, STEP, BACK], dtype=torch.float64, device=device)


def recover_coeffs(device: Device, alpha_prev: float = ALPHA_PREV) -> torch.Tensor:
    """``[decay, 1 / alpha_prev]`` (float64) for ``dots_recover``."""
    return torch.tensor([DECAY, 1.0 / alpha_prev], dtype=torch.float64, device=device)


def list_shapes(n: int) -> tuple[tuple[int, ...], ...]:
    """Parameter-like shapes holding ``n`` elements in all: a matrix, a vector, a 0-d
    scalar and a long vector with the rest (fewer pieces when ``n`` is small)."""
    if n < 17 + 7 + 1 + 1:
        return ((n,),)
    rows = max(1, n // 4 // 17)
    return ((rows, 17), (7,), (), (n - 17 * rows - 7 - 1,))


def clone_args(args: Sequence[object]) -> tuple:
    """A deep copy of an argument tuple (tensors and tensor lists cloned)."""

    def clone(a: object) -> object:
        if isinstance(a, torch.Tensor):
            return a.clone()
        if isinstance(a, (list, tuple)):
            return [clone(t) for t in a]
        return a

    return tuple(clone(a) for a in args)


@dataclass(frozen=True)
class Traffic:
    """Arguments read and written by one pass (each whole vector counted once)."""

    read: tuple[str, ...]
    written: tuple[str, ...]


@dataclass(frozen=True)
class OpCase:
    """One op of :data:`elra_fused.ops.OP_NAMES`: how to call it and what it should do.

    ``arg_names`` and ``mutated`` (the arguments written in place, ``(a!)`` / ``(b!)``)
    come from the op's schema. ``state_arg`` names the argument that may be stored as
    :data:`~elra_fused.ops.STATE_DTYPE_COMPACT` (bfloat16) whatever ``dtype`` is, or is
    ``None``. ``accept`` / ``retrace`` give the traffic of the two branches of an update
    (the same for reductions).
    """

    name: str
    arg_names: tuple[str, ...]
    mutated: tuple[str, ...]
    returns_tensor: bool
    is_list: bool
    state_arg: str | None
    #: The float64 oracle: same arguments; returns the float64 result or writes in place.
    reference: Callable[..., torch.Tensor | None]
    accept: Traffic
    retrace: Traffic
    _make: Callable[..., Args]

    @property
    def mutated_indices(self) -> tuple[int, ...]:
        """Positions of :attr:`mutated` in the argument tuple."""
        return tuple(self.arg_names.index(a) for a in self.mutated)

    def _state_dtype(self, dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
        if state_dtype is None or state_dtype == dtype:
            return dtype
        if self.state_arg is None:
            raise ValueError(f"{self.name} has no compact-state argument (state_dtype given)")
        return state_dtype

    def make_inputs(
        self,
        n: int,
        dtype: torch.dtype,
        device: Device,
        generator: torch.Generator,
        *,
        state_dtype: torch.dtype | None = None,
        accept: bool = True,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> Args:
        """Fresh arguments in schema order, coefficients included.

        ``n`` elements per vector argument (list ops: split over :func:`list_shapes`, or
        over ``shapes``, whose sizes must add up to ``n``). ``state_dtype``: the dtype of
        :attr:`state_arg` (default ``dtype``); only ops with a state argument accept
        another one. ``accept`` selects the update branch (``coeffs[0]`` 1 or 0); it is
        ignored by the reductions.
        """
        state = self._state_dtype(dtype, state_dtype)
        if shapes is not None and not self.is_list:
            raise ValueError(f"{self.name} takes flat tensors; shapes is for the list ops")
        if not self.is_list:
            return self._make(n, dtype, state, device, generator, accept)
        shapes = tuple(shapes) if shapes is not None else list_shapes(n)
        total = sum(torch.Size(s).numel() for s in shapes)
        if total != n:
            raise ValueError(f"shapes hold {total} elements, not n={n}")
        # Each element is a call of the single op on that shape; regroup them into lists.
        rows = [
            self._make(torch.Size(s).numel(), dtype, state, device, generator, accept)
            for s in shapes
        ]
        out: list[object] = []
        for i, name in enumerate(self.arg_names):
            if name == "coeffs":
                out.append(rows[0][i])
            else:
                out.append([row[i].view(s) for row, s in zip(rows, shapes, strict=True)])
        return tuple(out)

    def bytes_moved(
        self,
        n: int,
        dtype: torch.dtype,
        state_dtype: torch.dtype | None = None,
        *,
        accept: bool = True,
    ) -> int:
        """Compulsory traffic of one pass over ``n`` elements: every vector read and every
        vector written counted once at its element size (the state argument at
        ``state_dtype``'s). Coefficients and the 16-byte result are left out."""
        size = torch.empty((), dtype=dtype).element_size()
        state_size = torch.empty((), dtype=self._state_dtype(dtype, state_dtype)).element_size()
        traffic = self.accept if accept else self.retrace
        names = (*traffic.read, *traffic.written)
        return n * sum(state_size if a == self.state_arg else size for a in names)


# --------------------------------------------------------------------------------------
# Inputs of the single-tensor ops: (n, dtype, state dtype, device, generator, accept).
# --------------------------------------------------------------------------------------
def _dots_inputs(n, dtype, state, device, gen, accept) -> Args:
    return rand(n, dtype, device, gen), rand(n, state, device, gen)


def _dots_recover_inputs(n, dtype, state, device, gen, accept) -> Args:
    x_prev = rand(n, dtype, device, gen)
    # x = decay * x_prev - alpha_prev * G_prev, rounded to dtype: a real step's points.
    g_prev = rand(n, torch.float64, device, gen)
    x = (DECAY * x_prev.double() - ALPHA_PREV * g_prev).to(dtype)
    return x_prev, x, rand(n, dtype, device, gen), recover_coeffs(device)


def _update_inputs(n, dtype, state, device, gen, accept) -> Args:
    x, g = rand(n, dtype, device, gen), rand(n, dtype, device, gen)
    return x, g, rand(n, state, device, gen), update_coeffs(accept, device)


def _update_recover_inputs(n, dtype, state, device, gen, accept) -> Args:
    x, g = rand(n, dtype, device, gen), rand(n, dtype, device, gen)
    x_prev = (x.double() + 1e-3 * rand(n, torch.float64, device, gen)).to(dtype)
    return x, g, x_prev, update_coeffs(accept, device)


#: The float64 oracles: reference_ops, and its ops applied per element for the list ops.
_ORACLES = with_list_ops({name: getattr(ref, name) for name in OP_NAMES if name not in LIST_OPS})


def _case(
    name: str,
    make: Callable[..., Args],
    accept: Traffic,
    retrace: Traffic | None = None,
    state_arg: str | None = None,
) -> OpCase:
    schema = parse(name)
    args = schema.arguments
    return OpCase(
        name=name,
        arg_names=tuple(a.name for a in args),
        mutated=tuple(a.name for a in args if a.alias_info is not None and a.alias_info.is_write),
        returns_tensor=len(schema.returns) > 0,
        is_list=name in LIST_OPS,
        state_arg=state_arg,
        reference=_ORACLES[name],
        accept=accept,
        retrace=accept if retrace is None else retrace,
        _make=make,
    )


_DOTS = Traffic(read=("grad", "grad_prev"), written=())
# Standard mode: accept stores G as the new G_{t-1}; a retrace never reads G.
_UPDATE_ACCEPT = Traffic(read=("x", "grad"), written=("x", "grad_prev"))
_UPDATE_RETRACE = Traffic(read=("x", "grad_prev"), written=("x",))
# Swap mode: accept writes only x (the caller swaps the buffers' roles); a retrace copies
# G_{t-1} into the gradient buffer.
_SWAP_ACCEPT = Traffic(read=("x", "grad"), written=("x",))
_SWAP_RETRACE = Traffic(read=("x", "grad_prev"), written=("x", "grad"))

#: Every op of :data:`elra_fused.ops.OP_NAMES`, keyed by name.
OP_CASES: dict[str, OpCase] = {
    c.name: c
    for c in (
        _case("dots", _dots_inputs, _DOTS, state_arg="grad_prev"),
        _case(
            "dots_recover",
            _dots_recover_inputs,
            Traffic(read=("x_prev", "x", "grad"), written=()),
        ),
        _case(
            "update_",
            _update_inputs,
            _UPDATE_ACCEPT,
            _UPDATE_RETRACE,
            state_arg="grad_prev",
        ),
        _case(
            "update_recover_",
            _update_recover_inputs,
            Traffic(read=("x", "grad"), written=("x", "x_prev")),
            Traffic(read=("x", "x_prev"), written=("x",)),
        ),
        _case("update_swap_", _update_inputs, _SWAP_ACCEPT, _SWAP_RETRACE),
        _case("dots_list", _dots_inputs, _DOTS, state_arg="grad_prev"),
        _case(
            "update_list_",
            _update_inputs,
            _UPDATE_ACCEPT,
            _UPDATE_RETRACE,
            state_arg="grad_prev",
        ),
        _case(
            "update_swap_list_",
            _update_inputs,
            _SWAP_ACCEPT,
            _SWAP_RETRACE,
        ),
    )
}

if tuple(OP_CASES) != OP_NAMES:  # a new op needs its row here too
    raise RuntimeError(f"OP_CASES covers {tuple(OP_CASES)}, the schemas define {OP_NAMES}")
