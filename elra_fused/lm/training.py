"""One optimizer run: train on exactly the token budget, evaluating at checkpoints."""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, field

import torch

from ..batching import DynamicBatchSize, GroupedBatches
from ..boost import Booster
from .corpus import SequenceBatches, endless_full_batches
from .device import clock, job_device
from .memory import measure_step_peak, optimizer_state_bytes
from .model import build_model, evaluate, lm_loss, train_step
from .protocol import (
    ELRA_M0,
    ELRA_MIN_STEPS_PER_CYCLE,
    batch_of,
    evaluation_weights,
    make_optimizer,
)


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
    #: CUDA only: the step peak by ``torch.cuda.max_memory_allocated`` (the step's scope,
    #: see :class:`~.memory.StepPeak`) and the allocator's raw peak over that step.
    cuda_peak_bytes: int | None = None
    cuda_max_allocated: int | None = None
    retraces: int = 0
    boosted_val_loss: list[float] = field(default_factory=list)
    steps: int = 0


def train_run(
    name: str,
    train_seqs: torch.Tensor,
    val_seqs: torch.Tensor,
    args: argparse.Namespace,
    seed: int,
) -> Run:
    """Train one model from the seed's initialisation on exactly ``args.tokens`` tokens,
    on ``args.device`` (the CPU without it).

    On CUDA the loop queues work without waiting for it: the token tensors are on the
    device (moved here only if the caller has not), batches are device-side gathers, the
    loss accumulator and ELRA's alpha stay device tensors (alpha is read once, at the
    end), and the clock is read after a ``torch.cuda.synchronize`` at every checkpoint
    and at the end, so the training time covers the kernels, not only their launches."""
    from tqdm import tqdm

    device = job_device(args)
    train_seqs = train_seqs.to(device)  # no-op when the caller moved them (the job does)
    val_seqs = val_seqs.to(device)
    seq_len = args.seq_len
    torch.manual_seed(seed)
    model = build_model(args.hidden, args.layers, args.heads, seq_len, device)
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
        with evaluation_weights(name, opt):
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
        if not args.dynamic_batch:  # ablation: the batch stays at m_0 micro-batches
            m_max = ELRA_M0
        sizer = DynamicBatchSize(opt, m0=ELRA_M0, m_max=m_max)  # type: ignore[arg-type]
        grouped = GroupedBatches(loader, sizer, cycle_samples=cycle_samples)
        alphas: list[torch.Tensor] = []
        groups = (group for _ in itertools.count() for group in grouped)  # pass after pass
        start = clock(device)
        while seen < args.tokens:
            group = next(groups)
            micro = list(group)[: (args.tokens - seen) // micro_tokens]  # last may be cut
            total = torch.zeros((), device=device)
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
                run.train_seconds += clock(device) - start
                checkpoint()
                start = clock(device)
        run.alpha = torch.stack(alphas).tolist()
        run.retraces = opt.retrace_count  # type: ignore[attr-defined]
    else:
        batches = endless_full_batches(loader)
        start = clock(device)
        while seen < args.tokens:
            train_step(name, model, opt, next(batches))
            seen += micro_tokens
            run.steps += 1
            bar.update(micro_tokens)
            if next_check < len(checkpoints) and seen >= checkpoints[next_check]:
                run.train_seconds += clock(device) - start
                checkpoint()
                start = clock(device)
    bar.close()
    run.state_bytes = optimizer_state_bytes(opt)
    peak = measure_step_peak(name, model, opt, train_seqs[:batch_size])
    run.peak_bytes = peak.live_bytes
    run.cuda_peak_bytes, run.cuda_max_allocated = peak.cuda_bytes, peak.cuda_max_allocated
    return run


def warm_up(names: list[str], train_seqs: torch.Tensor, args: argparse.Namespace) -> None:
    """CUDA only: a few steps of each optimizer on a throwaway model of the job's size,
    so one-time costs -- CUDA context and cuBLAS set-up, kernel selection, and ELRA's
    ``torch.compile`` of its control law (once per process and configuration) -- are paid
    before any timed run rather than inside the first one. Nothing is kept."""
    device = job_device(args)
    if device.type != "cuda":
        return
    for name in names:
        model = build_model(args.hidden, args.layers, args.heads, args.seq_len, device)
        opt = make_optimizer(name, model, args)
        batch = train_seqs[: batch_of(name, args)].to(device)
        for _ in range(3):
            train_step(name, model, opt, batch)
        del model, opt
    clock(device)
