"""Checking a state dict against an optimizer before ``ELRA.load_state_dict`` changes anything.

torch's own loader checks little (the number of groups and of parameters per group) and
then commits piece by piece: a state with a wrong-shape G_{t-1} used to fail in the
layout's load *after* the param groups (their ``wd``) and part of the flat store had been
replaced, or (per-parameter layout) to load without error and break every later step;
a NaN alpha or G_{t-1} loaded silently and turned every parameter into NaN one step
later. So loading is a transaction in two parts:

1. :func:`validate_state_dict` checks everything and changes nothing: the top-level
   entries, the param groups (count, parameters per group, keys, ``wd``, torch's
   ``param_names``), every per-parameter entry (only the key of this memory mode, a
   dense floating tensor of exactly the parameter's shape, finite in the parameter's
   dtype), the control state (its shape as
   :func:`~elra_fused.control_runner.upgrade_state` takes it, every entry finite,
   alpha > 0, counters whole and >= 0, flags 0 or 1), the memory mode,
   ``steps_in_cycle`` and the retrace buffers. Any failure is one ``ValueError`` that
   starts with ``ELRA.load_state_dict:`` and names what is wrong (the parameter, by
   :func:`~elra_fused.checks.describe`). A saved control-law config that differs from
   the optimizer's is no error: the optimizer keeps its own (the constructor's) settings,
   and :func:`apply_plan` warns which ones differ.
2. :func:`apply_plan` applies the checked :class:`LoadPlan`. Nothing in it should fail
   any more, but an allocation can (the per-parameter layout copies each G_{t-1}), and so
   can user hooks or an interrupt: it snapshots what it changes first and puts it all
   back on any exception, so nothing is ever half-applied.

The checks run on the dict as it is passed. torch's load pre-hooks (registered on the
optimizer) run inside torch's loader during step 2, so a pre-hook that rewrites the dict
is trusted with what it writes; if torch's loader or a later part then fails, the
snapshot still restores everything.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from . import checks, control
from ._torch_compat import is_dtensor
from .control_runner import upgrade_state
from .layouts import FlatLayout, ListLayout
from .memory import GRAD_PREV_KEY, POINT_MODES, X_PREV_KEY

if TYPE_CHECKING:
    from .optimizer import ELRA

#: The state dict entry of everything ELRA keeps beyond torch's ``state`` and
#: ``param_groups``: the control state, the step within the cycle, the config, ...
STATE_KEY = checks.STATE_KEY
PREFIX = "ELRA.load_state_dict:"
#: Param group keys torch's ``Optimizer`` writes itself: ``param_names`` (torch >= 2.6,
#: for an optimizer built from ``model.named_parameters()``). torch's loader keeps the
#: saved names, or the optimizer's own where the state has none, whichever way the two
#: optimizers were built; ELRA checks them and leaves that rule to torch's loader.
TORCH_GROUP_KEYS = frozenset({"param_names"})

#: Control state entries that count events: whole numbers >= 0.
_COUNTERS = {
    control.ACCEPTED: "ACCEPTED",
    control.RETRACES: "RETRACES",
    control.CYCLE_COUNT: "CYCLE_COUNT",
    control.CYCLE_LAST_COUNT: "CYCLE_LAST_COUNT",
    control.RETRACE_RUN: "RETRACE_RUN",
    control.RESTARTS: "RESTARTS",
}
#: Control state entries that are 0.0 or 1.0.
_FLAGS = {
    control.LAST_RETRACED: "LAST_RETRACED",
    control.CYCLE_CLOSED: "CYCLE_CLOSED",
    control.RESTART_PENDING: "RESTART_PENDING",
    control.DAMPERS_STARTED: "DAMPERS_STARTED",
}
#: Lower bounds every state the law produces keeps: (entry, name, bound, strict).
_BOUNDS = (
    (control.ALPHA, "ALPHA (alpha)", 0.0, True),
    (control.ALPHA_ACCEPTED, "ALPHA_ACCEPTED", 0.0, True),
    (control.GRAD_PREV_SQ, "GRAD_PREV_SQ (||G_{t-1}||^2)", 0.0, False),
    (control.CYCLE_STD, "CYCLE_STD", 0.0, False),
    (control.CYCLE_SCALE, "CYCLE_SCALE", 0.0, True),
    (control.SIGMA_SCALE, "SIGMA_SCALE", 1.0, False),
    (control.GROWTH_DAMPER, "GROWTH_DAMPER (2-D preset)", 0.0, False),
    (control.ERROR_DAMPER, "ERROR_DAMPER (2-D preset)", 0.0, False),
)


def _fail(message: str) -> NoReturn:
    raise ValueError(f"{PREFIX} {message}")


@dataclass(frozen=True)
class LoadPlan:
    """A state dict that passed :func:`validate_state_dict`, in the pieces the optimizer
    applies (see :func:`apply_plan`)."""

    #: What torch's loader takes: ``state`` and ``param_groups`` (no ELRA entry).
    torch_state: dict[str, Any]
    #: The control state in the current layout (float64, ``control.STATE_SIZE`` entries).
    control: torch.Tensor
    steps_in_cycle: int
    #: The retrace buffers' saved values, or None (then the current values are kept).
    buffers: Mapping[str, torch.Tensor] | None
    #: Control-law settings that differ from the saved ones ("name: saved x, here y").
    config_changes: list[str]
    #: 1 / s_{t-1}, the GradScaler scale G_{t-1} carries (:mod:`elra_fused.amp`), or None.
    grad_prev_inv_scale: torch.Tensor | None = None


def validate_state_dict(opt: ELRA, state_dict: Mapping[str, Any]) -> LoadPlan:
    """Check ``state_dict`` against ``opt`` (see the module docstring); change nothing.

    Raises:
        ValueError: the first problem found, starting with ``ELRA.load_state_dict:``.
        RuntimeError: a retrace buffer of ``opt`` was replaced in its module (the live
            model is the problem, not the state dict; see
            :meth:`~elra_fused.buffers.RetraceBuffers.check`).
    """
    if not isinstance(state_dict, Mapping):
        _fail(f"expected the dict ELRA.state_dict() returns, got {type(state_dict).__name__}")
    state_dict = _lift_mirror(state_dict)
    extra = state_dict.get(STATE_KEY)
    if extra is None:
        _fail(
            f"this state dict has no ELRA control state ('{STATE_KEY}'); was it saved by "
            "another optimizer?"
        )
    if not isinstance(extra, Mapping):
        _fail(f"'{STATE_KEY}' must be a dict, got {type(extra).__name__}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            _fail(
                f"the state dict has no '{key}' entry; expected the dict ELRA.state_dict() "
                f"returns ('state', 'param_groups' and '{STATE_KEY}')"
            )
    _check_memory(opt.memory, extra)  # first: the per-parameter keys follow from it
    params = _check_groups(opt.param_groups, state_dict["param_groups"])
    _check_param_states(opt.memory, state_dict["state"], params)
    control_state = _check_control(extra)
    steps_in_cycle = extra.get("steps_in_cycle", 0)
    if isinstance(steps_in_cycle, bool) or not (
        isinstance(steps_in_cycle, int) and steps_in_cycle >= 0
    ):
        _fail(f"steps_in_cycle must be an int >= 0, got {steps_in_cycle!r}")
    config_changes = _config_changes(opt.config.as_dict(), extra.get("config"))
    inv_scale = extra.get("grad_prev_inv_scale")
    if inv_scale is not None and not (
        isinstance(inv_scale, torch.Tensor)
        and inv_scale.numel() == 1
        and inv_scale.is_floating_point()
        and bool(torch.isfinite(inv_scale).all())
        and float(inv_scale) > 0
    ):
        _fail(
            "grad_prev_inv_scale (1 / the GradScaler scale of the kept gradient) must be a "
            f"finite positive 1-element tensor or None, got {inv_scale!r}"
        )
    buffers = None
    if opt.retrace_buffers is None and extra.get("buffers"):
        # The saved BatchNorm statistics of the last accepted step have nowhere to go.
        config_changes = [*config_changes, "retrace buffers saved, none here (buffers=)"]
    if opt.retrace_buffers is not None:
        opt.retrace_buffers.check()  # a replaced buffer: RuntimeError, as in step()
        if extra.get("buffers") is not None:
            try:
                buffers = opt.retrace_buffers.check_state_dict(extra["buffers"])
            except ValueError as exc:
                _fail(f"the saved retrace buffers do not fit: {exc}")
    return LoadPlan(
        torch_state={k: v for k, v in state_dict.items() if k != STATE_KEY},
        control=control_state.to(opt.control_state.device),
        steps_in_cycle=steps_in_cycle,
        buffers=buffers,
        config_changes=config_changes,
        grad_prev_inv_scale=inv_scale,
    )


def _check_memory(memory: str, extra: Mapping[str, Any]) -> None:
    """Recover and offload keep x_{t-1}, standard G_{t-1}: a state moves only between
    the two point modes."""
    saved = extra.get("memory", "standard")
    if not (isinstance(saved, str) and saved in checks.MEMORY_MODES):
        _fail(f"the state names memory={saved!r}; expected one of {checks.MEMORY_MODES}")
    if (saved in POINT_MODES) != (memory in POINT_MODES):
        _fail(
            f"the state was saved with memory={saved!r} (it holds "
            f"{X_PREV_KEY if saved in POINT_MODES else GRAD_PREV_KEY}) but this optimizer "
            f"uses memory={memory!r}; build it with memory={saved!r} (recover and offload "
            "are interchangeable)"
        )


def saved_entry(opt: ELRA) -> dict[str, Any]:
    """What ``ELRA.state_dict()`` saves under :data:`STATE_KEY` beyond torch's ``state``
    and ``param_groups`` -- the entry :func:`validate_state_dict` checks."""
    buffers = opt.retrace_buffers
    return {
        "control": opt._law.state.detach().clone(),
        "steps_in_cycle": opt._steps_in_cycle,
        "config": opt.config.as_dict(),
        "backend": opt.backend,
        "flat": opt.flat,
        "memory": opt.memory,
        "buffers": None if buffers is None else buffers.state_dict(),
        "grad_prev_inv_scale": opt._amp.state_dict(),
    }


def keep_group_slot(param_groups: list[dict[str, Any]]) -> None:
    """Give the first live param group a :data:`STATE_KEY` entry (a placeholder; the
    state dicts ``ELRA.state_dict()`` returns hold the real entry there).

    ``torch.distributed.checkpoint`` with ``flatten_optimizer_state_dict=True``
    (torchtitan's setting) writes every group key per parameter on save, but on load
    rebuilds each group from the keys of the *live* optimizer's groups only: without
    this slot the control state would be dropped on the way in. Called at construction
    and after every load (torch's loader replaces the groups by the saved ones)."""
    param_groups[0].setdefault(STATE_KEY, GROUP_SLOT)


#: What the live first group holds under :data:`STATE_KEY` (see :func:`keep_group_slot`).
GROUP_SLOT = "ELRA's control state: filled in by state_dict()"


def _lift_mirror(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict with the ELRA entry at the top only.

    ``ELRA.state_dict()`` mirrors its entry into the first param group, because
    ``torch.distributed.checkpoint`` (``get_optimizer_state_dict``) keeps only ``state``
    and ``param_groups``; a state that went through it has the entry there alone. A
    group entry that is still the live placeholder (:data:`GROUP_SLOT`: saved by torch's
    own ``Optimizer.state_dict``) is no entry."""
    groups = state_dict.get("param_groups")
    if not (
        isinstance(groups, (list, tuple))
        and groups
        and isinstance(groups[0], Mapping)
        and STATE_KEY in groups[0]
    ):
        return state_dict
    first = {k: v for k, v in groups[0].items() if k != STATE_KEY}
    lifted = {**state_dict, "param_groups": [first, *groups[1:]]}
    if not isinstance(groups[0][STATE_KEY], str):
        lifted.setdefault(STATE_KEY, groups[0][STATE_KEY])
    return lifted


def _check_groups(
    groups: list[dict[str, Any]], saved_groups: Any
) -> dict[int, tuple[str, torch.Tensor]]:
    """The saved groups match the optimizer's; returns each saved parameter id's
    parameter, with its name for messages (torch maps ids to parameters by position)."""
    if not isinstance(saved_groups, (list, tuple)) or not all(
        isinstance(group, Mapping) for group in saved_groups
    ):
        _fail("'param_groups' must be a list of dicts, as ELRA.state_dict() saves it")
    if len(saved_groups) != len(groups):
        _fail(
            f"the state has {len(saved_groups)} param group(s), this optimizer "
            f"{len(groups)}; build the optimizer with the groups the state was saved with"
        )
    params: dict[int, tuple[str, torch.Tensor]] = {}
    for group_index, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
        where = f"param group {group_index} of the state"
        # A key the live group has too was put there by this training setup (a scheduler
        # of the user's own, say): torch keeps such keys, and so does ELRA.
        unknown = set(saved) - checks.PER_GROUP_KEYS - TORCH_GROUP_KEYS - set(group)
        if unknown:
            _fail(
                f"{where} has keys {sorted(unknown, key=str)}, which ELRA does not use (per "
                f"group only {sorted(checks.PER_GROUP_KEYS - {'params'})}); was the state "
                "saved by another optimizer?"
            )
        ids = saved.get("params")
        # int ids (Optimizer.state_dict) or names (torch.distributed.checkpoint's FQNs)
        if not isinstance(ids, (list, tuple)) or not all(
            (isinstance(i, int) and not isinstance(i, bool)) or isinstance(i, str) for i in ids
        ):
            _fail(f"{where} must list its parameters as int ids or names, got {ids!r}")
        if len(ids) != len(group["params"]):
            _fail(
                f"{where} has {len(ids)} parameter(s), this optimizer's "
                f"{len(group['params'])}; the state belongs to another model or grouping"
            )
        if "param_names" in saved:
            _check_param_names(where, saved["param_names"], len(ids))
        if "wd" not in saved:
            _fail(f"{where} has no 'wd'")
        try:  # the values add_param_group accepts (wd in (0, 1], ...)
            known = checks.PER_GROUP_KEYS - {"params"}
            checks.check_group_keys({k: v for k, v in saved.items() if k in known})
        except ValueError as exc:
            _fail(f"{where}: {str(exc).removeprefix('ELRA: ')}")
        for param_index, (param_id, param) in enumerate(zip(ids, group["params"], strict=True)):
            if param_id in params:
                _fail(f"parameter id {param_id} is listed twice in 'param_groups'")
            params[param_id] = (checks.describe(group_index, param_index, param), param)
    return params


def _check_param_names(where: str, names: Any, count: int) -> None:
    """torch's ``param_names``: one name (a str) per parameter of the group. torch's
    loader keeps them as they are, and a list of another length would name the wrong
    parameters from then on (and in every state dict saved later)."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        _fail(f"{where}: 'param_names' must be a list of str (torch's names), got {names!r}")
    if len(names) != count:
        _fail(
            f"{where} names {len(names)} parameter(s) in 'param_names' but lists {count}; "
            "the names do not belong to this group's parameters"
        )


def _check_param_states(
    memory: str, saved_state: Any, params: dict[int, tuple[str, torch.Tensor]]
) -> None:
    """Each saved per-parameter entry holds only what this memory mode keeps, as a tensor
    torch's loader can cast to the parameter without changing its meaning."""
    if not isinstance(saved_state, Mapping):
        _fail(f"'state' must be a dict, got {type(saved_state).__name__}")
    key = X_PREV_KEY if memory in POINT_MODES else GRAD_PREV_KEY
    for param_id, entry in saved_state.items():
        if param_id not in params:
            _fail(f"'state' has an entry for parameter id {param_id!r}, which no group lists")
        name, param = params[param_id]
        if not isinstance(entry, Mapping):
            _fail(f"the state of {name} must be a dict, got {type(entry).__name__}")
        unknown = set(entry) - {key}
        if unknown:
            _fail(
                f"the state of {name} holds {sorted(unknown, key=str)}; with "
                f"memory={memory!r} ELRA keeps only '{key}' (was it saved by another "
                "optimizer or memory mode?)"
            )
        if key in entry:
            _check_tensor(f"the saved {key} of {name}", entry[key], param)


def _check_tensor(what: str, value: Any, param: torch.Tensor) -> None:
    """A dense, finite floating tensor of exactly ``param``'s shape. Exactly: a transposed
    or broadcastable one would load (torch casts only dtype and device) and be wrong."""
    _check_dense(what, value)
    if not value.is_floating_point():
        _fail(f"{what} has dtype {value.dtype}; expected a floating dtype")
    if is_dtensor(param) and not is_dtensor(value):
        _fail(
            f"{what} is a plain tensor but the parameter is sharded (a DTensor); load a "
            "sharded optimizer's state with torch.distributed.checkpoint "
            "(set_optimizer_state_dict), which shards it like the parameter"
        )
    if value.shape != param.shape:
        _fail(
            f"{what} has shape {tuple(value.shape)}; expected exactly the parameter's "
            f"shape {tuple(param.shape)}"
        )
    if not bool(torch.isfinite(value).all()):
        _fail(f"{what} holds NaN or inf values; the state is corrupt")
    # torch's loader casts it to the parameter's dtype: it must stay finite there.
    if value.dtype != param.dtype and not bool(torch.isfinite(value.to(param.dtype)).all()):
        _fail(f"{what} ({value.dtype}) overflows {param.dtype}, the parameter's dtype")


def _check_dense(what: str, value: Any) -> None:
    if not isinstance(value, torch.Tensor):
        _fail(f"{what} must be a tensor, got {type(value).__name__}")
    if value.layout != torch.strided or value.is_meta:
        _fail(f"{what} must be a dense tensor with data, got {value.layout} on {value.device}")


def _check_control(extra: Mapping[str, Any]) -> torch.Tensor:
    """The control state in the current layout, with every invariant the law keeps."""
    if "control" not in extra:
        _fail(f"'{STATE_KEY}' has no 'control' state")
    saved = extra["control"]
    if not isinstance(saved, torch.Tensor):
        _fail(
            "the control state must be a tensor; the state dict is corrupt or from an "
            "incompatible version"
        )
    _check_dense("the control state", saved)
    if not saved.is_floating_point():
        _fail(f"the control state has dtype {saved.dtype}; expected float64")
    state = upgrade_state(saved)  # a legacy 14-entry state gains the guards' entries
    values = state.tolist()
    for index, value in enumerate(values):
        if not math.isfinite(value):
            _fail(f"control state entry {index} is {value}; every entry must be finite")
    for index, name, bound, strict in _BOUNDS:
        if values[index] < bound or (strict and values[index] == bound):
            _fail(
                f"control state entry {name} is {values[index]}; expected "
                f"{'>' if strict else '>='} {bound}"
            )
    for index, name in _COUNTERS.items():
        if values[index] < 0 or values[index] != int(values[index]):
            _fail(f"control state counter {name} is {values[index]}; expected a whole number >= 0")
    for index, name in _FLAGS.items():
        if values[index] not in (0.0, 1.0):
            _fail(f"control state flag {name} is {values[index]}; expected 0 or 1")
    return state


def _config_changes(current: dict[str, Any], saved: Any) -> list[str]:
    """The control-law settings that differ between the saved config and ``current``.

    Not an error: resuming with other settings (a larger ``max_retraces``, a new
    ``alpha_max``) is legitimate, and the loaded state is valid under any of them. The
    optimizer keeps its own; :func:`apply_plan` warns which ones differ."""
    if saved is None:
        return []
    if not isinstance(saved, Mapping):
        _fail(f"the saved config must be a dict, got {type(saved).__name__}")
    changes = []
    for name in sorted(set(saved) | set(current), key=str):
        value = saved.get(name, "<absent>")
        if isinstance(value, bool) or not isinstance(value, (int, float, str, type(None))):
            _fail(f"the saved config entry {name!r} must be a plain value, got {value!r}")
        here = current.get(name, "<absent>")
        if value != here:
            changes.append(f"{name}: saved {value!r}, here {here!r}")
    return changes


class _Snapshot:
    """What :func:`apply_plan` changes, as it was: references to the objects it replaces
    and copies of the values it overwrites in place (the control state, the flat
    previous-step stores, the remembered retrace buffers).

    The copy of a flat store costs one store's memory for the duration of the load (as
    much as the loaded tensors themselves); it is what makes a failure after the store
    was written (an interrupt, a user hook) bit-exact to undo.
    """

    def __init__(self, opt: ELRA) -> None:
        layout = opt.layout
        layout.synchronize()  # offload: copies to the host may be in flight
        self.param_groups = opt.param_groups
        self.state = opt.state
        self.control = opt._law.state.clone()
        self.steps_in_cycle = opt._steps_in_cycle
        self.amp = opt._amp.state_dict()
        self.prev_versions = dict(layout.prev_versions) if isinstance(layout, ListLayout) else {}
        self.retired = list(layout.retired) if isinstance(layout, ListLayout) else []
        stores = layout.stores if isinstance(layout, FlatLayout) else []
        self.stores = [
            (store, store.tensor.clone(), getattr(store, "param_states", None)) for store in stores
        ]
        buffers = opt.retrace_buffers
        self.buffers = None if buffers is None else buffers.state_dict()

    def restore(self, opt: ELRA) -> None:
        opt.param_groups = self.param_groups
        opt.state = self.state
        opt._law.state.copy_(self.control)
        opt._steps_in_cycle = self.steps_in_cycle
        opt._amp.load_state_dict(self.amp, opt.control_state.device)
        layout = opt.layout
        if isinstance(layout, ListLayout):
            layout.prev_versions.clear()
            layout.prev_versions.update(self.prev_versions)
            layout.retired[:] = self.retired
        for store, values, param_states in self.stores:
            store.synchronize()
            store.tensor.copy_(values)
            if param_states is not None:  # SwapGradPrevStore: re-pointed by the load
                store.param_states = param_states
        if self.buffers is not None:
            opt.retrace_buffers.load_state_dict(self.buffers)


def apply_plan(opt: ELRA, plan: LoadPlan, torch_load: Callable[[dict[str, Any]], None]) -> None:
    """Load a checked plan into ``opt``: torch's part (``torch_load``: the optimizer's
    ``super().load_state_dict``, which replaces ``state`` and ``param_groups``), the
    layout's stores, the control state, the retrace buffers, the step within the cycle.
    On any exception everything is put back as it was, then the exception propagates."""
    snapshot = _Snapshot(opt)
    try:
        torch_load(plan.torch_state)
        keep_group_slot(opt.param_groups)  # torch's loader put the saved groups in place
        opt._decay.sync(opt.param_groups, strict=False)  # new group dicts: seen as loaded
        opt.layout.load_state(opt.state, opt.param_groups)
        opt._law.load(plan.control)
        if opt.retrace_buffers is not None:
            if plan.buffers is None:  # the model's loaded buffers are the accepted state
                opt.retrace_buffers.remember()
            else:
                opt.retrace_buffers.load_state_dict({"buffers": plan.buffers})
        opt._steps_in_cycle = plan.steps_in_cycle
        opt._amp.load_state_dict(plan.grad_prev_inv_scale, opt.control_state.device)
    except BaseException:
        snapshot.restore(opt)
        raise
    if plan.config_changes:
        warnings.warn(
            f"{PREFIX} the state was saved with other control-law settings "
            f"({'; '.join(plan.config_changes)}); this optimizer keeps its own (the "
            "constructor's) and continues the loaded state under them",
            stacklevel=3,  # the user's opt.load_state_dict call
        )
