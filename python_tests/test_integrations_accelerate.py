"""ELRA with Hugging Face accelerate (elra_fused.integrations.accelerate).

``accelerator.prepare`` wraps ELRA in an ``AcceleratedOptimizer``, whose ``step()`` is a
no-op inside an ``accumulate()`` window. Losses recorded by
:func:`elra_fused.integrations.accelerate.backward` must survive the skipped steps, be
judged once (their sum) at the sync step and never twice; the run must be the plain loop
bit for bit; bf16 autocast and a prepared scheduler must work.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _frameworks import (
    BATCH_SIZE,
    StepSpy,
    TokenDataset,
    fresh_accelerate_state,  # noqa: F401  (fixture)
    hand_loop,
    max_difference,
    mean_loss,
    one_thread,  # noqa: F401  (fixture)
    require,
    same_parameters,
    tiny_llama,
)

from elra_fused import ELRA
from elra_fused.integrations import end_cycle, unwrap_elra

accelerate = require("accelerate")
require("transformers")

from elra_fused.integrations.accelerate import backward  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

EXAMPLES = 64  # 16 micro-batches per epoch


def _run(
    epochs: int, accumulation: int = 1, mixed_precision: str = "no", schedule: bool = False
) -> tuple[torch.nn.Module, ELRA, StepSpy]:
    """The loop of accelerate's documentation, with ELRA's two additions (the recording
    backward and an end_cycle per epoch)."""
    accelerator = accelerate.Accelerator(
        cpu=True, gradient_accumulation_steps=accumulation, mixed_precision=mixed_precision
    )
    model = tiny_llama(0)
    elra = ELRA(model.parameters())
    spy = StepSpy(elra)
    loader = torch.utils.data.DataLoader(
        TokenDataset(EXAMPLES), batch_size=BATCH_SIZE, shuffle=False
    )
    scheduler: Any = (
        torch.optim.lr_scheduler.LambdaLR(elra, lambda step: 1.0 / (1 + step)) if schedule else None
    )
    prepared = accelerator.prepare(model, elra, loader, *([scheduler] if schedule else []))
    model, opt, loader = prepared[:3]
    assert unwrap_elra(opt) is elra
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                backward(accelerator, loss, opt)
                opt.step()
                if schedule:
                    prepared[3].step()
                opt.zero_grad()
        end_cycle(opt)
    return accelerator.unwrap_model(model), elra, spy


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_accelerate_is_the_plain_loop(accumulation: int) -> None:
    """Through ``accelerator.accumulate``: each ELRA step got exactly its micro-batches'
    losses (the skipped ``opt.step()`` calls lost none, the sync step counted none
    twice) and judged their sum; the parameters are the hand-written loop's bit for bit."""
    epochs = 2
    dataset = TokenDataset(EXAMPLES)
    model, opt, spy = _run(epochs, accumulation)
    epoch_steps = EXAMPLES // BATCH_SIZE // accumulation
    assert len(spy.steps) == epochs * epoch_steps
    spy.check_judged_recorded_sums(accumulation)
    assert spy.cycles_closed == epochs

    reference = tiny_llama(0)
    ref_opt = ELRA(reference.parameters())
    judged = hand_loop(
        reference,
        ref_opt,
        dataset,
        batch_size=BATCH_SIZE,
        accumulation=accumulation,
        steps=epochs * epoch_steps,
        epoch_steps=epoch_steps,
    )
    assert [sum(r.recorded) for r in spy.steps] == pytest.approx(judged, rel=1e-6)
    assert same_parameters(model, reference), max_difference(model, reference)
    assert opt.alpha == ref_opt.alpha
    if accumulation == 1:  # 32 steps; with accumulation fewer, and alpha0 starts small
        assert mean_loss(model, dataset) < 0.8 * mean_loss(tiny_llama(0), dataset)


def test_accelerate_bf16() -> None:
    """``mixed_precision="bf16"`` on the CPU: the loss falls, ELRA judged the sums."""
    dataset = TokenDataset(EXAMPLES)
    model, _, spy = _run(3, accumulation=2, mixed_precision="bf16")
    spy.check_judged_recorded_sums(2)
    assert mean_loss(model, dataset) < 0.8 * mean_loss(tiny_llama(0), dataset)


def test_accelerate_prepared_scheduler_steps_with_elra() -> None:
    """A prepared scheduler steps only when ELRA stepped: per ELRA step, lr = 1/(1+i)."""
    _, _, spy = _run(1, accumulation=2, schedule=True)
    assert [r.lr for r in spy.steps] == pytest.approx([1.0 / (1 + i) for i in range(8)])


def _epochs_with_state(
    epochs: int, save_to: Any = None, load_from: Any = None
) -> tuple[torch.nn.Module, ELRA]:
    """``epochs`` epochs of the loop above (accumulation 2, a prepared OneCycleLR); the
    accelerator's state saved after them (``save_to``) or loaded before them
    (``load_from``, into a model with other weights)."""
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_llama(0 if load_from is None else 7)
    elra = ELRA(model.parameters())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        elra, max_lr=1.0, total_steps=16, cycle_momentum=False
    )
    loader = torch.utils.data.DataLoader(
        TokenDataset(EXAMPLES), batch_size=BATCH_SIZE, shuffle=False
    )
    model, opt, loader, scheduler = accelerator.prepare(model, elra, loader, scheduler)
    if load_from is not None:
        accelerator.load_state(load_from)
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                backward(accelerator, model(**batch).loss, opt)
                opt.step()
                scheduler.step()
                opt.zero_grad()
        end_cycle(opt)
    if save_to is not None:
        accelerator.save_state(save_to)
    return accelerator.unwrap_model(model), elra


def test_accelerate_save_state_resumes_bit_identically(tmp_path: Any) -> None:
    """``accelerator.save_state`` after an epoch and ``load_state`` into a fresh model,
    ELRA and scheduler: the second epoch is the uninterrupted run's, bit for bit."""
    full, full_opt = _epochs_with_state(2)
    _epochs_with_state(1, save_to=tmp_path / "state")
    resumed, resumed_opt = _epochs_with_state(1, load_from=tmp_path / "state")
    assert same_parameters(full, resumed), max_difference(full, resumed)
    assert resumed_opt.alpha == full_opt.alpha


def test_backward_refuses_a_loss_elra_cannot_record_before_back_propagating() -> None:
    """A loss ELRA could not judge (not a scalar) fails before accelerator.backward, so
    no gradient is written by a call that then fails; another optimizer is left alone."""
    accelerator = accelerate.Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    model, opt = accelerator.prepare(model, ELRA(model.parameters()))
    loss = model(torch.ones(4, 3))  # (4, 2): forgot the reduction
    with pytest.raises(ValueError, match="scalar"):
        backward(accelerator, loss, opt)
    assert all(p.grad is None for p in model.parameters())
    adam = torch.optim.Adam(model.parameters())
    backward(accelerator, loss.sum(), adam)  # not an ELRA: only the backward
    assert all(p.grad is not None for p in model.parameters())
