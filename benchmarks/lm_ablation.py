"""Multi-seed ablation of ELRA's language-model settings (issue 16, README LM section).

Each ELRA setting of the LM job (``python -m elra_fused lm``) is changed one at a time
from the job's defaults -- the warm-up floor on/off, the control cycle's length in
tokens, the initial batch (micro-batch), the dynamic batch size on/off -- and trained on
the same token budget over several seeds at the job's default model size, next to AdamW
(the paper's settings at its large batch, and at ELRA's initial batch) as the baseline.
Reported per setting: the median, minimum and maximum final validation loss over the
seeds, the median loss at half the budget, and the median training tokens per second.

    .venv/bin/python benchmarks/lm_ablation.py                     # 3 seeds, full budget
    .venv/bin/python benchmarks/lm_ablation.py --tokens 524288     # reduced budget

Seeds are the outer loop, so a change in machine load hits every setting alike. The JSON
(``benchmarks/results/lm/ablation.json`` by default) is rewritten after every seed, so an
interrupted run keeps what it finished. A ``--tokens`` below the job's default budget is
marked as reduced in the table's title and in the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from elra_fused.lm.cli import DEFAULT_TOKENS, RESULTS_DIR, parse_args
from elra_fused.lm.corpus import encode, load_corpus, windows
from elra_fused.lm.report import loss_at
from elra_fused.lm.training import Run, train_run

#: setting name -> (optimizer, LM-job flags changed from the defaults). Each ELRA row
#: changes one thing from the job's default ELRA (the first row).
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "elra (job default: floor whole run, cycles 65536, batch 8, dynamic on)": ("elra", []),
    "elra, no warm-up floor": ("elra", ["--warmup-steps", "0"]),
    "elra, warm-up floor for 1000 steps": ("elra", ["--warmup-steps", "1000"]),
    "elra, cycles of 262144 tokens": ("elra", ["--cycle-tokens", "262144"]),
    "elra, initial batch 4": ("elra", ["--elra-batch", "4"]),
    "elra, initial batch 16": ("elra", ["--elra-batch", "16"]),
    "elra, dynamic batch off": ("elra", ["--no-dynamic-batch"]),
    "adamw (paper settings, batch 64)": ("adamw", []),
    "adamw_small (paper settings, batch 8)": ("adamw_small", []),
}


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="per run")
    parser.add_argument("--only", default="", help="comma-separated substrings of settings")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "ablation.json")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def job_args(flags: list[str], tokens: int) -> argparse.Namespace:
    """The LM job's arguments for one setting: its defaults, the setting's flags, the
    ablation's token budget, and no boosted evaluation (it is not what is ablated)."""
    return parse_args([*flags, "--tokens", str(tokens), "--no-boost", "--no-progress"])


def summarize_setting(runs: list[Run], budget: int) -> dict[str, Any]:
    final = [r.val_loss[-1] for r in runs]
    return {
        "seeds": [r.seed for r in runs],
        "val_loss": final,
        "median": statistics.median(final),
        "min": min(final),
        "max": max(final),
        "median_val_loss_50%": statistics.median(loss_at(r, 0.5, budget) for r in runs),
        "tokens_per_s": statistics.median(r.tokens[-1] / max(r.train_seconds, 1e-9) for r in runs),
        "tokens": runs[0].tokens[-1],
    }


def format_table(rows: dict[str, dict[str, Any]], title: str) -> str:
    width = max(len(name) for name in rows) + 2
    lines = [
        title,
        f"{'setting':<{width}}{'seeds':>6}{'median':>9}{'min':>8}{'max':>8}{'val@50%':>9}"
        f"{'tok/s':>8}",
    ]
    for name, row in rows.items():
        lines.append(
            f"{name:<{width}}{len(row['seeds']):>6}{row['median']:>9.4f}{row['min']:>8.4f}"
            f"{row['max']:>8.4f}{row['median_val_loss_50%']:>9.4f}{row['tokens_per_s']:>8.0f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    options = parse(argv)
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    wanted = [s.strip() for s in options.only.split(",") if s.strip()]
    settings = {
        name: spec
        for name, spec in SETTINGS.items()
        if not wanted or any(w in name for w in wanted)
    }
    base = job_args([], options.tokens)
    corpus = load_corpus(base.corpus_root, base.corpus_bytes, base.val_every)
    train_seqs = windows(encode(corpus.train), base.seq_len)
    val_seqs = windows(encode(corpus.val), base.seq_len)[: base.val_tokens // base.seq_len]
    reduced = base.tokens < DEFAULT_TOKENS
    title = (
        f"ELRA LM ablation: final validation loss (nats/byte) over {options.seeds} seeds, "
        f"{base.tokens} tokens per run"
        + (f" (REDUCED budget; the LM job's default is {DEFAULT_TOKENS})" if reduced else "")
        + f"; hidden {base.hidden}, {base.layers} layers, seq {base.seq_len}; "
        f"corpus sha256 {corpus.sha256[:12]}"
    )
    print(title, flush=True)
    runs: dict[str, list[Run]] = {name: [] for name in settings}
    payload: dict[str, Any] = {}
    started = time.perf_counter()
    for seed in range(options.seeds):
        for name, (optimizer, flags) in settings.items():
            args = job_args(flags, options.tokens)
            run = train_run(optimizer, train_seqs, val_seqs, args, seed)
            runs[name].append(run)
            print(
                f"seed {seed} {name}: val {run.val_loss[-1]:.4f}, "
                f"{run.train_seconds:.0f} s ({time.perf_counter() - started:.0f} s total)",
                flush=True,
            )
        rows = {name: summarize_setting(r, base.tokens) for name, r in runs.items()}
        payload = {
            "config": {
                "seeds_done": seed + 1,
                "tokens": base.tokens,
                "reduced_budget": reduced,
                "job_default_tokens": DEFAULT_TOKENS,
                "hidden": base.hidden,
                "layers": base.layers,
                "heads": base.heads,
                "seq_len": base.seq_len,
                "val_tokens": len(val_seqs) * base.seq_len,
                "threads": torch.get_num_threads(),
                "python": sys.version.split()[0],
            },
            "corpus": {"bytes": corpus.bytes, "sha256": corpus.sha256},
            "settings": {
                name: {"optimizer": optimizer, "flags": flags}
                for name, (optimizer, flags) in settings.items()
            },
            "results": rows,
            "table": format_table(rows, title),
        }
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(payload, indent=1) + "\n")
    print()
    print(payload["table"])
    print(f"wrote {options.json}")
    return payload


if __name__ == "__main__":
    main()
