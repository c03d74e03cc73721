"""``memory="offload"``: x_{t-1} in host memory, streamed in chunks (paper section 3.6).

The paper notes that ELRA "can be implemented such that at any time only two vectors are
in the GPU-memory": x_{t-1} is only needed to recover <G_{t-1}, G_t> (and, on a retrace,
the direction back), so it can live in host memory. Per step and per flat buffer:

1. **dots pass**: x_{t-1} is copied chunk by chunk into one of two device staging
   buffers on a side (copy) stream, while the compute stream runs ``dots_recover`` on the
   other chunk (double buffering). Per-chunk partial sums are added in a fixed order, so
   the result is deterministic.
2. **update pass**: x_{t-1} is streamed in again, ``update_recover_`` writes x_{t+1} and,
   in the staging chunk, the new x_{t-1} (= x_t on accept, unchanged on a retrace), and
   that chunk is copied back to the host on the side stream.

Streaming x_{t-1} twice (instead of once plus a host decision) is what keeps the step free
of host syncs: whether the step retraces is only known on the device, and the update of
a retrace needs x_{t-1}. Ordering is by CUDA events only: a staging slot is refilled once
the kernel that read it (and the copy-back that drained it) is done; the compute stream
waits for each chunk's arrival. No host synchronisation happens in the step -- the copy
engine needs none, because the host buffer is pinned. Reading the host buffer (e.g.
``state_dict``) calls :meth:`OffloadedPrev.synchronize` first.

Only ``2 * chunk`` elements of device memory are used beyond x_t and G_t. The events are
made once, per staging slot, and re-recorded every step.

Not capturable in a CUDA graph: the copy stream is not forked from the captured stream
(its first wait is on an event recorded before the step), the copy-backs are never joined
into it, and a step that leaves a grad-less parameter waits on the host for the copies.
A step on a CUDA device while its stream is capturing raises a RuntimeError
(:func:`check_not_capturing`) before anything moves; under graphs use ``memory="recover"``
(x_{t-1} on the device).

On a machine without a GPU the same chunked path runs between host buffers (staging
chunks in ordinary memory, plain copies, no streams), so the logic is tested everywhere.
"""

from __future__ import annotations

import torch

from . import checks
from .memory import PointCoefficients
from .ops import KernelSet

#: Default staging chunk: 256 Ki elements (1 MiB in fp32): large enough that each copy
#: and kernel runs near full bandwidth, small enough that the two staging chunks cost
#: < 0.05 bytes per parameter on the device for models of 50M parameters and up.
DEFAULT_CHUNK = 1 << 18
#: Two staging buffers: one being filled while the other is computed on.
STAGING_SLOTS = 2


def check_not_capturing(device: torch.device) -> None:
    """Raise if ``device`` is a GPU whose current stream is capturing a CUDA graph.

    ``memory="offload"`` cannot be captured (see the module docstring). Only a CUDA device
    asks CUDA anything: on the CPU path this is a no-op.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            'ELRA: memory="offload" cannot be captured in a CUDA graph (x_{t-1} streams '
            "from host memory on a side stream, outside the graph). Step it eagerly, or use "
            'memory="recover" (x_{t-1} on the device, capturable) under torch.cuda.graph.'
        )


class OffloadedPrev(PointCoefficients):
    """x_{t-1} of one flat buffer in host memory, streamed through two staging chunks."""

    def __init__(self, x: torch.Tensor, chunk: int = DEFAULT_CHUNK) -> None:
        checks.check_offload_chunk(chunk)
        self.device = x.device
        self.on_gpu = x.device.type == "cuda"
        # pin_memory() needs a CUDA device; on the CPU path a plain tensor is the host.
        self.tensor = torch.empty(x.numel(), dtype=x.dtype, device="cpu", pin_memory=self.on_gpu)
        self.tensor.copy_(x.detach())
        self.chunk = min(chunk, max(x.numel(), 1))
        self.staging = [
            torch.empty(self.chunk, dtype=x.dtype, device=x.device) for _ in range(STAGING_SLOTS)
        ]
        if self.on_gpu:
            self.copy_stream = torch.cuda.Stream(device=x.device)
            # Per slot, made once and re-recorded each step (a wait takes the record made
            # last before it): arrived on the device, drained / read (free to refill),
            # written by the compute stream (ready to copy back).
            self.ready = [torch.cuda.Event() for _ in range(STAGING_SLOTS)]
            self.free = [torch.cuda.Event() for _ in range(STAGING_SLOTS)]
            self.computed = [torch.cuda.Event() for _ in range(STAGING_SLOTS)]

    @property
    def device_bytes(self) -> int:
        """Device memory this store holds (the staging chunks)."""
        return sum(s.numel() * s.element_size() for s in self.staging) if self.on_gpu else 0

    def _ranges(self) -> list[tuple[int, int]]:
        total = self.tensor.numel()
        return [(start, min(start + self.chunk, total)) for start in range(0, total, self.chunk)]

    def _stage_in(self, slot: int, start: int, stop: int) -> torch.Tensor:
        """Copy host[start:stop] into staging slot ``slot``; the compute stream waits for it."""
        staged = self.staging[slot][: stop - start]
        if not self.on_gpu:
            staged.copy_(self.tensor[start:stop])
            return staged
        compute = torch.cuda.current_stream(self.device)
        # The slot's previous reader (a kernel) or drainer (a copy back) must be done.
        self.copy_stream.wait_event(self.free[slot])
        with torch.cuda.stream(self.copy_stream):
            staged.copy_(self.tensor[start:stop], non_blocking=True)
            self.ready[slot].record(self.copy_stream)
        compute.wait_event(self.ready[slot])
        return staged

    def _release(self, slot: int) -> None:
        """The compute stream is done with the slot (nothing to copy back)."""
        if self.on_gpu:
            self.free[slot].record(torch.cuda.current_stream(self.device))

    def _stage_out(self, slot: int, start: int, stop: int) -> None:
        """Copy staging slot ``slot`` back to host[start:stop] after the compute stream."""
        staged = self.staging[slot][: stop - start]
        if not self.on_gpu:
            self.tensor[start:stop].copy_(staged)
            return
        done = self.computed[slot]
        done.record(torch.cuda.current_stream(self.device))
        self.copy_stream.wait_event(done)
        with torch.cuda.stream(self.copy_stream):
            self.tensor[start:stop].copy_(staged, non_blocking=True)
            self.free[slot].record(self.copy_stream)

    def dots(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        """[<G,G>, <G_prev,G>, bound] with x_{t-1} streamed in; partials summed in chunk
        order (the bound: :meth:`PointCoefficients.with_error_bound`)."""
        check_not_capturing(self.device)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for index, (start, stop) in enumerate(self._ranges()):
            slot = index % STAGING_SLOTS
            staged = self._stage_in(slot, start, stop)
            total += kernels.dots_recover(staged, x[start:stop], grad[start:stop], coeffs)
            self._release(slot)
        return self.with_error_bound(total, x, coeffs)

    def update_(
        self, kernels: KernelSet, x: torch.Tensor, grad: torch.Tensor, coeffs: torch.Tensor
    ) -> None:
        """Accept or retrace chunk by chunk; the new x_{t-1} goes back to the host."""
        check_not_capturing(self.device)
        for index, (start, stop) in enumerate(self._ranges()):
            slot = index % STAGING_SLOTS
            staged = self._stage_in(slot, start, stop)
            kernels.update_recover_(x[start:stop], grad[start:stop], staged, coeffs)
            self._stage_out(slot, start, stop)

    def synchronize(self) -> None:
        """Wait for copies in flight, so the host buffer can be read or written."""
        if self.on_gpu:
            self.copy_stream.synchronize()
