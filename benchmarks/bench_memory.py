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

``--fsdp N`` instead shards the model with FSDP2 (``fully_shard`` per layer) over N CPU
processes (gloo, loopback) and reports each rank's optimizer state bytes (the local
shards of the state DTensors) for ELRA and AdamW: ELRA's state is sharded like the model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from collections.abc import Callable

import _harness as harness  # also puts the repo root on sys.path
import torch

from elra_fused import ELRA
from elra_fused.report import optimizer_state_bytes as state_bytes

DEPTH = 4
BATCH = 16
STEPS_BEFORE_MEASURE = 3

ELRA_MODES: dict[str, dict] = {
    "standard": {"memory": "standard"},
    "recover": {"memory": "recover"},
    "offload": {"memory": "offload"},
    "bf16_state": {"memory": "standard", "state_dtype": torch.bfloat16},
}


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
        start = harness.synced_clock(device)
        opt.step(loss) if is_elra else opt.step()
        end = harness.synced_clock(device)
        if i >= STEPS_BEFORE_MEASURE:
            step_times.append(end - start)
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
    device = harness.resolve_device(args.device)
    n_target = int(float(args.params.rstrip("Mm")) * 1e6)
    base = harness.make_mlp(n_target, DEPTH, device)
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


def print_results(rows: list[dict], measured: list[dict], device: str) -> None:
    n = measured[0]["n_params"]
    print(
        f"device {device}; model {n / 1e6:.1f}M fp32 parameters; state after "
        f"{STEPS_BEFORE_MEASURE} steps; step medians"
    )
    columns = [
        "optimizer",
        "mode",
        "device B/param",
        "host B/param",
        "step ms",
        "step/standard",
        "peak GiB",
    ]
    lines = []
    for r, m in zip(rows, measured, strict=True):
        lines.append(
            [
                r["optimizer"],
                r["mode"] or "-",
                f"{r['device_bytes_per_param']:.3f}",
                f"{r['host_bytes_per_param']:.3f}",
                harness.cell(m["step_median_s"], ".1f", scale=1e3),
                harness.cell(r["step_ratio_vs_standard"], ".2f"),
                harness.cell(m["peak_allocated_bytes"], ".2f", scale=2**-30),
            ]
        )
    harness.print_table(columns, lines, left_aligned=2)


FSDP_OPTIMIZERS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "elra": lambda m: ELRA(m.parameters()),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
}


def _fsdp_rank(rank: int, world: int, port: int, n_target: int, out: str) -> None:
    """One FSDP2 rank: each optimizer steps a fresh sharded copy; local state bytes."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        rows = []
        for name, make in FSDP_OPTIMIZERS.items():
            torch.manual_seed(0)
            model = harness.make_mlp(n_target, DEPTH, torch.device("cpu"))
            n_params = sum(p.numel() for p in model.parameters())
            for layer in model:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer)
            fully_shard(model)
            opt = make(model)
            width = next(model.parameters()).shape[1]
            inputs, target = torch.randn(BATCH, width), torch.randn(BATCH, width)
            for _ in range(STEPS_BEFORE_MEASURE):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(inputs), target)
                loss.backward()
                opt.step(loss) if isinstance(opt, ELRA) else opt.step()
            local = sum(state_bytes(opt))  # on CPUs the device is the host
            rows.append({"name": name, "rank": rank, "local_bytes": local, "n_params": n_params})
        torch.save(rows, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_fsdp(args: argparse.Namespace) -> list[dict]:
    import socket
    import tempfile

    n_target = int(float(args.params.rstrip("Mm")) * 1e6)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/rows"
        torch.multiprocessing.spawn(
            _fsdp_rank, args=(args.fsdp, port, n_target, out), nprocs=args.fsdp, join=True
        )
        rows = [row for rank in range(args.fsdp) for row in torch.load(f"{out}.{rank}")]
    adamw = max(r["local_bytes"] for r in rows if r["name"] == "adamw")
    lines = [
        [
            r["name"],
            str(r["rank"]),
            harness.cell(r["local_bytes"], ".2f", scale=2**-20),
            harness.cell(r["local_bytes"] * args.fsdp / r["n_params"], ".2f"),
            harness.cell(r["local_bytes"] / adamw, ".2f"),
        ]
        for r in rows
    ]
    print(f"FSDP2 over {args.fsdp} CPU processes, {rows[0]['n_params'] / 1e6:.1f}M parameters")
    columns = ["optimizer", "rank", "local state MiB", "x world / param (B)", "vs AdamW"]
    harness.print_table(columns, lines, left_aligned=1)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--params", default="50M", help="model size, e.g. 50M (10^6 units)")
    parser.add_argument(
        "--fsdp", type=int, default=0, help="shard with FSDP2 over N CPU processes (gloo)"
    )
    harness.add_timing_flags(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.fsdp:
        harness.write_json(args.json, run_fsdp(args))
        return
    rows, measured = run(args)
    print_results(rows, measured, args.device)
    harness.write_json(args.json, rows)


if __name__ == "__main__":
    main()
