"""GradScaler drives ELRA (elra_fused/amp.py): no unscaling pass, no host read, the same
bits as an unscaled run (the scales are powers of two), found_inf retraces, and the easy
mistake ``scaler.step(opt, scaler.scale(loss))`` is undone."""

from __future__ import annotations

import io
import math

import pytest
import torch
from _lockstep import no_host_reads

from elra_fused import ELRA

LAYOUTS = {
    "lists": {"flat": False},
    "flat": {"flat": True},
    "swap": {"flat": True, "reuse_grad_buffer": True},
    "recover": {"memory": "recover"},
}
STEPS = 120


def _problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    inputs = torch.randn(256, 8)
    return model, inputs, torch.sin(inputs.sum(1, keepdim=True))


def _train(
    options: dict, mode: str, steps: int = STEPS, host_control: bool = True
) -> tuple[ELRA, torch.nn.Module]:
    """mode: "plain" (no scaler), "scaler" (record_loss + scaler.step(opt)) or
    "scaled_loss" (the mistake: scaler.step(opt, scaler.scale(loss)))."""
    model, inputs, target = _problem()
    opt = ELRA(model.parameters(), **options)
    opt.host_control = host_control
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=7)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        index = torch.randint(0, 256, (16,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs[index]), target[index])
        if mode == "plain":
            loss.backward()
            opt.step(loss)
            continue
        scaler.scale(loss).backward()
        if mode == "scaler":
            opt.record_loss(loss)
            scaler.step(opt)
        else:
            scaler.step(opt, scaler.scale(loss))
        scaler.update()
    return opt, model


@pytest.mark.parametrize("mode", ["scaler", "scaled_loss"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grad_scaler_steps_are_the_unscaled_steps_bit_for_bit(layout: str, mode: str) -> None:
    """The scale grows every 7 steps, so G_{t-1} and G_t often carry different scales."""
    plain_opt, plain = _train(LAYOUTS[layout], "plain")
    opt, model = _train(LAYOUTS[layout], mode)
    assert opt.retrace_count == plain_opt.retrace_count > 0
    for mine, theirs in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_found_inf_retraces_and_moves_nothing() -> None:
    model, inputs, target = _problem()
    opt = ELRA(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step_index in range(6):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        scaler.scale(loss).backward()
        if step_index == 5:
            model[0].weight.grad[0, 0] = math.inf
            before = [p.detach().clone() for p in model.parameters()]
        opt.record_loss(loss)
        scaler.step(opt)
        scaler.update()
    assert opt.last_step_retraced
    assert scaler.get_scale() == 2.0**11  # GradScaler backed off as usual
    last_accepted = [p.detach() for p in model.parameters()]
    # A retrace moves back along G_{t-1} only: no inf or NaN reaches the weights.
    assert all(torch.isfinite(p).all() for p in last_accepted)
    assert any(not torch.equal(p, b) for p, b in zip(last_accepted, before, strict=True))


def test_grad_scaler_step_reads_nothing_back_on_the_device_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, inputs, target = _problem()
    opt = ELRA(model.parameters())
    opt.host_control = False  # the law as device tensor ops, as on a GPU
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for step_index in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), target)
        scaler.scale(loss).backward()
        opt.record_loss(loss)
        if step_index == 3:
            with no_host_reads(monkeypatch):
                scaler.step(opt)
        else:
            scaler.step(opt)
        scaler.update()


def test_the_kept_gradients_scale_travels_in_the_state_dict() -> None:
    """Saved mid-run (G_{t-1} carries its scale), loaded into a fresh optimizer and
    scaler: the continuation is bit-identical."""
    opt, model = _train({}, "scaler", steps=40)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buffer)
    assert opt.state_dict()["elra_control"]["grad_prev_inv_scale"] is not None
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, _, _ = _problem(seed=3)
    model2.load_state_dict(saved["model"])
    opt2 = ELRA(model2.parameters())
    opt2.load_state_dict(saved["opt"])
    assert torch.equal(opt2._amp.inv_prev, opt._amp.inv_prev)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_with_a_grad_scaler_trains(dtype: torch.dtype) -> None:
    model, inputs, target = _problem()
    opt = ELRA(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    with torch.no_grad():
        start = torch.nn.functional.mse_loss(model(inputs), target).item()
    for _ in range(80):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = torch.nn.functional.mse_loss(model(inputs), target)
        scaler.scale(loss).backward()
        opt.record_loss(loss)
        scaler.step(opt)
        scaler.update()
    with torch.no_grad():
        end = torch.nn.functional.mse_loss(model(inputs), target).item()
    assert end < 0.8 * start
    assert all(torch.isfinite(p).all() for p in model.parameters())
