"""Optimizer step and training iteration time: ELRA (each backend) vs Adam, SGD, `elra`.

Question: how long does one optimizer step take, and one full training iteration
(forward + backward + step), for an MLP of 1M / 16M / 64M parameters, compared with
torch's Adam (fused and foreach), plain SGD and the authors' package ``elra`` 0.0.5 --
all measured in the same run on the same model and data.

``--models`` picks the parameter lists: ``mlp`` (default; 4 square Linear layers, 8
tensors) and ``blocks`` (a transformer-like stack of 196 tensors of mixed shapes, 1-D
norms and biases and 2-D matrices: ``_harness.make_blocks``), where per-parameter
("lists") stepping launches over many small tensors. Every contender, Adam included,
steps the same list, so the ratios compare on the same list.

Every optimizer starts from the same weights on its own copy of the model; iterations are
taken in turns (one iteration of each optimizer, then the next round), so load from
elsewhere on the machine hits all of them alike. Each timing is the median over
``--repeats`` rounds after ``--warmup`` rounds. On CUDA the device is synchronised
around every timed region. Ratios are against Adam fused, SGD and the pass floor (ELRA's
two unavoidable passes by torch's own kernels: ``PassFloor``) in the same run.

The ``elra`` package (GPL) is only imported, never copied; it is installed into the
benchmark environment when missing (``--no-install`` to skip it instead). Its step takes
the loss as a Python float, so its iteration includes that host read.

Usage: ``python benchmarks/bench_step.py [--device cpu|cuda] [--models mlp,blocks]
[--sizes 1M,16M] [--json PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import itertools
import statistics
import subprocess
import sys
from collections.abc import Callable

import _harness as harness  # also puts the repo root on sys.path
import torch

from elra_fused import ELRA, ops

ELRA_PYPI_VERSION = "0.0.5"
#: Hidden layers of the benchmark MLP; the width is chosen to hit the parameter count.
DEPTH = 4
BATCH = 32
SIZES = {"1M": 1 << 20, "16M": 1 << 24, "64M": 1 << 26}
#: The workloads of ``--models``.
MODELS = ("mlp", "blocks")


def parse_size(text: str) -> int:
    text = text.strip().upper()
    if text in SIZES:
        return SIZES[text]
    if text.endswith("M"):
        return int(float(text[:-1]) * (1 << 20))
    return int(text)


def build_model(kind: str, n_target: int, device: torch.device) -> tuple[torch.nn.Module, int]:
    """The ``--models`` workload ``kind`` of about ``n_target`` parameters and its input
    width (inputs and targets are ``(BATCH, width)``)."""
    if kind == "mlp":
        mlp = harness.make_mlp(n_target, DEPTH, device)
        return mlp, mlp[0].in_features
    if kind == "blocks":
        stack = harness.make_blocks(n_target, device)
        return stack, stack.width
    raise ValueError(f"unknown model {kind!r}: pick from {', '.join(MODELS)}")


def elra_pypi_class(install: bool) -> type | None:
    """The authors' ElraOptimizer, installed on demand; None when unavailable."""
    try:
        module = importlib.import_module("elra")
    except ImportError:
        if not install:
            return None
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        subprocess.run([*cmd, f"elra=={ELRA_PYPI_VERSION}"], check=False)
        importlib.invalidate_caches()
        try:
            module = importlib.import_module("elra")
        except ImportError:
            return None
    return getattr(module, "ElraOptimizer", None)


def optimizer_factories(
    device: torch.device, install: bool
) -> dict[tuple[str, str], Callable[[torch.nn.Module], torch.optim.Optimizer]]:
    """(optimizer name, backend) -> factory. ELRA gets one row per usable backend."""
    factories: dict[tuple[str, str], Callable] = {}
    backends = [b for b in ops.available_backends(device) if b != "triton" or device.type == "cuda"]
    # The default layout for the device (per-parameter lists on CPU, flat buffers on
    # CUDA), the other layout, and flat buffers with reuse_grad_buffer. On CUDA only the
    # first fused backend gets the two variants: every row holds its own model copy, and
    # at 1B parameters the H200's memory fits no more rows than that.
    other = "flat" if device.type == "cpu" else "lists"
    for index, backend in enumerate(backends):
        factories[("elra_fused", backend)] = lambda m, b=backend: ELRA(m.parameters(), backend=b)
        if backend == "reference" or (device.type == "cuda" and index > 0):
            continue  # the oracle: one row is enough
        factories[("elra_fused", f"{backend}+{other}")] = lambda m, b=backend: ELRA(
            m.parameters(), backend=b, flat=other == "flat"
        )
        # Flat buffers that swap instead of copying G_t: 20 instead of 24 bytes per step.
        factories[("elra_fused", f"{backend}+flat+reuse")] = lambda m, b=backend: ELRA(
            m.parameters(), backend=b, reuse_grad_buffer=True
        )
    factories[("adam_fused", "torch")] = lambda m: torch.optim.Adam(m.parameters(), fused=True)
    factories[("adam_foreach", "torch")] = lambda m: torch.optim.Adam(m.parameters(), foreach=True)
    factories[("sgd", "torch")] = lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, foreach=True)
    factories[("floor", "torch dot+add_")] = lambda m: PassFloor(m.parameters())
    pypi = elra_pypi_class(install)
    if pypi is not None:
        factories[("elra_pypi", ELRA_PYPI_VERSION)] = lambda m: pypi(m.parameters(), model=m)
    return factories


class PassFloor(torch.optim.Optimizer):
    """The two passes no exact ELRA step can skip, run by torch's own kernels, with no
    control law: ``<G_t, G_{t-1}>`` (``torch.dot`` per tensor: reads G_t and G_{t-1})
    then ``x -= lr G_t`` (``torch._foreach_add_``: reads x and G_t, writes x).

    alpha_t needs the sum over *all* of G_t before any x moves, so the two passes cannot
    be fused; G_{t-1} is the previous step's gradient tensor, kept by reference (as
    ELRA's default layout keeps it). Its step time is what an ELRA step costs at torch's
    own streaming rates on this machine: the row every ELRA row is held against
    (``step/floor``), next to Adam fused and SGD in the same run.
    """

    def __init__(self, params, lr: float = 1e-3) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], object] | None = None) -> torch.Tensor | None:
        dots = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            for param, grad in zip(params, grads, strict=True):
                grad_prev = self.state[param].get("grad_prev", grad)
                dots.append(torch.dot(grad.reshape(-1), grad_prev.reshape(-1)))
            torch._foreach_add_(params, grads, alpha=-group["lr"])
            for param, grad in zip(params, grads, strict=True):
                self.state[param]["grad_prev"] = grad
        return torch.stack(dots).sum() if dots else None


class Contender:
    """One optimizer on its own copy of the model, timed one iteration at a time."""

    def __init__(
        self,
        name: str,
        make: Callable[[torch.nn.Module], torch.optim.Optimizer],
        base_model: torch.nn.Module,
    ) -> None:
        self.name = name
        self.model = copy.deepcopy(base_model)
        # The elra package prints diagnostics on construction and per step; keep the table.
        with contextlib.redirect_stdout(io.StringIO()):
            self.opt = make(self.model)
        self.step_times: list[float] = []
        self.iter_times: list[float] = []

    def iteration(self, inputs: torch.Tensor, target: torch.Tensor, record: bool) -> None:
        device = inputs.device
        start = harness.synced_clock(device)
        self.opt.zero_grad()
        loss = torch.nn.functional.mse_loss(self.model(inputs), target)
        loss.backward()
        before_step = harness.synced_clock(device)
        if self.name == "elra_pypi":
            with contextlib.redirect_stdout(io.StringIO()):
                self.opt.step(loss.item())
        elif self.name == "elra_fused":
            self.opt.step(loss)
        else:
            self.opt.step()
        end = harness.synced_clock(device)
        if record:
            self.step_times.append(end - before_step)
            self.iter_times.append(end - start)


def time_round_robin(
    contenders: list[Contender],
    inputs: torch.Tensor,
    target: torch.Tensor,
    warmup: int,
    repeats: int,
    failures: dict[str, Exception] | None = None,
) -> None:
    """Iterations taken in turns, so load from elsewhere hits every optimizer alike.

    A contender that fails is reported (into ``failures``, by name) and dropped; the
    others go on.
    """
    for i in range(warmup + repeats):
        for contender in list(contenders):
            try:
                contender.iteration(inputs, target, record=i >= warmup)
            except Exception as exc:  # a broken baseline must not hide the others
                print(f"  {contender.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                contenders.remove(contender)
                if failures is not None:
                    failures[contender.name] = exc
                contender.opt = contender.model = None  # free it for the others


def _failed_row(name: str, backend: str, shape: dict, exc: Exception) -> dict:
    """A table row for a contender that could not run, with the reason (``shape``: the
    model's ``model`` / ``n_params`` / ``n_tensors`` keys)."""
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:80]
    print(f"  {name}/{backend} failed: {reason}", file=sys.stderr)
    return {
        "optimizer": name,
        "backend": backend,
        **shape,
        "step_median_s": None,
        "iter_median_s": None,
        "failed": reason,
    }


def time_graphed(
    make: Callable[[torch.nn.Module], torch.optim.Optimizer],
    base_model: torch.nn.Module,
    inputs: torch.Tensor,
    target: torch.Tensor,
    warmup: int,
    repeats: int,
) -> float:
    """Median seconds of one replay of a captured ELRA training iteration (CUDA only)."""
    model = copy.deepcopy(base_model)
    opt = make(model)

    def iteration() -> None:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        loss.backward()
        opt.step(loss)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 2)):
            iteration()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        iteration()
    times = []
    for i in range(warmup + repeats):
        start = harness.synced_clock(inputs.device)
        graph.replay()
        end = harness.synced_clock(inputs.device)
        if i >= warmup:
            times.append(end - start)
    return statistics.median(times)


def parse_models(text: str) -> list[str]:
    """The ``--models`` comma list, checked against ``MODELS``."""
    models = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in models if name not in MODELS]
    if unknown or not models:
        raise SystemExit(f"--models {text!r}: pick from {', '.join(MODELS)}")
    return models


def run(args: argparse.Namespace) -> list[dict]:
    """One row per (model, size, contender): medians of step and iteration time, ratios
    against Adam fused and SGD on the same model and size."""
    device = harness.resolve_device(args.device)
    models = parse_models(args.models)
    rows: list[dict] = []
    factories = optimizer_factories(device, not args.no_install)
    for model, size_text in itertools.product(models, args.sizes.split(",")):
        n_target = parse_size(size_text)
        base, width = build_model(model, n_target, device)
        shape = {
            "model": model,
            "n_params": sum(p.numel() for p in base.parameters()),
            "n_tensors": len(list(base.parameters())),
        }
        gen = torch.Generator(device="cpu").manual_seed(1)
        inputs = torch.randn(BATCH, width, generator=gen).to(device)
        target = torch.randn(BATCH, width, generator=gen).to(device) * 0.1
        size_rows = []
        # Large sizes: one contender at a time, freed before the next (every contender
        # holds its own model copy; at 1B parameters a GPU fits few at once).
        one_at_a_time = n_target >= parse_size(args.one_at_a_time)
        batches = (
            [[item] for item in factories.items()] if one_at_a_time else [list(factories.items())]
        )
        for batch in batches:
            contenders: list[tuple[str, Contender]] = []
            for (name, backend), make in batch:
                try:
                    contenders.append((backend, Contender(name, make, base)))
                except Exception as exc:
                    size_rows.append(_failed_row(name, backend, shape, exc))
            running = [c for _, c in contenders]
            failures: dict[str, Exception] = {}
            time_round_robin(running, inputs, target, args.warmup, args.repeats, failures)
            for backend, contender in contenders:
                if contender not in running:
                    size_rows.append(
                        _failed_row(contender.name, backend, shape, failures[contender.name])
                    )
                    continue
                size_rows.append(
                    {
                        "optimizer": contender.name,
                        "backend": backend,
                        **shape,
                        "step_median_s": statistics.median(contender.step_times),
                        "iter_median_s": statistics.median(contender.iter_times),
                    }
                )
            del contenders, running
            harness.release_memory(device)
        if device.type == "cuda":
            # A whole iteration captured in a CUDA graph: possible because step() never
            # syncs. The step alone cannot be separated inside a replay (step_median_s
            # is None there).
            for (name, backend), make in list(factories.items()):
                if name != "elra_fused" or backend == "reference" or "+" in backend:
                    continue
                try:
                    iter_s = time_graphed(make, base, inputs, target, args.warmup, args.repeats)
                except Exception as exc:
                    print(f"  graph {backend} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                size_rows.append(
                    {
                        "optimizer": name,
                        "backend": f"{backend}+graph",
                        **shape,
                        "step_median_s": None,
                        "iter_median_s": iter_s,
                    }
                )
        for row in size_rows:
            for peer in RATIO_PEERS:
                row[f"step_ratio_vs_{peer}"] = step_ratio(row, size_rows, peer)
                row[f"iter_ratio_vs_{peer}"] = step_ratio(row, size_rows, peer, "iter_median_s")
        rows.extend(size_rows)
        del base
    return rows


#: The steps every row is held against, in the same run: Adam fused (what users pick),
#: SGD (x += lr * G: 12 bytes per fp32 parameter, the floor of any step that reads G) and
#: the pass floor (``PassFloor``: ELRA's two unavoidable passes by torch's own kernels).
RATIO_PEERS = ("adam_fused", "sgd", "floor")


def step_ratio(
    row: dict, size_rows: list[dict], peer: str, key: str = "step_median_s"
) -> float | None:
    """``row``'s time (``key``) over the ``peer`` optimizer's at the same size (None where
    either has no figure)."""
    other = next((r for r in size_rows if r["optimizer"] == peer), None)
    if other is None or row.get(key) is None or other.get(key) is None or other[key] == 0:
        return None
    return row[key] / other[key]


def print_results(rows: list[dict], device: str) -> None:
    print(f"device {device}; threads {torch.get_num_threads()}; batch {BATCH}; medians")
    columns = ["model", "optimizer", "backend", "params", "tensors", "step ms", "iter ms"]
    columns += ["step/adam_fused", "step/sgd", "step/floor", "iter/adam_fused", "note"]
    lines = [
        [
            r["model"],
            r["optimizer"],
            r["backend"],
            r["n_params"],
            r["n_tensors"],
            harness.cell(r["step_median_s"], ".2f", scale=1e3),
            harness.cell(r["iter_median_s"], ".2f", scale=1e3),
            harness.cell(r["step_ratio_vs_adam_fused"], ".2f"),
            harness.cell(r["step_ratio_vs_sgd"], ".2f"),
            harness.cell(r["step_ratio_vs_floor"], ".2f"),
            harness.cell(r["iter_ratio_vs_adam_fused"], ".2f"),
            f"could not run: {r['failed']}" if r.get("failed") else "",
        ]
        for r in rows
    ]
    harness.print_table(columns, lines, left_aligned=3)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv``, time, print the table, write the JSON; the rows, for callers."""
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,16M,64M", help="comma list, e.g. 1M,16M,64M")
    parser.add_argument(
        "--models",
        default="mlp",
        help="comma list of workloads: mlp (4 Linear layers, 8 tensors), blocks "
        "(transformer-like, 196 tensors); default mlp",
    )
    harness.add_timing_flags(parser, repeats=11, warmup=2)
    parser.add_argument("--no-install", action="store_true", help="do not pip install elra")
    parser.add_argument(
        "--one-at-a-time",
        default="256M",
        help="from this size on, time the contenders one at a time, each freed before the "
        "next (less memory, no round robin)",
    )
    args = parser.parse_args(argv)
    rows = run(args)
    print_results(rows, args.device)
    harness.write_json(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
