"""The command line and the job: ``python -m elra_fused lm``.

Every flag is checked before the job trains (exit code 2 with argparse's ``usage: ...
error: ...``): counts below their minimum, an optimizer listed twice, a head width that
rotary positions cannot split into pairs, a memory cap that is not a size, ``--json`` /
``--plot`` files that could not be written at the end, and a corpus too small for one
validation sequence or the largest batch (with the smallest ``--corpus-bytes`` that
would do). The tables are printed before the files are written.
"""

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

from ..cli_args import int_at_least, job_outputs_problem, name_list
from .corpus import (
    DEFAULT_CORPUS_BYTES,
    DEFAULT_VAL_EVERY,
    Corpus,
    CorpusError,
    corpus_root_problem,
    encode,
    load_corpus,
    minimum_corpus_bytes,
    windows,
)
from .device import DEVICES, cuda_unavailable_reason, describe, device_name, job_device
from .memory import BOOSTER_BYTES_PER_PARAM
from .memory_cap import (
    DEFAULT_MEMORY_CAP,
    format_memory_cap,
    memory_cap_estimate,
    parse_bytes,
    sequences_to_measure,
)
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


def corpus_root_flag(text: str) -> Path:
    """An argparse ``type=`` for ``--corpus-root``: an existing directory."""
    root = Path(text)
    if problem := corpus_root_problem(root):
        raise argparse.ArgumentTypeError(problem)
    return root


def memory_size_flag(text: str) -> str:
    """An argparse ``type=`` for ``--memory-cap``: a size :func:`parse_bytes` reads
    (``16GiB``, ``8GB``, ``1e9``); the text is kept, as written, for the report."""
    try:
        parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The job's flags, each value checked on its own (:func:`parse_args` adds the checks
    between flags)."""
    at_least_one = int_at_least(1)
    parser = argparse.ArgumentParser(
        prog="python -m elra_fused lm",
        description="Train a small Llama-style byte-level language model on the Python "
        "standard library's sources with ELRA, AdamW, Prodigy and schedule-free AdamW at "
        "equal token budgets.",
    )
    add = parser.add_argument
    add("--hidden", type=at_least_one, default=DEFAULT_HIDDEN, help="model width")
    add("--layers", type=at_least_one, default=DEFAULT_LAYERS, help="decoder layers")
    add("--heads", type=at_least_one, default=DEFAULT_HEADS, help="attention heads")
    add("--seq-len", type=at_least_one, default=DEFAULT_SEQ, help="tokens (bytes) per sequence")
    add("--tokens", type=at_least_one, default=DEFAULT_TOKENS, help="training tokens per optimizer")
    add("--corpus-bytes", type=at_least_one, default=DEFAULT_CORPUS_BYTES, help="corpus byte cap")
    add(
        "--corpus-root",
        type=corpus_root_flag,
        default=None,
        help="a directory of .py files (default: the stdlib of this Python)",
    )
    add(
        "--val-every",
        type=int_at_least(2),
        default=DEFAULT_VAL_EVERY,
        help="every n-th file validates",
    )
    add(
        "--val-tokens",
        type=at_least_one,
        default=DEFAULT_VAL_TOKENS,
        help="validation tokens used (at least --seq-len)",
    )
    add("--evals", type=at_least_one, default=DEFAULT_EVALS, help="evaluation checkpoints (x4)")
    add(
        "--elra-batch",
        type=at_least_one,
        default=DEFAULT_ELRA_BATCH,
        help="ELRA micro-batch (seqs)",
    )
    add("--adamw-batch", type=at_least_one, default=DEFAULT_ADAMW_BATCH, help="AdamW's large batch")
    add(
        "--cycle-tokens",
        type=at_least_one,
        default=DEFAULT_CYCLE_TOKENS,
        help="ELRA control cycle (at least --seq-len)",
    )
    add(
        "--warmup-steps",
        type=int_at_least(WARMUP_WHOLE_RUN),
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
    add("--seeds", type=at_least_one, default=1, help="seeds 0..n-1 (medians reported)")
    add(
        "--optimizers",
        type=name_list(OPTIMIZERS),
        default=",".join(available_optimizers()),
        help=f"subset of {','.join(OPTIMIZERS)}, each at most once (default: those installed)",
    )
    add(
        "--memory-cap",
        type=memory_size_flag,
        default=DEFAULT_MEMORY_CAP,
        help="cap for the largest-model estimate (e.g. 16GiB, 8GB, 1e9)",
    )
    add("--json", type=Path, default=RESULTS_DIR / "lm.json")
    add("--plot", type=Path, default=RESULTS_DIR / "lm.png", help="format from the extension")
    add(
        "--threads",
        type=int_at_least(0),
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
    return parser


def parse_args(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """The job's arguments, checked (each flag, then the flags against each other), with
    the derived values: the token budget rounded to whole batches and checkpoints, and
    the warm-up length of "the whole run". A bad value exits through ``parser.error``."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and (reason := cuda_unavailable_reason()):
        parser.error(reason)
    if "schedulefree" in args.optimizers and not schedule_free_installed():
        parser.error(f"--optimizers: {SCHEDULE_FREE_NOTE}")
    if args.evals % 4:
        parser.error("--evals must be a positive multiple of 4 (25/50/100 % are checkpoints)")
    if args.hidden % args.heads:
        parser.error("--hidden must be a multiple of --heads")
    if (args.hidden // args.heads) % 2:
        parser.error(
            f"--hidden / --heads = {args.hidden // args.heads} must be even: rotary "
            "positions rotate the head's features in pairs"
        )
    for flag, tokens in (("--val-tokens", args.val_tokens), ("--cycle-tokens", args.cycle_tokens)):
        if tokens < args.seq_len:
            parser.error(
                f"{flag} {tokens} must be at least --seq-len ({args.seq_len}): one sequence"
            )
    if problem := job_outputs_problem(args.json, args.plot):
        parser.error(problem)
    # Equal budgets: a whole number of the largest fixed batch, and of every checkpoint.
    unit = math.lcm(args.adamw_batch, args.elra_batch) * args.seq_len * args.evals
    args.tokens = max(unit, args.tokens // unit * unit)
    if args.warmup_steps < 0:  # the whole run: ELRA takes at most this many steps
        args.warmup_steps = args.tokens // (args.elra_batch * args.seq_len)
    return args


def job_sequences(args: argparse.Namespace) -> tuple[Corpus, torch.Tensor, torch.Tensor]:
    """The corpus and its training and validation windows (on the CPU), checked to be
    large enough for the job: every optimizer's batch and the memory-cap measurements
    (:func:`~.memory_cap.sequences_to_measure`) need that many training sequences, the
    validation at least one. Otherwise a :class:`CorpusError` says what is short and the
    smallest ``--corpus-bytes`` that would do."""
    corpus = load_corpus(args.corpus_root, args.corpus_bytes, args.val_every)
    sequences = max(sequences_to_measure(name, args) for name in args.optimizers)
    # n windows of seq_len + 1 bytes share one byte with their neighbour.
    train_needed, val_needed = sequences * args.seq_len + 1, args.seq_len + 1
    if len(corpus.train) < train_needed or len(corpus.val) < val_needed:
        have = (
            f"--corpus-bytes {args.corpus_bytes} from {corpus.root} gives {len(corpus.train)} "
            f"training and {len(corpus.val)} validation bytes (every {args.val_every}th file "
            f"validates); the job needs at least {train_needed} training bytes ({sequences} "
            f"sequences of --seq-len {args.seq_len} for its largest batch and the memory-cap "
            f"measurements) and {val_needed} validation bytes (one sequence)"
        )
        minimum = minimum_corpus_bytes(args.corpus_root, args.val_every, train_needed, val_needed)
        if minimum is None:
            raise CorpusError(
                f"{have}, more than all .py files there hold: use a larger --corpus-root, "
                "a smaller --val-every, or smaller --seq-len / batches"
            )
        raise CorpusError(f"{have}: use --corpus-bytes {minimum} or more")
    train_seqs = windows(encode(corpus.train), args.seq_len)
    val_seqs = windows(encode(corpus.val), args.seq_len)
    return corpus, train_seqs, val_seqs[: max(1, args.val_tokens // args.seq_len)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the job; returns (and writes) the JSON payload."""
    parser = build_parser()
    args = parse_args(argv, parser)
    try:
        corpus, train_seqs, val_seqs = job_sequences(args)
    except CorpusError as error:
        parser.error(str(error))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = job_device(args)
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
    print(format_table(results, runs, settings), flush=True)  # before the files: never lost
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    plot(runs, args.plot, f"byte LM, {n_params} params, {args.tokens} tokens")
    print(f"wrote {args.json} and {args.plot}")
    return payload
