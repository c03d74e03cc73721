"""``elra_fused.ELRA``: the torch.optim.Optimizer users import.

The façade: it checks the arguments (:mod:`elra_fused.checks`), picks the backend and the
layout (:mod:`elra_fused.layouts`: per-parameter tensor lists, the default except on
CUDA, or flat buffers), and per step gathers the work from its layout and hands it to
the functional core (:func:`elra_fused.core.elra_step`): the ``dots`` pass, the control
law (:class:`elra_fused.control_runner.ControlRunner`), the ``update`` pass. None of it reads a
value back to the host unless the law runs there (the CPU default). It also carries the
torch conventions: param groups, ``state_dict`` / ``load_state_dict``, ``zero_grad``,
step hooks and the profiler range (:mod:`elra_fused._torch_compat`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from . import checks, control, copying, loading, ops
from ._torch_compat import step_entry
from .amp import AmpScales
from .buffers import RetraceBuffers
from .control import ControlConfig
from .control_runner import ControlRunner
from .core import plan_step
from .interrupts import uninterrupted
from .layouts import FlatLayout, Layout, ListLayout, default_flat
from .losses import LossArg, LossRecord, judged_loss, without_grad_scale
from .offload import DEFAULT_CHUNK
from .sharding import loss_group, sharding_of


class ELRA(copying.CopyableOptimizer, torch.optim.Optimizer):
    r"""Exponential Learning Rate Adaption (momentum-free, no learning rate to tune).

    Args:
        params: parameters or param groups (groups may set ``wd``).
        alpha0: initial step size alpha_0 (paper: 1e-3).
        wd: multiplicative weight decay, x <- wd * x on accepted steps (1.0 = off; the
            paper uses 0.9997).
        kappa_gain: k in kappa(a) = 1 + k / (1 + a^2); 0 for noise-free problems.
        gamma_max, alpha_min, alpha_max: cap of alpha_t / alpha_{t-1}; bounds on alpha.
        step_crop: c in alpha_t ||G_t|| <= c (paper 3.5 and the authors' code: 2); None
            = off.
        warmup_steps, warmup_min_step: alpha_t ||G_t|| >= warmup_min_step during the
            first ``warmup_steps`` steps (paper: 0.1 for language models).
        retrace_sigmas: retrace when f_t > mean + retrace_sigmas * sigma of the last
            control cycle.
        initial_retrace_factor: before the first cycle closes, retrace when f_t exceeds
            f_0 by this factor (1.1); None for pre-trained starting points.
        min_cycle_losses, sigma_inflation, retrace_min_step, max_retraces: the authors'
            guards of the retrace rule (:mod:`elra_fused.control`): a cycle closes with >=
            100 accepted losses; sigma x1.05 per retrace, /1.05 per accept; alpha >= 1e-4 /
            ||G_{t-1}|| after a retrace; the 25th retrace in a row restarts from the last
            accepted point (warned once). ``1, 1.0, 0.0, None``: the paper's law.
        max_grad_norm: a step on a gradient of larger norm is not taken (a retrace); off
            by default, the largest finite value of a compact ``state_dtype``.
        preset: "2d": the authors' 2-D path for exact gradients (control.PRESETS); None off.
        lr: scales the step taken, lr * alpha (1.0: the paper's step), for torch's LR
            schedulers; alpha follows the law at the points reached, a retrace fits its
            parabola along the step taken (:func:`elra_fused.control.control_step`).
        weight_decay: torch's name for the decay per step: wd = 1 - weight_decay (param
            groups may give either).
        cycle_steps: close a control cycle automatically every ``cycle_steps`` steps;
            None (default) means the user calls :meth:`end_cycle` (e.g. once per epoch,
            the paper's cycle).
        backend: "auto" (fastest available for the parameters' device and dtypes: cpp,
            then triton on GPU; cpp on CPU; else reference), or "reference", "triton",
            "cpp" to force one.
        flat: flat buffers (:mod:`elra_fused.layouts`). Default (None): on CUDA, for
            the point memory modes, ``reuse_grad_buffer`` and non-contiguous parameters;
            otherwise per-parameter tensor lists (G_{t-1} kept by reference).
        memory: what is kept from the previous step (3.6, :mod:`elra_fused.memory`):
            "standard" (G_{t-1}), "recover" (x_{t-1}) or "offload" (x_{t-1} on the host).
        state_dtype: the stored G_{t-1}'s dtype in "standard" mode: None (the
            parameters' own) or ``torch.bfloat16`` (compact: half the memory of fp32).
        offload_chunk: staging chunk size in elements for ``memory="offload"``.
        reuse_grad_buffer: flat standard mode: the gradient buffer becomes G_{t-1} by
            swapping, not copying; ``.grad`` is stale from ``step()`` to ``zero_grad()``.
        process_group: data parallel (DDP): ``step(loss)`` averages f_t over the group
            (one all-reduce, no host sync), so every replica takes the same decision.
        compile_control: the device law through ``torch.compile`` (default: on CUDA; a
            failing compile warns once and runs it eagerly).
        buffers: a module (its BatchNorm running statistics), tensors, or a
            :class:`~elra_fused.buffers.RetraceBuffers`: restored to their values of the
            last accepted step on every retrace (as the authors do), no host read.

    Use ``opt.step(loss)`` after ``loss.backward()``, ``opt.step(closure)``, or
    ``opt.record_loss(loss)`` per micro-batch and then ``opt.step()`` (frameworks).
    """

    #: GradScaler.step hands over grad_scale / found_inf instead of unscaling (amp.py).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        alpha0: float = control.ALPHA0,
        wd: float = 1.0,
        *,
        kappa_gain: float = control.KAPPA_GAIN,
        gamma_max: float = control.GAMMA_MAX,
        alpha_min: float = control.ALPHA_MIN,
        alpha_max: float = control.ALPHA_MAX,
        step_crop: float | None = control.STEP_CROP,
        warmup_steps: int = 0,
        warmup_min_step: float = control.WARMUP_MIN_STEP,
        retrace_sigmas: float = control.RETRACE_SIGMAS,
        initial_retrace_factor: float | None = control.INITIAL_RETRACE_FACTOR,
        min_cycle_losses: int = control.MIN_CYCLE_LOSSES,
        sigma_inflation: float = control.SIGMA_INFLATION,
        retrace_min_step: float = control.RETRACE_MIN_STEP,
        max_retraces: int | None = control.MAX_RETRACES,
        max_grad_norm: float | None = None,
        preset: str | None = None,
        lr: float = 1.0,
        weight_decay: float | None = None,
        cycle_steps: int | None = None,
        backend: str = "auto",
        flat: bool | None = None,
        memory: str = "standard",
        state_dtype: torch.dtype | None = None,
        offload_chunk: int = DEFAULT_CHUNK,
        reuse_grad_buffer: bool = False,
        process_group: dist.ProcessGroup | None = None,
        compile_control: bool | None = None,
        buffers: torch.nn.Module | Iterable[torch.Tensor] | RetraceBuffers | None = None,
    ) -> None:
        checks.check_wd(wd)
        checks.check_process_group(process_group)
        checks.check_cycle_steps(cycle_steps)
        checks.check_backend_name(backend, ops.BACKENDS)
        config = ControlConfig(
            alpha0=alpha0,
            kappa_gain=kappa_gain,
            gamma_max=gamma_max,
            alpha_min=alpha_min,
            alpha_max=alpha_max,
            step_crop=step_crop,
            warmup_steps=warmup_steps,
            warmup_min_step=warmup_min_step,
            retrace_sigmas=retrace_sigmas,
            initial_retrace_factor=initial_retrace_factor,
            min_cycle_losses=min_cycle_losses,
            sigma_inflation=sigma_inflation,
            retrace_min_step=retrace_min_step,
            max_retraces=max_retraces,
            max_grad_norm=max_grad_norm,
        )
        checks.check_memory(memory, state_dtype, flat, reuse_grad_buffer, offload_chunk)
        config = checks.grad_norm_for_state(control.with_preset(config, preset), state_dtype)
        self.cycle_steps = cycle_steps
        self.memory = memory
        wd = checks.resolve_wd(wd, weight_decay)
        checks.check_lr(lr)
        self._losses = LossRecord()
        self._amp = AmpScales()
        super().__init__(params, {"wd": wd, "lr": lr})  # checks each parameter (add_param_group)
        self._decay = checks.DecaySync(self.param_groups)  # wd vs a scheduled weight_decay
        loading.keep_group_slot(self.param_groups)  # for DCP's flattened state dicts
        sharded = sharding_of(self.param_groups, flat, memory, reuse_grad_buffer)
        self.process_group = loss_group(sharded, process_group)
        trainable = self._trainable() or [self._first_param()]
        self._device = self._first_param().device
        self.backend = ops.resolve_backend(backend, trainable, self._device)
        if flat is None:
            flat = sharded is None and default_flat(
                memory, reuse_grad_buffer, self.backend, self._device, trainable
            )
        self._kernels = ops.get_kernels(self.backend, self._device)
        self.layout: Layout = (
            FlatLayout(memory, state_dtype, offload_chunk, bool(reuse_grad_buffer))
            if flat
            else ListLayout(state_dtype, self.backend, ops.SUPPORTED_DTYPES)
        )
        self._add_to_layout(range(len(self.param_groups)))
        if checks.check_flag("compile_control", compile_control, allow_none=True) is None:
            compile_control = self._device.type == "cuda"
        self._law = ControlRunner(
            config, self._device, host=self._device.type == "cpu", compiled=compile_control
        )
        self._law.shard_group = sharded.group if sharded else None
        self._steps_in_cycle = 0
        if buffers is not None and not isinstance(buffers, RetraceBuffers):
            buffers = RetraceBuffers(buffers)
        #: Buffers restored on a retrace (``buffers=``), or None.
        self.retrace_buffers: RetraceBuffers | None = buffers

    # ------------------------------------------------------------------ set-up
    def _first_param(self) -> torch.Tensor:
        for group in self.param_groups:
            for param in group["params"]:
                return param
        raise ValueError("ELRA: got an empty parameter list")

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        checks.check_group_keys(param_group)
        param_group = checks.group_param_list(param_group, len(self.param_groups))
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        # A group the optimizer cannot take is removed again, leaving it as it was.
        try:
            checks.check_new_group(self.param_groups)  # its parameters, and group 0's lr
            if hasattr(self, "layout"):  # a group added after construction
                self._add_to_layout(range(group_index, group_index + 1))
                self._decay.sync(self.param_groups, strict=False)  # its decay, as added
        except BaseException:  # also an allocation failing in the layout, or a Ctrl-C
            self.param_groups.pop()
            raise

    def _add_to_layout(self, group_indices: range) -> None:
        """Check every group, then lay them out: nothing moves unless all can be taken."""
        for index in group_indices:
            params = self.param_groups[index]["params"]
            checks.check_group_params(
                params,
                index,
                backend=self.backend,
                supported_dtypes=ops.SUPPORTED_DTYPES,
                device=self._device,
                flat=self.layout.is_flat,
            )
            checks.check_state_dtype(index, params, self.layout.state_dtype)
        for index in group_indices:
            self.layout.add_group(index, self.param_groups[index], self.state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. Flat buffers: one fill each, ``.grad`` views kept (autograd
        would allocate a None one outside the buffer), yet a parameter backward does not
        reach steps as a None gradient does (:mod:`elra_fused.layouts`). Per parameter,
        ``set_to_none=False`` gives each a new zero tensor (the old one may be G_{t-1})."""
        self.layout.zero_grad(self.param_groups, set_to_none)

    # ------------------------------------------------------------------ user API
    @property
    def flat(self) -> bool:
        """Whether parameters and gradients live in flat buffers (else tensor lists)."""
        return self.layout.is_flat

    @property
    def host_control(self) -> bool:
        """Run the control law on Python floats (same bits as 0-d tensor ops; see
        :class:`elra_fused.control_runner.ControlRunner`): True for CPU parameters; False
        (device tensors: no host sync, CUDA-graph capture) is what a GPU needs."""
        return self._law.host

    @host_control.setter
    def host_control(self, value: bool) -> None:
        self._law.host = checks.check_flag("host_control", value)

    @property
    def compile_control(self) -> bool:
        """Run the device law through ``torch.compile`` (:mod:`elra_fused.control_runner`)."""
        return self._law.compiled

    @compile_control.setter
    def compile_control(self, value: bool) -> None:
        self._law.compiled = checks.check_flag("compile_control", value)

    @property
    def config(self) -> ControlConfig:
        """The control law's constants."""
        return self._law.config

    @property
    def alpha(self) -> float:
        """Current step size alpha (reading it synchronises with the device)."""
        return self._law.read(control.ALPHA)[0]

    @property
    def last_step_retraced(self) -> bool:
        """Whether the last ``step()`` was a retrace (soft restart) or a skipped start."""
        return self._law.read(control.LAST_RETRACED)[0] > 0

    @property
    def retrace_count(self) -> int:
        """Number of retraced steps so far."""
        return int(self._law.read(control.RETRACES)[0])

    @property
    def restart_count(self) -> int:
        """Restarts so far: ``max_retraces`` retraces in a row sent the law back to the
        last accepted point with fresh statistics (warned once)."""
        return int(self._law.read(control.RESTARTS)[0])

    @property
    def control_state(self) -> torch.Tensor:
        """The packed float64 control state (read-only view; see :mod:`elra_fused.control`)."""
        return self._law.state.detach()

    @property
    def alpha_tensor(self) -> torch.Tensor:
        """alpha as a 0-d float64 device tensor (a copy; reading it needs no sync)."""
        return self._law.state[control.ALPHA].clone()

    def end_cycle(self) -> None:
        """Close the current control cycle (host call, no sync; paper: once per epoch)."""
        self._law.close_cycle()
        self._steps_in_cycle = 0

    def cycle_statistics(self) -> tuple[float, float] | None:
        """(mean, sigma) of the accepted losses of the cycle closed last, sigma as the
        retrace rule uses it now (with the ``sigma_inflation`` of the retraces since).

        None before the first cycle closed and when the last ``end_cycle()`` closed none
        (fewer than ``min_cycle_losses`` accepted losses: the cycle goes on, the rule keeps
        the older statistics). The dynamic batch size controller (paper 3.3) reads them
        once per cycle. Reading them synchronises.
        """
        mean, std, scale, closed, count = self._law.read(
            control.CYCLE_MEAN,
            control.CYCLE_STD,
            control.SIGMA_SCALE,
            control.CYCLE_CLOSED,
            control.CYCLE_LAST_COUNT,
        )
        return (mean, std * scale) if closed > 0 and count > 0 else None

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Record one micro-batch's loss (as back-propagated, with accumulation's 1/N): a
        ``step()`` without a loss judges their sum (:mod:`elra_fused.losses`). No host read."""
        self._losses.add(loss)

    @step_entry
    @torch.no_grad()
    def step(self, closure: LossArg = None, loss: LossArg = None) -> Any:  # type: ignore[override]
        """One ELRA step; returns the loss passed or the closure's. ``closure``: torch's
        closure, or the loss f_t itself; ``loss``: f_t by keyword; without either, the sum
        of the :meth:`record_loss` losses since the last step (:mod:`elra_fused.losses`).
        A step that fails changes nothing (weights, state, recorded losses), and one that
        has begun to write completes before a Ctrl-C is raised (:mod:`elra_fused.interrupts`)."""
        recorded, committed = self._losses.snapshot(), self._law.state.clone()
        try:  # up to the first write, a failure leaves everything as it was
            plan = self._plan(closure, loss)
        except BaseException:
            self._losses.restore(recorded)  # a closure's own records would count twice
            self._law.state.copy_(committed)
            raise
        if plan is None:
            return None  # the closure skipped the batch (Lightning: training_step -> None)
        returned, work, decision, updates, scales = plan
        with uninterrupted():  # from the first write on, a Ctrl-C waits for the step's end
            try:
                updates.apply(self._kernels)  # each kernel checks its tensors, then writes
            except BaseException:
                if updates.applied == 0:  # nothing written yet
                    self._losses.restore(recorded)
                    self._law.state.copy_(committed)
                raise
            self.layout.finish(work, decision)
            self._amp.after_step(scales, decision)
            if self.retrace_buffers is not None:
                self.retrace_buffers.apply(self._law.state[control.LAST_RETRACED])
            self._losses.clear()
            self._steps_in_cycle += 1
            if self.cycle_steps is not None and self._steps_in_cycle >= self.cycle_steps:
                self.end_cycle()
        return returned

    def _plan(self, closure: LossArg, loss: LossArg) -> tuple | None:  # up to the first write
        loss, returned, factors = judged_loss(closure, loss, self._losses)
        if loss is None and callable(closure):
            return None
        checks.check_loss(loss)
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step
        loss = without_grad_scale(loss, factors, grad_scale)
        lr = checks.step_settings(self.param_groups, self._decay)
        scales = self._amp.for_step(grad_scale, getattr(self, "found_inf", None), self._device)
        if self.retrace_buffers is not None:
            self.retrace_buffers.check()  # a replaced buffer fails before anything moves
        loss_value = self._law.loss_value(loss, self.process_group)
        work = self.layout.gather(self.param_groups, self.state)  # every check runs here
        plan = plan_step(work.segments, loss_value, self._law, self._kernels, lr, scales)
        return (returned, work, *plan, scales)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        self._decay.sync(self.param_groups, strict=False)  # a scheduled weight_decay: one
        self.layout.synchronize()  # offload: copies to the host may be in flight
        sd = super().state_dict()
        sd[key := loading.STATE_KEY] = loading.saved_entry(self)
        sd["param_groups"][0][key] = sd[key]  # for DCP (loading._lift_mirror)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`. Everything is checked before anything
        changes (:mod:`elra_fused.loading`): a state that does not fit raises one
        ValueError and leaves the optimizer exactly as it was, and so does a failure
        while applying (the applied part is undone)."""
        plan = loading.validate_state_dict(self, state_dict)
        loading.apply_plan(self, plan, super().load_state_dict)
