"""Which loss a step judges (elra_fused/losses.py): passed, returned by a closure, or the
sum of the micro-batch losses given to record_loss -- what frameworks need."""

from __future__ import annotations

import pytest
import torch
from _lockstep import data, make_model

from elra_fused import ELRA, control


def _micro_batches(model: torch.nn.Module, parts: int = 2) -> list[torch.Tensor]:
    """Backward of each micro-batch's loss / parts (gradient accumulation); the losses."""
    inputs, target = data()
    losses = []
    for chunk_in, chunk_target in zip(inputs.chunk(parts), target.chunk(parts), strict=True):
        loss = torch.nn.functional.mse_loss(model(chunk_in), chunk_target) / parts
        loss.backward()
        losses.append(loss)
    return losses


def _judged(opt: ELRA) -> float:
    """f of the last accepted step (the first step is always accepted)."""
    return opt.control_state[control.LOSS_PREV].item()


def test_step_without_a_loss_judges_the_sum_of_the_recorded_losses() -> None:
    model = make_model()
    opt = ELRA(model.parameters())
    losses = _micro_batches(model)
    for loss in losses:
        opt.record_loss(loss)
    assert opt.step() is None
    assert _judged(opt) == losses[0].double().item() + losses[1].double().item()
    with pytest.raises(TypeError, match="record_loss"):
        opt.step()  # the record was cleared by the step


def test_an_explicit_loss_wins_and_clears_the_record() -> None:
    model = make_model()
    opt = ELRA(model.parameters())
    for loss in _micro_batches(model):
        opt.record_loss(loss)
    opt.step(torch.tensor(0.25))
    assert _judged(opt) == 0.25
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()


def test_a_closure_returns_its_loss_and_recorded_micro_batches_win() -> None:
    """Lightning: the closure runs the last micro-batch and returns only its loss; a
    callback recorded every micro-batch, so their sum is judged."""
    model = make_model()
    # No retrace before a cycle closes: every step is accepted and its loss kept.
    opt = ELRA(model.parameters(), initial_retrace_factor=None)
    inputs, target = data()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        loss.backward()
        return loss

    returned = opt.step(closure=closure)
    assert isinstance(returned, torch.Tensor)
    assert _judged(opt) == returned.double().item()

    recorded = []

    def recording_closure() -> torch.Tensor:
        loss = closure()
        recorded.append(loss)
        opt.record_loss(loss * 3)  # what a framework's hook saw
        return loss

    opt.step(recording_closure)
    assert not opt.last_step_retraced
    assert _judged(opt) == (recorded[0] * 3).double().item()


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (torch.ones(2), ValueError),
        ("0.5", TypeError),
        (torch.ones((), dtype=torch.complex64), TypeError),
    ],
)
def test_record_loss_rejects_what_is_not_a_loss_and_records_nothing(bad, error) -> None:
    model = make_model()
    opt = ELRA(model.parameters())
    with pytest.raises(error, match="ELRA.record_loss"):
        opt.record_loss(bad)
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()


def test_a_loss_given_twice_is_an_error() -> None:
    opt = ELRA(make_model().parameters())
    with pytest.raises(TypeError, match="both"):
        opt.step(torch.tensor(1.0), loss=torch.tensor(1.0))


def test_a_closure_that_skips_the_batch_skips_the_step() -> None:
    model = make_model()
    opt = ELRA(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step(closure=lambda: None) is None
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert opt.control_state[control.ACCEPTED].item() == 0


def test_a_failed_step_leaves_the_recorded_losses_as_before() -> None:
    """A closure that records its loss and then raises (a framework hook failing after
    the forward): the step fails, nothing is left recorded from it, and the retry judges
    one loss -- the same step as one that never failed."""
    results = []
    for fail_first in (False, True):
        model = make_model()
        opt = ELRA(model.parameters())
        inputs, target = data()
        failures = [fail_first]

        def closure(
            opt: ELRA = opt,
            model: torch.nn.Module = model,
            inputs: torch.Tensor = inputs,
            target: torch.Tensor = target,
            failures: list[bool] = failures,
        ) -> None:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), target)
            loss.backward()
            opt.record_loss(loss)
            if failures and failures.pop():
                raise RuntimeError("a hook failed")

        if fail_first:
            with pytest.raises(RuntimeError, match="a hook failed"):
                opt.step(closure)
        opt.step(closure)
        closure()
        opt.step(closure)
        results.append(([p.detach().clone() for p in model.parameters()], _judged(opt)))
    (clean, clean_f), (retried, retried_f) = results
    assert retried_f == clean_f
    assert all(torch.equal(a, b) for a, b in zip(clean, retried, strict=True))


def test_losses_recorded_before_a_failed_step_stay_for_the_retry() -> None:
    """Losses recorded before ``step()`` belong to the gradients still in place: a step
    that fails keeps them, and the fixed retry judges them."""
    model = make_model()
    opt = ELRA(model.parameters())
    losses = _micro_batches(model)
    for loss in losses:
        opt.record_loss(loss)
    opt.param_groups[0]["lr"] = float("nan")  # a bad schedule value: the step fails
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = 1.0
    opt.step()
    assert _judged(opt) == losses[0].double().item() + losses[1].double().item()
