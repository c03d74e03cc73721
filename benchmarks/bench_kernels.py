"""How close do the fused kernels get to memory bandwidth, and how much faster are they
than the same math done with unfused torch ops?

    python benchmarks/bench_kernels.py --device cpu --json benchmarks/results/kernels_cpu.json
    python benchmarks/bench_kernels.py --device cuda --sizes 1000000 16000000

For each size and op: median wall time over repeats (after warm-up), bytes moved, GB/s,
the fraction of a copy's bandwidth measured in the same run (the practical ceiling of a
streaming kernel), and the speedup over the "torch-unfused" baseline.

Bytes moved are the op's compulsory traffic, counted once per element of every vector
read and every vector written (element size of the storage dtype; coefficients and the
16-byte result are negligible):

    copy                    read src, write dst                      2 N
    dots                    read G, G_prev                           2 N
    dots_recover            read x_prev, x, G                        3 N
    update_ (accept)        read x, G; write x, G_prev               4 N
    update_ (retrace)       read x, G_prev; write x                  3 N
    update_recover_ (acc.)  read x, G; write x, x_prev               4 N
    update_recover_ (retr.) read x, x_prev; write x                  3 N
    update_swap_ (accept)   read x, G; write x                       3 N

Compact state rows (dtype "float32+bf16state"): G_prev stored as bfloat16 next to
float32 x and G, for the two standard-mode ops that touch it. Bytes are counted per
vector at its own element size (4 bytes for x and G, 2 for G_prev):

    dots                    read G (4), G_prev (2)                   6 N
    update_ (accept)        read x, G; write x (4 each), G_prev (2)  14 N
    update_ (retrace)       read x (4), G_prev (2); write x (4)      10 N

The torch-unfused baseline does the same math with separate torch ops, so it actually
moves more bytes (several passes, temporaries); it is scored with the same byte count,
i.e. its GB/s is an *effective* bandwidth and the ratio is a plain time ratio.
Triton is benchmarked on CUDA only: on CPU it runs in the numpy interpreter, which is a
correctness tool, not a performance path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elra_fused import ops  # noqa: E402

DEFAULT_SIZES = (1 << 20, 16 << 20, 64 << 20)
DTYPE = torch.float32
#: Compact storage of G_prev (elra_fused.ops.STATE_DTYPE_COMPACT) and its row label.
STATE_DTYPE = torch.bfloat16
MIXED_LABEL = "float32+bf16state"
DECAY, STEP, BACK, INV_ALPHA = 0.9997, 1e-3, 5e-4, 1e3
# Repeat until about this much time is spent per measurement, within these bounds.
TARGET_SECONDS = 1.0
MIN_REPEATS, MAX_REPEATS = 5, 200
WARMUP = 2
UNFUSED = "torch-unfused"

# op -> number of N-element vectors moved (see module docstring)
VECTORS_MOVED = {
    "copy": 2,
    "dots": 2,
    "dots_recover": 3,
    "update_accept": 4,
    "update_retrace": 3,
    "update_recover_accept": 4,
    "update_recover_retrace": 3,
    # Swap mode: G_prev is not written (the optimizer swaps the buffers' roles instead).
    "update_swap_accept": 3,
}
# Compact-state ops -> (vectors moved at DTYPE's size, vectors moved at STATE_DTYPE's size)
MIXED_VECTORS_MOVED = {
    "dots": (1, 1),
    "update_accept": (3, 1),
    "update_retrace": (2, 1),
}


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Seconds taken by one call, measured the device's way."""
    if device.type == "cuda":

        def cuda_time(fn: Callable[[], object]) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def time_op(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(median, min) seconds per call. The median is the reported figure; the min is kept
    because on a shared machine preemption inflates the median (it shows the kernel's
    own speed when the cores were free)."""
    timer = _timer(device)
    for _ in range(WARMUP):
        timer(fn)
    first = timer(fn)
    repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, TARGET_SECONDS / max(first, 1e-6))))
    samples = [first, *(timer(fn) for _ in range(repeats - 1))]
    return statistics.median(samples), min(samples)


def _copy_op(dst: torch.Tensor, src: torch.Tensor) -> Callable[[], object]:
    return lambda: dst.copy_(src)


def _unfused_ops(t: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    """The same math as the fused ops with plain torch calls (host-side scalars, which is
    the most favourable form for the baseline)."""
    x, g, gp, xp = t["x"], t["g"], t["gp"], t["xp"]
    return {
        "dots": lambda: torch.stack([torch.dot(g, g), torch.dot(gp, g)]),
        "dots_recover": lambda: torch.stack(
            [torch.dot(g, g), torch.dot((xp * DECAY - x).mul_(INV_ALPHA), g)]
        ),
        "update_accept": lambda: (gp.copy_(g), x.mul_(DECAY).add_(g, alpha=-STEP)),
        "update_retrace": lambda: x.add_(gp, alpha=BACK),
        "update_recover_accept": lambda: (xp.copy_(x), x.mul_(DECAY).add_(g, alpha=-STEP)),
        "update_recover_retrace": lambda: x.add_(xp * DECAY - x, alpha=BACK),
        "update_swap_accept": lambda: x.mul_(DECAY).add_(g, alpha=-STEP),
    }


def _unfused_mixed_ops(t: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    """Baseline for the compact state: the same torch calls with a bf16 G_prev (casts
    happen inside dot's input conversion, copy_ and add_)."""
    x, g, gp16 = t["x"], t["g"], t["gp16"]
    return {
        "dots": lambda: torch.stack([torch.dot(g, g), torch.dot(gp16.float(), g)]),
        "update_accept": lambda: (gp16.copy_(g), x.mul_(DECAY).add_(g, alpha=-STEP)),
        "update_retrace": lambda: x.add_(gp16, alpha=BACK),
    }


def _fused_mixed_ops(
    k: ops.KernelSet, t: dict[str, torch.Tensor], device: torch.device
) -> dict[str, Callable[[], object]]:
    x, g, gp16 = t["x"], t["g"], t["gp16"]
    acc = torch.tensor([1.0, DECAY, STEP, BACK], dtype=torch.float64, device=device)
    ret = torch.tensor([0.0, DECAY, STEP, BACK], dtype=torch.float64, device=device)
    return {
        "dots": lambda: k.dots(g, gp16),
        "update_accept": lambda: k.update_(x, g, gp16, acc),
        "update_retrace": lambda: k.update_(x, g, gp16, ret),
    }


def _fused_ops(
    k: ops.KernelSet, t: dict[str, torch.Tensor], device: torch.device
) -> dict[str, Callable[[], object]]:
    x, g, gp, xp = t["x"], t["g"], t["gp"], t["xp"]
    acc = torch.tensor([1.0, DECAY, STEP, BACK], dtype=torch.float64, device=device)
    ret = torch.tensor([0.0, DECAY, STEP, BACK], dtype=torch.float64, device=device)
    rc = torch.tensor([DECAY, INV_ALPHA], dtype=torch.float64, device=device)
    return {
        "dots": lambda: k.dots(g, gp),
        "dots_recover": lambda: k.dots_recover(xp, x, g, rc),
        "update_accept": lambda: k.update_(x, g, gp, acc),
        "update_retrace": lambda: k.update_(x, g, gp, ret),
        "update_recover_accept": lambda: k.update_recover_(x, g, xp, acc),
        "update_recover_retrace": lambda: k.update_recover_(x, g, xp, ret),
        "update_swap_accept": lambda: k.update_swap_(x, g, gp, acc),
    }


def bench(device: torch.device, sizes: list[int]) -> list[dict[str, object]]:
    backends = [b for b in ops.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # interpreter: not a perf path
    rows: list[dict[str, object]] = []
    esize = torch.tensor([], dtype=DTYPE).element_size()
    ssize = torch.tensor([], dtype=STATE_DTYPE).element_size()
    label = str(DTYPE).removeprefix("torch.")

    def nbytes_of(op: str, dtype_label: str, n: int) -> int:
        if dtype_label == MIXED_LABEL:
            wide, narrow = MIXED_VECTORS_MOVED[op]
            return (wide * esize + narrow * ssize) * n
        return VECTORS_MOVED[op] * n * esize

    for n in sizes:
        t = {name: torch.randn(n, dtype=DTYPE, device=device) for name in ("x", "g", "gp", "xp")}
        t["gp16"] = t["gp"].to(STATE_DTYPE)
        dst = torch.empty_like(t["g"])
        timings: dict[tuple[str, str, str], tuple[float, float]] = {
            ("copy", "torch", label): time_op(_copy_op(dst, t["g"]), device)
        }
        del dst
        for op, fn in _unfused_ops(t).items():
            timings[(op, UNFUSED, label)] = time_op(fn, device)
        for op, fn in _unfused_mixed_ops(t).items():
            timings[(op, UNFUSED, MIXED_LABEL)] = time_op(fn, device)
        for backend in backends:
            kset = ops.get_kernels(backend, device)
            for op, fn in _fused_ops(kset, t, device).items():
                timings[(op, backend, label)] = time_op(fn, device)
            for op, fn in _fused_mixed_ops(kset, t, device).items():
                timings[(op, backend, MIXED_LABEL)] = time_op(fn, device)
        copy_gbps = VECTORS_MOVED["copy"] * n * esize / timings[("copy", "torch", label)][0] / 1e9
        for (op, backend, dtype_label), (sec, min_sec) in timings.items():
            nbytes = nbytes_of(op, dtype_label, n)
            gbps = nbytes / sec / 1e9
            rows.append(
                {
                    "op": op,
                    "backend": backend,
                    "n": n,
                    "dtype": dtype_label,
                    "median_s": sec,
                    "bytes": nbytes,
                    "gbps": gbps,
                    "frac_of_copy": gbps / copy_gbps,
                    "min_s": min_sec,
                }
            )
        del t
    return rows


def print_table(rows: list[dict[str, object]]) -> None:
    base = {(r["op"], r["n"], r["dtype"]): r["median_s"] for r in rows if r["backend"] == UNFUSED}
    header = (
        f"{'op':<24}{'backend':<15}{'dtype':<19}{'n':>10}{'median ms':>11}{'min ms':>9}"
        f"{'GB/s':>8}{'frac_copy':>10}{'vs unfused':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ref_s = base.get((r["op"], r["n"], r["dtype"]))
        speed = f"{ref_s / r['median_s']:.2f}x" if ref_s else "-"
        print(
            f"{r['op']:<24}{r['backend']:<15}{r['dtype']:<19}{r['n']:>10}"
            f"{r['median_s'] * 1e3:>11.3f}"
            f"{r['min_s'] * 1e3:>9.3f}"
            f"{r['gbps']:>8.2f}{r['frac_of_copy']:>10.2f}{speed:>11}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", type=Path, help="write the rows as a JSON list here")
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    print(ops.cpp_extension_status())
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    rows = bench(device, args.sizes)
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
