"""Memory measurement: optimizer state bytes and the peak of a step (live tensor bytes;
on CUDA also the allocator's ``torch.cuda.max_memory_allocated``)."""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._torch_compat import TorchDispatchMode, tree_flatten
from ..offload import OffloadedPrev
from ..optimizer import ELRA
from ..report import optimizer_state_bytes as report_state_bytes
from .model import build_model, train_step
from .protocol import make_optimizer

#: Booster: float64 sums + the mean's fp32 copy per parameter (boost.py).
BOOSTER_BYTES_PER_PARAM = 12


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's own tensors, each storage once, wherever they live
    (:func:`elra_fused.report.optimizer_state_bytes`)."""
    return sum(report_state_bytes(opt))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, counting those that exist when the
    mode is entered (``resident``) plus every storage an op creates while it is active,
    released when the storage is freed. On CPU torch keeps no allocator statistics and
    the process's RSS never shrinks, so this is how a step's peak is measured here."""

    def __init__(self, resident: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        for t in resident:
            storage = t.untyped_storage()
            self.live[storage.data_ptr()] = storage.nbytes()
        self.current = sum(self.live.values())
        self.peak = self.current

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                storage = value.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._release, key)
        self.peak = max(self.peak, self.current)
        return out


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's own tensors: its per-parameter state and, for ELRA, the control
    vector and offload staging chunks (as :func:`elra_fused.report.optimizer_state_bytes`)."""
    tensors = [
        v for entry in opt.state.values() for v in entry.values() if isinstance(v, torch.Tensor)
    ]
    control = getattr(opt, "control_state", None)
    if isinstance(control, torch.Tensor):
        tensors.append(control)
    for store in getattr(getattr(opt, "layout", None), "stores", []):
        tensors.extend(getattr(store, "staging", []))
    return tensors


def offloaded_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes ELRA's ``memory="offload"`` keeps in host memory (x_{t-1}), off the device.
    On a CPU-only machine they are in the same memory, so a device budget subtracts them."""
    stores = getattr(getattr(opt, "layout", None), "stores", [])
    return sum(s.tensor.untyped_storage().nbytes() for s in stores if isinstance(s, OffloadedPrev))


@dataclass(frozen=True)
class StepPeak:
    """The peak of one training step, two ways.

    ``live_bytes``: the :class:`LiveBytes` tracker (every device; on the CPU the only
    measurement). ``cuda_bytes`` (CUDA only, else None): the same scope measured by the
    CUDA caching allocator -- ``torch.cuda.max_memory_allocated`` over the step (peak
    stats reset first) less the device bytes allocated before the step that are not the
    step's own tensors (the job's token tensors on the device, the booster's sums, ...).
    ``cuda_max_allocated``: the allocator's raw peak over the step, everything on the
    device included."""

    live_bytes: int
    cuda_bytes: int | None = None
    cuda_max_allocated: int | None = None


def device_storage_bytes(tensors: Sequence[torch.Tensor], device: torch.device) -> int:
    """Bytes of the distinct storages of ``tensors`` that live on ``device``'s type."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type == device.type:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_step_peak(
    name: str, model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor
) -> StepPeak:
    """Peak bytes of one full training step on ``batch`` (one micro-batch: ELRA
    accumulates micro-batches, so its activations never exceed one's): the batch,
    parameters, buffers, optimizer state, and all the step allocates. On CUDA (``batch``
    on a GPU) the allocator's peak is recorded as well (:class:`StepPeak`)."""
    batch = batch.clone()  # its own storage: a slice would count the whole data set
    opt.zero_grad(set_to_none=True)
    # Gradients that outlive zero_grad are resident from the start: ELRA's flat buffers
    # (recover, offload) keep their .grad views, one storage for the whole model (the
    # tracker would otherwise count it only once backward first writes into it).
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    resident = [batch, *model.parameters(), *model.buffers(), *grads, *optimizer_tensors(opt)]
    cuda = batch.device.type == "cuda"
    before = 0
    if cuda:
        torch.cuda.synchronize(batch.device)
        torch.cuda.reset_peak_memory_stats(batch.device)
        before = torch.cuda.memory_allocated(batch.device)
    with LiveBytes(resident) as tracker:
        train_step(name, model, opt, batch)
    if not cuda:
        return StepPeak(tracker.peak)
    torch.cuda.synchronize(batch.device)
    max_allocated = torch.cuda.max_memory_allocated(batch.device)
    outside = max(0, before - device_storage_bytes(resident, batch.device))
    return StepPeak(tracker.peak, max_allocated - outside, max_allocated)


#: ELRA's memory modes (paper 3.6, README "Memory modes"): name -> ELRA keyword arguments.
ELRA_MEMORY_MODES: dict[str, dict[str, Any]] = {
    "standard": {},
    "bf16_state": {"state_dtype": torch.bfloat16},
    "recover": {"memory": "recover"},
    "offload": {"memory": "offload"},
}


@dataclass(frozen=True)
class StepMemory:
    """One measured training step: the model's width, its parameters, the micro-batch's
    tokens, the peak live bytes, the optimizer's state bytes, the part of them that lives
    in host memory, and offload's device staging buffers with their chunk size in
    elements (each buffer holds ``min(parameters, chunk)`` elements). On CUDA,
    ``cuda_peak_bytes`` is the step's peak by the allocator (:class:`StepPeak`), which
    counts device memory only; None on the CPU."""

    hidden: int
    params: int
    tokens: int
    peak_bytes: int
    state_bytes: int
    host_bytes: int
    staging_bytes: int
    staging_chunk: int = 0
    cuda_peak_bytes: int | None = None

    @property
    def device_bytes(self) -> int:
        """The step's peak in device memory: on CUDA the allocator's measurement
        (``cuda_peak_bytes``, host memory is not in it); elsewhere the live-bytes peak
        less the bytes offload keeps in host memory."""
        if self.cuda_peak_bytes is not None:
            return self.cuda_peak_bytes
        return self.peak_bytes - self.host_bytes


def measure_step_memory(
    name: str,
    args: argparse.Namespace,
    hidden: int,
    sequences: torch.Tensor,
    elra_mode: str | None = None,
) -> StepMemory:
    """Measure one training step of a fresh model of width ``hidden`` (the job's depth,
    heads and sequence length) on ``sequences``, after one warm-up step so the optimizer's
    state exists, on the device the sequences are on. ``name`` is a protocol optimizer;
    ``elra_mode`` (with ``name="elra"``) one of :data:`ELRA_MEMORY_MODES` instead of the
    job's ELRA."""
    torch.manual_seed(0)
    model = build_model(hidden, args.layers, args.heads, args.seq_len, sequences.device)
    if elra_mode is None:
        opt = make_optimizer(name, model, args)
    else:
        opt = ELRA(model.parameters(), **ELRA_MEMORY_MODES[elra_mode])
    train_step(name, model, opt, sequences)  # the warm-up step: the state exists
    peak = measure_step_peak(name, model, opt, sequences)
    return StepMemory(
        hidden=hidden,
        params=sum(p.numel() for p in model.parameters()),
        tokens=sequences.shape[0] * (sequences.shape[1] - 1),
        peak_bytes=peak.live_bytes,
        state_bytes=optimizer_state_bytes(opt),
        host_bytes=offloaded_bytes(opt),
        staging_bytes=sum(
            t.untyped_storage().nbytes()
            for store in getattr(getattr(opt, "layout", None), "stores", [])
            for t in getattr(store, "staging", [])
        ),
        staging_chunk=getattr(opt.layout, "offload_chunk", 0) if elra_mode == "offload" else 0,
        cuda_peak_bytes=peak.cuda_bytes,
    )
