"""The control law's constants (:class:`ControlConfig`): the paper's values and the
authors' guards, with their validation. The law itself is :mod:`elra_fused.control`,
which re-exports everything here."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# ---------------------------------------------------------------------------------------
# Paper constants (defaults of the constructor arguments).
# ---------------------------------------------------------------------------------------
#: Initial step size alpha_0 (section 3.1: "We chose alpha_0 = 1e-3").
ALPHA0 = 1e-3
#: Gain k of the noise correction kappa(a) = 1 + k / (1 + a^2) (section 3.1).
KAPPA_GAIN = 0.15
#: Cap of the growth ratio alpha_t / alpha_{t-1} (section 3.1, footnote 4: "for neural
#: networks gamma_max = 10 is probably sufficient").
GAMMA_MAX = 10.0
#: Hard bounds 1e-8 < alpha < 1e6 (section 3.1).
ALPHA_MIN = 1e-8
ALPHA_MAX = 1e6
#: Step cropping constant c in alpha_t * ||G_t|| <= c (section 3.5, "we use c = 2").
STEP_CROP = 2.0
#: Warm-up floor m in alpha_t * ||G_t|| >= m (section 3.1, footnote 5).
WARMUP_MIN_STEP = 0.1
#: Retrace when f_t > mean + 5 sigma of the last control cycle (section 3.2).
RETRACE_SIGMAS = 5.0
#: Before the first cycle closes: retrace when f_t > 1.1 f_0 (section 3.2).
INITIAL_RETRACE_FACTOR = 1.1
#: A retrace reduces alpha at least by this factor (section 3.2).
RETRACE_MAX_SHRINK = 0.5
#: Fallback shrink when the parabola formula gives no usable step (issue spec: alpha/100).
RETRACE_FALLBACK_SHRINK = 0.01
#: The authors' guards (module docstring).
MIN_CYCLE_LOSSES = 100
SIGMA_INFLATION = 1.05
RETRACE_MIN_STEP = 1e-4
MAX_RETRACES = 25


@dataclass(frozen=True)
class ControlConfig:
    """Constants of the control law; defaults are the paper's (or the authors') values.
    ``step_crop`` is on at c = 2 (paper 3.5 "we use c = 2"; the authors' code always
    clips at 2: without it small-batch runs diverge), ``warmup_steps`` off (the paper
    enables it for language models); ``initial_retrace_factor=None`` drops the
    ``f_t > 1.1 f_0`` rule (pre-trained starts). The last five fields are the authors'
    guards (module docstring); ``min_cycle_losses=1, sigma_inflation=1.0,
    retrace_min_step=0.0, max_retraces=None`` is the paper's law without them.
    """

    alpha0: float = ALPHA0
    kappa_gain: float = KAPPA_GAIN
    gamma_max: float = GAMMA_MAX
    alpha_min: float = ALPHA_MIN
    alpha_max: float = ALPHA_MAX
    step_crop: float | None = STEP_CROP
    warmup_steps: int = 0
    warmup_min_step: float = WARMUP_MIN_STEP
    retrace_sigmas: float = RETRACE_SIGMAS
    initial_retrace_factor: float | None = INITIAL_RETRACE_FACTOR
    min_cycle_losses: int = MIN_CYCLE_LOSSES
    sigma_inflation: float = SIGMA_INFLATION
    retrace_min_step: float = RETRACE_MIN_STEP
    max_retraces: int | None = MAX_RETRACES
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        positive = {
            "alpha0": self.alpha0,
            "gamma_max": self.gamma_max,
            "alpha_min": self.alpha_min,
            "alpha_max": self.alpha_max,
            "warmup_min_step": self.warmup_min_step,
            "retrace_sigmas": self.retrace_sigmas,
        }
        for name, value in positive.items():
            if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
                raise ValueError(f"ELRA: {name} must be a finite positive number, got {value!r}")
        if not self.alpha_min < self.alpha_max:
            raise ValueError(
                f"ELRA: need alpha_min < alpha_max, got {self.alpha_min} and {self.alpha_max}"
            )
        if not self.alpha_min <= self.alpha0 <= self.alpha_max:
            raise ValueError(
                f"ELRA: alpha0={self.alpha0} lies outside [alpha_min, alpha_max] = "
                f"[{self.alpha_min}, {self.alpha_max}]"
            )
        if not (isinstance(self.kappa_gain, (int, float)) and self.kappa_gain >= 0):
            raise ValueError(f"ELRA: kappa_gain must be >= 0, got {self.kappa_gain!r}")
        if self.step_crop is not None and not self.step_crop > 0:
            raise ValueError(f"ELRA: step_crop must be > 0 or None, got {self.step_crop!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"ELRA: warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.initial_retrace_factor is not None and not self.initial_retrace_factor >= 1:
            raise ValueError(
                "ELRA: initial_retrace_factor must be >= 1 or None, "
                f"got {self.initial_retrace_factor!r}"
            )
        _check_count("min_cycle_losses", self.min_cycle_losses, allow_none=False)
        _check_count("max_retraces", self.max_retraces, allow_none=True)
        if not (isinstance(self.sigma_inflation, (int, float)) and 1.0 <= self.sigma_inflation):
            raise ValueError(f"ELRA: sigma_inflation must be >= 1, got {self.sigma_inflation!r}")
        limit = self.max_grad_norm
        if limit is not None and not (isinstance(limit, (int, float)) and limit > 0):
            raise ValueError(f"ELRA: max_grad_norm must be > 0 or None, got {limit!r}")
        step = self.retrace_min_step
        if not (isinstance(step, (int, float)) and 0.0 <= step < float("inf")):
            raise ValueError(f"ELRA: retrace_min_step must be finite and >= 0, got {step!r}")

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _check_count(name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
        none = " or None" if allow_none else ""
        raise ValueError(f"ELRA: {name} must be an int >= 1{none}, got {value!r}")
