"""Every check of a user's argument, parameter, gradient or loss, and the errors it raises.

Each check changes nothing: it runs before anything is applied, so a rejected call leaves
the optimizer and the model as they were. Messages name the parameter
(:func:`describe`) and say how to fix the call. The kernels' own argument checks live
with their schemas in :mod:`elra_fused.ops`; the control law's constants are checked by
:class:`elra_fused.control.ControlConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

#: Keys torch's LR schedulers write into param groups (every scheduler ``initial_lr``,
#: OneCycleLR ``max_lr`` / ``min_lr``, SWALR ``swa_lr``): ELRA keeps them, as torch's
#: optimizers do, so that its state dict round-trips with any of them, and uses none.
SCHEDULER_GROUP_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "swa_lr"})
#: Keys a param group may have. alpha is global (paper section 3.1), so per group only:
#: ``wd`` (or torch's ``weight_decay``, mapped to wd = 1 - weight_decay), ``lr`` (scales
#: the step: lr * alpha), a ``name``, and the schedulers' bookkeeping.
PER_GROUP_KEYS = frozenset({"params", "wd", "weight_decay", "lr", "name"}) | SCHEDULER_GROUP_KEYS
#: What is kept from the previous step (paper section 3.6; :mod:`elra_fused.memory`).
MEMORY_MODES = ("standard", "recover", "offload")


class ParameterMovedError(RuntimeError):
    """A parameter no longer lives in the flat buffer the optimizer updates."""


def describe(group_index: int, param_index: int, param: torch.Tensor) -> str:
    """How error messages name a parameter."""
    return f"parameter {param_index} of param group {group_index} (shape {tuple(param.shape)})"


# ------------------------------------------------------------------ constructor arguments
def check_wd(wd: Any) -> None:
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not 0.0 < wd <= 1.0:
        raise ValueError(
            f"ELRA: wd is the paper's multiplicative weight decay x <- wd * x and must lie "
            f"in (0, 1] (1.0 = off, e.g. 0.9997), got {wd!r}"
        )


def check_cycle_steps(cycle_steps: Any) -> None:
    if cycle_steps is not None and (
        isinstance(cycle_steps, bool) or not (isinstance(cycle_steps, int) and cycle_steps > 0)
    ):
        raise ValueError(f"ELRA: cycle_steps must be a positive int or None, got {cycle_steps!r}")


def check_backend_name(backend: str, known: Iterable[str]) -> None:
    if backend != "auto" and backend not in known:
        raise ValueError(
            f"ELRA: unknown backend {backend!r}; choose 'auto' or one of {tuple(known)}"
        )


def check_memory(
    memory: str,
    state_dtype: Any,
    flat: bool | None,
    reuse_grad_buffer: bool,
    offload_chunk: Any = None,
) -> None:
    """The memory mode and what goes with it (``flat=None``: not chosen yet), all before
    anything is built. The flags must be bools: ``reuse_grad_buffer="no"`` would
    otherwise switch reuse on."""
    if offload_chunk is not None:
        check_offload_chunk(offload_chunk)
    check_flag("flat", flat, allow_none=True)
    check_flag("reuse_grad_buffer", reuse_grad_buffer)
    if memory not in MEMORY_MODES:
        raise ValueError(f"ELRA: memory must be one of {MEMORY_MODES}, got {memory!r}")
    if state_dtype is not None and memory != "standard":
        raise ValueError(
            f"ELRA: state_dtype applies to memory='standard' (a stored G_{{t-1}}); "
            f"memory={memory!r} stores x_{{t-1}} in the parameters' dtype"
        )
    if state_dtype is not None and not (
        isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point
    ):
        raise ValueError(f"ELRA: state_dtype must be a floating dtype, got {state_dtype!r}")
    if flat is False and memory != "standard":
        raise ValueError(f"ELRA: memory={memory!r} needs flat buffers (flat=True)")
    if reuse_grad_buffer and (flat is False or memory != "standard"):
        raise ValueError(
            "ELRA: reuse_grad_buffer swaps the flat gradient and G_{t-1} buffers: it "
            "needs flat=True and memory='standard'"
        )


def check_flag(name: str, value: Any, allow_none: bool = False) -> bool | None:
    """A bool option (or None where it means "choose for me"): a truthy string or an int
    is not a flag (``"no"`` would switch it on). Returns the value."""
    if not (isinstance(value, bool) or (allow_none and value is None)):
        raise TypeError(
            f"ELRA: {name} must be True or False{' or None' if allow_none else ''}, got {value!r}"
        )
    return value


def check_offload_chunk(chunk: Any) -> None:
    """``memory="offload"``'s staging chunk: a positive number of elements."""
    if isinstance(chunk, bool) or not (isinstance(chunk, int) and chunk > 0):
        raise ValueError(f"ELRA: offload_chunk must be a positive int, got {chunk!r}")


def check_process_group(process_group: Any) -> None:
    """A ProcessGroup or None."""
    if process_group is not None and not (
        dist.is_available() and isinstance(process_group, dist.ProcessGroup)
    ):
        raise TypeError(
            "ELRA: process_group must be a torch.distributed ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}"
        )


def warn_without_process_group() -> None:
    """Warn when distributed training runs with plain (replicated) parameters and no
    process group (sharded parameters bring their own)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        warnings.warn(
            f"ELRA: torch.distributed is initialized with {dist.get_world_size()} ranks but "
            "no process_group was given. If this optimizer steps a data-parallel replica "
            "(DDP), pass process_group=torch.distributed.group.WORLD (or DDP's group): "
            "otherwise each rank decides accept / retrace on its own loss and the replicas "
            "drift apart. Ignore this if you pass a loss that is already averaged over "
            "the ranks.",
            stacklevel=4,  # warn_without_process_group <- loss_group <- ELRA() <- user
        )


#: The first param group's slot for ELRA's control state (``loading.keep_group_slot``):
#: groups taken from another ELRA (``ELRA(opt.param_groups)``) carry it, and drop it.
STATE_KEY = "elra_control"


def check_group_keys(param_group: dict[str, Any]) -> None:
    unknown = set(param_group) - PER_GROUP_KEYS - {STATE_KEY}
    if unknown:
        raise ValueError(
            f"ELRA: param group keys {sorted(unknown)} are not supported; a group may set "
            "'wd' (or torch's 'weight_decay') and 'lr' (alpha is global and adapts by "
            "itself, paper section 3.1; lr scales the step it takes)"
        )
    if "wd" in param_group:
        check_wd(param_group["wd"])
    if "weight_decay" in param_group:
        check_weight_decay(param_group["weight_decay"])
        if "wd" in param_group and not decays_agree(param_group["wd"], param_group["weight_decay"]):
            raise ValueError(
                f"ELRA: a param group gives wd={param_group['wd']!r} and weight_decay="
                f"{param_group['weight_decay']!r}; they are one setting (wd = 1 - "
                "weight_decay): give one"
            )
    if "lr" in param_group:
        check_lr(param_group["lr"])


def check_weight_decay(weight_decay: Any) -> None:
    """torch's decoupled weight decay, as ELRA's multiplicative wd = 1 - weight_decay."""
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not 0.0 <= weight_decay < 1.0
    ):
        raise ValueError(
            "ELRA: weight_decay (torch's name for the decay per step, ELRA's wd = 1 - "
            f"weight_decay) must lie in [0, 1), e.g. 3e-4, got {weight_decay!r}"
        )


def grad_norm_for_state(config: Any, state_dtype: torch.dtype | None) -> Any:
    """``config`` (a ControlConfig) with ``max_grad_norm`` at most the largest finite
    value of a compact ``state_dtype``: a G_{t-1} rounded to inf there could never be
    stepped back along."""
    if state_dtype is None or state_dtype == torch.float64:
        return config  # a float64 G_{t-1} holds any fp64 norm (and limit**2 would overflow)
    limit = torch.finfo(state_dtype).max * (1 - torch.finfo(state_dtype).eps)
    return dataclasses.replace(config, max_grad_norm=min(config.max_grad_norm or limit, limit))


def resolve_wd(wd: Any, weight_decay: Any) -> Any:
    """The constructor's ``wd``, or ``1 - weight_decay`` when torch's name is given."""
    if weight_decay is None:
        return wd
    check_weight_decay(weight_decay)
    if wd != 1.0:
        raise ValueError("ELRA: give wd or weight_decay (wd = 1 - weight_decay)")
    return 1.0 - weight_decay


def check_lr(lr: Any) -> None:
    """lr scales the step ELRA takes (lr * alpha); a scheduler may take it to 0.

    A tensor lr (what some schedulers keep) is checked by value where that is free: on
    the CPU. Reading a GPU tensor would sync with the device every step; there the device
    law takes a non-finite or negative lr as 0, no step
    (``ControlRunner._lr_tensor``)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point() or lr.is_complex():
            raise ValueError(f"ELRA: lr must be a number or a 1-element float tensor, got {lr!r}")
        if lr.device.type != "cpu":
            return
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 <= lr < math.inf:
        raise ValueError(
            "ELRA: lr scales the step alpha * lr that ELRA takes (1.0: the paper's step; "
            f"schedulers anneal it) and must be a finite number >= 0, got {lr!r}"
        )


class DecaySync:
    """ELRA's ``wd`` and torch's ``weight_decay`` (``wd = 1 - weight_decay``) in a param
    group that has both, kept one setting while either is edited between steps.

    A weight-decay schedule (timm, DINO) writes ``weight_decay``; ELRA's own API writes
    ``wd``. Each :meth:`sync` takes the one that changed since the last sync it saw for
    that group and writes the other to match, so a step decays by what was asked and the
    group -- and the state dict saved from it -- never holds two decays. Both changed
    apart is an error. The optimizer syncs without checking (``strict=False``) after a
    load and after ``add_param_group``, whose group dicts are new: they are then seen
    as loaded or added.
    """

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        #: Per group index: (the group dict, wd, weight_decay) at the last sync.
        self.seen: list[tuple[dict[str, Any], Any, Any]] = []
        self.sync(param_groups)

    def sync(self, param_groups: list[dict[str, Any]], strict: bool = True) -> None:
        """Reconcile the two keys of every group and check each decay (a step: before
        anything moves). ``strict=False`` (``state_dict``): reconcile what can be, raise
        nothing -- saving never fails; loading checks what was saved. Every group is
        checked before any is written: a refused decay leaves all groups as they were."""
        writes: list[tuple[dict[str, Any], str, float]] = []
        for index, group in enumerate(param_groups):
            wd = group["wd"]
            if "weight_decay" in group:
                weight_decay = group["weight_decay"]
                last = self.seen[index] if index < len(self.seen) else None
                known = last is not None and last[0] is group
                wd_kept = known and _unchanged(wd, last[1])
                decay_kept = known and _unchanged(weight_decay, last[2])
                try:
                    if decays_agree(wd, weight_decay):
                        pass
                    elif wd_kept and not decay_kept:
                        check_weight_decay(weight_decay)
                        wd = 1.0 - weight_decay
                        writes.append((group, "wd", wd))
                    elif decay_kept:
                        _check_group_wd(index, wd)
                        writes.append((group, "weight_decay", 1.0 - wd))
                    else:
                        check_group_keys({"wd": wd, "weight_decay": weight_decay})
                except ValueError:
                    if strict:
                        raise
            if strict:
                _check_group_wd(index, wd)
        for group, key, value in writes:
            group[key] = value
        self.seen = [(group, group["wd"], group.get("weight_decay")) for group in param_groups]


def _check_group_wd(index: int, wd: Any) -> None:
    """:func:`check_wd` with the group named (a value written into a group after
    construction, by the user or a schedule)."""
    try:
        check_wd(wd)
    except ValueError as exc:
        raise ValueError(f"{exc} (param group {index})") from None


def _unchanged(value: Any, before: Any) -> bool:
    """``value`` is what a setting held before (the same object, or an equal number)."""
    return value is before or (
        isinstance(value, _NUMBERS) and isinstance(before, _NUMBERS) and value == before
    )


def decays_agree(wd: Any, weight_decay: Any) -> bool:
    """Do ``wd`` and ``weight_decay`` say the same, ``wd = 1 - weight_decay``? Up to the
    rounding of that subtraction (``1 - (1 - 0.3)`` is not 0.3 in floats): a pair one was
    computed from, or typed as decimals, agrees."""
    return (
        isinstance(wd, _NUMBERS)
        and isinstance(weight_decay, _NUMBERS)
        and abs(wd - (1.0 - weight_decay)) <= DECAY_AGREEMENT
    )


#: How far ``wd`` and ``1 - weight_decay`` may differ and still be one setting: a few
#: float64 roundings of numbers <= 1 (decays that far apart are the same to any step).
DECAY_AGREEMENT = 1e-12


#: The Python numbers a group setting holds (a tensor or a str is never "the same").
_NUMBERS = (int, float)


def step_settings(param_groups: list[dict[str, Any]], decay: DecaySync) -> float | torch.Tensor:
    """Every group's settings as a step takes them, checked before anything moves: each
    ``wd`` (:class:`DecaySync`: a schedule may write ``weight_decay``) and the one lr
    (:func:`step_lr`). Returns the lr."""
    decay.sync(param_groups)
    return step_lr(param_groups)


def step_lr(param_groups: list[dict[str, Any]]) -> float | torch.Tensor:
    """The one lr of every param group (the law's step is global): a scheduler keeps
    them equal when they start equal."""
    lr = param_groups[0]["lr"]
    for index, group in enumerate(param_groups):
        other = group["lr"]
        if other is not lr and not (
            not isinstance(other, torch.Tensor) and not isinstance(lr, torch.Tensor) and other == lr
        ):
            raise ValueError(
                f"ELRA: param group {index} has lr={other!r}, group 0 lr={lr!r}; ELRA's step "
                "alpha * lr is one global step (the law measures it along the whole "
                "gradient), so every group needs the same lr. Scale groups with wd instead."
            )
    check_lr(lr)
    return lr


def group_param_list(param_group: dict[str, Any], group_index: int) -> dict[str, Any]:
    """``param_group`` with its parameters as a list (a generator is read once), after
    checking that no tensor is listed twice: torch only warns, and a twice-listed tensor
    would be stepped twice per step (or alias itself in a flat buffer). torch's
    ``weight_decay`` becomes ``wd = 1 - weight_decay`` (the key stays)."""
    if STATE_KEY in param_group:  # another ELRA's group: its slot is not a setting
        param_group = {k: v for k, v in param_group.items() if k != STATE_KEY}
    if "weight_decay" in param_group and "wd" not in param_group:
        param_group = {**param_group, "wd": 1.0 - param_group["weight_decay"]}
    params = param_group.get("params")
    if isinstance(params, (torch.Tensor, set)) or params is None:
        return param_group  # torch's own checks give the error (or wrap the tensor)
    params = list(params)
    seen: dict[int, int] = {}
    for index, param in enumerate(params):
        first = seen.setdefault(id(param), index)
        if first != index:
            raise ValueError(
                f"ELRA: {describe(group_index, index, param)} is the same tensor as "
                f"parameter {first} of the group; list each parameter once (tied weights "
                "are one parameter: model.parameters() lists them once)"
            )
    return {**param_group, "params": params}


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s elements fill a block of ``numel`` storage slots exactly once
    (contiguous, channels_last, or any other permutation of the dimensions): then the
    block, read as one vector, holds every element once, and elementwise kernels can run
    over it when the other operands have the same strides."""
    expected = 1
    for stride, size in sorted(zip(tensor.stride(), tensor.shape, strict=True)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


# ------------------------------------------------------------------ parameters
def check_param(name: str, param: torch.Tensor) -> None:
    """What ELRA needs of every parameter, whatever the backend and layout."""
    if param.is_complex():
        raise ValueError(
            f"ELRA: {name} is complex; ELRA supports real floating-point parameters only"
        )
    if param.dtype not in PARAM_DTYPES:
        raise ValueError(
            f"ELRA: {name} has dtype {param.dtype}; ELRA steps float32, bfloat16 and "
            "float16 parameters (float64 with backend='reference')"
        )


#: The parameter dtypes some backend steps (float8 and integers none does).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_new_group(param_groups: list[dict[str, Any]]) -> None:
    """The group just added (the last one): each parameter (:func:`check_param`) and its
    lr, which must be group 0's (ELRA's step is global; :func:`step_lr` would refuse it at
    every step)."""
    group_index = len(param_groups) - 1
    for param_index, param in enumerate(param_groups[-1]["params"]):
        check_param(describe(group_index, param_index, param), param)
    step_lr(param_groups)


def check_group_params(
    params: list[torch.Tensor],
    group_index: int,
    *,
    backend: str,
    supported_dtypes: tuple[torch.dtype, ...],
    device: torch.device,
    flat: bool,
) -> None:
    """What the backend and the layout need of each parameter of a group."""
    for param_index, param in enumerate(params):
        name = describe(group_index, param_index, param)
        if backend != "reference" and param.dtype not in supported_dtypes:
            raise ValueError(
                f"ELRA: {name} has dtype {param.dtype}, which backend {backend!r} does not "
                "support (float32, bfloat16, float16); use backend='reference' for float64"
            )
        if (flat or backend != "reference") and param.device != device:
            raise ValueError(
                f"ELRA: {name} is on {param.device}, the optimizer's parameters on {device}"
            )
        if not flat and param.requires_grad and not is_dense(param):
            raise not_dense(name, param)


def check_state_dtype(
    group_index: int, params: list[torch.Tensor], state_dtype: torch.dtype | None
) -> None:
    """G_{t-1} is kept in each parameter's dtype (``state_dtype=None``) or compact in
    bfloat16: the kernels read it in one of those (fp32 state for bf16 parameters, or
    fp16 state for fp32 ones, they do not take). A ``state_dtype`` equal to a
    parameter's own dtype is the default for it. Frozen parameters too: one unfrozen later
    joins with a G_{t-1} in ``state_dtype``."""
    if state_dtype is None or state_dtype == torch.bfloat16:
        return
    for param_index, param in enumerate(params):
        if param.dtype != state_dtype:
            name = describe(group_index, param_index, param)
            raise ValueError(
                f"ELRA: state_dtype={state_dtype} cannot hold G_{{t-1}} of {name} "
                f"({param.dtype}): G_{{t-1}} is kept in the parameter's dtype "
                "(state_dtype=None) or compact in torch.bfloat16"
            )


def not_dense(name: str, param: torch.Tensor) -> ValueError:
    """The per-parameter layout steps each parameter in place through its storage block,
    which must hold its elements exactly once."""
    return ValueError(
        f"ELRA: {name} is a view with gaps or overlaps (shape {tuple(param.shape)}, strides "
        f"{param.stride()}); flat=False updates each parameter in place through its "
        "storage: give it its own tensor (p.data = p.data.clone()) or use flat=True"
    )


# ------------------------------------------------------------------ gradients
def check_grad(name: str, param: torch.Tensor, grad: torch.Tensor) -> None:
    """Reject gradients ELRA cannot use in any layout, naming the parameter; changes
    nothing: another layout than strided (sparse COO, CSR, ...), complex, another shape,
    another device."""
    if grad.is_sparse:
        raise ValueError(f"ELRA: {name} has a sparse gradient; ELRA needs dense gradients")
    if grad.layout != torch.strided:
        raise ValueError(f"ELRA: {name} has a {grad.layout} gradient; ELRA needs dense gradients")
    if grad.is_complex():
        raise ValueError(f"ELRA: {name} has a complex gradient; ELRA supports real parameters only")
    if grad.shape != param.shape:
        raise ValueError(f"ELRA: {name} has a gradient of shape {tuple(grad.shape)}")
    if grad.device != param.device:
        raise ValueError(f"ELRA: {name} is on {param.device} but its gradient on {grad.device}")


def reject_list_grad(name: str, param: torch.Tensor, backend: str) -> None:
    """Raise the error that fits a gradient the per-parameter layout cannot take."""
    check_grad(name, param, param.grad)  # layout, complex, shape, device
    raise ValueError(
        f"ELRA: {name} now has dtype {param.dtype}, which backend {backend!r} does "
        "not support (float32, bfloat16, float16)"
    )


def param_reshaped(name: str, param: torch.Tensor, grad_prev: torch.Tensor) -> ValueError:
    """The error for a parameter whose element count changed since its G_{t-1} was kept."""
    return ValueError(
        f"ELRA: {name} has {param.numel()} elements (shape {tuple(param.shape)}) but its "
        f"G_{{t-1}} has {grad_prev.numel()}: the parameter was replaced by one of another "
        "size (param.data = ...) after the optimizer was built; nothing was changed. Build "
        "the optimizer after changing the model (or load a state saved for this shape)."
    )


def grad_prev_changed(name: str) -> RuntimeError:
    """The error for a G_{t-1} kept by reference that was changed in place."""
    return RuntimeError(
        f"ELRA: the gradient of {name} from the previous step was modified in place after "
        "that step (e.g. zero_grad(set_to_none=False) from the model or another optimizer, "
        "or a backward() without zero_grad() in between). With flat=False ELRA keeps that "
        "tensor as G_{t-1}, so it is lost; nothing was changed. Call opt.zero_grad() (or "
        "model.zero_grad()) between steps, or build ELRA with flat=True, which keeps its own "
        "copy."
    )


# ------------------------------------------------------------------ loss
def check_loss(loss: Any, caller: str = "ELRA.step") -> None:
    """A real scalar tensor or a number (a closure has been called already)."""
    if loss is None:
        raise TypeError(
            "ELRA.step needs the loss: call opt.step(loss) after loss.backward(), "
            "opt.step(closure) with a closure that returns the loss, or record each "
            "micro-batch's loss with opt.record_loss(loss) before opt.step()"
        )
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ValueError(
                f"{caller}: the loss must be a scalar (one element), got shape "
                f"{tuple(loss.shape)}; reduce it (e.g. .mean()) first"
            )
        if loss.is_complex():
            raise TypeError(f"{caller}: the loss must be real, got a complex tensor")
        if loss.dtype == torch.bool:
            raise TypeError(f"{caller}: the loss must be a number, got a bool tensor")
        if loss.is_meta or loss.is_sparse:
            raise TypeError(
                f"{caller}: the loss must hold its value (a dense tensor), got a "
                f"{'meta' if loss.is_meta else 'sparse'} tensor"
            )
    elif isinstance(loss, bool) or not isinstance(loss, numbers.Real):  # numpy floats too
        raise TypeError(
            f"{caller}: the loss must be a 0-d tensor, a number or a closure, "
            f"got {type(loss).__name__}"
        )
