"""The language-model job: ``python -m elra_fused lm`` (issue 16).

Why: the main job (MNIST) proves the algorithm, not the use. Users train language models;
the paper (section 4.4) reports ELRA on BabyLlama against AdamW at equal tokens. This job
reproduces that protocol scaled down to a few CPU minutes, on data every machine has, so
anyone can see where ELRA stands and rerun it bigger with flags.

Model: a Llama-style decoder built from ``transformers.LlamaConfig`` (random init, nothing
downloaded; the Hugging Face offline switches are set before transformers is imported).

Data: byte-level tokens (vocabulary 256) of the running interpreter's standard library
``.py`` sources (``sysconfig.get_paths()["stdlib"]``), without site-packages,
dist-packages and test directories. Files are sorted by relative path (deterministic),
taken in that order up to ``--corpus-bytes`` (the last file cut to fit), and every
``--val-every``-th file goes to validation. The corpus root, file count, byte count and
the sha256 of the selected bytes (in file order) are printed and written to the JSON: two
runs are comparable when the hashes agree (they differ across Python versions).

Sequences are non-overlapping windows of ``seq_len + 1`` bytes; a sequence trains
``seq_len`` next-byte predictions, which is what "tokens" counts everywhere below.

Protocol (paper 4.4, scaled down; stated in the output):

* ``elra``: ELRA with the paper's defaults, a small initial batch (micro-batches of
  ``--elra-batch`` sequences, ``m_0 = 1``) grown by the dynamic batch size
  (:class:`~elra_fused.batching.DynamicBatchSize`, :class:`GroupedBatches`), control
  cycles of ``--cycle-tokens`` tokens, the warm-up floor ``alpha_t ||G_t|| >= 0.1`` for
  the first ``--warmup-steps`` steps (default: the whole run -- measured: the floor ending
  after 200 or 1000 steps lets alpha collapse ~10x and costs 0.33 / 0.11 nats at the end
  of the default budget; README ablation), no weight decay.
* ``adamw``: AdamW with the paper's hyper-parameters (lr 5e-4, weight decay 0.1, betas
  0.9/0.95) at a larger fixed batch (``--adamw-batch``; the paper: 512 sequences).
* ``adamw_small``: the same AdamW at ELRA's initial batch.
* ``prodigy``: Prodigy (prodigyopt) with its defaults at ELRA's initial batch: the
  learning-rate-free peer a user would pick instead. Schedule-free AdamW is not installed
  in this environment and is not run (said in the output).

Every optimizer trains on exactly ``--tokens`` tokens (rounded to a whole number of the
large batch; ELRA's last group is cut to the remaining micro-batches), from the same
initialisation and the same data order per seed. Validation loss (mean next-byte
cross-entropy in nats over the first ``--val-tokens`` validation tokens) is evaluated at
``--evals`` evenly spaced token checkpoints (at the first step boundary at or after each)
and plotted against tokens and against training wall time (evaluation excluded).

Memory: ``state_bytes`` are the optimizer's state tensors, each storage once;
``peak_bytes`` is the peak of live tensor bytes during one training step (parameters,
gradients, optimizer state and the step's activations), measured by a dispatch-mode
tracker of tensor storages -- on CPU torch has no allocator statistics, and the process's
resident set size only ever grows. ``memory_cap`` extrapolates those measurements to the
widest model of the same depth under ``--memory-cap`` (an estimate, see
:func:`memory_cap_estimate`).

JSON: ``{"config": {...}, "corpus": {"bytes", "sha256", ...}, "results": {name:
{"tokens", "val_loss", "val_loss_at": {"25%", "50%", "100%"}, "tokens_per_s",
"state_bytes", "peak_bytes"}}, "memory_cap": {...}, "curves": {name: {"tokens",
"seconds", "val_loss"}}, "elra_trace": {"tokens", "alpha", "batch_tokens"}}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
import sysconfig
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._torch_compat import TorchDispatchMode, tree_flatten
from .batching import DynamicBatchSize, GroupedBatches
from .boost import Booster
from .optimizer import ELRA
from .report import optimizer_state_bytes as report_state_bytes

OPTIMIZERS = ("elra", "adamw", "adamw_small", "prodigy")
VOCAB = 256  # byte-level tokens
#: Paper 4.4: AdamW lr 5e-4, weight decay 0.1, betas (0.9, 0.95), batch 512.
ADAMW_LR = 5e-4
ADAMW_WD = 0.1
ADAMW_BETAS = (0.9, 0.95)
#: Paper 4.4 / footnote 5: during warm-up alpha_t ||G_t|| >= 0.1.
WARMUP_MIN_STEP = 0.1
#: Paper 4.4: bs_0 = 1 x 16 (m_0 = 1), cycles of 45,000 tokens.
ELRA_M0 = 1
#: Cap m_t so that a control cycle keeps at least this many ELRA steps (as the main job:
#: from a handful of steps the cycle's mean and sigma are noise).
ELRA_MIN_STEPS_PER_CYCLE = 10
# Defaults sized for ~2 minutes on one CPU core (all four optimizers together).
DEFAULT_HIDDEN = 64
DEFAULT_LAYERS = 2
DEFAULT_HEADS = 4
DEFAULT_SEQ = 64
DEFAULT_TOKENS = 1_048_576
DEFAULT_CORPUS_BYTES = 4_000_000
DEFAULT_VAL_EVERY = 10
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
DEFAULT_MEMORY_CAP = "16GiB"
EVAL_BATCH = 64
FP32_BYTES = 4
#: Booster: float64 sums + the mean's fp32 copy per parameter (boost.py).
BOOSTER_BYTES_PER_PARAM = 12
RESULTS_DIR = Path("benchmarks") / "results" / "lm"
#: Directory names left out of the corpus: installed packages and the test suites.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
SCHEDULE_FREE_NOTE = "schedule-free AdamW: not installed here (schedulefree), not run"


# ---------------------------------------------------------------------------------------
# Corpus and tokens
# ---------------------------------------------------------------------------------------
@dataclass
class Corpus:
    """The selected files, their bytes split train/validation, and the identifying hash."""

    root: str
    train_files: list[str]
    val_files: list[str]
    train: bytes
    val: bytes
    sha256: str

    @property
    def bytes(self) -> int:
        return len(self.train) + len(self.val)


def stdlib_root() -> Path:
    """The running interpreter's standard library: a corpus every machine has."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[Path]:
    """``.py`` files under ``root``, sorted by relative path (deterministic on any
    machine), without installed packages and test directories."""
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        found.extend(Path(directory) / f for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(
    root: Path | None = None,
    max_bytes: int = DEFAULT_CORPUS_BYTES,
    val_every: int = DEFAULT_VAL_EVERY,
) -> Corpus:
    """Read files in sorted order up to ``max_bytes`` and split them by file: every
    ``val_every``-th file (the 10th, 20th, ...) is validation, so no file contributes to
    both sides. The hash covers the selected bytes in file order."""
    if max_bytes < 1 or val_every < 2:
        raise ValueError("load_corpus: max_bytes must be >= 1 and val_every >= 2")
    root = stdlib_root() if root is None else Path(root)
    digest = hashlib.sha256()
    train: list[bytes] = []
    val: list[bytes] = []
    train_files: list[str] = []
    val_files: list[str] = []
    total = 0
    for index, path in enumerate(corpus_files(root)):
        if total >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - total]
        total += len(data)
        digest.update(data)
        name = path.relative_to(root).as_posix()
        if (index + 1) % val_every == 0:
            val.append(data)
            val_files.append(name)
        else:
            train.append(data)
            train_files.append(name)
    return Corpus(
        str(root), train_files, val_files, b"".join(train), b"".join(val), digest.hexdigest()
    )


def encode(data: bytes) -> torch.Tensor:
    """Bytes -> int64 token ids in [0, 256): the byte-level tokenizer (no vocabulary file)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def decode(tokens: torch.Tensor) -> bytes:
    """Token ids -> bytes (inverse of :func:`encode`)."""
    return bytes(tokens.to(torch.uint8).tolist())


def windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``(n, seq_len + 1)`` windows: inputs ``[:, :-1]``, targets
    ``[:, 1:]``; consecutive windows share one byte so every byte is a target once."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"windows: {len(tokens)} tokens are too few for seq_len {seq_len}")
    return tokens[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()


class SequenceBatches:
    """Re-iterable batches of sequences, reshuffled every pass with a seeded generator
    (the same order for every optimizer with the same seed and batch size)."""

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int) -> None:
        if batch_size > len(sequences):
            raise ValueError(
                f"batch size {batch_size} exceeds the {len(sequences)} training sequences"
            )
        self.sequences, self.batch_size = sequences, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.sequences) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(self.sequences), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            yield self.sequences[order[start : start + self.batch_size]]


def endless_full_batches(batches: SequenceBatches) -> Iterator[torch.Tensor]:
    """Full batches pass after pass (the short last batch skipped, paper 3.5)."""
    while True:
        for batch in batches:
            if len(batch) == batches.batch_size:
                yield batch


# ---------------------------------------------------------------------------------------
# Model, loss, evaluation, memory
# ---------------------------------------------------------------------------------------
def build_model(hidden: int, layers: int, heads: int, seq_len: int) -> nn.Module:
    """A Llama-style decoder (RMSNorm, rotary positions, SwiGLU) from ``LlamaConfig``,
    randomly initialised: no download, any size from flags."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of a batch of ``(n, seq_len + 1)`` windows."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, sequences: torch.Tensor) -> float:
    """Mean validation cross-entropy over all tokens of ``sequences`` (equal lengths)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, len(sequences), EVAL_BATCH):
        chunk = sequences[start : start + EVAL_BATCH]
        total += lm_loss(model, chunk).double() * len(chunk)
    model.train(was_training)
    return float(total / len(sequences))


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's own tensors, each storage once, wherever they live
    (:func:`elra_fused.report.optimizer_state_bytes`)."""
    return sum(report_state_bytes(opt))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, counting those that exist when the
    mode is entered (``resident``) plus every storage an op creates while it is active,
    released when the storage is freed. On CPU torch keeps no allocator statistics and
    the process's RSS never shrinks, so this is how a step's peak is measured here."""

    def __init__(self, resident: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        for t in resident:
            storage = t.untyped_storage()
            self.live[storage.data_ptr()] = storage.nbytes()
        self.current = sum(self.live.values())
        self.peak = self.current

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                storage = value.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._release, key)
        self.peak = max(self.peak, self.current)
        return out


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """What one optimizer run recorded (curves at the token checkpoints)."""

    name: str
    seed: int
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    trace_tokens: list[int] = field(default_factory=list)
    alpha: list[float] = field(default_factory=list)
    batch_tokens: list[int] = field(default_factory=list)
    train_seconds: float = 0.0
    state_bytes: int = 0
    peak_bytes: int = 0
    retraces: int = 0
    boosted_val_loss: list[float] = field(default_factory=list)
    steps: int = 0


def make_optimizer(name: str, model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The optimizer of one protocol entry (see the module docstring)."""
    if name == "elra":
        return ELRA(
            model.parameters(), warmup_steps=args.warmup_steps, warmup_min_step=WARMUP_MIN_STEP
        )
    if name in ("adamw", "adamw_small"):
        return torch.optim.AdamW(
            model.parameters(), lr=ADAMW_LR, weight_decay=ADAMW_WD, betas=ADAMW_BETAS
        )
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(model.parameters())
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def batch_of(name: str, args: argparse.Namespace) -> int:
    """Sequences per (micro-)batch: ELRA's micro-batch, or the fixed batch of a peer."""
    return args.adamw_batch if name == "adamw" else args.elra_batch


def measure_peak(
    name: str, model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor
) -> int:
    """Peak live tensor bytes of one full training step on ``batch`` (one micro-batch:
    ELRA accumulates micro-batches, so its activations never exceed one's): the batch,
    parameters, buffers, optimizer state, and all the step allocates."""
    batch = batch.clone()  # its own storage: a slice would count the whole data set
    resident = [batch, *model.parameters(), *model.buffers()]
    opt.zero_grad(set_to_none=True)
    state = [
        v for entry in opt.state.values() for v in entry.values() if isinstance(v, torch.Tensor)
    ]
    with LiveBytes(resident + state) as tracker:
        loss = lm_loss(model, batch)
        loss.backward()
        if name == "elra":
            opt.step(loss.detach())
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return tracker.peak


#: ELRA's memory modes (paper 3.6, README "Memory modes"): name -> ELRA keyword arguments.
ELRA_MEMORY_MODES: dict[str, dict[str, Any]] = {
    "standard": {},
    "bf16_state": {"state_dtype": torch.bfloat16},
    "recover": {"memory": "recover"},
    "offload": {"memory": "offload"},
}


def elra_mode_memory(args: argparse.Namespace, train_seqs: torch.Tensor) -> dict[str, Any]:
    """State bytes and step peak of ELRA in each memory mode, on a fresh model of the
    job's size after one step (so the state exists). On CPU offload's host copy is in the
    same memory, so it saves nothing here; its device saving needs a GPU."""
    out: dict[str, Any] = {}
    batch = train_seqs[: args.elra_batch]
    for mode, kwargs in ELRA_MEMORY_MODES.items():
        torch.manual_seed(0)
        model = build_model(args.hidden, args.layers, args.heads, args.seq_len)
        opt = ELRA(model.parameters(), **kwargs)
        loss = lm_loss(model, batch)
        loss.backward()
        opt.step(loss.detach())
        opt.zero_grad()
        n_params = sum(p.numel() for p in model.parameters())
        state = optimizer_state_bytes(opt)
        out[mode] = {
            "state_bytes": state,
            "state_bytes_per_param": round(state / n_params, 3),
            "peak_bytes": measure_peak("elra", model, opt, batch),
        }
    return out


def train_run(
    name: str,
    train_seqs: torch.Tensor,
    val_seqs: torch.Tensor,
    args: argparse.Namespace,
    seed: int,
) -> Run:
    """Train one model from the seed's initialisation on exactly ``args.tokens`` tokens."""
    from tqdm import tqdm

    seq_len = args.seq_len
    torch.manual_seed(seed)
    model = build_model(args.hidden, args.layers, args.heads, seq_len)
    model.train()
    opt = make_optimizer(name, model, args)
    batch_size = batch_of(name, args)
    loader = SequenceBatches(train_seqs, batch_size, seed)
    micro_tokens = batch_size * seq_len
    run = Run(name, seed)
    checkpoints = [round(args.tokens * k / args.evals) for k in range(1, args.evals + 1)]
    bar = tqdm(
        total=args.tokens,
        desc=f"{name:>11} seed {seed}",
        unit="tok",
        unit_scale=True,
        file=sys.stderr,
        disable=args.no_progress,
        leave=False,
        dynamic_ncols=True,
    )
    seen = 0
    next_check = 0
    # Mean value boosting (paper 3.7), evaluation only: the mean of ELRA's iterates since
    # the previous checkpoint is evaluated next to the last iterate.
    booster = Booster(model.parameters()) if name == "elra" and args.boost else None

    def checkpoint() -> None:
        nonlocal next_check
        while next_check < len(checkpoints) and seen >= checkpoints[next_check]:
            next_check += 1
        loss = evaluate(model, val_seqs)
        run.tokens.append(seen)
        run.seconds.append(run.train_seconds)
        run.val_loss.append(loss)
        if booster is not None:
            if booster.end_window():
                with booster.boosted(model):
                    run.boosted_val_loss.append(evaluate(model, val_seqs))
            else:
                run.boosted_val_loss.append(loss)
        bar.set_postfix(val=f"{loss:.3f}")

    checkpoint()  # at 0 tokens
    if name == "elra":
        cycle_samples = max(1, args.cycle_tokens // seq_len)
        m_max = max(ELRA_M0, cycle_samples // (batch_size * ELRA_MIN_STEPS_PER_CYCLE))
        sizer = DynamicBatchSize(opt, m0=ELRA_M0, m_max=m_max)  # type: ignore[arg-type]
        grouped = GroupedBatches(loader, sizer, cycle_samples=cycle_samples)
        alphas: list[torch.Tensor] = []
        groups = (group for _ in itertools.count() for group in grouped)  # pass after pass
        start = time.perf_counter()
        while seen < args.tokens:
            group = next(groups)
            micro = list(group)[: (args.tokens - seen) // micro_tokens]  # last may be cut
            total = torch.zeros(())
            for batch in micro:
                loss = lm_loss(model, batch)
                (loss / len(micro)).backward()
                total = total + loss.detach()
            opt.step(total / len(micro))
            opt.zero_grad()
            seen += len(micro) * micro_tokens
            run.steps += 1
            alphas.append(opt.alpha_tensor)  # type: ignore[attr-defined]
            if booster is not None:
                booster.update()
            run.trace_tokens.append(seen)
            run.batch_tokens.append(len(micro) * micro_tokens)
            bar.update(len(micro) * micro_tokens)
            if next_check < len(checkpoints) and seen >= checkpoints[next_check]:
                run.train_seconds += time.perf_counter() - start
                checkpoint()
                start = time.perf_counter()
        run.alpha = torch.stack(alphas).tolist()
        run.retraces = opt.retrace_count  # type: ignore[attr-defined]
    else:
        batches = endless_full_batches(loader)
        start = time.perf_counter()
        while seen < args.tokens:
            batch = next(batches)
            loss = lm_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            seen += micro_tokens
            run.steps += 1
            bar.update(micro_tokens)
            if next_check < len(checkpoints) and seen >= checkpoints[next_check]:
                run.train_seconds += time.perf_counter() - start
                checkpoint()
                start = time.perf_counter()
    bar.close()
    run.state_bytes = optimizer_state_bytes(opt)
    run.peak_bytes = measure_peak(name, model, opt, train_seqs[:batch_size])
    return run


# ---------------------------------------------------------------------------------------
# Summaries: table, equal wall time, memory cap, JSON, figure
# ---------------------------------------------------------------------------------------
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


def parse_bytes(text: str) -> int:
    """'16GiB', '512MiB', '8GB', '1e9' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    units |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    lowered = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * units[unit])
    return int(float(lowered))


def llama_params(hidden: int, layers: int) -> int:
    """Parameters of :func:`build_model`'s decoder (tied embedding, MLP 4x, RMSNorms)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * 4 * hidden + 2 * hidden
    return VOCAB * hidden + layers * per_layer + hidden


def widest_hidden(
    cap: int,
    layers: int,
    bytes_per_param: float,
    bytes_per_token_unit: float,
    step_tokens: int,
    fixed: int = 0,
) -> int:
    """Largest hidden size (a multiple of 64) at ``layers`` depth whose parameters,
    gradients and state (``bytes_per_param``), activations (``bytes_per_token_unit``
    per token per layer per hidden unit, ``step_tokens`` per micro-batch) and ``fixed``
    bytes fit under ``cap``; 0 when not even 64 fits."""
    hidden = 0
    while hidden < 1 << 16:
        candidate = hidden + 64
        need = llama_params(candidate, layers) * bytes_per_param + fixed
        need += bytes_per_token_unit * step_tokens * layers * candidate
        if need > cap:
            break
        hidden = candidate
    return hidden


def memory_cap_estimate(
    runs: dict[str, Run],
    args: argparse.Namespace,
    n_params: int,
    elra_modes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Widest decoder of the configured depth that fits under ``--memory-cap``, per
    optimizer and per ELRA memory mode, extrapolated from this run's measurements: state
    bytes per parameter (measured), parameters + gradients at 4 + 4 bytes each, and
    activation bytes per token per (layer x hidden) from the measured step peak at each
    optimizer's micro-batch. An estimate (attention's seq^2 term and the vocabulary
    logits scale differently); on a GPU the measured peak is what to trust. Offload
    keeps x_{t-1} on the host: its device bytes per parameter are taken as 0 (+ its
    fixed staging chunks)."""
    cap = parse_bytes(args.memory_cap)
    out: dict[str, Any] = {"cap": args.memory_cap, "cap_bytes": cap, "depth": args.layers}
    out["method"] = "estimate from the measured state bytes and step peak (see lm.py)"
    units: dict[str, float] = {}
    widths: dict[str, Any] = {}
    for name, run in runs.items():
        state_per_param = run.state_bytes / n_params
        fixed = n_params * (2 * FP32_BYTES) + run.state_bytes
        step_tokens = batch_of(name, args) * args.seq_len
        units[name] = max(run.peak_bytes - fixed, 0) / (step_tokens * args.layers * args.hidden)
        hidden = widest_hidden(
            cap, args.layers, 2 * FP32_BYTES + state_per_param, units[name], step_tokens
        )
        widths[name] = {
            "state_bytes_per_param": round(state_per_param, 3),
            "activation_bytes_per_token": round(units[name] * args.layers * args.hidden, 1),
            "max_hidden": hidden,
            "max_params": llama_params(hidden, args.layers),
        }
    out["optimizers"] = widths
    if elra_modes and "elra" in units:
        modes: dict[str, Any] = {}
        step_tokens = args.elra_batch * args.seq_len
        for mode, measured in elra_modes.items():
            per_param, fixed = measured["state_bytes_per_param"], 0
            if mode == "offload":  # x_{t-1} on the host; the device keeps staging chunks
                per_param, fixed = 0.0, measured["state_bytes"] - FP32_BYTES * n_params
            hidden = widest_hidden(
                cap, args.layers, 2 * FP32_BYTES + per_param, units["elra"], step_tokens, fixed
            )
            modes[mode] = {
                **measured,
                "max_hidden": hidden,
                "max_params": llama_params(hidden, args.layers),
            }
        out["elra_modes"] = modes
    return out


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
    return results


def format_table(
    results: dict[str, dict[str, Any]], runs: dict[str, list[Run]], settings: dict[str, str]
) -> str:
    """Results at equal tokens, plus the loss every optimizer had reached by the time the
    fastest-finishing run was done (equal wall time)."""
    shortest = min(median([r.train_seconds for r in seeds]) for seeds in runs.values())
    header = (
        f"{'optimizer':<12}{'batch':>14}{'val@25%':>9}{'val@50%':>9}{'val@100%':>9}"
        f"{'tok/s':>9}{'train s':>9}{f'val@{shortest:.0f}s':>9}{'state B':>10}{'peak B':>11}"
    )
    lines = [header]
    for name, row in results.items():
        seeds = runs[name]
        at = row["val_loss_at"]
        lines.append(
            f"{name:<12}{settings[name + '_batch']:>14}{at['25%']:>9.4f}{at['50%']:>9.4f}"
            f"{at['100%']:>9.4f}{row['tokens_per_s']:>9.0f}"
            f"{median([r.train_seconds for r in seeds]):>9.1f}"
            f"{median([loss_at_time(r, shortest) for r in seeds]):>9.4f}"
            f"{row['state_bytes']:>10}{row['peak_bytes']:>11}"
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


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m elra_fused lm",
        description="Train a small Llama-style byte-level language model on the Python "
        "standard library's sources with ELRA, AdamW and Prodigy at equal token budgets.",
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
        "--boost",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate ELRA at the mean of its iterates since the previous checkpoint "
        "(paper 3.7; evaluation only, reported as elra_boosted; default on)",
    )
    add("--seeds", type=int, default=1, help="seeds 0..n-1 (medians reported)")
    add("--optimizers", default=",".join(OPTIMIZERS), help=f"subset of {','.join(OPTIMIZERS)}")
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
    add("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(OPTIMIZERS))
    if unknown or not names:
        parser.error(f"--optimizers: unknown {unknown}; choose from {','.join(OPTIMIZERS)}")
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
    corpus = load_corpus(args.corpus_root, args.corpus_bytes, args.val_every)
    train_seqs = windows(encode(corpus.train), args.seq_len)
    val_seqs = windows(encode(corpus.val), args.seq_len)
    val_seqs = val_seqs[: max(1, args.val_tokens // args.seq_len)]
    n_params = sum(
        p.numel() for p in build_model(args.hidden, args.layers, args.heads, 8).parameters()
    )
    settings = {
        "elra": f"ELRA paper defaults, bs_t = m_t x {args.elra_batch} seqs, m_0 = {ELRA_M0}, "
        f"dynamic batch size, cycles of {args.cycle_tokens} tokens, warm-up floor "
        f"alpha*|G| >= {WARMUP_MIN_STEP} for {args.warmup_steps} steps, no weight decay",
        "adamw": f"AdamW lr {ADAMW_LR}, wd {ADAMW_WD}, betas {ADAMW_BETAS}, "
        f"bs {args.adamw_batch} seqs",
        "adamw_small": f"AdamW as above at ELRA's initial batch, bs {args.elra_batch} seqs",
        "prodigy": f"Prodigy (prodigyopt) defaults, bs {args.elra_batch} seqs",
        "elra_batch": f"{args.elra_batch}xm_t",
        "adamw_batch": str(args.adamw_batch),
        "adamw_small_batch": str(args.elra_batch),
        "prodigy_batch": str(args.elra_batch),
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
        f"{args.seeds} seed(s), {torch.get_num_threads()} CPU thread(s)",
        flush=True,
    )
    for name in args.optimizers:
        print(f"  {name}: {settings[name]}", flush=True)
    print(f"  {SCHEDULE_FREE_NOTE}", flush=True)

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
            "elra_batch": args.elra_batch,
            "adamw_batch": args.adamw_batch,
            "cycle_tokens": args.cycle_tokens,
            "warmup_steps": args.warmup_steps,
            "settings": {k: settings[k] for k in args.optimizers},
            "not_run": SCHEDULE_FREE_NOTE,
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
        "memory_cap": memory_cap_estimate(
            first, args, n_params, elra_mode_memory(args, train_seqs) if "elra" in first else None
        ),
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
    cap = payload["memory_cap"]
    print(
        f"largest hidden at depth {cap['depth']} under {args.memory_cap} (estimate): "
        + ", ".join(f"{k} {v['max_hidden']}" for k, v in cap["optimizers"].items())
        + "".join(
            f", elra {k} {v['max_hidden']} ({v['state_bytes_per_param']} B/param)"
            for k, v in cap.get("elra_modes", {}).items()
        )
    )
    print()
    print(elra_versus_peers(results, runs))
    print()
    print(format_table(results, runs, settings))
    return payload
