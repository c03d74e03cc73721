"""The command line and the job: ``python -m elra_fused lm``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .corpus import DEFAULT_CORPUS_BYTES, DEFAULT_VAL_EVERY, encode, load_corpus, windows
from .device import DEVICES, cuda_unavailable_reason, describe, device_name, job_device
from .memory import BOOSTER_BYTES_PER_PARAM
from .memory_cap import DEFAULT_MEMORY_CAP, format_memory_cap, memory_cap_estimate
from .model import VOCAB, build_model
from .protocol import (
    ADAMW_BETAS,
    ADAMW_LR,
    ADAMW_WD,
    ELRA_M0,
    OPTIMIZERS,
    SCHEDULE_FREE_NOTE,
    WARMUP_MIN_STEP,
    available_optimizers,
    schedule_free_installed,
)
from .report import elra_versus_peers, format_table, plot, summarize
from .training import Run, train_run, warm_up

DEFAULT_HIDDEN = 64
DEFAULT_LAYERS = 2
DEFAULT_HEADS = 4
DEFAULT_SEQ = 64
DEFAULT_TOKENS = 1_048_576
DEFAULT_VAL_TOKENS = 32_768
DEFAULT_EVALS = 8  # checkpoints at 1/8, 2/8, ... of the budget: 25/50/100 % among them
#: Sequences per micro-batch = ELRA's initial batch. 4 is better per token (README
#: ablation) but twice as slow on a CPU; 8 keeps ``make run`` short.
DEFAULT_ELRA_BATCH = 8
DEFAULT_ADAMW_BATCH = 64
#: 128 steps at the initial batch: a cycle closes only with >= 100 accepted losses
#: (ELRA's ``min_cycle_losses``), so shorter cycles merge into this one anyway.
DEFAULT_CYCLE_TOKENS = 65_536
#: ELRA's warm-up floor lasts the whole run unless --warmup-steps says otherwise (the
#: paper gives no length; the README's ablation measured 200, 1000 steps and the run).
WARMUP_WHOLE_RUN = -1
RESULTS_DIR = Path("benchmarks") / "results" / "lm"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m elra_fused lm",
        description="Train a small Llama-style byte-level language model on the Python "
        "standard library's sources with ELRA, AdamW, Prodigy and schedule-free AdamW at "
        "equal token budgets.",
    )
    add = parser.add_argument
    add("--hidden", type=int, default=DEFAULT_HIDDEN, help="model width")
    add("--layers", type=int, default=DEFAULT_LAYERS, help="decoder layers")
    add("--heads", type=int, default=DEFAULT_HEADS, help="attention heads")
    add("--seq-len", type=int, default=DEFAULT_SEQ, help="tokens (bytes) per sequence")
    add("--tokens", type=int, default=DEFAULT_TOKENS, help="training tokens per optimizer")
    add("--corpus-bytes", type=int, default=DEFAULT_CORPUS_BYTES, help="corpus byte cap")
    add("--corpus-root", type=Path, default=None, help="default: the stdlib of this Python")
    add("--val-every", type=int, default=DEFAULT_VAL_EVERY, help="every n-th file validates")
    add("--val-tokens", type=int, default=DEFAULT_VAL_TOKENS, help="validation tokens used")
    add("--evals", type=int, default=DEFAULT_EVALS, help="evaluation checkpoints (x4)")
    add("--elra-batch", type=int, default=DEFAULT_ELRA_BATCH, help="ELRA micro-batch (seqs)")
    add("--adamw-batch", type=int, default=DEFAULT_ADAMW_BATCH, help="AdamW's large batch")
    add("--cycle-tokens", type=int, default=DEFAULT_CYCLE_TOKENS, help="ELRA control cycle")
    add(
        "--warmup-steps",
        type=int,
        default=WARMUP_WHOLE_RUN,
        help="steps of ELRA's warm-up floor alpha*|G| >= 0.1 (default -1: the whole run)",
    )
    add(
        "--dynamic-batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="grow ELRA's batch by the dynamic batch size (paper 3.3; default on); "
        "--no-dynamic-batch keeps m_t = m_0",
    )
    add(
        "--boost",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate ELRA at the mean of its iterates since the previous checkpoint "
        "(paper 3.7; evaluation only, reported as elra_boosted; default on)",
    )
    add("--seeds", type=int, default=1, help="seeds 0..n-1 (medians reported)")
    add(
        "--optimizers",
        default=",".join(available_optimizers()),
        help=f"subset of {','.join(OPTIMIZERS)} (default: those installed)",
    )
    add("--memory-cap", default=DEFAULT_MEMORY_CAP, help="cap for the largest-model estimate")
    add("--json", type=Path, default=RESULTS_DIR / "lm.json")
    add("--plot", type=Path, default=RESULTS_DIR / "lm.png")
    add(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for "
        "these tiny models and least sensitive to other load; 0 = torch's default)",
    )
    add(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="where models, tokens and optimizer state live (default cpu; cuda: the "
        "first GPU, wall time measured after a device synchronize, memory also by "
        "torch.cuda.max_memory_allocated)",
    )
    add("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    if args.device == "cuda" and (reason := cuda_unavailable_reason()):
        parser.error(reason)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown or not names:
        parser.error(f"--optimizers: unknown {unknown}; choose from {','.join(OPTIMIZERS)}")
    if "schedulefree" in names and not schedule_free_installed():
        parser.error(f"--optimizers: {SCHEDULE_FREE_NOTE}")
    args.optimizers = names
    positive = ("hidden", "layers", "heads", "seq_len", "tokens", "elra_batch", "adamw_batch")
    if any(getattr(args, k) < 1 for k in positive) or args.seeds < 1:
        parser.error("sizes, batches, --tokens and --seeds must be >= 1")
    if args.evals < 4 or args.evals % 4:
        parser.error("--evals must be a positive multiple of 4 (25/50/100 % are checkpoints)")
    if args.hidden % args.heads:
        parser.error("--hidden must be a multiple of --heads")
    # Equal budgets: a whole number of the largest fixed batch, and of every checkpoint.
    unit = math.lcm(args.adamw_batch, args.elra_batch) * args.seq_len * args.evals
    args.tokens = max(unit, args.tokens // unit * unit)
    if args.warmup_steps < 0:  # the whole run: ELRA takes at most this many steps
        args.warmup_steps = args.tokens // (args.elra_batch * args.seq_len)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the job; returns (and writes) the JSON payload."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = job_device(args)
    corpus = load_corpus(args.corpus_root, args.corpus_bytes, args.val_every)
    train_seqs = windows(encode(corpus.train), args.seq_len)
    val_seqs = windows(encode(corpus.val), args.seq_len)
    val_seqs = val_seqs[: max(1, args.val_tokens // args.seq_len)]
    # Once, before any run: every batch is then a gather on the device.
    train_seqs, val_seqs = train_seqs.to(device), val_seqs.to(device)
    n_params = sum(
        p.numel() for p in build_model(args.hidden, args.layers, args.heads, 8).parameters()
    )
    settings = {
        "elra": f"ELRA paper defaults, bs_t = m_t x {args.elra_batch} seqs, m_0 = {ELRA_M0}, "
        f"{'dynamic batch size' if args.dynamic_batch else 'fixed batch (m_t = m_0)'}, "
        f"cycles of {args.cycle_tokens} tokens, warm-up floor "
        f"alpha*|G| >= {WARMUP_MIN_STEP} for {args.warmup_steps} steps, no weight decay",
        "adamw": f"AdamW lr {ADAMW_LR}, wd {ADAMW_WD}, betas {ADAMW_BETAS}, "
        f"bs {args.adamw_batch} seqs",
        "adamw_small": f"AdamW as above at ELRA's initial batch, bs {args.elra_batch} seqs",
        "prodigy": f"Prodigy (prodigyopt) defaults, bs {args.elra_batch} seqs",
        "elra_batch": f"{args.elra_batch}xm_t",
        "adamw_batch": str(args.adamw_batch),
        "adamw_small_batch": str(args.elra_batch),
        "prodigy_batch": str(args.elra_batch),
        "schedulefree": "schedule-free AdamW (schedulefree) defaults: lr 0.0025, betas "
        f"(0.9, 0.999), no warm-up, evaluated at its averaged weights, bs {args.elra_batch} seqs",
        "schedulefree_batch": str(args.elra_batch),
    }
    print(
        f"corpus: {corpus.root}: {len(corpus.train_files) + len(corpus.val_files)} files, "
        f"{corpus.bytes} bytes ({len(corpus.train)} train / {len(corpus.val)} validation, "
        f"every {args.val_every}th file), sha256 {corpus.sha256}",
        flush=True,
    )
    print(
        f"model: Llama decoder, hidden {args.hidden}, {args.layers} layers, {args.heads} "
        f"heads, seq {args.seq_len}, vocab {VOCAB} (bytes), {n_params} parameters; "
        f"{args.tokens} training tokens per optimizer ({len(train_seqs)} train sequences = "
        f"{len(train_seqs) * args.seq_len} tokens per pass), validation on "
        f"{len(val_seqs) * args.seq_len} tokens at {args.evals} checkpoints; "
        f"{args.seeds} seed(s), {torch.get_num_threads()} CPU thread(s); device "
        f"{describe(device)}",
        flush=True,
    )
    for name in args.optimizers:
        print(f"  {name}: {settings[name]}", flush=True)
    not_run = [] if schedule_free_installed() else [SCHEDULE_FREE_NOTE]
    for note in not_run:
        print(f"  {note}", flush=True)

    warm_up(args.optimizers, train_seqs, args)  # CUDA only: one-time costs, untimed
    runs: dict[str, list[Run]] = {name: [] for name in args.optimizers}
    for seed in range(args.seeds):  # seeds outer: machine load hits every optimizer alike
        for name in args.optimizers:
            runs[name].append(train_run(name, train_seqs, val_seqs, args, seed))

    first = {name: seeds[0] for name, seeds in runs.items()}
    if args.boost and "elra" in runs:
        # The boosted mean is ELRA's run evaluated elsewhere; its float64 sums and the
        # mean copy (8 + 4 bytes per parameter) are evaluation-only memory.
        runs["elra_boosted"] = [
            dataclasses.replace(
                r,
                name="elra_boosted",
                val_loss=r.boosted_val_loss,
                state_bytes=r.state_bytes + BOOSTER_BYTES_PER_PARAM * n_params,
            )
            for r in runs["elra"]
        ]
        settings["elra_boosted"] = "ELRA's run, evaluated at the mean of its iterates"
        settings["elra_boosted_batch"] = settings["elra_batch"]
    results = summarize(runs, args.tokens)
    payload: dict[str, Any] = {
        "config": {
            "hidden": args.hidden,
            "layers": args.layers,
            "heads": args.heads,
            "seq_len": args.seq_len,
            "vocab": VOCAB,
            "params": n_params,
            "tokens": args.tokens,
            "val_tokens": len(val_seqs) * args.seq_len,
            "evals": args.evals,
            "seeds": args.seeds,
            "threads": torch.get_num_threads(),
            "device": device.type,
            "gpu": device_name(device),
            "elra_batch": args.elra_batch,
            "adamw_batch": args.adamw_batch,
            "cycle_tokens": args.cycle_tokens,
            "dynamic_batch": args.dynamic_batch,
            "warmup_steps": args.warmup_steps,
            "settings": {k: settings[k] for k in args.optimizers},
            "not_run": not_run,
        },
        "corpus": {
            "bytes": corpus.bytes,
            "sha256": corpus.sha256,
            "root": corpus.root,
            "files": len(corpus.train_files) + len(corpus.val_files),
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
            "python": sys.version.split()[0],
        },
        "results": results,
        "memory_cap": memory_cap_estimate(args, train_seqs, args.optimizers),
        "curves": {
            name: {"tokens": r.tokens, "seconds": r.seconds, "val_loss": r.val_loss}
            for name, r in ((n, seeds[0]) for n, seeds in runs.items())
        },
    }
    if "elra" in first:
        elra = first["elra"]
        payload["elra_trace"] = {
            "tokens": elra.trace_tokens,
            "alpha": elra.alpha,
            "batch_tokens": elra.batch_tokens,
            "retraces": elra.retraces,
            "steps": elra.steps,
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    plot(runs, args.plot, f"byte LM, {n_params} params, {args.tokens} tokens")
    print(f"wrote {args.json} and {args.plot}")
    if "elra" in first:
        elra = first["elra"]
        print(
            f"ELRA: {elra.steps} steps, {elra.retraces} retraces, final batch "
            f"{elra.batch_tokens[-1] if elra.batch_tokens else 0} tokens, alpha "
            f"{min(elra.alpha, default=0):.3g}..{max(elra.alpha, default=0):.3g} "
            f"(final {elra.alpha[-1] if elra.alpha else 0:.3g})"
        )
    print()
    print(elra_versus_peers(results, runs))
    print()
    print(format_memory_cap(payload["memory_cap"]))
    print()
    print(format_table(results, runs, settings))
    return payload
