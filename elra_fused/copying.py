"""``copy.deepcopy`` and pickling of an ELRA optimizer: the copy trains on.

Trainers, EMA / SWA helpers and in-memory checkpoints deep-copy optimizers, and users
``torch.save`` whole optimizer objects. torch's ``Optimizer.__getstate__`` keeps only
``defaults``, ``state`` and ``param_groups``: enough to rebuild Adam, but an ELRA also
holds its layout (flat buffers whose views the parameters are, or tensor lists with
G_{t-1}), its control law, the losses recorded for the next step and more, so a copy made
that way fails at its first ``step``. A copy is therefore *rebuilt*
(:func:`rebuild_optimizer`):

1. a fresh optimizer of the same class on the copied param groups, with the constructor
   arguments the original got (recorded by :meth:`CopyableOptimizer.__new__`) and the
   layout it chose; flat layouts build their own buffers over the copied parameters;
2. ``load_state_dict`` of the original's state dict, which holds G_{t-1} or x_{t-1}, the
   control state, the step within the cycle, the GradScaler scale of G_{t-1} and the
   remembered retrace buffers -- through the checked loader, like any checkpoint;
3. what a step needs beyond the state dict: the losses recorded with ``record_loss`` and
   not yet stepped, and the control law's runtime switches (``host_control``,
   ``compile_control`` where the device type is the same, the restart warning given).

A deep copy copies everything it takes through the ``memo``, so within one call
(``copy.deepcopy((model, opt))``) the copy steps the copied model's parameters and a
``buffers=model`` copy restores the copied model's BatchNorm statistics, not the
original's. Pickling sends the same recipe, so parameters pickled alongside (the model
in the same ``torch.save``) are the ones the unpickled optimizer steps.

What is not copied, as torch's optimizers do not copy it either: hooks registered on the
optimizer (step, state-dict and load hooks are closures over the original) and an LR
scheduler's step wrapper. Gradients follow torch's rules (``Parameter`` deep copies have
none). A ``process_group`` belongs to the running process: a deep copy shares the same
group, and pickling refuses with a ``TypeError`` (save ``state_dict()`` instead).
A shallow ``copy.copy`` is refused: two optimizers would step the same parameters (a flat
layout would even move them out of the original's buffers).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from . import checks
from .buffers import RetraceBuffers

if TYPE_CHECKING:
    from .optimizer import ELRA

#: Constructor arguments the rebuild does not take from the recorded call: the copied
#: param groups replace ``params``; ``buffers`` is rebuilt from the live
#: :class:`RetraceBuffers` (the argument may have been a generator, long consumed).
_REBUILT_ARGUMENTS = ("params", "buffers")


class CopyableOptimizer:
    """Mixin of :class:`elra_fused.ELRA`: deep copies and pickles that keep training.

    Records the constructor arguments in ``__new__`` (which sees the same call as
    ``__init__``) and rebuilds copies from them (see the module docstring). A subclass
    whose constructor takes other arguments than ELRA's (``params`` first, then ELRA's
    options) must define its own ``__deepcopy__`` and ``__reduce__``.
    """

    _constructor_args: tuple[Any, ...]
    _constructor_kwargs: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        self = super().__new__(cls)
        # Positional arguments after ``params`` (alpha0, wd); params may come by keyword.
        self._constructor_args = args if "params" in kwargs else args[1:]
        self._constructor_kwargs = {
            key: value for key, value in kwargs.items() if key not in _REBUILT_ARGUMENTS
        }
        return self

    def __deepcopy__(self: ELRA, memo: dict[int, Any]) -> ELRA:
        recipe = _recipe(self)
        # Not copyable (a handle on this process's communicator), and a copy in the same
        # process averages its loss over the same ranks.
        group = recipe["kwargs"].pop("process_group", None)
        recipe = copy.deepcopy(recipe, memo)
        if group is not None:
            recipe["kwargs"]["process_group"] = group
        return rebuild_optimizer(type(self), recipe)

    def __reduce__(self: ELRA) -> tuple[Any, tuple[type, dict[str, Any]]]:
        recipe = _recipe(self)
        if recipe["kwargs"].get("process_group") is not None:
            raise TypeError(
                f"{type(self).__name__}: an optimizer built with process_group= cannot be "
                "pickled: a torch.distributed ProcessGroup belongs to the running process "
                "(copy.deepcopy keeps it). Save opt.state_dict() instead and load it into "
                "an optimizer built with the new process's group."
            )
        return rebuild_optimizer, (type(self), recipe)

    def __copy__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__}: a shallow copy.copy would step the same parameters as "
            "the original with a second state (and a flat layout would move them out of "
            "the original's buffers); use copy.deepcopy, or state_dict() / "
            "load_state_dict() on a new optimizer"
        )


def _recipe(opt: ELRA) -> dict[str, Any]:
    """What :func:`rebuild_optimizer` needs to rebuild ``opt``, as references to the live
    objects (deep-copied or pickled by the caller)."""
    state_dict = opt.state_dict()  # first: it reconciles the groups' settings
    kwargs = dict(opt._constructor_kwargs)
    # The layout ``opt`` chose (flat=None picks by the parameters, which a copy may not
    # share: a deep-copied view with gaps becomes dense) and its current cycle length.
    kwargs["flat"] = opt.flat
    kwargs["cycle_steps"] = opt.cycle_steps
    losses = opt._losses
    law = opt._law
    return {
        "groups": opt.param_groups,
        "args": opt._constructor_args,
        "kwargs": kwargs,
        "buffers": None if opt.retrace_buffers is None else opt.retrace_buffers.source(),
        "state_dict": state_dict,
        # Detached: a factor may be part of the autograd graph, which neither deepcopy
        # nor pickle takes; it is only compared with the GradScaler's scale.
        "losses": (
            losses.total,
            losses.count,
            [factor.detach() for factor in losses.factors],
        ),
        "law": {
            "device_type": opt.control_state.device.type,
            "host": law.host,
            "compiled": law.compiled,
            "restart_warned": law.restart_warned,
        },
    }


def _construction_group(group: dict[str, Any]) -> dict[str, Any]:
    """A param group as the constructor takes it: the keys it accepts (others are put
    back before loading), the parameters named as they were (``param_names``)."""
    built = {
        key: value
        for key, value in group.items()
        if key in checks.PER_GROUP_KEYS and key != "params"
    }
    names = group.get("param_names")
    params = list(group["params"])
    built["params"] = params if names is None else list(zip(names, params, strict=True))
    return built


def rebuild_optimizer(cls: type[ELRA], recipe: dict[str, Any]) -> ELRA:
    """A new ``cls`` from a recipe (see the module docstring): built on the recipe's param
    groups with its arguments, then the saved state loaded through the checked loader,
    then the recorded losses and the law's runtime switches. Also what unpickling calls.
    """
    kwargs = dict(recipe["kwargs"])
    if recipe["buffers"] is not None:
        source, all_buffers = recipe["buffers"]
        kwargs["buffers"] = RetraceBuffers(source, all_buffers=all_buffers)
    groups = recipe["groups"]
    opt = cls([_construction_group(group) for group in groups], *recipe["args"], **kwargs)
    for live, saved in zip(opt.param_groups, groups, strict=True):
        for key, value in saved.items():
            live.setdefault(key, value)  # keys set after construction: the loader keeps them
    opt.load_state_dict(recipe["state_dict"])
    total, count, factors = recipe["losses"]
    opt._losses.total, opt._losses.count, opt._losses.factors = total, count, list(factors)
    law = recipe["law"]
    if law["device_type"] == opt.control_state.device.type:  # else the new device's defaults
        opt._law.host = law["host"]
        opt._law.compiled = law["compiled"]
    opt._law.restart_warned = law["restart_warned"]
    return opt
