"""Where the job runs (``--device cpu|cuda``): choosing the device, its name, and a clock
that is correct on CUDA.

Every CUDA call here sits behind a ``device.type == "cuda"`` test, so importing and using
the job on a CPU-only machine never touches the CUDA runtime (with a CPU-only build of
torch, or without a GPU, most ``torch.cuda`` calls raise).
"""

from __future__ import annotations

import platform
import time

import torch

DEVICES = ("cpu", "cuda")


def cuda_unavailable_reason(index: int | None = None) -> str | None:
    """Why ``--device cuda`` (``cuda:<index>`` with ``index``) cannot run here, or None
    when it can. Both jobs turn the reason into an argument error before anything runs."""
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return (
            "--device cuda: CUDA is not available here (torch "
            f"{torch.__version__}, {'built with CUDA ' + built if built else 'a CPU-only build'}"
            ", torch.cuda.is_available() is False); run with --device cpu or on a machine "
            "with an NVIDIA GPU"
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        return f"--device cuda:{index}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
    return None


def job_device(args: object) -> torch.device:
    """The job's device from its flags (``cpu`` when ``args`` has no ``device``, e.g. a
    namespace built by hand)."""
    return torch.device(getattr(args, "device", "cpu") or "cpu")


def device_name(device: torch.device) -> str | None:
    """The GPU's name on CUDA (e.g. ``NVIDIA H200``); None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return None


def describe(device: torch.device) -> str:
    """``cpu (x86_64)`` or ``cuda (NVIDIA H200)``, for the printed header."""
    if device.type == "cuda":
        return f"cuda ({device_name(device)})"
    return f"cpu ({platform.machine() or 'unknown'})"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA launches are asynchronous); nothing on
    the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work: read at a
    checkpoint, it covers the kernels launched before it, not only their launches."""
    synchronize(device)
    return time.perf_counter()
