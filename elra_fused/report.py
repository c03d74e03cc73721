"""Results of training runs: what one run records (:class:`RunResult`), and the summary
table, JSON file and plot the jobs behind ``python -m elra_fused`` print and write."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    optimizer: str
    seed: int
    test_acc: list[float] = field(default_factory=list)  # per epoch
    train_loss: list[float] = field(default_factory=list)  # per epoch, whole training set
    boosted_test_acc: list[float] = field(default_factory=list)  # ELRA with --boost
    epoch_seconds: list[float] = field(default_factory=list)
    state_bytes: int = 0
    alpha_trace: list[float] = field(default_factory=list)  # ELRA, per step
    batch_trace: list[int] = field(default_factory=list)  # ELRA, m_t * bs_min per step
    retraces: int = 0
    steps: int = 0

    @property
    def best_test_acc(self) -> float:
        return max(self.test_acc)

    @property
    def sec_per_epoch(self) -> float:
        return statistics.median(self.epoch_seconds)


def _median_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    return [statistics.median(values) for values in zip(*curves, strict=True)]


def summarize(results: dict[str, list[RunResult]]) -> list[dict[str, Any]]:
    rows = []
    for name, runs in results.items():
        best = [r.best_test_acc for r in runs]
        row = {
            "optimizer": name,
            "best_median": statistics.median(best),
            "best_mean": statistics.fmean(best),
            "best_std": statistics.pstdev(best) if len(best) > 1 else 0.0,
            "final_train_loss": statistics.median(r.train_loss[-1] for r in runs),
            "sec_per_epoch": statistics.median(r.sec_per_epoch for r in runs),
            "state_bytes": runs[0].state_bytes,
            "steps": statistics.median(r.steps for r in runs),
        }
        if runs[0].boosted_test_acc:
            row["boosted_median"] = statistics.median(max(r.boosted_test_acc) for r in runs)
        if name == "elra":
            row["retraces"] = statistics.median(r.retraces for r in runs)
            # None when no run took a step (nothing to report, not an error)
            finals = [r.batch_trace[-1] for r in runs if r.batch_trace]
            row["final_bs"] = statistics.median(finals) if finals else None
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'optimizer':<9} {'best test acc':>13} {'mean +- std':>17} {'final loss':>10} "
        f"{'s/epoch':>8} {'state bytes':>11} {'steps':>6}  notes"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        notes = []
        if "boosted_median" in row:
            notes.append(f"boosted best {row['boosted_median']:.4f}")
        if "retraces" in row:
            final_bs = "-" if row["final_bs"] is None else f"{row['final_bs']:g}"
            notes.append(f"retraces {row['retraces']:g}, final bs {final_bs}")
        lines.append(
            f"{row['optimizer']:<9} {row['best_median']:>13.4f} "
            f"{row['best_mean']:>8.4f} +- {row['best_std']:.4f} "
            f"{row['final_train_loss']:>10.4f} {row['sec_per_epoch']:>8.3f} "
            f"{row['state_bytes']:>11d} {row['steps']:>6g}  {', '.join(notes)}"
        )
    return "\n".join(lines)


def to_json(
    dataset: str, model: str, epochs: int, results: dict[str, list[RunResult]], settings: dict
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "dataset": dataset,
        "model": model,
        "epochs": epochs,
        "settings": settings,
        "results": {},
    }
    for name, runs in results.items():
        entry: dict[str, Any] = {
            "best_test_acc": [r.best_test_acc for r in runs],
            "final_train_loss": [r.train_loss[-1] for r in runs],
            "sec_per_epoch": [r.sec_per_epoch for r in runs],
            "seeds": [r.seed for r in runs],
            "state_bytes": runs[0].state_bytes,
            "test_acc_per_epoch": [r.test_acc for r in runs],
            "train_loss_per_epoch": [r.train_loss for r in runs],
        }
        if runs[0].boosted_test_acc:
            entry["boosted_best_test_acc"] = [max(r.boosted_test_acc) for r in runs]
            entry["boosted_test_acc_per_epoch"] = [r.boosted_test_acc for r in runs]
        if name == "elra":
            entry["retraces"] = [r.retraces for r in runs]
            entry["final_batch_size"] = [r.batch_trace[-1] if r.batch_trace else None for r in runs]
        out["results"][name] = entry
    return out


def plot(results: dict[str, list[RunResult]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_acc, ax_loss), (ax_alpha, ax_bs) = axes
    for name, runs in results.items():
        epochs = range(1, len(runs[0].test_acc) + 1)
        (line,) = ax_acc.plot(epochs, _median_curve([r.test_acc for r in runs]), label=name)
        if runs[0].boosted_test_acc:
            ax_acc.plot(
                epochs,
                _median_curve([r.boosted_test_acc for r in runs]),
                color=line.get_color(),
                linestyle="--",
                label=f"{name} boosted",
            )
        ax_loss.plot(epochs, _median_curve([r.train_loss for r in runs]), label=name)
    # Zoom on the end game: from the lowest median accuracy after the first third.
    late = [
        value
        for line in ax_acc.get_lines()
        for value in list(line.get_ydata())[len(line.get_ydata()) // 3 :]
    ]
    if late:
        ax_acc.set_ylim(max(0.0, min(late) - 0.02), min(1.0, max(late) + 0.01))
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (median over seeds)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss (median)", title="training loss", yscale="log")
    for r in results.get("elra", []):
        steps = range(1, len(r.alpha_trace) + 1)
        ax_alpha.plot(steps, r.alpha_trace, linewidth=0.7, label=f"seed {r.seed}")
        ax_bs.step(steps, r.batch_trace, where="post", label=f"seed {r.seed}")
    ax_alpha.set(xlabel="step", ylabel="alpha", title="ELRA step size alpha", yscale="log")
    ax_bs.set(xlabel="step", ylabel="batch size m_t * bs_min", title="ELRA batch size")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def optimizer_state_bytes(optimizer: Any) -> tuple[int, int]:
    """(device bytes, host bytes) of an optimizer's own tensors, each storage once.

    Every tensor in ``optimizer.state`` (a DTensor counts its local shard; ELRA's
    per-parameter entries may be views of one flat buffer, or last step's gradient), and
    for ELRA its control vector and offload staging chunks. On a CPU-only run everything
    is host memory: callers add the two when "device" means the host.
    """
    tensors: list[Any] = []
    for entry in optimizer.state.values():
        if isinstance(entry, dict):
            tensors.extend(
                value.to_local() if hasattr(value, "to_local") else value
                for value in entry.values()
                if hasattr(value, "untyped_storage")
            )
    control = getattr(optimizer, "control_state", None)
    if control is not None:
        tensors.append(control)
    for store in getattr(getattr(optimizer, "layout", None), "stores", []):
        tensors.extend(getattr(store, "staging", []))
    seen: set[tuple[str, int]] = set()
    device_bytes = host_bytes = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        if tensor.device.type == "cpu":
            host_bytes += storage.nbytes()
        else:
            device_bytes += storage.nbytes()
    return device_bytes, host_bytes
