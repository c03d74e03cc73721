"""Does ELRA lock up on small mini-batches with short control cycles?

Question (issue 12, "must show" #1): with noisy mini-batch losses, the retrace rule
"f_t > mean + 5 sigma of the last control cycle" uses statistics of a handful of losses
when the cycle is short. Does the law then retrace (almost) every step, with alpha
collapsing to its floor, so that the run stops learning? And do the control-law guards
(``min_cycle_losses``, ``sigma_inflation``, ``retrace_min_step``, ``max_retraces``) stop
that?

Workload: a fixed synthetic 4-class problem (256 points in 8 dimensions, labels from a
fixed random teacher MLP) and an 8-32-4 tanh MLP student (420 parameters), cross-entropy.
A classifier rather than the 6-16-1 regression of ``python_tests/_lockstep.py``: its
target is linear, so Adam drives the loss towards 0 and the ELRA/Adam ratio would
compare round-off; the teacher's labels keep the full-data loss well above 0 after 2000
steps for both. 256 points: the batch sizes 2, 4, 16 divide it (every step gets a full
batch, an epoch is a whole number of steps) and the full-data loss is exact and cheap.
The model is small so that the full grid (12 cells x 12 seeds x 2000 steps) runs in a
few minutes on 2 CPU cores.

Per seed: the student's initial weights and the order of the mini-batches (a fresh
permutation of the data every epoch). ELRA at every cycle length and Adam (lr 1e-3, the
reference) train from the same weights on the same batches. Cycles: every N steps
(``ELRA(cycle_steps=N)``) or ``epoch`` (``opt.end_cycle()`` after each pass over the
data: 128, 64 and 16 steps for batches of 2, 4, 16).

Per grid cell (batch size, cycle): runs "locked" (>= 99 % of their last 500 steps
retraced), the smallest alpha any run reached, the median share of retraced steps, and
the median final full-data loss of ELRA and of Adam and their ratio. ELRA's final loss is
also given at its boosted point (paper 3.7: the mean of its iterates over the last epoch,
:class:`elra_fused.boost.Booster`; evaluation only, the run itself is unchanged), since
on tiny batches ELRA's last iterate carries the step noise that the mean cancels. Adam
is reported at its last iterate, as a user would take it.

``--guards on``: ELRA's default guards. ``--guards off``: the paper's law without them
(``min_cycle_losses=1, sigma_inflation=1.0, retrace_min_step=0.0, max_retraces=None``);
an ELRA whose constructor has no guard arguments has no guards, so "off" then passes
nothing and "on" is refused.

``--dynamic-batch`` adds one row per batch size: ELRA with the paper's dynamic batch size
(3.3; :class:`elra_fused.batching.DynamicBatchSize`, m_0 = 1, one cycle per epoch) on the
same stream of mini-batches as Adam -- a step of m_t mini-batches consumes m_t of them --
stopped at the same number of samples. The paper's answer to gradient noise that turns
descent into a random walk is a larger batch, not a smaller alpha; this row shows what
that buys at the batch sizes where the fixed-batch law trails Adam. "locked" and the
retraced share count optimizer steps.

``--step-crop C`` passes ``step_crop=C`` (ELRA's default is 2, off with ``--guards
off``): without it the small-batch runs that do not lock diverge, guards or not.

Usage: ``python benchmarks/bench_lockup.py --guards off [--seeds N] [--steps N]
[--batches 2 4 16] [--cycles 4 16 32 epoch] [--step-crop C] [--json PATH]`` (about
2-3 min for the full grid on one CPU core).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass

import _harness as harness  # also puts the repo root on sys.path
import torch
import torch.nn.functional as F

from elra_fused import ELRA
from elra_fused.batching import DynamicBatchSize, GroupedBatches
from elra_fused.boost import Booster

N_SAMPLES, N_FEATURES, N_CLASSES, HIDDEN = 256, 8, 4, 32
ADAM_LR = 1e-3
#: A run is "locked" when at least this share of its last ``LOCK_WINDOW`` steps retraced.
LOCK_WINDOW, LOCK_SHARE = 500, 0.99
#: The guards switched off: the paper's retrace rule as printed (issue 12).
GUARDS_OFF = {
    "min_cycle_losses": 1,
    "sigma_inflation": 1.0,
    "retrace_min_step": 0.0,
    "max_retraces": None,
    "step_crop": None,  # the step crop (on by default since the guards) off too
}
EPOCH = "epoch"
#: The cycle label of the dynamic-batch rows (one cycle per epoch, m_t grown by the law).
DYNAMIC = "epoch+dyn"


def elra_has_guards() -> bool:
    """Whether this checkout's ELRA takes the guard arguments (they are being added)."""
    return set(GUARDS_OFF) <= set(inspect.signature(ELRA).parameters)


def guard_kwargs(guards: str) -> dict[str, float | int | None]:
    """Constructor arguments for ``--guards``: "on" is ELRA's defaults (nothing passed);
    "off" passes ``GUARDS_OFF`` where ELRA has the arguments (else it has no guards)."""
    if guards == "on":
        if not elra_has_guards():
            raise SystemExit("--guards on: this ELRA has no guard arguments (no guards)")
        return {}
    return dict(GUARDS_OFF) if elra_has_guards() else {}


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed dataset: Gaussian inputs, labels = argmax of a random tanh teacher (its
    own seed, so the data never depend on the run's seed)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=gen)
    w1 = torch.randn(N_FEATURES, 16, generator=gen)
    w2 = torch.randn(16, N_CLASSES, generator=gen)
    return x, (torch.tanh(x @ w1) @ w2).argmax(dim=1)


def make_model(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, N_CLASSES)
    )


def batch_indices(batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch) sample indices: consecutive epochs, each a fresh permutation cut
    into full batches (``batch`` divides ``N_SAMPLES``)."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = N_SAMPLES // batch
    epochs = -(-steps // per_epoch)
    order = torch.cat([torch.randperm(N_SAMPLES, generator=gen) for _ in range(epochs)])
    return order[: steps * batch].view(steps, batch)


@torch.no_grad()
def full_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return F.cross_entropy(model(x), y).item()


@dataclass
class ElraRun:
    """One ELRA run: what the table summarises (the JSON keeps every run)."""

    seed: int
    locked: bool
    retraced_last_window: float  # share of the last LOCK_WINDOW steps retraced
    retraced_share: float  # share of all steps retraced
    min_alpha: float
    final_alpha: float
    final_loss: float
    boosted_loss: float  # at the mean of the last epoch's iterates (paper 3.7)
    restarts: int | None  # max_retraces restarts (None: this ELRA has no guards)
    final_m: int = 1  # mini-batches per step at the end (dynamic batch size; else 1)


def summarize_run(
    seed: int,
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    opt: ELRA,
    booster: Booster,
    retraced: list[bool],
    min_alpha: float,
    final_m: int = 1,
) -> ElraRun:
    """The :class:`ElraRun` of a finished run (closes the booster's window)."""
    x, y = data
    booster.end_window()
    with booster.boosted(model):
        boosted_loss = full_loss(model, x, y)
    window = retraced[-LOCK_WINDOW:]
    share = sum(window) / len(window)
    return ElraRun(
        seed=seed,
        locked=share >= LOCK_SHARE,
        retraced_last_window=share,
        retraced_share=sum(retraced) / len(retraced),
        min_alpha=min_alpha,
        final_alpha=opt.alpha,
        final_loss=full_loss(model, x, y),
        boosted_loss=boosted_loss,
        restarts=getattr(opt, "restart_count", None),
        final_m=final_m,
    )


def train_elra(
    seed: int,
    data: tuple[torch.Tensor, torch.Tensor],
    indices: torch.Tensor,
    cycle: int | str,
    kwargs: dict[str, float | int | None],
) -> ElraRun:
    x, y = data
    model = make_model(seed)
    per_epoch = N_SAMPLES // indices.shape[1]
    opt = ELRA(model.parameters(), cycle_steps=None if cycle == EPOCH else int(cycle), **kwargs)
    booster = Booster(model.parameters())
    boost_from = len(indices) - min(per_epoch, len(indices))  # the last epoch's steps
    retraced: list[bool] = []
    min_alpha = opt.alpha
    for step, index in enumerate(indices):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[index]), y[index])
        loss.backward()
        opt.step(loss)
        # Host control on the CPU: these reads cost a float each, no device sync.
        retraced.append(opt.last_step_retraced)
        min_alpha = min(min_alpha, opt.alpha)
        if step >= boost_from:
            booster.update()
        if cycle == EPOCH and (step + 1) % per_epoch == 0:
            opt.end_cycle()
    return summarize_run(seed, model, data, opt, booster, retraced, min_alpha)


class EpochStream:
    """The mini-batch stream as a re-iterable loader: each pass yields the next epoch's
    mini-batches (``GroupedBatches`` calls one pass an epoch)."""

    def __init__(self, indices: torch.Tensor, per_epoch: int) -> None:
        self.epochs = list(indices.split(per_epoch))

    def __iter__(self):
        if self.epochs:
            yield from self.epochs.pop(0)


def train_elra_dynamic(
    seed: int,
    data: tuple[torch.Tensor, torch.Tensor],
    indices: torch.Tensor,
    kwargs: dict[str, float | int | None],
) -> ElraRun:
    """ELRA with the dynamic batch size on the stream ``indices`` (mini-batches in order),
    until it is used up: the same samples Adam sees, in fewer, larger steps."""
    x, y = data
    model = make_model(seed)
    budget, per_epoch = len(indices), N_SAMPLES // indices.shape[1]
    opt = ELRA(model.parameters(), **kwargs)
    sizer = DynamicBatchSize(opt)
    grouped = GroupedBatches(EpochStream(indices, per_epoch), sizer)
    booster = Booster(model.parameters())
    retraced: list[bool] = []
    min_alpha, used = opt.alpha, 0
    while used < budget:
        steps_before = len(retraced)
        for group in grouped:
            total = torch.zeros(())
            for index in group:
                loss = F.cross_entropy(model(x[index]), y[index])
                (loss * group.scale).backward()
                total = total + loss.detach()
            opt.step(total / len(group))
            opt.zero_grad()
            retraced.append(opt.last_step_retraced)
            min_alpha = min(min_alpha, opt.alpha)
            used += len(group)
            if used > budget - per_epoch:  # the last epoch's samples: the boosting window
                booster.update()
            if used >= budget:
                break
        if len(retraced) == steps_before:  # the stream ran dry (the rest was carried)
            break
    return summarize_run(seed, model, data, opt, booster, retraced, min_alpha, sizer.m)


def train_adam(seed: int, data: tuple[torch.Tensor, torch.Tensor], indices: torch.Tensor) -> float:
    """Final full-data loss of Adam from the same weights on the same batches."""
    x, y = data
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=ADAM_LR)
    for index in indices:
        opt.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        opt.step()
    return full_loss(model, x, y)


def cycle_arg(text: str) -> int | str:
    if text == EPOCH:
        return EPOCH
    value = int(text)
    if value < 1:
        raise ValueError(f"cycle length must be >= 1 or '{EPOCH}', got {text}")
    return value


def batch_arg(text: str) -> int:
    value = int(text)
    if value < 1 or N_SAMPLES % value:
        raise ValueError(f"batch size must divide {N_SAMPLES}, got {text}")
    return value


def run_grid(
    seeds: int,
    steps: int,
    batches: list[int],
    cycles: list[int | str],
    kwargs: dict[str, float | int | None],
    dynamic_batch: bool = False,
) -> list[dict[str, object]]:
    """One record per (batch, cycle) cell: the summary and every run; ``kwargs`` go to
    every ELRA (the guard switches, ``step_crop``); ``dynamic_batch`` adds a
    :data:`DYNAMIC` cell per batch size."""
    data = make_data()
    records: list[dict[str, object]] = []
    for batch in batches:
        orders = {seed: batch_indices(batch, steps, seed) for seed in range(seeds)}
        adam = [train_adam(seed, data, orders[seed]) for seed in range(seeds)]
        adam_median = statistics.median(adam)
        for cycle in [*cycles, *([DYNAMIC] if dynamic_batch else [])]:
            t0 = time.perf_counter()
            runs = [
                train_elra_dynamic(seed, data, orders[seed], kwargs)
                if cycle == DYNAMIC
                else train_elra(seed, data, orders[seed], cycle, kwargs)
                for seed in range(seeds)
            ]
            elra_median = statistics.median(r.final_loss for r in runs)
            boosted_median = statistics.median(r.boosted_loss for r in runs)
            records.append(
                {
                    "batch": batch,
                    "cycle": cycle,
                    "locked": sum(r.locked for r in runs),
                    "runs": len(runs),
                    "min_alpha": min(r.min_alpha for r in runs),
                    "median_retraced_share": statistics.median(r.retraced_share for r in runs),
                    "final_m": sorted(r.final_m for r in runs),
                    "elra_median_loss": elra_median,
                    "adam_median_loss": adam_median,
                    "ratio": elra_median / adam_median,
                    "elra_median_boosted_loss": boosted_median,
                    "boosted_ratio": boosted_median / adam_median,
                    "seconds": time.perf_counter() - t0,
                    "elra_runs": [asdict(r) for r in runs],
                    "adam_final_losses": adam,
                }
            )
    return records


def print_records(records: list[dict[str, object]]) -> None:
    columns = [
        "batch",
        "cycle",
        "locked",
        "min alpha",
        "retraced",
        "ELRA loss",
        "Adam loss",
        "ELRA/Adam",
        "boosted",
        "boosted/Adam",
    ]
    rows = [
        [
            r["batch"],
            r["cycle"],
            f"{r['locked']}/{r['runs']}",
            harness.cell(r["min_alpha"], ".1e"),
            harness.cell(r["median_retraced_share"], ".0%"),
            harness.cell(r["elra_median_loss"], ".4f"),
            harness.cell(r["adam_median_loss"], ".4f"),
            harness.cell(r["ratio"], ".3g"),
            harness.cell(r["elra_median_boosted_loss"], ".4f"),
            harness.cell(r["boosted_ratio"], ".3g"),
        ]
        for r in records
    ]
    harness.print_table(columns, rows, left_aligned=2)


def main(argv: list[str] | None = None) -> None:
    parser = harness.base_parser(__doc__.splitlines()[0], device=False)  # tiny model: CPU
    parser.add_argument("--guards", required=True, choices=["on", "off"])
    parser.add_argument("--seeds", type=int, default=12, help="seeds 0..N-1 (default 12)")
    parser.add_argument("--steps", type=int, default=2000, help="steps per run (default 2000)")
    parser.add_argument(
        "--batches", type=batch_arg, nargs="+", default=[2, 4, 16], help="mini-batch sizes"
    )
    parser.add_argument(
        "--cycles",
        type=cycle_arg,
        nargs="+",
        default=[4, 16, 32, EPOCH],
        help=f"control cycle lengths in steps, or '{EPOCH}' (end_cycle() per pass)",
    )
    parser.add_argument(
        "--dynamic-batch",
        action="store_true",
        help=f"add a '{DYNAMIC}' row per batch size: the paper's dynamic batch size (3.3)",
    )
    parser.add_argument(
        "--step-crop",
        type=float,
        help="ELRA step_crop c (alpha ||G|| <= c, paper 3.5); default: ELRA's 2 (None if off)",
    )
    args = parser.parse_args(argv)
    if args.steps < LOCK_WINDOW:
        parser.error(f"--steps must be >= {LOCK_WINDOW} (the lock-up window)")
    kwargs = guard_kwargs(args.guards)
    if args.step_crop is not None:
        kwargs["step_crop"] = args.step_crop
    # A 420-parameter model: a second thread only adds hand-off overhead per op, and the
    # machines this runs on are shared.
    torch.set_num_threads(1)
    print(
        f"guards {args.guards} (ELRA arguments passed: {kwargs or 'none'}); "
        f"{args.seeds} seeds x {args.steps} steps; MLP {N_FEATURES}-{HIDDEN}-{N_CLASSES} "
        f"tanh on {N_SAMPLES} points; Adam lr {ADAM_LR}"
    )
    print(
        f"locked: >= {LOCK_SHARE:.0%} of the last {LOCK_WINDOW} steps retraced; losses: "
        "median final full-data cross-entropy; retraced: median share of steps"
    )
    t0 = time.perf_counter()
    records = run_grid(
        args.seeds, args.steps, args.batches, args.cycles, kwargs, args.dynamic_batch
    )
    seconds = time.perf_counter() - t0
    print_records(records)
    print(f"total {seconds:.0f} s")
    harness.write_json(
        args.json,
        {
            "guards": args.guards,
            "elra_has_guard_arguments": elra_has_guards(),
            "elra_arguments_passed": kwargs,
            "seeds": args.seeds,
            "steps": args.steps,
            "seconds": seconds,
            "cells": records,
        },
    )


if __name__ == "__main__":
    main()
