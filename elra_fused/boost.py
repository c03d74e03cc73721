"""Mean value boosting (paper section 3.7): evaluate at the mean of recent iterates.

ELRA oscillates around the descent path, so the mean ``x_bar = (1/n) sum_k x_{T+k}`` of
the points of a window (e.g. an epoch) often has a lower loss than the last point. The
mean is used for evaluation only and never fed back into the optimization.

Usage (off by default in :mod:`elra_fused.train`; ``--boost`` turns it on)::

    from elra_fused.boost import Booster

    booster = Booster(model.parameters())        # window closed by end_window()
    for epoch in range(epochs):
        for xb, yb in loader:
            ...
            opt.step(loss)
            booster.update()                     # after the step: x_{t+1} enters the mean
        booster.end_window()                     # the epoch's mean becomes the boosted point
        with booster.boosted(model):             # model now holds x_bar
            test_acc = evaluate(model)
        # model holds its own weights again, bit for bit

Design:

* Accumulators are **float64 sums** (one per parameter). A float32 running sum of n
  iterates carries a rounding error that grows like n * 2^-24 relative to |x| (about
  1e-3 after ten thousand steps), larger than the oscillation the mean is meant to cancel;
  in float64 it is negligible for any realistic window. Cost: 2x the parameter memory of
  fp32 weights, plus one copy of the closed window's mean in the parameters' dtype. Pass
  ``dtype=torch.float32`` to halve the sum (ok for short windows), or ``device="cpu"`` to
  keep everything in host memory. Lower precisions (float16, bfloat16, float8) are
  refused rather than accumulated in: with an 8- or 11-bit mantissa the sum stops
  growing once it is a few hundred times the iterate (float16's mean of 3000 constant
  iterates is off by 0.14), so the "mean" would be wrong, silently. Parameters of any
  floating dtype are fine; only the sums need the precision.
* ``update()`` is sync-free: on the parameters' device it is one in-place ``add_`` per
  parameter. With host accumulators for device parameters it copies the parameters into
  a pinned staging buffer asynchronously and adds that copy to the sums at the *next*
  ``update()`` (or when the window closes), after waiting on the copy's CUDA event --
  a copy issued a whole step earlier, so normally no wait at all.
* ``boosted(model)`` copies the mean into the parameters in place (views stay valid,
  e.g. an optimizer's flat buffers), and restores the saved weights bit for bit on exit,
  also when the body raises.
* BatchNorm running statistics: by default the model's current running statistics are
  kept (they belong to the last iterate, a good approximation when the window is short
  relative to the BN momentum). Pass ``bn_data=`` (an iterable of input batches or
  ``(inputs, ...)`` tuples) to recompute them at the boosted weights with one forward
  pass in train mode (cumulative average over the pass); the original buffers are
  restored bit for bit on exit as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .batching import is_count

_BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)
#: Accumulator dtypes: precise enough to sum a window of iterates (see the module docstring).
ACCUMULATOR_DTYPES = (torch.float32, torch.float64)


class Booster:
    """Running mean of parameters over a window of steps (paper 3.7).

    Args:
        params: the parameters to average (e.g. ``model.parameters()``).
        window: close the window automatically every ``window`` updates; None (default)
            means the user calls :meth:`end_window` (e.g. once per epoch, the paper's
            window).
        device: where the sums live: None = each parameter's device, or e.g. "cpu".
        dtype: accumulator dtype, float64 (default) or float32; lower precisions are
            refused (see the module docstring).

    :meth:`load_state_dict` checks the whole state before it changes anything.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        window: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("Booster: got an empty parameter list")
        for index, param in enumerate(self.params):
            if not param.is_floating_point():
                raise ValueError(
                    f"Booster: parameter {index} has dtype {param.dtype}; only floating-point "
                    "parameters can be averaged"
                )
        if window is not None and not is_count(window, 1):
            raise ValueError(f"Booster: window must be a positive int or None, got {window!r}")
        if dtype not in ACCUMULATOR_DTYPES:
            raise ValueError(
                f"Booster: dtype must be torch.float32 or torch.float64, got {dtype}: the sums "
                "of a window lose the mean in a lower precision"
            )
        self.window = window
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self._sums = [torch.zeros(p.shape, dtype=dtype, device=self._home(p)) for p in self.params]
        self.count = 0  # iterates in the open window (host int: no sync)
        self.windows_closed = 0
        self.averaged_count = 0  # iterates behind ``averaged``
        self.averaged: list[torch.Tensor] | None = None  # mean of the last closed window
        # Host accumulation of device parameters: pinned staging + event per parameter.
        self._staging: list[torch.Tensor] | None = None
        self._pending_event: Any = None

    def _home(self, param: torch.Tensor) -> torch.device:
        return param.device if self.device is None else self.device

    def _async_host(self, param: torch.Tensor) -> bool:
        return self.device is not None and self.device.type == "cpu" and param.is_cuda

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self) -> None:
        """Add the current parameters to the window (call after ``opt.step``)."""
        self._flush()
        for param, total in zip(self.params, self._sums, strict=True):
            if self._async_host(param):
                continue
            total.add_(param.detach().to(total.device, non_blocking=True))
        if any(self._async_host(p) for p in self.params):
            self._stage()
        self.count += 1
        if self.window is not None and self.count >= self.window:
            self.end_window()

    def _stage(self) -> None:
        if self._staging is None:
            self._staging = [
                torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=True)
                if self._async_host(p)
                else torch.empty(0)
                for p in self.params
            ]
        for param, buffer in zip(self.params, self._staging, strict=True):
            if self._async_host(param):
                buffer.copy_(param.detach(), non_blocking=True)
        self._pending_event = torch.cuda.Event()
        self._pending_event.record()

    def _flush(self) -> None:
        """Add a pending asynchronous host copy to the sums."""
        if self._pending_event is None:
            return
        self._pending_event.synchronize()
        assert self._staging is not None
        for param, buffer, total in zip(self.params, self._staging, self._sums, strict=True):
            if self._async_host(param):
                total.add_(buffer)
        self._pending_event = None

    @torch.no_grad()
    def end_window(self) -> bool:
        """Close the window: its mean becomes the boosted point. False if it was empty."""
        self._flush()
        if self.count == 0:
            return False
        self.averaged = [
            (total / self.count).to(param.device, param.dtype)
            for param, total in zip(self.params, self._sums, strict=True)
        ]
        self.averaged_count = self.count
        for total in self._sums:
            total.zero_()
        self.count = 0
        self.windows_closed += 1
        return True

    @torch.no_grad()
    def mean(self) -> list[torch.Tensor]:
        """The boosted point: the last closed window's mean, else the open window's."""
        if self.averaged is not None:
            return self.averaged
        self._flush()
        if self.count == 0:
            raise RuntimeError("Booster: no iterates yet; call update() after optimizer steps")
        return [
            (total / self.count).to(param.device, param.dtype)
            for param, total in zip(self.params, self._sums, strict=True)
        ]

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def boosted(
        self, model: torch.nn.Module | None = None, bn_data: Iterable[Any] | None = None
    ) -> Iterator[None]:
        """Temporarily load the boosted point into the parameters (in place).

        Args:
            model: the module the parameters belong to; needed for ``bn_data``.
            bn_data: batches to recompute BatchNorm running statistics at the boosted
                weights (None: keep the current statistics; see the module docstring).

        On exit (normal or exception) parameters, BN buffers and the model's train/eval
        mode are restored exactly.
        """
        target = self.mean()
        with torch.no_grad():
            saved = [param.detach().clone() for param in self.params]
        bn_modules = []
        saved_buffers: list[torch.Tensor] = []
        if bn_data is not None:
            if model is None:
                raise ValueError("Booster.boosted: bn_data needs the model")
            bn_modules = [m for m in model.modules() if isinstance(m, _BN_TYPES)]
            saved_buffers = [b.detach().clone() for m in bn_modules for b in _bn_buffers(m)]
        saved_momenta = [m.momentum for m in bn_modules]
        was_training = model.training if model is not None else None
        try:
            with torch.no_grad():
                for param, value in zip(self.params, target, strict=True):
                    param.copy_(value)
            if bn_modules:
                _recompute_bn(model, bn_modules, bn_data)
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved, strict=True):
                    param.copy_(value)
                buffers = [b for m in bn_modules for b in _bn_buffers(m)]
                for buffer, value in zip(buffers, saved_buffers, strict=True):
                    buffer.copy_(value)
            for module, momentum in zip(bn_modules, saved_momenta, strict=True):
                module.momentum = momentum
            if model is not None and was_training is not None:
                model.train(was_training)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, ints and lists (loadable with ``torch.load(weights_only=True)``)."""
        self._flush()
        return {
            "sums": [t.clone() for t in self._sums],
            "count": self.count,
            "windows_closed": self.windows_closed,
            "averaged": None if self.averaged is None else [t.clone() for t in self.averaged],
            "averaged_count": self.averaged_count,
            "window": self.window,
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state. Everything is checked and converted first:
        on a bad state a ValueError says what is wrong and the booster is left as it was
        (also a pending host copy of the open window).

        The checks: ``sums`` and ``averaged`` (when not None) hold one floating-point
        tensor per parameter, of its shape, finite in the accumulator / parameter dtype;
        ``count``, ``windows_closed`` and ``averaged_count`` are ints >= 0, consistent
        (a closed window exists exactly when ``windows_closed > 0``, and then
        ``averaged`` holds its mean of ``averaged_count >= 1`` iterates; an empty open
        window has zero sums); ``window`` (optional) is a positive int or None."""
        where = "Booster.load_state_dict"
        required = ("sums", "count", "windows_closed", "averaged", "averaged_count")
        missing = [key for key in required if key not in state]
        if missing:
            raise ValueError(f"{where}: the state lacks {missing}")
        for key in ("count", "windows_closed", "averaged_count"):
            if not is_count(state[key], 0):
                raise ValueError(f"{where}: {key} must be an int >= 0, got {state[key]!r}")
        count, windows_closed = int(state["count"]), int(state["windows_closed"])
        averaged_count = int(state["averaged_count"])
        window = state.get("window", self.window)
        if window is not None and not is_count(window, 1):
            raise ValueError(f"{where}: window must be a positive int or None, got {window!r}")
        sums = self._checked_tensors(state["sums"], "sums", [self.dtype] * len(self.params))
        averaged = state["averaged"]
        if averaged is not None:
            averaged = self._checked_tensors(averaged, "averaged", [p.dtype for p in self.params])
        if (averaged is None) != (windows_closed == 0) or (averaged is None) != (
            averaged_count == 0
        ):
            raise ValueError(
                f"{where}: averaged ({'None' if averaged is None else 'a mean'}), "
                f"windows_closed ({windows_closed}) and averaged_count ({averaged_count}) "
                "disagree: a closed window has a mean of at least one iterate"
            )
        if count == 0 and any(bool(total.any()) for total in sums):
            raise ValueError(f"{where}: count is 0 but the sums are not zero")
        # Validated: from here on nothing can fail.
        self._pending_event = None
        self._sums = sums
        self.count, self.windows_closed, self.averaged_count = (
            count,
            windows_closed,
            averaged_count,
        )
        self.averaged = averaged
        self.window = window

    def _checked_tensors(
        self, values: Any, key: str, dtypes: list[torch.dtype]
    ) -> list[torch.Tensor]:
        """``values`` as new tensors, one per parameter (its shape, on its home device for
        ``sums`` / its device for ``averaged``, in ``dtypes``), all finite after the
        conversion; ValueError naming ``key`` otherwise."""
        where = f"Booster.load_state_dict: {key}"
        if not isinstance(values, (list, tuple)) or len(values) != len(self.params):
            raise ValueError(
                f"{where} must be a list of {len(self.params)} tensors (one per parameter); "
                "the state does not match the parameters"
            )
        converted = []
        for index, (value, param, dtype) in enumerate(
            zip(values, self.params, dtypes, strict=True)
        ):
            if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
                raise ValueError(f"{where}[{index}] must be a floating-point tensor, got {value!r}")
            if value.shape != param.shape:
                raise ValueError(
                    f"{where}[{index}] has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(param.shape)}: the state does not match the parameters"
                )
            device = self._home(param) if key == "sums" else param.device
            tensor = value.detach().to(device=device, dtype=dtype, copy=True)
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}[{index}] holds inf or NaN (in {dtype})")
            converted.append(tensor)
        return converted


def _bn_buffers(module: torch.nn.Module) -> list[torch.Tensor]:
    return [
        b
        for b in (module.running_mean, module.running_var, module.num_batches_tracked)
        if b is not None
    ]


@torch.no_grad()
def _recompute_bn(
    model: torch.nn.Module, bn_modules: list[torch.nn.Module], data: Iterable[Any]
) -> None:
    """Reset BN running statistics and re-estimate them with one forward pass in train
    mode (momentum None = cumulative moving average over the pass)."""
    for module in bn_modules:
        module.reset_running_stats()
        module.momentum = None
    model.train()
    device = next(iter(model.parameters())).device
    for batch in data:
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        model(inputs.to(device))
    model.eval()
