"""Optimizer state memory per parameter: ELRA's memory modes vs Adam, AdamW, SGD, Lion, Prodigy.

Question: how many bytes of optimizer state does each optimizer keep per parameter, on
the parameters' device and on the host, for a ~50M-parameter model -- and what does each
ELRA memory mode cost in step time relative to ``memory="standard"``?

Bytes are measured from the actual state tensors after a few steps: every tensor in
``optimizer.state`` (deduplicated by storage, since ELRA's per-parameter state entries are
views of one flat buffer) plus ELRA's own device tensors (the control vector and the
offload staging chunks). On CUDA the peak ``torch.cuda.max_memory_allocated`` of a full
training step is reported as well.

Usage: ``python benchmarks/bench_memory.py [--device cpu|cuda] [--params 50M] [--json PATH]``
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elra_fused import ELRA  # noqa: E402

DEPTH = 4
BATCH = 16
STEPS_BEFORE_MEASURE = 3

ELRA_MODES: dict[str, dict] = {
    "standard": {"memory": "standard"},
    "recover": {"memory": "recover"},
    "offload": {"memory": "offload"},
    "bf16_state": {"memory": "standard", "state_dtype": torch.bfloat16},
}


def make_model(n_params: int, device: torch.device) -> torch.nn.Module:
    width = int((n_params / DEPTH) ** 0.5)
    layers: list[torch.nn.Module] = []
    for i in range(DEPTH):
        layers.append(torch.nn.Linear(width, width))
        if i < DEPTH - 1:
            layers.append(torch.nn.ReLU())
    torch.manual_seed(0)
    return torch.nn.Sequential(*layers).to(device)


def baselines() -> dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    found: dict[str, Callable] = {
        "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3),
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
        "sgd_momentum": lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
    }
    try:
        from lion_pytorch import Lion

        found["lion"] = lambda m: Lion(m.parameters(), lr=1e-4)
    except ImportError:
        print("lion-pytorch not installed: Lion skipped", file=sys.stderr)
    try:
        from prodigyopt import Prodigy

        found["prodigy"] = lambda m: Prodigy(m.parameters(), lr=1.0)
    except ImportError:
        print("prodigyopt not installed: Prodigy skipped", file=sys.stderr)
    return found


def state_bytes(opt: torch.optim.Optimizer) -> tuple[int, int]:
    """(device bytes, host bytes) of the optimizer's own tensors, each storage once."""
    tensors: list[torch.Tensor] = []
    for entry in opt.state.values():
        if isinstance(entry, dict):
            tensors.extend(v for v in entry.values() if isinstance(v, torch.Tensor))
    if isinstance(opt, ELRA):
        tensors.append(opt.control_state)
        for store in opt._stores:
            tensors.extend(getattr(store, "staging", []))
    seen: set[tuple[str, int]] = set()
    device_bytes = host_bytes = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        if t.device.type == "cpu":
            host_bytes += storage.nbytes()
        else:
            device_bytes += storage.nbytes()
    return device_bytes, host_bytes


def measure(
    name: str,
    make: Callable[[torch.nn.Module], torch.optim.Optimizer],
    base: torch.nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    repeats: int,
) -> dict:
    device = inputs.device
    model = copy.deepcopy(base)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    opt = make(model)
    is_elra = isinstance(opt, ELRA)
    step_times = []
    for i in range(STEPS_BEFORE_MEASURE + repeats):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step(loss) if is_elra else opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= STEPS_BEFORE_MEASURE:
            step_times.append(time.perf_counter() - start)
    device_bytes, host_bytes = state_bytes(opt)
    # On a CPU-only machine "device" is the host: report all of it as device memory,
    # except offload's x_{t-1}, which is the host copy by design.
    if device.type == "cpu" and not (is_elra and opt.memory == "offload"):
        device_bytes, host_bytes = device_bytes + host_bytes, 0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    n_params = sum(p.numel() for p in model.parameters())
    del opt, model
    return {
        "name": name,
        "device_bytes": device_bytes,
        "host_bytes": host_bytes,
        "n_params": n_params,
        "step_median_s": statistics.median(step_times),
        "peak_allocated_bytes": peak,
    }


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    device = torch.device(args.device)
    n_target = int(float(args.params.rstrip("Mm")) * 1e6)
    base = make_model(n_target, device)
    width = base[0].in_features
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(BATCH, width, generator=gen).to(device)
    target = (torch.randn(BATCH, width, generator=gen) * 0.1).to(device)
    measured: list[dict] = []
    for mode, kwargs in ELRA_MODES.items():
        make = lambda m, kw=kwargs: ELRA(m.parameters(), **kw)  # noqa: E731
        measured.append(
            {"optimizer": "elra_fused", "mode": mode}
            | measure(mode, make, base, inputs, target, args.repeats)
        )
    for name, make in baselines().items():
        measured.append(
            {"optimizer": name, "mode": None}
            | measure(name, make, base, inputs, target, args.repeats)
        )
    standard = measured[0]["step_median_s"]
    rows = []
    for m in measured:
        n = m["n_params"]
        rows.append(
            {
                "optimizer": m["optimizer"],
                "mode": m["mode"],
                "device_bytes_per_param": m["device_bytes"] / n,
                "host_bytes_per_param": m["host_bytes"] / n,
                "step_ratio_vs_standard": m["step_median_s"] / standard
                if m["optimizer"] == "elra_fused"
                else None,
            }
        )
    return rows, measured


def print_table(rows: list[dict], measured: list[dict], device: str) -> None:
    n = measured[0]["n_params"]
    print(
        f"device {device}; model {n / 1e6:.1f}M fp32 parameters; state after "
        f"{STEPS_BEFORE_MEASURE} steps; step medians"
    )
    header = (
        f"{'optimizer':<13} {'mode':<11} {'device B/param':>15} {'host B/param':>13} "
        f"{'step ms':>9} {'step/standard':>14} {'peak GiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for r, m in zip(rows, measured, strict=True):
        ratio = r["step_ratio_vs_standard"]
        peak = m["peak_allocated_bytes"]
        print(
            f"{r['optimizer']:<13} {r['mode'] or '-':<11} {r['device_bytes_per_param']:>15.3f} "
            f"{r['host_bytes_per_param']:>13.3f} {m['step_median_s'] * 1e3:>9.1f} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>14} "
            f"{'-' if peak is None else f'{peak / 2**30:.2f}':>9}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--params", default="50M", help="model size, e.g. 50M")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows, measured = run(args)
    print_table(rows, measured, args.device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
