"""The protocol's optimizers: who runs, with which settings, at which batch."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..optimizer import ELRA

OPTIMIZERS = ("elra", "adamw", "adamw_small", "prodigy", "schedulefree")
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
#: Printed (and written to the JSON) when ``schedulefree`` is missing: the job skips that
#: peer instead of failing (``make env`` installs the pinned version).
SCHEDULE_FREE_NOTE = (
    "schedule-free AdamW: the schedulefree package is not installed (pinned in the "
    "Makefile's REQUIREMENTS; make env installs it), not run"
)


def schedule_free_installed() -> bool:
    """Whether the ``schedulefree`` package (schedule-free AdamW) can be imported."""
    return importlib.util.find_spec("schedulefree") is not None


def available_optimizers() -> tuple[str, ...]:
    """The protocol's optimizers that can run here (all but a missing schedule-free)."""
    return tuple(n for n in OPTIMIZERS if n != "schedulefree" or schedule_free_installed())


@contextmanager
def evaluation_weights(name: str, opt: torch.optim.Optimizer) -> Iterator[None]:
    """Put the model at the weights an optimizer is evaluated at, and back.

    Schedule-free AdamW trains at an interpolation ``y`` and is evaluated at its average
    ``x``: ``opt.eval()`` swaps the parameters to ``x``, ``opt.train()`` back to ``y``
    (its ``step`` refuses to run in eval mode). Every other optimizer is evaluated where
    it trains, so this does nothing for them."""
    swap = name == "schedulefree"
    if swap:
        opt.eval()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if swap:
            opt.train()  # type: ignore[attr-defined]


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
    if name == "schedulefree":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(model.parameters())  # its defaults: lr 0.0025, no warm-up
        opt.train()  # created in eval mode; steps need train mode
        return opt
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def batch_of(name: str, args: argparse.Namespace) -> int:
    """Sequences per (micro-)batch: ELRA's micro-batch, or the fixed batch of a peer."""
    return args.adamw_batch if name == "adamw" else args.elra_batch
