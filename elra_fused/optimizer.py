"""``elra_fused.ELRA``: the torch.optim.Optimizer users import.

Per step the optimizer runs exactly three things, none of which reads a value back to
the host:

1. the ``dots`` pass: <G_t, G_t> and <G_{t-1}, G_t> summed over all parameters;
2. the control law (:mod:`elra_fused.control`) on a packed float64 state vector;
3. the ``update`` pass: x <- wd x - alpha G (accept) or x <- x + (alpha_{t-1} - alpha_t)
   G_{t-1} (retrace), with coefficients read from a device tensor.

Two layouts, both run by every backend (``reference``: plain torch, float64-capable, the
oracle; ``cpp``: C++/OpenMP on CPU, CUDA on GPU; ``triton``):

* per parameter (``flat=False``; the default except on CUDA): the passes take the
  parameters' own tensors and autograd's own gradients as tensor lists (one op call per
  pass, :mod:`elra_fused.ops` "Tensor lists"). G_{t-1} is kept *by reference*: after an
  accept the gradient tensor itself becomes G_{t-1}, so the update pass reads x and G and
  writes only x, and backward writes each gradient once (no zero fill, no accumulation
  into a buffer). Use ``zero_grad()`` (``set_to_none=True``) between steps, as torch's
  default does; an in-place change of last step's gradient is detected and refused.
* flat (``flat=True``; the default on CUDA, needed for ``memory="recover"/"offload"``
  and ``reuse_grad_buffer``): parameters and gradients are views into one buffer per
  (group, device, dtype) (:mod:`elra_fused.flat`), so each pass is one kernel launch per
  buffer and every tensor keeps its address (what CUDA-graph capture needs). The price on
  the host: ``zero_grad`` fills the buffer and backward adds each gradient into it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.optim.optimizer as torch_optimizer

from . import control, ops
from .control import ControlConfig
from .flat import FlatBuffer, build_flat_buffers, check_grad
from .memory import (
    GRAD_PREV_KEY,
    MEMORY_MODES,
    POINT_MODES,
    GradPrevList,
    GradPrevStore,
    PointPrevStore,
    SwapGradPrevStore,
)
from .offload import DEFAULT_CHUNK, OffloadedPrev

#: Param-group keys a user may set per group. alpha is global (paper section 3.1), so
#: only the multiplicative weight decay can differ between groups.
PER_GROUP_KEYS = frozenset({"params", "wd", "name"})
_STATE_KEY = "elra_control"

LossArg = torch.Tensor | float | int | Callable[[], Any] | None


def _step_entry(step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``ELRA.step`` like torch's ``Optimizer`` does, without its fixed cost when
    nothing uses it.

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
    def wrapper(self: ELRA, *args: Any, **kwargs: Any) -> Any:
        if (
            torch.compiler.is_compiling()  # dynamo traces torch's wrapper, as before
            or torch._C._autograd._profiler_enabled()
            or torch_optimizer._global_optimizer_pre_hooks
            or torch_optimizer._global_optimizer_post_hooks
            or self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
        ):
            return torch_wrapped(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    # torch.optim.Optimizer.__init__ wraps a step that is not marked as hooked.
    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


def _describe(group_index: int, param_index: int, param: torch.Tensor) -> str:
    return f"parameter {param_index} of param group {group_index} (shape {tuple(param.shape)})"


class ELRA(torch.optim.Optimizer):
    r"""Exponential Learning Rate Adaption (momentum-free, no learning rate to tune).

    Args:
        params: parameters or param groups (groups may set ``wd``).
        alpha0: initial step size alpha_0 (paper: 1e-3).
        wd: multiplicative weight decay, x <- wd * x on accepted steps (1.0 = off; the
            paper uses 0.9997).
        kappa_gain: k in kappa(a) = 1 + k / (1 + a^2); 0 for noise-free problems.
        gamma_max: cap of alpha_t / alpha_{t-1}.
        alpha_min, alpha_max: bounds on alpha.
        step_crop: c in alpha_t ||G_t|| <= c (paper: 2), None = off.
        warmup_steps, warmup_min_step: alpha_t ||G_t|| >= warmup_min_step during the
            first ``warmup_steps`` steps (paper: 0.1 for language models).
        retrace_sigmas: retrace when f_t > mean + retrace_sigmas * sigma of the last
            control cycle.
        initial_retrace_factor: before the first cycle closes, retrace when f_t exceeds
            f_0 by this factor (1.1); None for pre-trained starting points.
        cycle_steps: close a control cycle automatically every ``cycle_steps`` steps;
            None (default) means the user calls :meth:`end_cycle` (e.g. once per epoch,
            the paper's cycle).
        backend: "auto" (fastest available for the parameters' device and dtypes: cpp,
            then triton on GPU; cpp on CPU; else reference), or "reference", "triton",
            "cpp" to force one.
        flat: keep parameters and gradients in flat buffers. Default (None): True on
            CUDA (graph capture, one launch per pass), for ``memory="recover"/"offload"``,
            for ``reuse_grad_buffer`` and for non-contiguous parameters; False (the
            per-parameter layout, G_{t-1} kept by reference) otherwise.
        memory: what is kept from the previous step (paper section 3.6; see
            :mod:`elra_fused.memory`): "standard" (G_{t-1} on the device), "recover"
            (x_{t-1} on the device, G_{t-1} recovered per element) or "offload" (x_{t-1}
            in pinned host memory, streamed in chunks). The last two need flat buffers.
        state_dtype: dtype of the stored G_{t-1} in "standard" mode (default: the
            parameters' dtype); ``torch.bfloat16`` halves its memory.
        offload_chunk: staging chunk size in elements for ``memory="offload"``.
        reuse_grad_buffer: standard mode on flat buffers: let the gradient buffer become
            G_{t-1} by swapping buffers instead of copying (12 instead of 16 bytes per
            fp32 parameter in the update pass). After ``step()`` the ``.grad`` tensors
            hold stale values until ``zero_grad()``: read gradients before the step.
        process_group: data parallel training (DDP): the group the model is replicated
            over. ``step(loss)`` then averages f_t over it (one all-reduce of one value
            per step, no host sync on a GPU), so every replica takes the same accept /
            retrace decision on the same (DDP-averaged) gradient. Without it each rank's
            control law sees only its own loss and the replicas drift apart.
        compile_control: run the control law through ``torch.compile`` (a few fused
            kernels instead of ~200 tiny ops per step) where it runs on device tensors.
            Default (None): True on CUDA. The first step compiles it (seconds); if
            compiling fails, ELRA warns once and runs the law eagerly. Unused while
            ``host_control`` is on (the CPU default: the law runs on Python floats).

    Use ``opt.step(loss)`` after ``loss.backward()``, or ``opt.step(closure)``.
    """

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
        step_crop: float | None = None,
        warmup_steps: int = 0,
        warmup_min_step: float = control.WARMUP_MIN_STEP,
        retrace_sigmas: float = control.RETRACE_SIGMAS,
        initial_retrace_factor: float | None = control.INITIAL_RETRACE_FACTOR,
        cycle_steps: int | None = None,
        backend: str = "auto",
        flat: bool | None = None,
        memory: str = "standard",
        state_dtype: torch.dtype | None = None,
        offload_chunk: int = DEFAULT_CHUNK,
        reuse_grad_buffer: bool = False,
        process_group: dist.ProcessGroup | None = None,
        compile_control: bool | None = None,
    ) -> None:
        _check_wd(wd)
        _check_process_group(process_group)
        if cycle_steps is not None and not (isinstance(cycle_steps, int) and cycle_steps > 0):
            raise ValueError(
                f"ELRA: cycle_steps must be a positive int or None, got {cycle_steps!r}"
            )
        if backend != "auto" and backend not in ops.BACKENDS:
            raise ValueError(
                f"ELRA: unknown backend {backend!r}; choose 'auto' or one of {ops.BACKENDS}"
            )
        self.config = ControlConfig(
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
        )
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
        self.cycle_steps = cycle_steps
        self.memory = memory
        self.state_dtype = state_dtype
        self.offload_chunk = offload_chunk
        self.reuse_grad_buffer = bool(reuse_grad_buffer)
        self.process_group = process_group
        super().__init__(params, {"wd": wd})
        first = self._first_param()
        self._device = first.device
        self.backend = self._resolve_backend(backend)
        self.flat = self._default_flat() if flat is None else bool(flat)
        self._kernels = ops.get_kernels(self.backend, self._device)
        # Per-parameter layout: the version counter of each G_{t-1} tensor when the last
        # step left it, to detect an in-place change of a gradient kept by reference.
        self._prev_versions: dict[torch.Tensor, int] = {}
        # ... and the G_{t-1} tensors the last step replaced, released by zero_grad.
        self._retired: list[torch.Tensor] = []
        if not self.flat:
            for group_index in range(len(self.param_groups)):
                self._check_group(group_index)
        if memory != "standard" and not self.flat:
            raise ValueError(f"ELRA: memory={memory!r} needs flat buffers (flat=True)")
        if self.reuse_grad_buffer and not (self.flat and memory == "standard"):
            raise ValueError(
                "ELRA: reuse_grad_buffer swaps the flat gradient and G_{t-1} buffers: it "
                "needs flat=True and memory='standard'"
            )
        self._buffers: list[FlatBuffer] = []
        self._stores: list[GradPrevStore | PointPrevStore | OffloadedPrev] = []
        if self.flat:
            self._build_flat()
        self._control = control.initial_state(self.config, self._device)
        self._steps_in_cycle = 0
        #: Run the control law on Python floats (same code, same bits; see
        #: :mod:`elra_fused.control`) instead of 0-d tensor ops. True for CPU parameters,
        #: where the device is the host; False keeps the law in device tensors, which is
        #: what a GPU needs (no host sync, CUDA-graph capture). True on a GPU works but
        #: reads the values back every step.
        self.host_control = self._device.type == "cpu"
        #: Run the device law through :func:`control.compiled_control_step`.
        self.compile_control = (
            self._device.type == "cuda" if compile_control is None else bool(compile_control)
        )

    # ------------------------------------------------------------------ set-up
    def _first_param(self) -> torch.Tensor:
        for group in self.param_groups:
            for param in group["params"]:
                return param
        raise ValueError("ELRA: got an empty parameter list")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        unknown = set(param_group) - PER_GROUP_KEYS
        if unknown:
            raise ValueError(
                f"ELRA: param group keys {sorted(unknown)} are not supported; only 'wd' can "
                "be set per group (alpha is global and adapts by itself, paper section 3.1)"
            )
        if "wd" in param_group:
            _check_wd(param_group["wd"])
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        # A group the optimizer cannot take is removed again, leaving it as it was.
        try:
            for param_index, param in enumerate(self.param_groups[-1]["params"]):
                _check_param(_describe(group_index, param_index, param), param)
            if hasattr(self, "flat"):
                # A group added after construction gets flat buffers of its own (or is
                # checked for the per-parameter layout).
                if self.flat:
                    self._add_flat_buffers(group_index)
                else:
                    self._check_group(group_index)
        except ValueError:
            self.param_groups.pop()
            raise

    def _default_flat(self) -> bool:
        """flat=None: see the class docstring for why each case picks its layout."""
        if self.memory != "standard" or self.reuse_grad_buffer:
            return True
        if self._device.type == "cuda" and self.backend != "reference":
            return True
        return not all(p.is_contiguous() for p in self._trainable())

    def _check_group(self, group_index: int) -> None:
        """What the backend and the layout need of each parameter of a group."""
        for param_index, param in enumerate(self.param_groups[group_index]["params"]):
            name = _describe(group_index, param_index, param)
            if self.backend != "reference" and param.dtype not in ops.SUPPORTED_DTYPES:
                raise ValueError(
                    f"ELRA: {name} has dtype {param.dtype}, which backend {self.backend!r} "
                    "does not support (float32, bfloat16, float16); use backend='reference' "
                    "for float64"
                )
            if (self.flat or self.backend != "reference") and param.device != self._device:
                raise ValueError(
                    f"ELRA: {name} is on {param.device}, the optimizer's parameters on "
                    f"{self._device}"
                )
            if not self.flat and param.requires_grad and not param.is_contiguous():
                # The per-parameter layout flattens each parameter without a copy.
                raise ValueError(
                    f"ELRA: {name} is not contiguous (strides {param.stride()}); flat=False "
                    "updates each parameter in place as one vector: use flat=True (or the "
                    "default layout)"
                )

    def _trainable(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _resolve_backend(self, backend: str) -> str:
        params = self._trainable() or [self._first_param()]
        devices = {p.device for p in params}
        if len(devices) > 1 and backend != "reference":
            if backend != "auto":
                raise ValueError(
                    f"ELRA: backend {backend!r} needs all parameters on one device, got "
                    f"{sorted(str(d) for d in devices)}; use backend='reference'"
                )
            return "reference"
        if backend != "auto":
            return backend  # unsupported dtypes are rejected when the buffers are built
        if not all(p.dtype in ops.SUPPORTED_DTYPES for p in params):
            return "reference"
        order = ("cpp", "triton") if self._device.type == "cuda" else ("cpp",)
        usable = ops.available_backends(self._device)
        return next((b for b in order if b in usable), "reference")

    def _build_flat(self) -> None:
        for group_index in range(len(self.param_groups)):
            self._add_flat_buffers(group_index)

    def _add_flat_buffers(self, group_index: int) -> None:
        group = self.param_groups[group_index]
        self._check_group(group_index)
        buffers = build_flat_buffers([group], _describe, group_offset=group_index)
        self._buffers.extend(buffers)
        for buffer in buffers:
            if self.memory == "standard":
                dtype = self.state_dtype or buffer.data.dtype
                grad_prev = torch.zeros_like(buffer.data, dtype=dtype)
                if self.reuse_grad_buffer and dtype == buffer.data.dtype:
                    states = [self.state[param] for param in buffer.params]
                    store = SwapGradPrevStore(buffer, grad_prev, states)
                else:  # a compact G_{t-1} cannot trade places with the gradient buffer
                    store = GradPrevStore(grad_prev)
            elif self.memory == "recover":
                # x_{t-1} starts as x_0: finite, and ignored by the first step anyway.
                store = PointPrevStore(buffer.data.detach().clone())
            else:
                store = OffloadedPrev(buffer.data, self.offload_chunk)
            self._stores.append(store)
            for index, param in enumerate(buffer.params):
                self.state[param][store.state_key] = buffer.view(store.tensor, index)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients.

        In flat mode the gradient buffers are zeroed with one fill each and the ``.grad``
        views are kept (``set_to_none`` is ignored there: a None gradient would make
        autograd allocate a new tensor outside the buffer, which then has to be copied in).
        Per parameter, ``set_to_none=False`` gives each parameter a new zero tensor
        instead of zeroing the old one in place: that one may be G_{t-1}.
        """
        if not self.flat:
            self._retired.clear()
            if set_to_none:
                super().zero_grad(set_to_none=True)
                return
            for group in self.param_groups:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad = torch.zeros_like(param.grad)
            return
        for buffer in self._buffers:
            buffer.zero_grad()

    # ------------------------------------------------------------------ user API
    @property
    def alpha(self) -> float:
        """Current step size alpha (reading it synchronises with the device)."""
        return float(self._control[control.ALPHA].item())

    @property
    def last_step_retraced(self) -> bool:
        """Whether the last ``step()`` was a retrace (soft restart) or a skipped start."""
        return bool(self._control[control.LAST_RETRACED].item() > 0)

    @property
    def retrace_count(self) -> int:
        """Number of retraced steps so far."""
        return int(self._control[control.RETRACES].item())

    @property
    def control_state(self) -> torch.Tensor:
        """The packed float64 control state (read-only view; see :mod:`elra_fused.control`)."""
        return self._control.detach()

    def end_cycle(self) -> None:
        """Close the current control cycle (host call, no sync; paper: once per epoch)."""
        self._control.copy_(control.close_cycle(self._control))
        self._steps_in_cycle = 0

    @property
    def alpha_tensor(self) -> torch.Tensor:
        """alpha as a 0-d float64 device tensor (a copy; reading it needs no sync)."""
        return self._control[control.ALPHA].clone()

    def cycle_statistics(self) -> tuple[float, float] | None:
        """(mean, sigma) of the accepted losses of the cycle closed last.

        None before the first cycle closed and when the last cycle had no accepted step
        (the retrace rule then keeps the older statistics). These are the statistics the
        retrace rule uses; the dynamic batch size controller (paper 3.3) reads the same
        ones once per cycle. Reading them synchronises.
        """
        mean, std, closed, count = self._control[
            [control.CYCLE_MEAN, control.CYCLE_STD, control.CYCLE_CLOSED, control.CYCLE_LAST_COUNT]
        ].tolist()
        return (mean, std) if closed > 0 and count > 0 else None

    @_step_entry
    @torch.no_grad()
    def step(self, loss: LossArg = None) -> Any:  # type: ignore[override]
        """One ELRA step.

        Args:
            loss: the loss f_t at the current parameters (0-d tensor or number), or a
                closure that re-evaluates the model and returns the loss (torch style).

        Returns:
            The loss that was passed or that the closure returned.
        """
        returned = loss
        if callable(loss):
            with torch.enable_grad():
                returned = loss()
            loss = returned
        loss_value = self._loss_value(loss)
        work = self._flat_work() if self.flat else self._list_work()
        kernels = self._kernels

        # alpha_{t-1}: recover modes divide by it (G_{t-1} = (wd x_{t-1} - x_t) / alpha).
        recover = self.memory in POINT_MODES
        alpha_prev = self._control[control.ALPHA].clone() if recover else None
        partials: list[torch.Tensor] = []
        dots_coeffs: dict[tuple[float, torch.device], torch.Tensor] = {}
        for x, grad, store, wd, device in work.segments:
            coeffs = None
            if recover:
                key = (wd, device)
                if key not in dots_coeffs:
                    inv_alpha = (1.0 / alpha_prev).reshape(1)
                    dots_coeffs[key] = torch.cat([inv_alpha.new_full((1,), wd), inv_alpha])
                coeffs = dots_coeffs[key]
            partials.append(store.dots(kernels, x, grad, coeffs))

        decision = self._control_step(loss_value, partials)

        # A retrace moves back by (alpha_{t-1} - alpha_t) along G_{t-1}; recover modes
        # step along (wd x_{t-1} - x_t) = alpha_{t-1} G_{t-1}, hence the division.
        if recover:
            decision = _as_tensors(decision)
            decision = decision._replace(back=decision.back / alpha_prev)
        update_coeffs: dict[tuple[float, torch.device], torch.Tensor] = {}
        for x, grad, store, wd, device in work.segments:
            key = (wd, device)
            if key not in update_coeffs:
                update_coeffs[key] = _update_coeffs(decision, wd, device)
            store.update_(kernels, x, grad, update_coeffs[key])
        work.finish(decision)
        if not self.flat:
            # The stores recorded the versions of the G_{t-1} they updated; finish() just
            # wrote those of the parameters without gradient.
            for param, grad_prev in work.without_grad:
                self._prev_versions[param] = grad_prev._version
            self._retired = [t for _, _, store, _, _ in work.segments for t in store.retired]

        self._steps_in_cycle += 1
        if self.cycle_steps is not None and self._steps_in_cycle >= self.cycle_steps:
            self.end_cycle()
        return returned

    # ------------------------------------------------------------------ internals
    def _control_step(
        self, loss: float | torch.Tensor, partials: list[torch.Tensor]
    ) -> control.Decision:
        """Sum the segments' [||G_t||^2, <G_t, G_{t-1}>] (in segment order, from zero, in
        fp64), run the control law and update the state. The decision comes as 0-d
        device tensors, or as floats with ``host_control``."""
        if self.host_control:
            # The device is the host: reading the values syncs nothing, and the law in
            # Python floats costs a few us instead of ~150 us of tiny tensor ops. The
            # state goes in and out through a numpy view of the state tensor (one call
            # each way: this path runs once per step, right after backward, when the
            # CPU's caches are cold and every torch call costs several us).
            grad_sq = grad_dot_prev = 0.0
            for partial in partials:
                part_sq, part_dot = partial.tolist()
                grad_sq += part_sq
                grad_dot_prev += part_dot
            # On the CPU .cpu() is the tensor itself; host_control set on a GPU reads and
            # writes back a copy.
            host_state = self._control.cpu()
            state_view = host_state.numpy()
            state, decision = control.control_step(
                state_view.tolist(),
                loss,
                grad_sq,
                grad_dot_prev,
                self.config,
                control.FLOAT_MATH,
            )
            state_view[:] = state
            if host_state is not self._control:
                self._control.copy_(host_state)
            return decision
        totals = torch.zeros(2, dtype=torch.float64, device=self._device)
        for partial in partials:
            totals += partial.to(self._device, non_blocking=True)
        args = (self._control, loss, totals[0], totals[1], self.config)
        # Inside a torch.compile of the user's own step, dynamo traces the plain law.
        if self.compile_control and not torch.compiler.is_compiling():
            try:
                new_state, decision = control.compiled_control_step()(*args)
            except Exception as exc:  # any compiler failure: run the law eagerly
                # Compiling happens before the law runs, and the law itself changes
                # nothing in place: the eager call below starts from the same state.
                self.compile_control = False
                warnings.warn(
                    f"ELRA: torch.compile of the control law failed ({type(exc).__name__}: "
                    f"{exc}); running it eagerly (~200 small ops per step). Pass "
                    "compile_control=False to skip the attempt.",
                    stacklevel=4,
                )
                new_state, decision = control.control_step(*args)
        else:
            new_state, decision = control.control_step(*args)
        self._control.copy_(new_state)
        return decision

    def _loss_value(self, loss: Any) -> float | torch.Tensor:
        """f_t (averaged over ``process_group``) as a Python float with ``host_control``,
        else as a 0-d fp64 tensor on the control state's device (no host read)."""
        if loss is None:
            raise TypeError(
                "ELRA.step needs the loss: call opt.step(loss) after loss.backward(), or "
                "opt.step(closure) with a closure that returns the loss"
            )
        reduce = self.process_group is not None
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"ELRA.step: the loss must be a scalar (one element), got shape "
                    f"{tuple(loss.shape)}; reduce it (e.g. .mean()) before calling step"
                )
            if loss.is_complex():
                raise TypeError("ELRA.step: the loss must be real, got a complex tensor")
            if self.host_control and not reduce:
                return float(loss.item())  # fp64, like the tensor path (exact for float dtypes)
            # A copy when reducing: all_reduce works in place on what it is given.
            value = (
                loss.detach()
                .reshape(())
                .to(self._device, torch.float64, non_blocking=True, copy=reduce)
            )
        elif isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(
                f"ELRA.step: the loss must be a 0-d tensor, a number or a closure, "
                f"got {type(loss).__name__}"
            )
        elif self.host_control and not reduce:
            return float(loss)
        else:
            value = torch.tensor(float(loss), dtype=torch.float64, device=self._device)
        return self._mean_over_group(value) if reduce else value

    def _mean_over_group(self, value: torch.Tensor) -> float | torch.Tensor:
        """The mean of ``value`` (0-d fp64, ours to overwrite) over ``process_group``.

        Every rank receives the same sum and divides it by the same count, so all take
        bit-identical decisions; a non-finite loss on any rank makes every rank retrace.
        """
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.process_group)
        value /= dist.get_world_size(self.process_group)
        return float(value.item()) if self.host_control else value

    def _list_work(self) -> _StepWork:
        """Per-parameter segments: one tensor list per (device, wd); grad-less parameters
        are skipped. Everything is checked before the first kernel runs; error messages
        are only formatted when raised (this loop runs over every parameter per step)."""
        work = _StepWork()
        segments: dict[tuple[torch.device, float], _ListSegment] = {}
        # Hoisted: this loop costs ~1-3 us per parameter, most of it attribute reads.
        state_of = self.state
        versions = self._prev_versions
        strided = torch.strided
        supported = ops.SUPPORTED_DTYPES if self.backend != "reference" else None
        for group_index, group in enumerate(self.param_groups):
            wd = group["wd"]
            for param_index, param in enumerate(group["params"]):
                grad = param.grad
                state = state_of[param]
                grad_prev = state.get(GRAD_PREV_KEY)
                if grad_prev is not None:
                    recorded = versions.get(param)
                    if recorded is not None and grad_prev._version != recorded:
                        raise _grad_prev_changed(_describe(group_index, param_index, param))
                if grad is None:
                    if grad_prev is not None:
                        work.without_grad.append((param, grad_prev))
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
                    self._reject_list_grad(_describe(group_index, param_index, param), param)
                if (
                    grad.dtype != dtype
                    or not grad.is_contiguous()
                    or (grad_prev is not None and grad.data_ptr() == grad_prev.data_ptr())
                ):
                    # Rare: a gradient assigned by hand, or a second step without backward
                    # (the gradient is still last step's tensor, now G_{t-1}). One copy
                    # in the parameter's dtype and layout keeps it apart.
                    grad = grad.to(dtype, memory_format=torch.contiguous_format, copy=True)
                    param.grad = grad
                if grad_prev is None:
                    # A parameter seen for the first time had no gradient before: its
                    # previous gradient is zero, which is exact for <G_{t-1}, G_t>.
                    grad_prev = torch.zeros_like(
                        param,
                        dtype=self.state_dtype or dtype,
                        memory_format=torch.contiguous_format,
                    )
                    state[GRAD_PREV_KEY] = grad_prev
                segment = segments.get((device, wd))
                if segment is None:
                    segment = segments[(device, wd)] = _ListSegment()
                segment.add(param, grad, grad_prev, state)
        for (device, wd), segment in segments.items():
            store = GradPrevList(
                segment.prevs,
                segment.states,
                keep_reference=segment.by_reference,
                versions=self._prev_versions,
            )
            work.segments.append((segment.xs, segment.grads, store, wd, device))
        return work

    def _reject_list_grad(self, name: str, param: torch.Tensor) -> None:
        """Raise the error that fits a gradient the per-parameter layout cannot take."""
        check_grad(name, param, param.grad)  # sparse, complex, wrong shape
        if param.grad.device != param.device:
            raise ValueError(
                f"ELRA: {name} is on {param.device} but its gradient on {param.grad.device}"
            )
        raise ValueError(
            f"ELRA: {name} now has dtype {param.dtype}, which backend {self.backend!r} does "
            "not support (float32, bfloat16, float16)"
        )

    def _flat_work(self) -> _StepWork:
        """One segment per flat buffer; grad-less parameters keep their value."""
        work = _StepWork()
        for buffer, store in zip(self._buffers, self._stores, strict=True):
            buffer.check()
            missing = buffer.gather_grads()
            wd = self.param_groups[buffer.group_index]["wd"]
            if missing and wd != 1.0 and self.memory == "standard":
                # G = 0 already leaves x alone except for the decay; undo that on accept
                # so a parameter without gradient is skipped as in the reference. (Point
                # modes must decay it: x_{t-1} and x_t have to stay on the decay line.)
                for index in missing:
                    view = buffer.view(buffer.data, index)
                    work.kept.append((view, view.detach().clone()))
            work.segments.append((buffer.data, buffer.grad, store, wd, buffer.data.device))
        return work

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        for store in self._stores:
            store.synchronize()  # offload: copies to the host may be in flight
        sd = super().state_dict()
        sd[_STATE_KEY] = {
            "control": self._control.detach().clone(),
            "steps_in_cycle": self._steps_in_cycle,
            "config": self.config.as_dict(),
            "backend": self.backend,
            "flat": self.flat,
            "memory": self.memory,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(_STATE_KEY, None)
        if extra is None:
            raise ValueError(
                "ELRA.load_state_dict: this state dict has no ELRA control state "
                f"('{_STATE_KEY}'); was it saved by another optimizer?"
            )
        control_state = extra["control"]
        if not isinstance(control_state, torch.Tensor) or control_state.shape != (
            control.STATE_SIZE,
        ):
            raise ValueError(
                f"ELRA.load_state_dict: control state must be a tensor of {control.STATE_SIZE} "
                "values; the state dict is corrupt or from an incompatible version"
            )
        saved_memory = extra.get("memory", "standard")
        if (saved_memory in POINT_MODES) != (self.memory in POINT_MODES):
            raise ValueError(
                f"ELRA.load_state_dict: the state was saved with memory={saved_memory!r} "
                f"(it holds {'x_prev' if saved_memory in POINT_MODES else 'grad_prev'}) but "
                f"this optimizer uses memory={self.memory!r}; build it with "
                f"memory={saved_memory!r} (recover and offload are interchangeable)"
            )
        super().load_state_dict(state_dict)
        if self.flat:
            # torch rebuilt the per-parameter state as new tensors: copy the values back
            # into the flat buffers of the stores and restore the views.
            for buffer, store in zip(self._buffers, self._stores, strict=True):
                store.synchronize()
                for index, param in enumerate(buffer.params):
                    view = buffer.view(store.tensor, index)
                    loaded = self.state[param].get(store.state_key)
                    if loaded is not None:
                        view.copy_(loaded)
                    elif isinstance(store, GradPrevStore):
                        view.zero_()  # never had a gradient: G_{t-1} = 0
                    else:
                        view.copy_(param.detach())  # x_{t-1} = x_t: recovered G_{t-1} ~ 0
                    self.state[param][store.state_key] = view
        else:
            # torch cast the loaded state to each parameter's dtype (a compact G_{t-1} goes
            # back to state_dtype) and may have kept the caller's tensors: the optimizer
            # takes its own contiguous copies, whose versions it then starts tracking.
            self._prev_versions.clear()
            for state in self.state.values():
                loaded = state.get(GRAD_PREV_KEY)
                if loaded is not None:
                    state[GRAD_PREV_KEY] = loaded.to(
                        self.state_dtype or loaded.dtype,
                        memory_format=torch.contiguous_format,
                        copy=True,
                    )
        self._control.copy_(control_state.to(self._control.device, torch.float64))
        self._steps_in_cycle = int(extra.get("steps_in_cycle", 0))


class _ListSegment:
    """The tensor lists of one (device, wd) segment of the per-parameter layout."""

    __slots__ = ("xs", "grads", "prevs", "states", "by_reference")

    def __init__(self) -> None:
        self.xs: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.prevs: list[torch.Tensor] = []
        self.states: list[dict[str, Any]] = []
        # G_t can become G_{t-1} by reference only when they share a dtype (a compact
        # state_dtype is a copy) and G_t owns its memory: a gradient that is a view into
        # someone else's buffer (DDP's gradient_as_bucket_view=True) is rewritten in
        # place by the next backward, so G_{t-1} is copied out of it instead.
        self.by_reference = True

    def add(
        self, x: torch.Tensor, grad: torch.Tensor, grad_prev: torch.Tensor, state: dict[str, Any]
    ) -> None:
        self.xs.append(x)
        self.grads.append(grad)
        self.prevs.append(grad_prev)
        self.states.append(state)
        if grad_prev.dtype != grad.dtype or grad._base is not None:
            self.by_reference = False


class _StepWork:
    """What one step works on: (x, grad, previous-step store, wd, device) segments (x and
    grad are tensors in the flat layout, lists of tensors per parameter) and fix-ups."""

    def __init__(self) -> None:
        self.segments: list[tuple[Any, Any, Any, float, torch.device]] = []
        # per-parameter layout: parameters without gradient that have a G_{t-1}
        self.without_grad: list[tuple[torch.Tensor, torch.Tensor]] = []
        # flat layout: (view, value before the update) of parameters without gradient
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def finish(self, decision: control.Decision) -> None:
        if not (self.kept or self.without_grad):
            return
        decision = _as_tensors(decision)
        accepted = decision.accept > 0
        for view, saved in self.kept:
            view.copy_(torch.where(accepted.to(view.device), saved, view))
        if self.without_grad:
            # Skipped parameters: their G_t is zero. An accept leaves x alone (no decay)
            # and the stored G_{t-1} becomes 0; a retrace still undoes their last step.
            keep = 1.0 - decision.accept
            for param, grad_prev in self.without_grad:
                back = (keep * decision.back).to(param.device, grad_prev.dtype)
                param.add_(grad_prev * back)
                grad_prev.mul_(keep.to(grad_prev.device, grad_prev.dtype))


def _update_coeffs(decision: control.Decision, wd: float, device: torch.device) -> torch.Tensor:
    """[accept, decay, step, back] for the update kernels, on ``device``."""
    if isinstance(decision.alpha, float):  # host control: one small host-to-device copy
        values = torch.tensor(
            [decision.accept, wd, decision.alpha, decision.back], dtype=torch.float64
        )
        return values if device.type == "cpu" else values.to(device, non_blocking=True)
    wd_tensor = torch.full_like(decision.alpha, wd)
    stacked = torch.stack([decision.accept, wd_tensor, decision.alpha, decision.back])
    return stacked.to(device, non_blocking=True)


def _as_tensors(decision: control.Decision) -> control.Decision:
    """The decision as 0-d float64 tensors (host control gives floats)."""
    return control.Decision(*(torch.as_tensor(v, dtype=torch.float64) for v in decision))


def _grad_prev_changed(name: str) -> RuntimeError:
    return RuntimeError(
        f"ELRA: the gradient of {name} from the previous step was modified in place after "
        "that step (e.g. zero_grad(set_to_none=False) from the model or another optimizer, "
        "or a backward() without zero_grad() in between). With flat=False ELRA keeps that "
        "tensor as G_{t-1}, so it is lost; nothing was changed. Call opt.zero_grad() (or "
        "model.zero_grad()) between steps, or build ELRA with flat=True, which keeps its own "
        "copy."
    )


def _check_param(name: str, param: torch.Tensor) -> None:
    """What ELRA needs of every parameter, whatever the backend and layout."""
    if _is_dtensor(param):
        raise ValueError(
            f"ELRA: {name} is a DTensor (FSDP / tensor parallel). Sharded parameters are "
            "not supported: the dots pass would need a sum over the shards. For data "
            "parallel training use DDP with process_group=..."
        )
    if param.is_complex():
        raise ValueError(
            f"ELRA: {name} is complex; ELRA supports real floating-point parameters only"
        )
    if not param.is_floating_point():
        raise ValueError(
            f"ELRA: {name} has dtype {param.dtype}; ELRA needs floating-point parameters"
        )


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not dist.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 keeps it under torch.distributed._tensor
        from torch.distributed._tensor import DTensor
    return isinstance(tensor, DTensor)


def _check_process_group(process_group: Any) -> None:
    if process_group is not None:
        if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(
                "ELRA: process_group must be a torch.distributed ProcessGroup (e.g. "
                f"torch.distributed.group.WORLD) or None, got {type(process_group).__name__}"
            )
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        warnings.warn(
            f"ELRA: torch.distributed is initialized with {dist.get_world_size()} ranks but "
            "no process_group was given. If this optimizer steps a data-parallel replica "
            "(DDP), pass process_group=torch.distributed.group.WORLD (or DDP's group): "
            "otherwise each rank decides accept / retrace on its own loss and the replicas "
            "drift apart. Ignore this if you pass a loss that is already averaged over "
            "the ranks.",
            stacklevel=3,
        )


def _check_wd(wd: Any) -> None:
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not 0.0 < wd <= 1.0:
        raise ValueError(
            f"ELRA: wd is the paper's multiplicative weight decay x <- wd * x and must lie "
            f"in (0, 1] (1.0 = off, e.g. 0.9997), got {wd!r}"
        )
