"""No lock-up on ordinary mini-batch noise (the CI-size cut of benchmarks/bench_lockup.py).

A small tanh classifier on a fixed 4-class problem, random mini-batches, 4-step control
cycles: the cell where the paper's law as printed locks most runs in endless retraces at
alpha_min. With ELRA's defaults (the authors' guards, step crop 2) no run locks and the
final full-data loss stays within 2x of Adam's on the same batches.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from elra_fused import ELRA

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_lockup  # noqa: E402

SAMPLES, FEATURES, CLASSES = 256, 8, 4
STEPS = 800
#: "Locked": at least this share of the last WINDOW steps retraced.
WINDOW, LOCKED_SHARE = 200, 0.99
SEEDS = range(4)
#: The dynamic-batch check runs the benchmark's length: 2000 mini-batches of 2 = 15 epochs.
DYNAMIC_STEPS = 2000
PAPER_LAW = {
    "min_cycle_losses": 1,
    "sigma_inflation": 1.0,
    "retrace_min_step": 0.0,
    "max_retraces": None,
    "step_crop": None,
}


def problem() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(SAMPLES, FEATURES, generator=gen)
    teacher = torch.randn(FEATURES, 16, generator=gen), torch.randn(16, CLASSES, generator=gen)
    return x, (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(dim=1)


def model_for(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32), torch.nn.Tanh(), torch.nn.Linear(32, CLASSES)
    )


def batches(batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-STEPS * batch // SAMPLES)
    order = torch.cat([torch.randperm(SAMPLES, generator=gen) for _ in range(epochs)])
    return order[: STEPS * batch].view(STEPS, batch)


def train(seed: int, batch: int, make_opt) -> tuple[float, float]:
    """(share of the last WINDOW steps retraced, final full-data loss)."""
    x, y = problem()
    model = model_for(seed)
    opt = make_opt(model.parameters())
    retraced = []
    for index in batches(batch, seed):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[index]), y[index])
        loss.backward()
        if isinstance(opt, ELRA):
            opt.step(loss)
            retraced.append(opt.last_step_retraced)
        else:
            opt.step()
            retraced.append(False)
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    return sum(retraced[-WINDOW:]) / WINDOW, final


@pytest.mark.parametrize("batch", [4, 16])
def test_no_run_locks_and_the_loss_stays_near_adams(batch: int) -> None:
    runs = [train(seed, batch, lambda p: ELRA(p, cycle_steps=4)) for seed in SEEDS]
    adam = [train(seed, batch, lambda p: torch.optim.Adam(p, lr=1e-3))[1] for seed in SEEDS]
    assert all(share < LOCKED_SHARE for share, _ in runs), runs
    assert statistics.median(loss for _, loss in runs) <= 2 * statistics.median(adam)


def test_the_paper_law_as_printed_locks_here() -> None:
    """The check above can fail: without the guards this setting locks runs."""
    runs = [train(seed, 16, lambda p: ELRA(p, cycle_steps=4, **PAPER_LAW)) for seed in SEEDS]
    assert any(share >= LOCKED_SHARE for share, _ in runs), runs


def test_batch_2_with_the_dynamic_batch_size_ends_below_adam() -> None:
    """Batches of 2 are where the fixed-batch law trails Adam (benchmarks/bench_lockup.py:
    2.3-2.7x): its alpha random-walks on the noise. The paper's remedy (3.3) is a growing
    batch; on the same stream of samples as Adam it ends below Adam's loss here.
    Uses the benchmark's own runner and length (the batch grows once per epoch: it needs
    the epochs), so this checks the figure the README quotes."""
    data = bench_lockup.make_data()
    dynamic, adam = [], []
    for seed in SEEDS:
        stream = bench_lockup.batch_indices(2, DYNAMIC_STEPS, seed)
        run = bench_lockup.train_elra_dynamic(seed, data, stream, {})
        assert not run.locked and run.final_m > 1, run  # the batch did grow
        dynamic.append(run.final_loss)
        adam.append(bench_lockup.train_adam(seed, data, stream))
    assert statistics.median(dynamic) < statistics.median(adam), (dynamic, adam)
