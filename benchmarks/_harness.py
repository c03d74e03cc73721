"""What every benchmark script shares: device handling, timing, the command line, the
table on stdout and the JSON file.

Each script under ``benchmarks/`` answers one question; this module holds the parts that
are not the question, so that all scripts measure and report the same way:

* ``resolve_device`` / ``synchronize`` / ``synced_clock``: a CUDA device runs
  asynchronously, so a host clock only means something right after a synchronisation.
* ``time_call`` / ``time_repeated``: one call timed the device's way (CUDA events on a
  GPU, ``time.perf_counter`` on the CPU), and the median (plus the minimum) over repeats
  after a warm-up.
* ``base_parser`` / ``add_timing_flags``: the flags every script takes (``--device``,
  ``--json``, ``--repeats``, ``--warmup``), spelled and defaulted the same everywhere.
* ``make_mlp``: the square MLP the optimizer benchmarks train.
* ``make_blocks``: a transformer-like stack of about 200 parameter tensors of mixed
  shapes (per-parameter stepping as FSDP2 and transformers models ask of an optimizer).
* ``cell`` / ``print_table``: a plain-text table, one row per JSON record.
* ``write_json``: the records as JSON (what ``benchmarks/results/*.json`` hold).

The scripts import it as ``_harness`` (``python benchmarks/<script>.py`` puts
``benchmarks/`` first on ``sys.path``); it also puts the repository root on ``sys.path``
so that the scripts import ``elra_fused`` from the checkout without an install.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

#: Adaptive repeat count of ``time_repeated(repeats=None)``: repeat until about this much
#: time is spent per measurement, within these bounds (short ops get many samples, a
#: 64M-element pass on a slow CPU still gets enough for a median).
TARGET_SECONDS = 1.0
MIN_REPEATS, MAX_REPEATS = 5, 200


# --- device -----------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """The ``--device`` argument as a device; a clear exit when CUDA is asked for but
    absent (instead of an error deep inside the first allocation)."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, whose ops run in place)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Give freed device memory back (between contenders that each hold a model copy):
    collect reference cycles, then, on CUDA, empty the caching allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def synced_clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work is done.

    For wall time of a region that mixes host and device work (an optimizer step: host
    bookkeeping plus launches): the difference of two readings includes both, which
    device-side events would not.
    """
    synchronize(device)
    return time.perf_counter()


# --- timing -----------------------------------------------------------------------------


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by one call of ``fn``, measured the device's way.

    On CUDA, events recorded around the call measure the device time of its kernels
    (host-side launch cost that overlaps earlier work does not count); on the CPU the
    call is synchronous and a host clock measures it.
    """
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Timing:
    """Median and minimum seconds per call over the timed repeats.

    The median is the reported figure; the minimum is kept because on a shared machine
    preemption inflates the median (the minimum shows the code's own speed when the
    cores were free).
    """

    median_s: float
    min_s: float


def time_repeated(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    repeats: int | None = None,
) -> Timing:
    """``fn`` called ``warmup`` times untimed, then timed ``repeats`` times.

    ``repeats=None`` picks the count from the first timed call: as many as fit in about
    ``TARGET_SECONDS``, between ``MIN_REPEATS`` and ``MAX_REPEATS`` (that first call is
    one of the samples).
    """
    for _ in range(warmup):
        time_call(fn, device)
    first = time_call(fn, device)
    if repeats is None:
        repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, TARGET_SECONDS / max(first, 1e-6))))
    samples = [first, *(time_call(fn, device) for _ in range(repeats - 1))]
    return Timing(statistics.median(samples), min(samples))


def time_interleaved(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    *,
    warmup: int,
    repeats: int | None = None,
) -> list[Timing]:
    """Each of ``fns`` timed in turns: one call of each per round, ``repeats`` rounds
    after ``warmup`` untimed rounds, the :class:`Timing` of each. Where a machine's
    bandwidth drifts (shared hosts: 20-50 % within a minute), contenders timed in turns
    see the same drift, so their *ratio* stays meaningful when their absolute figures do
    not. ``repeats=None``: as many rounds as fit in about ``TARGET_SECONDS`` (bounds as
    in ``time_repeated``), from one round's time."""
    for _ in range(warmup):
        for fn in fns:
            time_call(fn, device)
    first = [time_call(fn, device) for fn in fns]
    if repeats is None:
        round_s = max(sum(first), 1e-6)
        repeats = int(min(MAX_REPEATS, max(MIN_REPEATS, TARGET_SECONDS / round_s)))
    samples = [[t] for t in first]
    for _ in range(repeats - 1):
        for fn, times in zip(fns, samples, strict=True):
            times.append(time_call(fn, device))
    return [Timing(statistics.median(times), min(times)) for times in samples]


# --- command line -----------------------------------------------------------------------


def base_parser(description: str, *, device: bool = True) -> argparse.ArgumentParser:
    """A parser with the flags every script takes: ``--json`` and (unless the script runs
    on the CPU only) ``--device``."""
    parser = argparse.ArgumentParser(description=description)
    if device:
        parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    return parser


def add_timing_flags(
    parser: argparse.ArgumentParser, *, repeats: int | None, warmup: int | None = None
) -> None:
    """``--repeats`` (timed rounds; default ``repeats``, ``None`` = adaptive, see
    ``time_repeated``) and, when the script has a separate warm-up, ``--warmup``."""
    adaptive = f"as many as fit in about {TARGET_SECONDS:g} s, {MIN_REPEATS} to {MAX_REPEATS}"
    parser.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"timed repeats (default: {adaptive if repeats is None else repeats})",
    )
    if warmup is not None:
        parser.add_argument(
            "--warmup", type=int, default=warmup, help=f"untimed rounds first (default {warmup})"
        )


# --- workload ---------------------------------------------------------------------------


def make_mlp(n_params: int, depth: int, device: torch.device) -> torch.nn.Sequential:
    """An MLP of ``depth`` square Linear layers (ReLU between) with about ``n_params``
    parameters; the weights are the same in every run (seed 0)."""
    width = int((n_params / depth) ** 0.5)
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i in range(depth):
        layers.append(torch.nn.Linear(width, width))
        if i < depth - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(device)


#: Parameter tensors of one :class:`Block`: two LayerNorms (weight, bias) and four Linear
#: layers (weight, bias).
TENSORS_PER_BLOCK = 12
#: Blocks of ``make_blocks`` by default: 16 * 12 + 4 (final norm, head) = 196 tensors.
BLOCKS = 16


class Block(torch.nn.Module):
    """A transformer block's parameters without the attention itself.

    LayerNorm, fused q/k/v projection (``width -> 3 * width``), output projection,
    LayerNorm, MLP up (``width -> 4 * width``) and down: 12 tensors, 1-D (norms,
    biases) and 2-D (matrices), ``12 * width**2 + 13 * width`` parameters. The forward
    works token by token (q, k, v mixed by a gate instead of attention across tokens), so
    it stays cheap while every parameter gets a gradient.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.proj(torch.sigmoid(q) * k + v)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class BlockStack(torch.nn.Module):
    """``n_blocks`` :class:`Block` s, a final LayerNorm and a square head: the parameter
    list of a small transformer (``TENSORS_PER_BLOCK * n_blocks + 4`` tensors). Takes
    ``(batch, width)`` or ``(batch, seq, width)`` and returns the same shape."""

    def __init__(self, width: int, n_blocks: int) -> None:
        super().__init__()
        self.width = width
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(n_blocks))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def blocks_width(n_params: int, n_blocks: int = BLOCKS) -> int:
    """The width (a multiple of 8, at least 8) at which ``BlockStack(width, n_blocks)``
    has about ``n_params`` parameters: ``(12 n + 1) w^2 + (13 n + 3) w`` solved for w."""
    a, b = 12 * n_blocks + 1, 13 * n_blocks + 3
    exact = (-b + (b * b + 4 * a * n_params) ** 0.5) / (2 * a)
    return max(8, 8 * round(exact / 8))


def make_blocks(n_params: int, device: torch.device, n_blocks: int = BLOCKS) -> BlockStack:
    """A transformer-like :class:`BlockStack` of about ``n_params`` parameters in
    ``TENSORS_PER_BLOCK * n_blocks + 4`` tensors (196 by default), for the benchmarks of
    per-parameter ("lists") stepping over many small tensors of mixed shapes, as FSDP2
    and transformers models hand an optimizer; the MLP of ``make_mlp`` has 8 large ones.
    The width is chosen to hit ``n_params`` (a multiple of 8, so about it); the weights
    are the same in every run (seed 0)."""
    torch.manual_seed(0)
    return BlockStack(blocks_width(n_params, n_blocks), n_blocks).to(device)


# --- output -----------------------------------------------------------------------------


def cell(value: float | None, spec: str, *, scale: float = 1.0, missing: str = "-") -> str:
    """``value * scale`` formatted with ``spec`` (``scale=1e3``: seconds shown as ms), or
    ``missing`` where there is no value."""
    return missing if value is None else format(value * scale, spec)


def print_table(
    columns: Sequence[str], rows: Iterable[Sequence[object]], *, left_aligned: int = 1
) -> None:
    """A plain-text table: header, rule, one line per row.

    Each column is as wide as its widest entry; the first ``left_aligned`` columns
    (names) are left-aligned, the others (figures) right-aligned so digits line up.
    Cells are printed with ``str``: format numbers before (see ``cell``).
    """
    text = [[str(value) for value in row] for row in rows]
    widths = [max([len(title), *(len(row[i]) for row in text)]) for i, title in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            value.ljust(width) if i < left_aligned else value.rjust(width)
            for i, (value, width) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    header = line(list(columns))
    print(header)
    print("-" * len(header))
    for row in text:
        print(line(row))


def write_json(path: Path | None, records: object) -> None:
    """Write ``records`` as indented JSON to ``path`` (parents created); nothing when
    ``path`` is None (no ``--json`` given)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")
    print(f"wrote {path}")
