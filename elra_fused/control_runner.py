"""Where and how the control law (:mod:`elra_fused.control`) runs each step.

:class:`ControlRunner` owns the packed control state and picks, per step, the cheapest
way to evaluate :func:`elra_fused.control.control_step` with the same bits: Python floats
on the host (the CPU default), one compiled graph of fused kernels
(:func:`compiled_control_step`, the CUDA default) or ~200 eager 0-d tensor ops. It also
turns the loss into what the law takes (averaged over a data-parallel group).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import control
from ._torch_compat import is_dtensor
from .control import (
    ALPHA,
    LR_TAKEN,
    RESTARTS,
    ControlConfig,
    Decision,
    close_cycle,
    control_step,
    initial_state,
)
from .control_math import FLOAT_MATH, TENSOR_MATH, Math


@functools.cache
def compiled_control_step() -> Callable[..., tuple[torch.Tensor, Decision]]:
    """:func:`control_step` on :data:`TENSOR_MATH` through ``torch.compile`` (one per
    process; compiled at its first call, again for another device or config).

    The law is pure pointwise math on 0-d tensors, so it compiles as one graph
    (``fullgraph=True``) into fused kernels: no host sync, capturable in a CUDA graph
    once it has compiled (call it before capturing, as the warm-up steps do).
    """
    return torch.compile(control_step, fullgraph=True, dynamic=False)


def upgrade_state(saved: torch.Tensor) -> torch.Tensor:
    """A saved control state in the current layout (float64, ``control.STATE_SIZE`` entries).

    A state saved before the guards (``control.LEGACY_STATE_SIZE`` entries) gains them as a
    fresh state has them; its raw cycle sums are the shifted sums with K = 0. A state saved
    before the learning rate (``control.GUARDS_STATE_SIZE``) took its steps at lr = 1; one
    saved before the 2-D preset (``control.LR_STATE_SIZE``) has not started its entries.
    """
    saved = saved.detach().to(torch.float64)
    sizes = (control.STATE_SIZE, control.LR_STATE_SIZE, control.GUARDS_STATE_SIZE)
    if saved.dim() != 1 or saved.shape[0] not in (*sizes, control.LEGACY_STATE_SIZE):
        raise ValueError(
            f"ELRA.load_state_dict: control state must be a tensor of {control.STATE_SIZE} (or "
            f"{', '.join(map(str, sizes[1:]))} or {control.LEGACY_STATE_SIZE}) values, got "
            f"shape {tuple(saved.shape)}; the state dict is corrupt or from an incompatible version"
        )
    size = saved.shape[0]
    if size == control.STATE_SIZE:
        return saved
    fresh = torch.zeros(control.STATE_SIZE, dtype=torch.float64, device=saved.device)
    fresh[:size] = saved
    if size < control.LR_STATE_SIZE:
        fresh[control.LR_TAKEN] = 1.0
    if size == control.LEGACY_STATE_SIZE:
        fresh[control.SIGMA_SCALE] = 1.0
        fresh[control.CYCLE_SCALE] = 1.0
        fresh[control.ALPHA_ACCEPTED] = saved[control.ALPHA]
    return fresh


def trusted_dot(dot: Any, bound: Any, xp: Math) -> Any:
    """<G_{t-1}, G_t> as far as it is known: moved towards 0 by its error ``bound``.

    The recover and offload modes know the dot only within a bound
    (:class:`elra_fused.memory.PointCoefficients`). Of all the values the bound allows,
    the law takes the one nearest 0, the neutral angle (ratio 1 in eq. 4): the growth or
    shrinking of alpha is never more than the data proves. An interval that holds 0 gives
    0, so alpha then grows only by kappa, gently, until the steps are large enough against
    the points' resolution to be measured again. NaN stays NaN (the law retraces).
    """
    shrunk = xp.clamp(abs(dot) - bound, lo=0.0)
    return xp.where(dot < 0.0, -shrunk, shrunk)


class ControlRunner:
    """Owns the packed control state and runs the law once per step where it is cheapest.

    * ``host=True`` (the CPU default): :func:`control_step` on Python floats
      (:data:`FLOAT_MATH`, same bits as the tensor law). On the CPU the device is the
      host, so reading the values syncs nothing, and the law costs a few us instead of
      ~150 us of tiny tensor ops. Set on a GPU it works but reads the state back every
      step.
    * ``host=False, compiled=True`` (the CUDA default): :func:`compiled_control_step`,
      a few fused kernels; a compiler failure warns once and falls back to eager.
    * ``host=False, compiled=False``: the law as ~200 eager 0-d tensor ops.

    The device paths never read a value back to the host (CUDA-graph capturable).
    """

    def __init__(
        self, config: ControlConfig, device: torch.device, *, host: bool, compiled: bool
    ) -> None:
        self.config = config
        self.state = initial_state(config, device)
        self.host = host
        self.compiled = compiled
        #: Whether the first restart (max_retraces retraces in a row) was warned about.
        self.restart_warned = False
        self._lr_cache: tuple[float, torch.Tensor] | None = None
        #: Sharded parameters (:mod:`elra_fused.sharding`): the group the partial sums
        #: are all-reduced over, or None.
        self.shard_group: dist.ProcessGroup | None = None

    def read(self, *entries: int) -> list[float]:
        """State entries as floats, in one host read (a sync on a GPU). Every read also
        reports a restart that the device law took since the last one (see
        :meth:`_warn_restart`)."""
        values = self.state[[*entries, RESTARTS]].tolist()
        self._warn_restart(values[-1], stacklevel=4)
        return values[:-1]

    def _warn_restart(self, restarts: float, stacklevel: int) -> None:
        """Warn once per optimizer when the law has restarted (the device law restarts
        without a host read; its warning comes with the next read of the state)."""
        if restarts > 0 and not self.restart_warned:
            self.restart_warned = True
            warnings.warn(
                f"ELRA: {self.config.max_retraces} retraces in a row: the control law "
                "went back to the last accepted point and restarted with its alpha and "
                f"fresh loss statistics ({int(restarts)} restart(s) so far; "
                "opt.restart_count counts them, no further warning). The loss kept "
                "exceeding the retrace threshold: mini-batch noise too large for the batch "
                "size, a diverging model or a bad batch.",
                stacklevel=stacklevel,
            )

    def alpha_prev(self) -> float | torch.Tensor:
        """The step taken last, lr_{t-1} alpha_{t-1} (read before :meth:`step` commits):
        a float with ``host``, else a 0-d device tensor (no host read)."""
        if self.host:
            alpha, lr = self.state.cpu()[[ALPHA, LR_TAKEN]].tolist()
            return alpha * lr
        return self.state[ALPHA] * self.state[LR_TAKEN]

    def loss_value(self, loss: torch.Tensor | float, group: Any = None) -> float | torch.Tensor:
        """f_t as the law takes it: a Python float with ``host``, else a 0-d fp64 tensor on
        the state's device (no host read). With a process ``group`` (data parallel) it is
        the mean over the group: every rank receives the same sum and divides it by the
        same count, so all take bit-identical decisions, and a non-finite loss on any
        rank makes every rank retrace. ``loss`` has passed :func:`checks.check_loss`."""
        device = self.state.device
        if is_dtensor(loss):  # computed from DTensors (tensor parallel): the global value
            loss = loss.full_tensor()
        if group is None and self.host:
            return float(loss.item()) if isinstance(loss, torch.Tensor) else float(loss)
        if isinstance(loss, torch.Tensor):
            # A copy when reducing: all_reduce works in place on what it is given.
            value = (
                loss.detach()
                .reshape(())
                .to(device, torch.float64, non_blocking=True, copy=group is not None)
            )
        else:
            # A fill kernel, not torch.tensor(...): a host-to-device copy would block, sync
            # with the device and fail under CUDA-graph capture (as _lr_tensor does).
            value = torch.full((), float(loss), dtype=torch.float64, device=device)
        if group is None:
            return value
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        value /= dist.get_world_size(group)
        return float(value.item()) if self.host else value

    def step(
        self,
        loss: float | torch.Tensor,
        partials: Sequence[torch.Tensor],
        lr: float | torch.Tensor = 1.0,
        found_inf: torch.Tensor | None = None,
    ) -> Decision:
        """Sum the segments' [||G_t||^2, <G_t, G_{t-1}>] (and the dot's error bound, where
        a segment has one: :func:`trusted_dot`) in segment order, from zero, in fp64; run
        the law and commit the new state. The decision comes as 0-d device tensors, or as
        floats with ``host``. ``lr`` scales the step taken (:func:`control.control_step`):
        a float, or a 0-d tensor (the device law takes it as one, so a changing lr never
        recompiles the law). A ``found_inf`` > 0 (GradScaler) makes ||G_t||^2 NaN: the
        law retraces as for any non-finite gradient."""
        bounded = any(partial.numel() > 2 for partial in partials)
        if self.shard_group is not None:  # this rank's shards: one all-reduce of the sums
            partials = [self._all_ranks(partials)]
            bounded = True
        if self.host:
            totals = [0.0, 0.0, 0.0]
            for partial in partials:
                for index, value in enumerate(partial.tolist()):
                    totals[index] += value
            grad_sq, grad_dot_prev, bound = totals
            if found_inf is not None and float(found_inf) > 0:
                grad_sq = math.nan
            if bounded:
                grad_dot_prev = trusted_dot(grad_dot_prev, bound, FLOAT_MATH)
            # The state goes in and out through a numpy view (one call each way: this
            # runs right after backward, when the CPU's caches are cold and every torch
            # call costs several us). On the CPU .cpu() is the tensor itself; on a GPU
            # it is a copy, written back below.
            host_state = self.state.cpu()
            state_view = host_state.numpy()
            state, decision = control_step(
                state_view.tolist(),
                loss,
                grad_sq,
                grad_dot_prev,
                self.config,
                FLOAT_MATH,
                _host_lr(lr),
            )
            state_view[:] = state
            self._warn_restart(state[RESTARTS], stacklevel=7)  # the user's opt.step call
            if host_state is not self.state:
                self.state.copy_(host_state)
            return decision
        totals = torch.zeros(3 if bounded else 2, dtype=torch.float64, device=self.state.device)
        for partial in partials:
            totals[: partial.numel()] += partial.to(self.state.device, non_blocking=True)
        grad_dot_prev = totals[1]
        grad_sq = totals[0]
        if found_inf is not None:
            grad_sq = torch.where(found_inf > 0, math.nan, grad_sq)
        if bounded:
            grad_dot_prev = trusted_dot(grad_dot_prev, totals[2], TENSOR_MATH)
        lr = self._lr_tensor(lr)
        args = (self.state, loss, grad_sq, grad_dot_prev, self.config, TENSOR_MATH, lr)
        # Inside a torch.compile of the user's own step, dynamo traces the plain law.
        if self.compiled and not torch.compiler.is_compiling():
            try:
                new_state, decision = compiled_control_step()(*args)
            except Exception as exc:  # any compiler failure: run the law eagerly
                # Compiling happens before the law runs, and the law itself changes
                # nothing in place: the eager call below starts from the same state.
                self.compiled = False
                warnings.warn(
                    f"ELRA: torch.compile of the control law failed ({type(exc).__name__}: "
                    f"{exc}); running it eagerly (~200 small ops per step). Pass "
                    "compile_control=False to skip the attempt.",
                    stacklevel=6,  # the user's opt.step call
                )
                new_state, decision = control_step(*args)
        else:
            new_state, decision = control_step(*args)
        self.state.copy_(new_state)
        return decision

    def _all_ranks(self, partials: Sequence[torch.Tensor]) -> torch.Tensor:
        """[<G,G>, <G_prev,G>, bound] summed over this rank's segments (in order, fp64)
        and then over the shard group (:mod:`elra_fused.sharding`): every rank gets the
        same bits. No host read."""
        totals = torch.zeros(3, dtype=torch.float64, device=self.state.device)
        for partial in partials:
            totals[: partial.numel()] += partial.to(self.state.device, non_blocking=True)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=self.shard_group)
        return totals

    def _lr_tensor(self, lr: float | torch.Tensor) -> torch.Tensor:
        """lr as a 0-d float64 tensor on the state's device without a host sync: a
        tensor is moved (non-blocking), a float is written by a fill kernel (a copy from
        host memory could wait for the device), cached while the value stays.

        A float lr was checked on the host (:func:`checks.check_lr`), a CPU tensor too; a
        device tensor cannot be read without a sync, so a non-finite or negative value
        becomes 0 here, on the device: no step instead of NaN or ascending weights."""
        if isinstance(lr, torch.Tensor):
            value = lr.detach().reshape(()).to(self.state.device, torch.float64, non_blocking=True)
            return torch.where((value >= 0) & (value < math.inf), value, 0.0)
        cached = self._lr_cache
        if cached is None or cached[0] != lr:
            cached = self._lr_cache = (
                lr,
                torch.full((), lr, dtype=torch.float64, device=self.state.device),
            )
        return cached[1]

    def load(self, saved: torch.Tensor) -> None:
        """Take a saved state (see :func:`upgrade_state`); raises before changing anything."""
        self.state.copy_(upgrade_state(saved).to(self.state.device))

    def close_cycle(self) -> None:
        """End the current control cycle (no host read)."""
        self.state.copy_(close_cycle(self.state, self.config.min_cycle_losses))


def _host_lr(lr: float | torch.Tensor) -> float:
    """lr as the host law takes it: a float, read from a tensor (for a device tensor the
    only value check it gets: :func:`checks.check_lr` reads CPU tensors only)."""
    value = float(lr)
    if not 0.0 <= value < math.inf:
        raise ValueError(
            f"ELRA: lr must be a finite number >= 0 (it scales the step alpha * lr), got {value!r}"
        )
    return value
