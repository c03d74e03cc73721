"""The control law's constants (:class:`ControlConfig`): the paper's values and the
authors' guards, with their validation, and the opt-in presets (:data:`PRESETS`). The law
itself is :mod:`elra_fused.control`, which re-exports everything here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
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

# ---------------------------------------------------------------------------------------
# The authors' 2-D path (opt-in: ``preset="2d"``, :data:`PRESETS`). From their code,
# GitHub ``alex77g2/solver_icml`` at commit d6cefd0, ``lib_grad_solve.py``, class
# ``SelfConstOptim`` (the ``p2min_step`` path for len(x) <= 20); learnt from, not copied.
# ---------------------------------------------------------------------------------------
#: alpha_0 of the 2-D path (``SelfConstOptim.__init__`` and ``p2min_step``: 0.00001).
ALPHA0_2D = 1e-5
#: Start (and reset) value of the growth damper d (``__growthdamper``, ``growth_func``).
GROWTH_DAMPER_START = 855000.0
#: The growth cap is GROWTH_DAMPER_SCALE / (1 + d) (``growth_func``).
GROWTH_DAMPER_SCALE = 1e6
#: d is divided by this on every accepted step (``growth_func``).
GROWTH_DAMPER_DECAY = 3.9
#: Both dampers grow by this factor (or by this amount, below 1) on a bad step
#: (``growth_func``, ``UpdateErrorDamper``).
DAMPER_JUMP = 16.0
#: Start value and cap of the error damper e (``__errordamper``, ``UpdateErrorDamper``).
ERROR_DAMPER_START = 500000.0
#: e is divided by this on every step that is not an accepted rise (``UpdateErrorDamper``).
ERROR_DAMPER_DECAY = 1.69
#: Retrace tolerance T = base + (span + root * sqrt(best)) / (1 + sqrt(e)), and retrace
#: when f_t >= margin * T * best (``CalcErrorTolerance``, ``p2min_step``).
TOLERANCE_BASE = 25.0
TOLERANCE_SPAN = 2500.0
TOLERANCE_ROOT = 71.0
TOLERANCE_MARGIN = 1.1
#: "best" is the best loss so far, relaxed by this factor on every step that does not
#: improve it (``p2min_step``: ``__truebestfkt *= 1.1``).
BEST_RELAX = 1.1
#: The least a non-negative best loss relaxes to (ours, not the authors'): a best of exactly
#: 0 (an exact minimum of a loss >= 0) would keep the threshold at 0 for good, and every
#: later loss >= 0 would retrace.
BEST_FLOOR = 1e-300


@dataclass(frozen=True)
class ControlConfig:
    """Constants of the control law; defaults are the paper's (or the authors') values.
    ``step_crop`` is on at c = 2 (paper 3.5 "we use c = 2"; the authors' code always
    clips at 2: without it small-batch runs diverge), ``warmup_steps`` off (the paper
    enables it for language models); ``initial_retrace_factor=None`` drops the
    ``f_t > 1.1 f_0`` rule (pre-trained starts). The last five fields are the authors'
    guards (module docstring); ``min_cycle_losses=1, sigma_inflation=1.0,
    retrace_min_step=0.0, max_retraces=None`` is the paper's law without them.

    ``growth_damper`` and ``error_damper`` (None = off) are the authors' 2-D path, opt-in
    through ``PRESETS["2d"]`` (:mod:`elra_fused.control`, "The 2-D preset"): the start
    values of their growth damper (the growth cap of eq. 4 becomes
    min(gamma_max, 1e6 / (1 + d))) and of their error damper (the retrace rule becomes
    "f_t >= 1.1 T(best, e) best", T from ``CalcErrorTolerance``, in place of the
    5-sigma rule).
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
    growth_damper: float | None = None
    error_damper: float | None = None

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
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and value > 0 and value != float("inf")):
                raise ValueError(f"ELRA: {name} must be a finite positive number, got {value!r}")
        if not self.gamma_max >= 1.0:
            raise ValueError(
                f"ELRA: gamma_max caps the growth alpha_t / alpha_{{t-1}} and must be >= 1 "
                f"(below 1 alpha could only shrink), got {self.gamma_max!r}"
            )
        if not self.alpha_min < self.alpha_max:
            raise ValueError(
                f"ELRA: need alpha_min < alpha_max, got {self.alpha_min} and {self.alpha_max}"
            )
        if not self.alpha_min <= self.alpha0 <= self.alpha_max:
            raise ValueError(
                f"ELRA: alpha0={self.alpha0} lies outside [alpha_min, alpha_max] = "
                f"[{self.alpha_min}, {self.alpha_max}]"
            )
        gain = self.kappa_gain
        if not (isinstance(gain, (int, float)) and 0 <= gain < float("inf")):
            raise ValueError(f"ELRA: kappa_gain must be finite and >= 0, got {gain!r}")
        crop = self.step_crop
        if crop is not None and (isinstance(crop, bool) or not crop > 0):
            raise ValueError(f"ELRA: step_crop must be > 0 or None, got {crop!r}")
        steps = self.warmup_steps
        if isinstance(steps, bool) or not (isinstance(steps, int) and steps >= 0):
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
        number = isinstance(limit, (int, float)) and not isinstance(limit, bool)
        if limit is not None and not (number and limit > 0):
            raise ValueError(f"ELRA: max_grad_norm must be > 0 or None, got {limit!r}")
        step = self.retrace_min_step
        if not (isinstance(step, (int, float)) and 0.0 <= step < float("inf")):
            raise ValueError(f"ELRA: retrace_min_step must be finite and >= 0, got {step!r}")
        for name in ("growth_damper", "error_damper"):
            damper = getattr(self, name)
            ok = isinstance(damper, (int, float)) and 0.0 <= damper < float("inf")
            if damper is not None and not (ok and not isinstance(damper, bool)):
                raise ValueError(f"ELRA: {name} must be finite and >= 0 or None, got {damper!r}")

    def as_dict(self) -> dict[str, float | int | None]:
        """The fields as a dict (saved in the state dict). The 2-D dampers appear only
        when set, so a default config reads as one saved before they existed."""
        values = asdict(self)
        for name in _OPT_IN_FIELDS:
            if values[name] is None:
                del values[name]
        return values


#: Fields that :meth:`ControlConfig.as_dict` leaves out while they are None (off).
_OPT_IN_FIELDS = ("growth_damper", "error_damper")

#: Opt-in presets: name -> the :class:`ControlConfig` fields it sets.
#:
#: ``"2d"``, the authors' 2-D path (``lib_grad_solve.py``, ``SelfConstOptim.p2min_step``
#: for len(x) <= 20, at commit d6cefd0) for exact gradients in few dimensions: alpha_0 =
#: 1e-5; no noise correction (kappa_gain 0), no step crop and no retrace floor (their 2-D
#: path has none); the growth damper (``growth_func``) in place of a fixed gamma_max; the
#: retrace rule against the best loss so far (``CalcErrorTolerance``) in place of the
#: 5-sigma and the initial 1.1 f_0 rules. Reproduces the paper's ELRA column of Tables 1
#: and 2 (README, "Paper 2-D problems"). Not meant for mini-batch training.
PRESETS: dict[str, dict[str, float | int | None]] = {
    "2d": {
        "alpha0": ALPHA0_2D,
        "kappa_gain": 0.0,
        "gamma_max": GROWTH_DAMPER_SCALE,  # the damper's cap never exceeds it
        "step_crop": None,
        "retrace_min_step": 0.0,
        "initial_retrace_factor": None,
        "growth_damper": GROWTH_DAMPER_START,
        "error_damper": ERROR_DAMPER_START,
    },
}


def with_preset(config: ControlConfig, preset: str | None) -> ControlConfig:
    """``config`` with the fields of ``PRESETS[preset]`` that it leaves at their defaults
    (a field set to another value wins over the preset). ``None``: ``config`` itself."""
    if preset is None:
        return config
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"ELRA: preset must be None or one of {sorted(PRESETS)}, got {preset!r}")
    defaults = ControlConfig()
    unchanged = {
        field.name
        for field in fields(ControlConfig)
        if getattr(config, field.name) == getattr(defaults, field.name)
    }
    return replace(config, **{k: v for k, v in PRESETS[preset].items() if k in unchanged})


def _check_count(name: str, value: Any, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
        none = " or None" if allow_none else ""
        raise ValueError(f"ELRA: {name} must be an int >= 1{none}, got {value!r}")
