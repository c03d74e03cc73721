"""Every use of torch-private API in one place, so a torch upgrade touches one file.

* :func:`step_entry`: ``Optimizer.step``'s profiler range and hook loops, skipped when
  nothing would observe them (``torch.optim.optimizer`` module globals, the private
  ``_optimizer_step_code`` and ``_profiler_enabled``).
* ``TorchDispatchMode`` and ``tree_flatten`` (``torch.utils._python_dispatch`` /
  ``_pytree``): the LM job's live-memory tracker (:mod:`elra_fused.lm`).
* :func:`is_dtensor`: DTensor moved from ``torch.distributed._tensor`` to
  ``torch.distributed.tensor`` in torch 2.5.
* :func:`grad_scaler_scale`: a GradScaler's scale as a tensor (``_get_scale_async``);
  the public ``get_scale()`` reads it back to the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.optim.optimizer as torch_optimizer
from torch.utils._python_dispatch import TorchDispatchMode as TorchDispatchMode
from torch.utils._pytree import tree_flatten as tree_flatten


def _step_is_observed(optimizer: torch.optim.Optimizer) -> bool:
    """Whether anything would see torch's step wrapper: dynamo (which traces it), a
    profiler (its ``record_function`` range) or a step hook, global or per optimizer."""
    return bool(
        torch.compiler.is_compiling()
        or torch._C._autograd._profiler_enabled()
        or torch_optimizer._global_optimizer_pre_hooks
        or torch_optimizer._global_optimizer_post_hooks
        or optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
    )


def step_entry(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an optimizer's ``step`` as torch's ``Optimizer`` does, without its fixed cost
    when nothing uses it.

    torch wraps every optimizer's step in a profiler range (``record_function``) and its
    hook loops. Right after a backward, when the CPU's caches are cold, that wrapper
    measured ~40-80 us per step on 2 cores (an MLP of 1M parameters, as in
    ``benchmarks/bench_step.py``), against a whole ELRA step of ~600 us. This wrapper
    calls torch's own wrapper whenever a profiler runs or any step hook is registered
    (global or on this optimizer), so traces and hooks behave exactly as torch's;
    otherwise it calls the step directly, plus the bookkeeping torch does after every
    step (``_optimizer_step_code``).
    """
    torch_wrapped = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        if _step_is_observed(self):
            return torch_wrapped(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    # torch.optim.Optimizer.__init__ wraps a step that is not marked as hooked.
    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


@functools.cache
def dtensor_class() -> type | None:
    """torch's DTensor class (None where torch.distributed is not built)."""
    if not dist.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 keeps it under torch.distributed._tensor
        from torch.distributed._tensor import DTensor
    return DTensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2 / tensor-parallel shard)."""
    cls = dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard as the plain tensor that ``tensor.to_local()`` returns a view
    of: the same storage, shape and strides (the kernels write into it in place), read
    from DTensor's private ``_local_tensor`` attribute. ``to_local()`` runs an autograd
    Function and makes a view, ~5 us per call: the per-parameter layout needs five per
    sharded parameter per step. Falls back to ``to_local()`` where the attribute is gone."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor.to_local()


def grad_scaler_scale(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scale ``scaler`` multiplies losses by now, as a tensor: dividing a scaled loss
    by it needs no host sync (``GradScaler.get_scale()`` returns a float, which syncs)."""
    scale = scaler._get_scale_async()
    if scale is None:  # no loss scaled yet: the scale tensor is created lazily
        return torch.tensor(scaler.get_scale())
    return scale
