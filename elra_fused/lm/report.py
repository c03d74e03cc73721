"""Summaries of the runs: equal-token and equal-time losses, the table, the figure."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .training import Run


def loss_at(run: Run, fraction: float, budget: int) -> float:
    """Validation loss at the first checkpoint at or after ``fraction`` of the budget."""
    target = fraction * budget
    for tokens, loss in zip(run.tokens, run.val_loss, strict=True):
        if tokens >= target - 1e-9:
            return loss
    return run.val_loss[-1]


def loss_at_time(run: Run, seconds: float) -> float:
    """Validation loss at the last checkpoint reached within ``seconds`` of training."""
    best = run.val_loss[0]
    for spent, loss in zip(run.seconds, run.val_loss, strict=True):
        if spent <= seconds + 1e-9:
            best = loss
    return best


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def summarize(runs: dict[str, list[Run]], budget: int) -> dict[str, dict[str, Any]]:
    """The JSON's ``results``: medians over seeds."""
    results: dict[str, dict[str, Any]] = {}
    for name, seeds in runs.items():
        results[name] = {
            "tokens": seeds[0].tokens[-1],
            "val_loss": median([r.val_loss[-1] for r in seeds]),
            "val_loss_at": {
                f"{int(f * 100)}%": median([loss_at(r, f, budget) for r in seeds])
                for f in (0.25, 0.5, 1.0)
            },
            "tokens_per_s": median([r.tokens[-1] / max(r.train_seconds, 1e-9) for r in seeds]),
            "state_bytes": seeds[-1].state_bytes,
            "peak_bytes": seeds[-1].peak_bytes,
        }
        if seeds[-1].cuda_peak_bytes is not None:  # --device cuda: the allocator's peaks
            results[name]["cuda_peak_bytes"] = seeds[-1].cuda_peak_bytes
            results[name]["cuda_max_allocated_bytes"] = seeds[-1].cuda_max_allocated
    return results


def format_table(
    results: dict[str, dict[str, Any]], runs: dict[str, list[Run]], settings: dict[str, str]
) -> str:
    """Results at equal tokens, plus the loss every optimizer had reached by the time the
    fastest-finishing run was done (equal wall time)."""
    shortest = min(median([r.train_seconds for r in seeds]) for seeds in runs.values())
    cuda = any("cuda_peak_bytes" in row for row in results.values())
    header = (
        f"{'optimizer':<14}{'batch':>14}{'val@25%':>9}{'val@50%':>9}{'val@100%':>9}"
        f"{'tok/s':>9}{'train s':>9}{f'val@{shortest:.0f}s':>9}{'state B':>10}{'peak B':>11}"
        + (f"{'cuda peak B':>13}" if cuda else "")
    )
    lines = [header]
    for name, row in results.items():
        seeds = runs[name]
        at = row["val_loss_at"]
        lines.append(
            f"{name:<14}{settings[name + '_batch']:>14}{at['25%']:>9.4f}{at['50%']:>9.4f}"
            f"{at['100%']:>9.4f}{row['tokens_per_s']:>9.0f}"
            f"{median([r.train_seconds for r in seeds]):>9.1f}"
            f"{median([loss_at_time(r, shortest) for r in seeds]):>9.4f}"
            f"{row['state_bytes']:>10}{row['peak_bytes']:>11}"
            + (f"{row.get('cuda_peak_bytes', ''):>13}" if cuda else "")
        )
    return "\n".join(lines)


def elra_versus_peers(results: dict[str, dict[str, Any]], runs: dict[str, list[Run]]) -> str:
    """Plain lines: ELRA against each peer at equal tokens and at equal wall time (the
    time the faster of the two needed for the whole budget)."""
    if "elra" not in results:
        return ""
    elra_seconds = median([r.train_seconds for r in runs["elra"]])
    lines = []
    for name, row in results.items():
        if name.startswith("elra"):
            continue
        ours, theirs = results["elra"]["val_loss"], row["val_loss"]
        seconds = min(elra_seconds, median([r.train_seconds for r in runs[name]]))
        ours_t = median([loss_at_time(r, seconds) for r in runs["elra"]])
        theirs_t = median([loss_at_time(r, seconds) for r in runs[name]])
        lines.append(
            f"ELRA vs {name}: equal tokens {ours:.4f} vs {theirs:.4f} "
            f"({'better' if ours < theirs else 'worse'}); equal wall time ({seconds:.0f} s) "
            f"{ours_t:.4f} vs {theirs_t:.4f} ({'better' if ours_t < theirs_t else 'worse'})"
        )
    return "\n".join(lines)


def plot(runs: dict[str, list[Run]], path: Path, title: str) -> None:
    """Validation loss vs tokens and vs wall time; ELRA's alpha and batch vs tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, seeds in runs.items():
        run = seeds[0]
        axes[0].plot(run.tokens, run.val_loss, marker=".", label=name)
        axes[1].plot(run.seconds, run.val_loss, marker=".", label=name)
    axes[0].set(xlabel="training tokens", ylabel="validation loss (nats/byte)", title=title)
    axes[1].set(xlabel="training wall time (s, evaluation excluded)", ylabel="validation loss")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    if "elra" in runs:
        run = runs["elra"][0]
        axes[2].semilogy(run.trace_tokens, run.alpha, color="C0", lw=0.8)
        axes[2].set(xlabel="training tokens", ylabel="ELRA alpha", title="ELRA alpha and batch")
        twin = axes[2].twinx()
        twin.plot(run.trace_tokens, run.batch_tokens, color="C3", lw=1.0)
        twin.set_ylabel("batch (tokens)", color="C3")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
