"""Reporting of training runs (elra_fused.report): summary rows, table, JSON, plot."""

from __future__ import annotations

import json

import pytest
import torch

from elra_fused import ELRA, control
from elra_fused.report import (
    RunResult,
    format_table,
    optimizer_state_bytes,
    plot,
    summarize,
    to_json,
)


def runs() -> dict[str, list[RunResult]]:
    elra = [
        RunResult(
            "elra",
            seed,
            test_acc=[0.5, 0.80 + seed / 100],
            train_loss=[1.0, 0.3 - seed / 10],
            epoch_seconds=[1.0, 3.0],
            alpha_trace=[1e-3, 2e-3],
            batch_trace=[32, 48 + 16 * seed],
            retraces=2 + seed,
            steps=10,
        )
        for seed in (0, 1, 2)
    ]
    adam = [RunResult("adam", 0, test_acc=[0.7], train_loss=[0.4], epoch_seconds=[0.5])]
    return {"elra": elra, "adam": adam}


def test_summary_rows_take_medians_over_seeds() -> None:
    elra, adam = summarize(runs())
    assert elra["best_median"] == pytest.approx(0.81)
    assert elra["best_std"] == pytest.approx(0.0081649, rel=1e-4)
    assert elra["final_train_loss"] == pytest.approx(0.2)
    assert elra["sec_per_epoch"] == 2.0
    assert (elra["retraces"], elra["final_bs"]) == (3, 64)
    assert adam["best_std"] == 0.0 and "retraces" not in adam
    table = format_table([elra, adam])
    assert table.splitlines()[2].startswith("elra") and "retraces 3, final bs 64" in table


def test_json_and_plot(tmp_path) -> None:
    payload = to_json("digits", "mlp", 2, runs(), {"bs": 32})
    json.dumps(payload)  # plain JSON types only
    assert payload["results"]["elra"]["final_batch_size"] == [48, 64, 80]
    assert payload["results"]["adam"]["best_test_acc"] == [0.7]
    path = tmp_path / "curves.png"
    plot(runs(), path, "digits")
    assert path.stat().st_size > 1000


def test_optimizer_state_bytes_counts_each_storage_once() -> None:
    """Flat ELRA: the per-parameter G_{t-1} entries are views of one buffer (counted once)
    plus the control vector; Adam: two moments per parameter plus its step counters."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    n = sum(p.numel() for p in model.parameters())
    elra = ELRA(model.parameters(), flat=True)
    assert sum(optimizer_state_bytes(elra)) == n * 4 + control.STATE_SIZE * 8
    adam = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    adam.step()
    assert sum(optimizer_state_bytes(adam)) >= 2 * n * 4


def test_summary_of_elra_runs_without_a_step_has_no_final_batch() -> None:
    """No step taken: the table says so instead of failing on an empty median."""
    stepless = [RunResult("elra", 0, test_acc=[0.1], train_loss=[2.3], epoch_seconds=[0.1])]
    (row,) = summarize({"elra": stepless})
    assert row["final_bs"] is None
    assert "final bs -" in format_table([row])
