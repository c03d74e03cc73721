"""Buffers that follow ELRA's retraces: BatchNorm running statistics restored on a retrace.

A retrace (paper section 3.2) rejects the point x_t: ELRA moves back onto the line of
the last accepted step instead of stepping from x_t. But the forward pass that produced
the rejected loss f_t has already run in train mode, and BatchNorm layers updated their
running mean / variance (and ``num_batches_tracked``) from activations at x_t -- often a
point with exploding activations, which is what made f_t spike. Those statistics then
survive the retrace and poison evaluation (and, with ``momentum=None``, the cumulative
average for good). The authors of ELRA restore BatchNorm running statistics on a retrace
(GitHub ``alex77g2/solver_icml``, ``Cos2MinTorchFunctionOptimizer.py``: ``ElraOptimizer``
calls ``ImportBatchNorm(model, self.BatchNormBak)`` after a retrace, re-assigning
``running_mean`` / ``running_var`` of every ``BatchNorm2d``; in the published snapshot
the matching ``ExportBatchNorm`` after accepted steps is commented out, so the backup
stays None and nothing is restored). :class:`RetraceBuffers` does the same job for every
normalization layer, ``num_batches_tracked`` included, in place and without a host sync::

    from elra_fused import ELRA
    from elra_fused.buffers import RetraceBuffers

    opt = ELRA(model.parameters())
    keeper = RetraceBuffers(model)        # BatchNorm running statistics, remembered now
    for xb, yb in loader:
        loss = loss_fn(model(xb), yb)     # the forward pass updates the running stats
        loss.backward()
        opt.step(loss)
        keeper.after_step(opt)            # accepted: remember them; retraced: restore
        opt.zero_grad()

Design:

* **What is tracked.** From a module, by default only the running statistics of its
  normalization layers (every ``torch.nn.modules.batchnorm._NormBase`` with
  ``track_running_stats=True``: BatchNorm1d/2d/3d, SyncBatchNorm, the lazy variants once
  materialized, InstanceNorm with tracked statistics): ``running_mean``, ``running_var``
  and ``num_batches_tracked``. These are the buffers a forward pass writes. Other
  buffers are usually constants (causal masks, rotary tables, position ids) that no
  step changes; tracking them would only cost a copy of each (a causal mask can be far
  larger than all BN statistics together) and a copy per step. ``all_buffers=True``
  tracks every buffer of the module (custom running averages, EMA buffers), and an
  iterable of tensors tracks exactly those.
* **Branch-free, no host read.** :meth:`update` takes the retrace flag as a tensor (ELRA's
  ``control_state[control.LAST_RETRACED]``, a 0-d float64 on the optimizer's device) and
  computes ``committed = where(retraced, remembered, current)``; ``committed`` becomes
  both the remembered and the live value. No ``.item()``, no Python ``if`` on a value:
  the same ops run on every step, so it can be captured in a CUDA graph and runs with
  ``host_control=False``. ``where`` selects bits, so it is exact for every dtype
  (``num_batches_tracked`` is int64) and for non-finite values: a rejected forward pass
  that made a running variance ``inf`` or ``nan`` is undone bit for bit (a blend such as
  ``lerp`` or ``x + m (y - x)`` would turn it into ``nan``).
* **In place.** Values are copied into the existing buffers, never re-assigned: whoever
  holds the buffers (DDP's buffer broadcast, a captured CUDA graph, an ``nn.Module``
  hook) keeps seeing the live tensors.
* **Few launches.** The tracked buffers are grouped by (device, dtype); each group has one
  flat remembered copy. Per group and step: one ``cat`` of the current values, one
  ``where`` into the remembered copy, one ``_foreach_copy_`` back into the buffers (a
  single multi-tensor launch on CUDA) -- three kernels however many layers the model has
  (a BatchNorm model has two groups: float running stats and int64 counters).
* **Memory.** One persistent copy of the tracked buffers (for BatchNorm two floats per
  channel and one int64 per layer: kilobytes) plus a transient copy inside :meth:`update`.
* **Before the first step** the remembered values are those at construction, so a
  retraced or skipped first step restores the initial statistics. Build the helper (or
  call :meth:`remember`) where the buffers hold an accepted state: before the forward
  pass of the next step.
* **Replaced buffers raise.** ``module.to(dtype)`` / ``.cuda()`` and
  ``load_state_dict(..., assign=True)`` put new tensors into the module; restoring into
  the old ones would silently do nothing. Every :meth:`update` checks (host metadata
  only: identity, ``data_ptr``, shape, dtype) that each tracked buffer is still the one
  registered in its module and still has the same storage, and raises with the fix
  (:meth:`rebind`) otherwise. It does not re-bind on its own: by the time ``update``
  sees the new tensors, a forward pass may already have written statistics from a
  rejected point into them, and there is nothing valid left to restore. For an iterable
  of tensors only storage changes can be detected (there is no module to look into).
* **Values changed in place outside training** (the model's ``load_state_dict`` without
  ``assign``, ``reset_running_stats()``) cannot be told apart from a forward pass: call
  :meth:`remember` afterwards, or load the helper's own state dict too.
* **Checkpoints.** :meth:`state_dict` holds the remembered values by buffer name; after
  every :meth:`update` they equal the live buffers, so a checkpoint of model and helper
  taken between steps round-trips exactly (so does one taken between a forward pass and
  ``update``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import control

#: Normalization layers whose running statistics a forward pass in train mode updates.
_NORM_TYPES = (torch.nn.modules.batchnorm._NormBase,)
#: Their running-statistics buffers (each may be None when not tracked).
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")

Source = torch.nn.Module | torch.Tensor | Iterable[torch.Tensor]


@dataclass
class _Tracked:
    """One tracked buffer: where it is registered and what it looked like when bound."""

    name: str
    tensor: torch.Tensor
    owner: torch.nn.Module | None  # the module holding it, None for a bare tensor
    local_name: str  # its key in owner._buffers
    data_ptr: int
    shape: torch.Size
    dtype: torch.dtype


@dataclass
class _Group:
    """Buffers of one (device, dtype) and their flat remembered copy."""

    tensors: list[torch.Tensor]
    remembered: torch.Tensor  # flat, the group's buffers one after the other
    views: list[torch.Tensor]  # remembered, cut and shaped like each buffer
    flat: list[torch.Tensor | None]  # each buffer viewed as a vector (None: not contiguous)


class RetraceBuffers:
    """Keeps module buffers (BatchNorm running statistics by default) as of the last
    accepted ELRA step and restores them when a step retraces.

    Args:
        source: a module (its normalization layers' running statistics, or all its
            buffers with ``all_buffers=True``), a tensor, or an iterable of tensors.
        all_buffers: with a module, track every buffer instead of only running
            statistics (see the module docstring for why that is not the default).

    Raises:
        TypeError: ``source`` is neither a module nor tensors, or a parameter is given
            (ELRA's retrace moves parameters itself).
        ValueError: nothing to track, a sparse or lazy (not yet materialized) buffer.
    """

    def __init__(self, source: Source, *, all_buffers: bool = False) -> None:
        self._module = source if isinstance(source, torch.nn.Module) else None
        self._all_buffers = bool(all_buffers)
        if self._module is None and all_buffers:
            raise ValueError("RetraceBuffers: all_buffers=True needs a module as source")
        self._source = None if self._module is not None else _tensor_entries(source)
        self._bind()

    # ------------------------------------------------------------------ binding
    def _bind(self) -> None:
        """Collect the tracked buffers, allocate the remembered copy and fill it."""
        if self._module is not None:
            self._tracked = _module_entries(self._module, self._all_buffers)
        else:
            assert self._source is not None
            self._tracked = self._source
        self._live = [entry.tensor for entry in self._tracked]
        self._signature = [(e.data_ptr, e.shape, e.dtype) for e in self._tracked]
        self._owned = [
            (e.owner._buffers, e.local_name, e.tensor) for e in self._tracked if e.owner is not None
        ]
        by_key: dict[tuple[torch.device, torch.dtype], list[_Tracked]] = {}
        for entry in self._tracked:
            by_key.setdefault((entry.tensor.device, entry.dtype), []).append(entry)
        self._groups: list[_Group] = []
        # The remembered values by buffer name, for state_dict / load_state_dict.
        self._views_by_name: dict[str, torch.Tensor] = {}
        for (device, dtype), entries in by_key.items():
            tensors = [entry.tensor for entry in entries]
            remembered = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
            views, offset = [], 0
            for entry, tensor in zip(entries, tensors, strict=True):
                view = remembered[offset : offset + tensor.numel()].view(tensor.shape)
                views.append(view)
                self._views_by_name[entry.name] = view
                offset += tensor.numel()
            # Flat views of the buffers, for the gather in update(); a non-contiguous
            # buffer (None) is flattened by a copy at each update instead.
            flat = [t.view(-1) if t.is_contiguous() else None for t in tensors]
            self._groups.append(_Group(tensors, remembered, views, flat))
        self.remember()

    def rebind(self) -> None:
        """Track the module's buffers anew (after ``module.to(...)``, ``.cuda()``,
        ``load_state_dict(..., assign=True)``) and remember their current values.

        Call it where the buffers hold an accepted state (between steps, before the next
        forward pass). Only for a helper built from a module.
        """
        if self._module is None:
            raise ValueError(
                "RetraceBuffers.rebind: this helper was built from tensors, not a module; "
                "build a new RetraceBuffers from the new tensors"
            )
        self._bind()

    def check(self) -> None:
        """Raise if a tracked buffer was replaced (see below); changes nothing. ELRA calls
        it before a step, so a replaced buffer fails before any parameter moves."""
        self._check_bound()

    def _check_bound(self) -> None:
        """Raise if a tracked buffer was replaced in its module or got new storage, shape
        or dtype (host metadata only: no device read; well under 1 us per buffer)."""
        if all(
            buffers.get(local) is tensor for buffers, local, tensor in self._owned
        ) and self._signature == [(t.data_ptr(), t.shape, t.dtype) for t in self._live]:
            return
        for entry in self._tracked:  # the slow path only finds the culprit for the message
            tensor = entry.tensor
            replaced = (
                entry.owner is not None and entry.owner._buffers.get(entry.local_name) is not tensor
            )
            if replaced or (tensor.data_ptr(), tensor.shape, tensor.dtype) != (
                entry.data_ptr,
                entry.shape,
                entry.dtype,
            ):
                what = "was replaced in its module" if replaced else "got new storage"
                fix = (
                    "call rebind() after moving or reloading the model (where the buffers "
                    "hold an accepted state)"
                    if self._module is not None
                    else "build a new RetraceBuffers from the new tensors"
                )
                raise RuntimeError(
                    f"RetraceBuffers: buffer {entry.name!r} {what} (module.to(), .cuda(), "
                    "load_state_dict(assign=True), .data = ...); restoring into the old "
                    f"tensor would do nothing: {fix}"
                )

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def update(self, retraced: torch.Tensor | bool | float) -> None:
        """After a step: remember the buffers (accepted) or restore them (retraced).

        Args:
            retraced: the step's retrace flag, nonzero for a retrace (or a skipped first
                step): ELRA's ``control_state[control.LAST_RETRACED]``, a one-element
                tensor on any device (no host read; it is copied to the buffers'
                devices, which for a GPU flag and CPU buffers means waiting for the GPU),
                or a Python bool / number (not inside a CUDA graph capture).

        Both outcomes run the same ops (``committed = where(retraced, remembered,
        current)``, written to both), so nothing depends on the flag's value on the host.
        """
        self._check_bound()
        self.apply(retraced)

    @torch.no_grad()
    def apply(self, retraced: torch.Tensor | bool | float) -> None:
        """:meth:`update` without the replacement check (for a caller that ran
        :meth:`check` before the step)."""
        if isinstance(retraced, torch.Tensor):
            if retraced.numel() != 1:
                raise ValueError(
                    "RetraceBuffers.update: the retrace flag must have one element, got "
                    f"shape {tuple(retraced.shape)}"
                )
            flag = retraced.detach().reshape(())
        elif isinstance(retraced, (bool, int, float)):
            flag = torch.tensor(float(retraced), dtype=torch.float64)
        else:
            raise TypeError(
                "RetraceBuffers.update: expected the retrace flag as a tensor or a bool, got "
                f"{type(retraced).__name__}"
            )
        masks: dict[torch.device, torch.Tensor] = {}
        for group in self._groups:
            device = group.remembered.device
            if device not in masks:
                masks[device] = flag.to(device) != 0  # NaN counts as retraced
            current = torch.cat(
                [
                    t.reshape(-1) if f is None else f
                    for t, f in zip(group.tensors, group.flat, strict=True)
                ]
            )
            torch.where(masks[device], group.remembered, current, out=group.remembered)
            torch._foreach_copy_(group.tensors, group.views)

    def after_step(self, optimizer: Any) -> None:
        """:meth:`update` with the retrace flag of ``optimizer``'s last step (an
        :class:`elra_fused.ELRA`: ``control_state[control.LAST_RETRACED]``)."""
        self.update(optimizer.control_state[control.LAST_RETRACED])

    @torch.no_grad()
    def remember(self) -> None:
        """Remember the buffers' current values (as if the last step was accepted).

        For a state the helper did not see arrive: after ``reset_running_stats()`` or
        after loading the model's state dict in place without the helper's.
        """
        self._check_bound()
        for group in self._groups:
            torch._foreach_copy_(group.views, group.tensors)

    # ------------------------------------------------------------------ inspection
    @property
    def names(self) -> list[str]:
        """Names of the tracked buffers (module-qualified, or "0", "1", ... for tensors)."""
        return [entry.name for entry in self._tracked]

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The tracked buffers themselves (the live tensors, not copies)."""
        return [entry.tensor for entry in self._tracked]

    @property
    def nbytes(self) -> int:
        """Bytes of the remembered copy (the helper's persistent memory)."""
        return sum(g.remembered.numel() * g.remembered.element_size() for g in self._groups)

    def __len__(self) -> int:
        return len(self._tracked)

    def __repr__(self) -> str:
        return f"RetraceBuffers({len(self)} buffers, {self.nbytes} bytes)"

    # ------------------------------------------------------------------ state dict
    def source(self) -> tuple[torch.nn.Module | list[torch.Tensor], bool]:
        """(module or tensors, all_buffers): the arguments that build an equal
        :class:`RetraceBuffers` over other objects -- a deep copy's (``copying.py``), whose
        storage addresses differ. Tensors come back in their source order (their names
        are their indices; a tensor given twice left a gap, filled with a repeat)."""
        if self._module is not None:
            return self._module, self._all_buffers
        assert self._source is not None
        entries = {int(entry.name): entry.tensor for entry in self._source}
        first = entries[min(entries)]
        return [entries.get(index, first) for index in range(max(entries) + 1)], False

    def state_dict(self) -> dict[str, Any]:
        """The remembered values by buffer name (plain tensors: loadable with
        ``torch.load(weights_only=True)``)."""
        return {
            "buffers": {name: view.detach().clone() for name, view in self._views_by_name.items()}
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load remembered values saved by :meth:`state_dict` (validated before any is
        applied: same names, same shapes; dtypes and devices are converted)."""
        saved = self.check_state_dict(state_dict)
        for name, view in self._views_by_name.items():
            view.copy_(saved[name])

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
        """Raise unless :meth:`load_state_dict` can take ``state_dict``; its buffers."""
        saved = state_dict.get("buffers") if isinstance(state_dict, Mapping) else None
        if not isinstance(saved, Mapping):
            raise ValueError(
                "RetraceBuffers.load_state_dict: expected a dict with a 'buffers' entry, as "
                "saved by RetraceBuffers.state_dict()"
            )
        missing = sorted(set(self._views_by_name) - set(saved))
        unexpected = sorted(set(saved) - set(self._views_by_name))
        if missing or unexpected:
            raise ValueError(
                "RetraceBuffers.load_state_dict: the saved buffers do not match the tracked "
                f"ones (missing: {missing}, unexpected: {unexpected})"
            )
        for name, view in self._views_by_name.items():
            value = saved[name]
            if not isinstance(value, torch.Tensor) or value.shape != view.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    f"RetraceBuffers.load_state_dict: buffer {name!r} has shape "
                    f"{tuple(view.shape)}, the saved value {got}"
                )
        return saved


# ---------------------------------------------------------------------------------------
# Collecting and checking the buffers.
# ---------------------------------------------------------------------------------------
def _module_entries(module: torch.nn.Module, all_buffers: bool) -> list[_Tracked]:
    """The buffers to track in ``module``, each once (shared modules and tensors too)."""
    entries: list[_Tracked] = []
    seen: set[int] = set()
    for prefix, sub in module.named_modules():
        if all_buffers:
            local_names = [n for n, b in sub._buffers.items() if b is not None]
        elif isinstance(sub, _NORM_TYPES) and sub.track_running_stats:
            local_names = [n for n in _RUNNING_STATS if sub._buffers.get(n) is not None]
        else:
            continue
        for local in local_names:
            tensor = sub._buffers[local]
            assert tensor is not None
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            name = f"{prefix}.{local}" if prefix else local
            entries.append(_entry(name, tensor, sub, local))
    if not entries:
        what = (
            "no buffers"
            if all_buffers
            else "no normalization layer with running statistics (BatchNorm / InstanceNorm "
            "with track_running_stats=True); pass all_buffers=True to track every buffer"
        )
        raise ValueError(
            f"RetraceBuffers: {type(module).__name__} has {what}; there is nothing to restore"
        )
    return entries


def _tensor_entries(source: Any) -> list[_Tracked]:
    """Entries for a tensor or an iterable of tensors, named "0", "1", ..."""
    if isinstance(source, torch.Tensor):
        source = [source]
    elif not isinstance(source, Iterable) or isinstance(source, (str, bytes, Mapping)):
        raise TypeError(
            "RetraceBuffers: expected a torch.nn.Module, a tensor or an iterable of tensors, "
            f"got {type(source).__name__}"
        )
    entries: list[_Tracked] = []
    seen: set[int] = set()
    for index, tensor in enumerate(source):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"RetraceBuffers: element {index} is a {type(tensor).__name__}, not a tensor"
            )
        if id(tensor) not in seen:
            seen.add(id(tensor))
            entries.append(_entry(str(index), tensor, None, ""))
    if not entries:
        raise ValueError("RetraceBuffers: got no tensors; there is nothing to restore")
    return entries


def _entry(name: str, tensor: torch.Tensor, owner: torch.nn.Module | None, local: str) -> _Tracked:
    _check_buffer(name, tensor)
    return _Tracked(name, tensor, owner, local, tensor.data_ptr(), tensor.shape, tensor.dtype)


def _check_buffer(name: str, tensor: torch.Tensor) -> None:
    if isinstance(tensor, torch.nn.Parameter):
        raise TypeError(
            f"RetraceBuffers: {name!r} is a parameter; ELRA's retrace moves parameters itself "
            "(back onto the last accepted step's line), so only buffers belong here"
        )
    if torch.nn.parameter.is_lazy(tensor):
        raise ValueError(
            f"RetraceBuffers: buffer {name!r} is not materialized yet (a lazy module); run "
            "one forward pass before building RetraceBuffers"
        )
    if tensor.layout != torch.strided:
        raise ValueError(
            f"RetraceBuffers: buffer {name!r} has layout {tensor.layout}; only dense "
            "(strided) tensors can be restored"
        )
