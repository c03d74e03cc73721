"""The per-parameter layout (``flat=False``; the default except on CUDA): the passes take
the parameters' own tensors and autograd's own gradients as tensor lists (one op call per
pass, multi-tensor kernels on CUDA), and G_{t-1} is kept *by reference*
(:class:`~elra_fused.memory.GradPrevList`): after an accept the gradient tensor itself
becomes G_{t-1}, so the update pass reads x and G and writes only x, and backward writes
each gradient once. A parameter whose gradient is None is skipped (:meth:`ListLayout.finish`
does the retrace and G_{t-1} = 0). Sharded (DTensor) parameters are stepped through
their local shards. The common step -- every parameter plain -- is checked in one C++
call (:meth:`ListLayout._gather_plain`). See :mod:`elra_fused.layouts` for what both
layouts share.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _torch_compat, checks, control
from .core import OptimizerState, ParamGroups, Segment, StepWork, decision_tensors
from .memory import GRAD_PREV_KEY, GradPrevList
from .ops import backends
from .sharding import replicas


def _same_order(tensor: torch.Tensor, param: torch.Tensor, param_contiguous: bool) -> bool:
    """Whether ``tensor`` holds its elements in ``param``'s memory order (both dense, same
    shape; ``param_contiguous`` is ``param.is_contiguous()``). For a contiguous parameter
    that is ``tensor.is_contiguous()``: equal strides imply it, and contiguous tensors of
    one shape hold their elements in the same order (strides of size-1 dims aside)."""
    if param_contiguous:
        return tensor.is_contiguous()
    return tensor.stride() == param.stride()


def _storage_ptr(tensor: torch.Tensor, sharded: bool) -> int:
    """The address of ``tensor``'s first element (a DTensor's: of its local shard)."""
    return (_torch_compat.local_shard(tensor) if sharded else tensor).data_ptr()


def _same_storage(tensor: torch.Tensor, param: torch.Tensor, sharded: bool) -> bool:
    """Whether ``tensor`` lives in ``param``'s storage (a DTensor: its local shard's), as a
    gradient assigned as the parameter itself or a view of it does: the update would
    read G_t while writing x."""
    if sharded:
        tensor, param = _torch_compat.local_shard(tensor), _torch_compat.local_shard(param)
    return tensor.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()


#: Types the one-call check takes for a parameter, its gradient and its G_{t-1}
#: (:meth:`ListLayout._gather_plain`; None: no gradient or no G_{t-1} yet).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, type(None))
#: The kinds plain_list_step gives a parameter (csrc/layout_checks.h, kPlain*): stepped,
#: or skipped (a G_{t-1} but no gradient now); 0 is frozen.
_STEPPED, _SKIPPED = 1, 2


def _local_shards(
    params: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    prevs: list[torch.Tensor | None],
    recorded: list[int],
    dtensor: type,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[torch.Tensor | None]] | None:
    """The local shards of a sharded model's parameters, gradients and G_{t-1} (None where
    a tensor is None) for the one-call check; None where the full loop must run: a
    gradient or G_{t-1} that is not a DTensor, a local shard that is a subclass itself,
    or a G_{t-1} changed since the last step. That last check is made here, on the
    DTensors: their version counters are the ones the layout records (an in-place op on a
    DTensor bumps its own counter), not the local shards'.

    Read as :func:`~elra_fused._torch_compat.local_shard` reads them, in bulk (this runs
    over every parameter per step); a torch whose DTensor lacks ``_local_tensor`` takes
    the loop, which falls back to ``to_local()``."""
    if not {type(t) for t in (*grads, *prevs)}.issubset((dtensor, type(None))):
        return None
    for prev, version in zip(prevs, recorded, strict=True):
        if version >= 0 and prev is not None and prev._version != version:
            return None
    try:
        local_params = [param._local_tensor for param in params]
        local_grads = [None if grad is None else grad._local_tensor for grad in grads]
        local_prevs = [None if prev is None else prev._local_tensor for prev in prevs]
    except AttributeError:
        return None
    if not {type(t) for t in (*local_params, *local_grads, *local_prevs)}.issubset(_PLAIN_TYPES):
        return None
    return local_params, local_grads, local_prevs


class ListLayout:
    """Per-parameter tensor lists; G_{t-1} kept by reference where it can be."""

    is_flat = False

    def __init__(
        self, state_dtype: torch.dtype | None, backend: str, supported: tuple[torch.dtype, ...]
    ) -> None:
        self.state_dtype = state_dtype
        self.backend = backend
        #: Storage dtypes the kernels take (None: the reference takes any float dtype).
        self.supported = supported if backend != "reference" else None
        #: The version counter of each G_{t-1} tensor when the last step left it, to
        #: detect an in-place change of a gradient kept by reference.
        self.prev_versions: dict[torch.Tensor, int] = {}
        #: The G_{t-1} tensors the last step replaced, released by zero_grad.
        self.retired: list[torch.Tensor] = []

    def add_group(self, group_index: int, group: dict[str, Any], state: OptimizerState) -> None:
        """G_{t-1} = 0 for each trainable parameter (exact for the first <G_{t-1}, G_t>),
        laid out like it. Each step gathers the parameters' own tensors; the first accept
        replaces these by the gradients themselves. Built now rather than at the first
        step so that the state exists before any step, as torch.distributed.checkpoint
        expects of an optimizer (it would otherwise call ``step()`` to make it)."""
        fresh = {  # all allocated before any state entry is made: a failure adds none
            param: torch.zeros_like(param, dtype=self.state_dtype or param.dtype)
            for param in group["params"]
            if param.requires_grad and GRAD_PREV_KEY not in state.get(param, {})
        }
        for param, grad_prev in fresh.items():
            state[param][GRAD_PREV_KEY] = grad_prev

    def gather(self, param_groups: ParamGroups, state: OptimizerState) -> StepWork:
        """One segment per (device, wd, replicas: :mod:`elra_fused.sharding`); grad-less
        parameters are skipped. Sharded (DTensor) parameters step their local shards
        (:class:`~elra_fused.memory.GradPrevList`). Everything is
        checked before the first kernel runs; error messages are only formatted when
        raised (this loop runs over every parameter per step). The common case -- every
        parameter plain -- is recognised in one call first (:meth:`_gather_plain`)."""
        work = self._gather_plain(param_groups, state)
        if work is not None:
            return work
        work = StepWork()
        segments: dict[tuple[torch.device, float, int], GradPrevList] = {}
        # Hoisted: this loop runs over every parameter per step; at ~300 small tensors it
        # is most of a step's host time. Each check below costs one or two C calls in the
        # common case (a contiguous parameter with autograd's own gradient).
        versions = self.prev_versions
        strided = torch.strided
        supported = self.supported
        state_dtype = self.state_dtype
        dtensor_class = _torch_compat.dtensor_class()
        for group_index, group in enumerate(param_groups):
            wd = group["wd"]
            for param_index, param in enumerate(group["params"]):
                grad = param.grad
                param_state = state[param]
                grad_prev = param_state.get(GRAD_PREV_KEY)
                if grad_prev is not None:
                    recorded = versions.get(param)
                    if recorded is not None and grad_prev._version != recorded:
                        name = checks.describe(group_index, param_index, param)
                        raise checks.grad_prev_changed(name)
                if grad is None:
                    if grad_prev is not None:
                        work.skipped.append((param, grad_prev))
                    continue
                device = param.device
                dtype = param.dtype
                if (
                    grad.layout != strided
                    or grad.is_complex()
                    or grad.shape != param.shape
                    or grad.device != device
                    or (supported is not None and dtype not in supported)
                ):
                    name = checks.describe(group_index, param_index, param)
                    checks.reject_list_grad(name, param, self.backend)
                contiguous = param.is_contiguous()
                if not contiguous and not checks.is_dense(param):
                    name = checks.describe(group_index, param_index, param)
                    raise checks.not_dense(name, param)
                sharded = dtensor_class is not None and isinstance(param, dtensor_class)
                if (
                    grad.dtype != dtype
                    or not _same_order(grad, param, contiguous)
                    or (  # (empty tensors share the null address: nothing to keep apart)
                        grad.numel() > 0
                        and (
                            (
                                grad_prev is not None
                                and _storage_ptr(grad, sharded) == _storage_ptr(grad_prev, sharded)
                            )
                            or _same_storage(grad, param, sharded)
                        )
                    )
                ):
                    # Rare: a gradient assigned by hand (in another dtype or order, or the
                    # parameter's own memory: w.grad = w.detach()), or a second step
                    # without backward (the gradient is still last step's tensor, now
                    # G_{t-1}). One copy in the parameter's dtype and strides keeps it
                    # apart. (Autograd's own gradients follow the parameter's strides,
                    # channels_last included.)
                    grad = torch.empty_like(param).copy_(grad)
                    param.grad = grad
                if grad_prev is not None and grad_prev.numel() != param.numel():
                    name = checks.describe(group_index, param_index, param)
                    raise checks.param_reshaped(name, param, grad_prev)
                if (
                    grad_prev is None
                    or not _same_order(grad_prev, param, contiguous)
                    or grad_prev.device != device
                    or (grad_prev.dtype != dtype and grad_prev.dtype != state_dtype)
                ):
                    # A parameter seen for the first time had no gradient before: its
                    # previous gradient is zero, which is exact for <G_{t-1}, G_t>. A
                    # loaded G_{t-1}, or one kept from before the model was cast or
                    # moved, is laid out like its parameter (the kernels read the three
                    # tensors' storage as vectors of the same order).
                    fresh = torch.empty_like(param, dtype=state_dtype or dtype)
                    if grad_prev is None:
                        grad_prev = fresh.zero_()
                    else:
                        grad_prev = fresh.copy_(grad_prev)
                    param_state[GRAD_PREV_KEY] = grad_prev
                key = (device, wd, replicas(param) if sharded else 1)
                store = segments.get(key)
                if store is None:
                    store = segments[key] = GradPrevList(versions)
                store.add(param, grad, grad_prev, param_state, sharded, contiguous)
        for (device, wd, copies), store in segments.items():
            work.segments.append(Segment(store.xs, store.grads, store, wd, device, 1.0 / copies))
        return work

    def _gather_plain(self, param_groups: ParamGroups, state: OptimizerState) -> StepWork | None:
        """:meth:`gather`'s result when every parameter is plain, else None (then the full
        loop runs and does what a parameter needs, errors included).

        Plain: a G_{t-1} unchanged since the last step, and either no gradient
        (frozen, or skipped: listed for :meth:`finish`) or -- on the first parameter's
        device, contiguous -- a gradient the loop would take as it is (the parameter's
        dtype, shape and memory order, not last step's G_{t-1} itself) with a G_{t-1} it
        would keep (laid out like the parameter, in its dtype or state_dtype).
        ``elra_fused._C.plain_list_step`` checks all of it in one call
        (csrc/layout_checks.cpp); without the extension the full loop always runs. A
        model sharded throughout (every parameter a DTensor, as FSDP2 leaves it) is
        checked on its local shards (:func:`_local_shards`). The segments are the loop's:
        one per (wd, replicas), in order of first appearance.
        """
        check = getattr(backends._C, "plain_list_step", None)
        if check is None:
            return None
        params = [param for group in param_groups for param in group["params"]]
        if not params:
            return None
        # Tensor subclasses (wrappers that answer shape or layout in Python) go through
        # the loop, which sees them as Python does. A model sharded throughout (FSDP2:
        # every parameter a DTensor) is checked on its local shards. Parameters first: a
        # model of any other kind declines before any state lookup.
        kinds_of_params = set(map(type, params))
        dtensor = _torch_compat.dtensor_class()
        sharded = dtensor is not None and kinds_of_params == {dtensor}
        if not sharded and not kinds_of_params.issubset(_PLAIN_TYPES):
            return None
        states = [state[param] for param in params]
        grads = [param.grad for param in params]
        prevs = [param_state.get(GRAD_PREV_KEY) for param_state in states]
        versions = self.prev_versions
        recorded = [versions.get(param, -1) for param in params]
        if sharded:
            checked = _local_shards(params, grads, prevs, recorded, dtensor)
            if checked is None:
                return None
            local_params, local_grads, local_prevs = checked
            recorded = [-1] * len(params)  # compared on the DTensors by _local_shards
        else:
            if any(type(t) not in _PLAIN_TYPES for t in (*grads, *prevs)):
                return None
            local_params, local_grads, local_prevs = params, grads, prevs
        any_dtype = self.supported is None
        supported = [] if any_dtype else list(self.supported)
        first_not_plain, kinds = check(
            local_params,
            local_grads,
            local_prevs,
            recorded,
            self.state_dtype,
            supported,
            any_dtype,
        )
        if first_not_plain >= 0:
            return None
        work = StepWork()
        # Segments in the order the loop creates them: a (wd, replicas) enters when its
        # first parameter with a gradient does (a frozen or empty group creates none).
        rows: dict[tuple[float, int], list[int]] = {}
        copies_of: dict[Any, int] = {}  # replicas by (mesh, placements): few distinct
        start = 0
        for group in param_groups:
            end = start + len(group["params"])
            for i in range(start, end):
                if kinds[i] != _STEPPED:
                    continue
                copies = 1
                if sharded:
                    key = (id(params[i].device_mesh), params[i].placements)
                    copies = copies_of.get(key)
                    if copies is None:
                        copies = copies_of[key] = replicas(params[i])
                rows.setdefault((group["wd"], copies), []).append(i)
            start = end
        work.skipped = [(params[i], prevs[i]) for i, kind in enumerate(kinds) if kind == _SKIPPED]
        device = local_params[0].device
        for (wd, copies), indices in rows.items():
            store = GradPrevList.of_plain(
                versions,
                [params[i] for i in indices],
                [grads[i] for i in indices],
                [prevs[i] for i in indices],
                [states[i] for i in indices],
                (
                    [local_params[i] for i in indices],
                    [local_grads[i] for i in indices],
                    [local_prevs[i] for i in indices],
                )
                if sharded
                else None,
            )
            work.segments.append(Segment(store.xs, store.grads, store, wd, device, 1.0 / copies))
        return work

    def finish(self, work: StepWork, decision: control.Decision) -> None:
        """Parameters without gradient: their G_t is zero. An accept leaves x alone (no
        decay) and the stored G_{t-1} becomes 0; a retrace still undoes their last step.
        Then record what the next step checks and what zero_grad releases."""
        if work.skipped:
            decision = decision_tensors(decision)
            keep = 1.0 - decision.accept
            with torch.no_grad():  # also when called outside ELRA.step (the tests' oracle)
                for param, grad_prev in work.skipped:
                    back = (keep * decision.back).to(param.device, grad_prev.dtype)
                    param.add_(grad_prev * back)
                    grad_prev.mul_(keep.to(grad_prev.device, grad_prev.dtype))
                    self.prev_versions[param] = grad_prev._version
        self.retired = [t for seg in work.segments for t in seg.store.retired]

    def zero_grad(self, param_groups: ParamGroups, set_to_none: bool) -> None:
        """``set_to_none=False`` gives each parameter a new zero tensor instead of zeroing
        the old one in place: that one may be G_{t-1}."""
        self.retired.clear()
        for group in param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad = None if set_to_none else torch.zeros_like(param.grad)

    def load_state(self, state: OptimizerState, param_groups: ParamGroups) -> None:
        """torch cast the loaded state to each parameter's dtype (a compact G_{t-1} goes
        back to state_dtype) and may have kept the caller's tensors: the layout takes its
        own contiguous copies, whose versions it then starts tracking."""
        self.prev_versions.clear()
        self.retired.clear()
        for param_state in state.values():
            loaded = param_state.get(GRAD_PREV_KEY)
            if loaded is not None:
                param_state[GRAD_PREV_KEY] = loaded.to(
                    self.state_dtype or loaded.dtype,
                    memory_format=torch.contiguous_format,
                    copy=True,
                )

    def synchronize(self) -> None:
        """Nothing in flight."""
