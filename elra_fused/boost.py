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
  keep everything in host memory.
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

_BN_TYPES = (torch.nn.modules.batchnorm._BatchNorm,)


class Booster:
    """Running mean of parameters over a window of steps (paper 3.7).

    Args:
        params: the parameters to average (e.g. ``model.parameters()``).
        window: close the window automatically every ``window`` updates; None (default)
            means the user calls :meth:`end_window` (e.g. once per epoch, the paper's
            window).
        device: where the sums live: None = each parameter's device, or e.g. "cpu".
        dtype: accumulator dtype (float64 default; see the module docstring).
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
        if window is not None and not (isinstance(window, int) and window > 0):
            raise ValueError(f"Booster: window must be a positive int or None, got {window!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"Booster: dtype must be a floating-point dtype, got {dtype}")
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

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sums = state["sums"]
        if len(sums) != len(self.params) or any(
            s.shape != p.shape for s, p in zip(sums, self.params, strict=True)
        ):
            raise ValueError("Booster.load_state_dict: the state does not match the parameters")
        self._pending_event = None
        with torch.no_grad():
            for total, value in zip(self._sums, sums, strict=True):
                total.copy_(value)
        self.count = int(state["count"])
        self.windows_closed = int(state["windows_closed"])
        self.averaged_count = int(state["averaged_count"])
        averaged = state["averaged"]
        self.averaged = (
            None
            if averaged is None
            else [
                v.to(p.device, p.dtype).clone() for v, p in zip(averaged, self.params, strict=True)
            ]
        )
        self.window = state.get("window", self.window)


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
