"""Shared pieces of the framework tests (``test_integrations_*.py``): a tiny Llama built
from a config (no download), a learnable synthetic token data set, a spy that logs what
ELRA was given per step, and the framework import policy.

The policy: a framework that is not installed skips its tests, except in CI
(``CI=true``), where the Makefile installs the pinned frameworks and a missing one must
fail, not pass silently.
"""

from __future__ import annotations

import functools
import importlib
import os
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest
import torch

from elra_fused import ELRA, control

# Models are built from configs; nothing may reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

IN_CI = os.environ.get("CI", "").lower() == "true"

VOCAB = 64
SEQ_LEN = 16
BATCH_SIZE = 4  # micro-batch size of every framework run


def require(module: str) -> ModuleType:
    """Import ``module``, or skip the calling test module (fail in CI: the Makefile pins
    the frameworks, so there a missing one is a broken set-up)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"CI must have {module} installed (Makefile REQUIREMENTS): {exc}")
        pytest.skip(f"{module} is not installed", allow_module_level=True)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: the models are tiny, and with two threads on two busy cores
    torch's OpenMP workers spin against each other (a 20 ms loop took 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState): a
    Trainer or Accelerator built in one test (with bf16, or gradient accumulation) would
    otherwise configure the next one."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama, hidden 32, vocabulary 64, from a config (no download). Llama has
    no dropout, so a framework run and a hand-written loop can be compared bit for bit;
    its class name gives it Trainer's causal-LM loss type, so Trainer counts
    ``num_items_in_batch`` over the shifted labels as the loss does (GPT2LMHeadModel
    gets none, and Trainer counts one token per sequence too many)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def token_sequences(count: int, seed: int = 0) -> torch.Tensor:
    """``count`` sequences x_{i+1} = x_i + d (mod VOCAB), random start, d in 1..3: the
    next token is predictable from the previous two, so the loss falls fast."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    stride = torch.randint(1, 4, (count, 1), generator=generator)
    return (start + stride * torch.arange(SEQ_LEN)) % VOCAB


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM examples ``{"input_ids", "labels"}`` (labels = inputs: the model shifts)."""

    def __init__(self, count: int, seed: int = 0) -> None:
        self.tokens = token_sequences(count, seed)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def batches(dataset: TokenDataset, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The data set in order, in batches (what a sequential sampler gives)."""
    for begin in range(0, len(dataset), batch_size):
        tokens = dataset.tokens[begin : begin + batch_size]
        yield {"input_ids": tokens, "labels": tokens}


def mean_loss(model: torch.nn.Module, dataset: TokenDataset) -> float:
    """The model's mean loss over the whole data set (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=dataset.tokens, labels=dataset.tokens).loss.item()
    model.train(was_training)
    return loss


@dataclass
class StepRecord:
    """What one ``ELRA.step()`` was given, and what the law kept."""

    recorded: list[float]  # the micro-batch losses recorded since the previous step
    closure: bool  # whether step() got a closure
    judged: float  # f_t the law stored (control state LOSS_PREV), meaningful if accepted
    retraced: bool
    lr: float  # lr of the first group when the step was taken


@dataclass
class StepSpy:
    """Wraps one ELRA's ``record_loss``, ``step`` and ``end_cycle`` (instance attributes, so every
    framework wrapper that calls them goes through the spy) and logs each step."""

    elra: ELRA
    steps: list[StepRecord] = field(default_factory=list)
    pending: list[float] = field(default_factory=list)
    cycles_closed: int = 0  # end_cycle() calls

    def __post_init__(self) -> None:
        # Bound methods, as torch's LR schedulers wrap ``opt.step.__func__``.
        record_loss, step, end_cycle = self.elra.record_loss, self.elra.step, self.elra.end_cycle

        @functools.wraps(end_cycle)
        def spy_end_cycle(elra: ELRA) -> None:
            self.cycles_closed += 1
            end_cycle()

        @functools.wraps(record_loss)
        def spy_record(elra: ELRA, loss: Any) -> Any:
            # The spy reads the value back (a sync): fine in a test.
            self.pending.append(float(loss))
            return record_loss(loss)

        @functools.wraps(step)
        def spy_step(elra: ELRA, *args: Any, **kwargs: Any) -> Any:
            lr = elra.param_groups[0]["lr"]
            closure = kwargs.get("closure", args[0] if args else None)
            # A closure records its micro-batch loss while step() runs: read pending after.
            out = step(*args, **kwargs)
            state = elra.control_state
            self.steps.append(
                StepRecord(
                    recorded=list(self.pending),
                    closure=callable(closure),
                    judged=float(state[control.LOSS_PREV]),
                    retraced=elra.last_step_retraced,
                    lr=lr,
                )
            )
            self.pending.clear()
            return out

        self.elra.record_loss = types.MethodType(spy_record, self.elra)  # type: ignore[method-assign]
        self.elra.step = types.MethodType(spy_step, self.elra)  # type: ignore[method-assign]
        self.elra.end_cycle = types.MethodType(spy_end_cycle, self.elra)  # type: ignore[method-assign]

    def check_judged_recorded_sums(self, micro_batches: int) -> None:
        """Every step got ``micro_batches`` recorded losses, and every accepted step
        judged their sum (the loss of the accumulated gradient)."""
        assert self.steps, "ELRA.step() was never called"
        for index, record in enumerate(self.steps):
            assert len(record.recorded) == micro_batches, (index, record)
            if not record.retraced:
                expected = sum(record.recorded)
                assert record.judged == pytest.approx(expected, rel=1e-6, abs=1e-9), (
                    index,
                    record,
                )


def hand_loop(
    model: torch.nn.Module,
    opt: ELRA,
    dataset: TokenDataset,
    *,
    batch_size: int,
    accumulation: int,
    steps: int,
    max_grad_norm: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    token_normalised: bool = False,
    epoch_steps: int | None = None,
) -> list[float]:
    """The plain loop every framework should amount to: per step ``accumulation``
    micro-batches in order, each loss scaled for accumulation, back-propagated and
    recorded; optional clipping; ``opt.step()``; the scheduler. Returns the summed
    (judged) loss of each step.

    ``token_normalised``: Trainer's scaling for models that take ``num_items_in_batch``
    (loss summed over tokens / the tokens of the whole accumulated batch) instead of
    the mean divided by ``accumulation``. ``epoch_steps``: close a control cycle after
    every that many steps, as the frameworks' epoch-end hooks do.
    """
    model.train()
    loader = list(batches(dataset, batch_size))
    judged: list[float] = []
    position = 0
    for step in range(steps):
        group = [loader[(position + i) % len(loader)] for i in range(accumulation)]
        position += accumulation
        items = sum(b["labels"][..., 1:].ne(-100).sum() for b in group) / 1
        total = 0.0
        for batch in group:
            if token_normalised:
                loss = model(**batch, num_items_in_batch=items).loss
            else:
                loss = model(**batch).loss / accumulation
            loss.backward()
            opt.record_loss(loss.detach())
            total += float(loss.detach())
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        opt.zero_grad()
        judged.append(total)
        if epoch_steps is not None and (step + 1) % epoch_steps == 0:
            opt.end_cycle()
    return judged


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bit-identical parameters (names and values)."""
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute parameter difference (for failure messages)."""
    pb = dict(b.named_parameters())
    return max((p - pb[n]).abs().max().item() for n, p in a.named_parameters())
