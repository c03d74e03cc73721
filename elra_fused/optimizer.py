"""``elra_fused.ELRA``: the torch.optim.Optimizer users import.

Per step the optimizer runs exactly three things, none of which reads a value back to
the host:

1. the ``dots`` pass: <G_t, G_t> and <G_{t-1}, G_t> summed over all parameters;
2. the control law (:mod:`elra_fused.control`) on a packed float64 state vector;
3. the ``update`` pass: x <- wd x - alpha G (accept) or x <- x + (alpha_{t-1} - alpha_t)
   G_{t-1} (retrace), with coefficients read from a device tensor.

The passes are the kernels of :mod:`elra_fused.reference_ops` (plain torch, float64
math): this module is the reference optimizer every fused backend is compared with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import control
from . import reference_ops as ref
from .control import ControlConfig

#: Param-group keys a user may set per group. alpha is global (paper section 3.1), so
#: only the multiplicative weight decay can differ between groups.
PER_GROUP_KEYS = frozenset({"params", "wd", "name"})
_STATE_KEY = "elra_control"

LossArg = torch.Tensor | float | int | Callable[[], Any] | None


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
        backend: "reference" (plain torch ops).

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
        backend: str = "reference",
    ) -> None:
        _check_wd(wd)
        if cycle_steps is not None and not (isinstance(cycle_steps, int) and cycle_steps > 0):
            raise ValueError(
                f"ELRA: cycle_steps must be a positive int or None, got {cycle_steps!r}"
            )
        if backend != "reference":
            raise ValueError(f"ELRA: unknown backend {backend!r}; available: 'reference'")
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
        self.cycle_steps = cycle_steps
        self.backend = backend
        super().__init__(params, {"wd": wd})
        first = self._first_param()
        self._device = first.device
        self._control = control.initial_state(self.config, self._device)
        self._steps_in_cycle = 0

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
        for param_index, param in enumerate(self.param_groups[-1]["params"]):
            if param.is_complex():
                raise ValueError(
                    f"ELRA: {_describe(group_index, param_index, param)} is complex; ELRA "
                    "supports real floating-point parameters only"
                )
            if not param.is_floating_point():
                raise ValueError(
                    f"ELRA: {_describe(group_index, param_index, param)} has dtype "
                    f"{param.dtype}; ELRA needs floating-point parameters"
                )

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
        loss_value = self._loss_tensor(loss)
        segments = self._segments()

        totals = torch.zeros(2, dtype=torch.float64, device=self._device)
        for param, grad_prev in segments.with_grad:
            part = ref.dots(param.grad, grad_prev)
            totals += part.to(self._device, non_blocking=True)

        new_state, decision = control.control_step(
            self._control, loss_value, totals[0], totals[1], self.config
        )
        self._control.copy_(new_state)
        self._apply(decision, segments)

        self._steps_in_cycle += 1
        if self.cycle_steps is not None and self._steps_in_cycle >= self.cycle_steps:
            self.end_cycle()
        return returned

    # ------------------------------------------------------------------ internals
    def _loss_tensor(self, loss: Any) -> torch.Tensor:
        if loss is None:
            raise TypeError(
                "ELRA.step needs the loss: call opt.step(loss) after loss.backward(), or "
                "opt.step(closure) with a closure that returns the loss"
            )
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"ELRA.step: the loss must be a scalar (one element), got shape "
                    f"{tuple(loss.shape)}; reduce it (e.g. .mean()) before calling step"
                )
            if loss.is_complex():
                raise TypeError("ELRA.step: the loss must be real, got a complex tensor")
            return loss.detach().reshape(()).to(self._device, torch.float64, non_blocking=True)
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(
                f"ELRA.step: the loss must be a 0-d tensor, a number or a closure, "
                f"got {type(loss).__name__}"
            )
        return torch.tensor(float(loss), dtype=torch.float64, device=self._device)

    def _segments(self) -> _Segments:
        segments = _Segments()
        for group_index, group in enumerate(self.param_groups):
            for param_index, param in enumerate(group["params"]):
                grad = param.grad
                state = self.state[param]
                if grad is None:
                    if "grad_prev" in state:
                        segments.without_grad.append((param, state["grad_prev"]))
                    continue
                if grad.is_sparse:
                    raise ValueError(
                        f"ELRA: {_describe(group_index, param_index, param)} has a sparse "
                        "gradient; ELRA needs dense gradients"
                    )
                if grad.is_complex():
                    raise ValueError(
                        f"ELRA: {_describe(group_index, param_index, param)} has a complex "
                        "gradient; ELRA supports real parameters only"
                    )
                if grad.shape != param.shape:
                    raise ValueError(
                        f"ELRA: {_describe(group_index, param_index, param)} has a gradient "
                        f"of shape {tuple(grad.shape)}"
                    )
                if "grad_prev" not in state:
                    # A parameter seen for the first time had no gradient before: its
                    # previous gradient is zero, which is exact for <G_{t-1}, G_t>.
                    state["grad_prev"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )
                segments.with_grad.append((param, state["grad_prev"]))
                segments.wd.append(group["wd"])
        return segments

    def _apply(self, decision: control.Decision, segments: _Segments) -> None:
        coeff_cache: dict[float, torch.Tensor] = {}
        for (param, grad_prev), wd in zip(segments.with_grad, segments.wd, strict=True):
            coeffs = coeff_cache.get(wd)
            if coeffs is None:
                coeffs = self._coeffs(decision, wd, param.device)
                coeff_cache[wd] = coeffs
            ref.update_(param, param.grad, grad_prev, coeffs)
        if segments.without_grad:
            # Skipped parameters: their G_t is zero. An accept leaves x alone (no decay)
            # and the stored G_{t-1} becomes 0; a retrace still undoes their last step.
            keep = 1.0 - decision.accept
            for param, grad_prev in segments.without_grad:
                back = (keep * decision.back).to(param.device, grad_prev.dtype)
                param.add_(grad_prev * back)
                grad_prev.mul_(keep.to(grad_prev.device, grad_prev.dtype))

    @staticmethod
    def _coeffs(decision: control.Decision, wd: float, device: torch.device) -> torch.Tensor:
        wd_tensor = torch.full_like(decision.alpha, wd)
        coeffs = torch.stack([decision.accept, wd_tensor, decision.alpha, decision.back])
        return coeffs.to(device, non_blocking=True)

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd[_STATE_KEY] = {
            "control": self._control.detach().clone(),
            "steps_in_cycle": self._steps_in_cycle,
            "config": self.config.as_dict(),
            "backend": self.backend,
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
        super().load_state_dict(state_dict)
        self._control.copy_(control_state.to(self._control.device, torch.float64))
        self._steps_in_cycle = int(extra.get("steps_in_cycle", 0))


class _Segments:
    """The (param, grad_prev) pairs one step works on, split by whether a grad exists."""

    def __init__(self) -> None:
        self.with_grad: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.wd: list[float] = []
        self.without_grad: list[tuple[torch.Tensor, torch.Tensor]] = []


def _check_wd(wd: Any) -> None:
    if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not 0.0 < wd <= 1.0:
        raise ValueError(
            f"ELRA: wd is the paper's multiplicative weight decay x <- wd * x and must lie "
            f"in (0, 1] (1.0 = off, e.g. 0.9997), got {wd!r}"
        )
