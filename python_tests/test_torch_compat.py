"""The torch-private glue (elra_fused._torch_compat): ELRA's step behaves as torch's
wrapped step for hooks and the profiler, and DTensor detection."""

from __future__ import annotations

import functools

import torch
from _lockstep import mlp_setup, mlp_step
from torch.optim.optimizer import register_optimizer_step_pre_hook

import elra_fused

ELRA = functools.partial(elra_fused.ELRA, backend="reference")
F64 = torch.float64


def test_step_hooks_run_as_with_torch_optimizers() -> None:
    # ELRA skips torch's step wrapper only while no hook is registered and no profiler
    # runs; with any of them the wrapper (and so torch's hook semantics) is back.
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters())
    calls: list[str] = []
    replaced_loss = torch.tensor(123.0, dtype=F64)

    def pre_hook(optimizer, args, kwargs):
        assert optimizer is opt
        calls.append("pre")
        return (args[0], replaced_loss), kwargs  # may replace the arguments (args[0]: opt)

    def post_hook(optimizer, args, kwargs):
        calls.append(f"post {float(args[1])}")

    def global_pre_hook(optimizer, args, kwargs):
        calls.append("global pre")

    handles = [opt.register_step_pre_hook(pre_hook), opt.register_step_post_hook(post_hook)]
    handles.append(register_optimizer_step_pre_hook(global_pre_hook))
    try:
        mlp_step(model, data, target, opt)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global pre", "pre", "post 123.0"]
    assert opt.control_state[elra_fused.control.LOSS_PREV].item() == 123.0  # the replaced loss

    calls.clear()
    mlp_step(model, data, target, opt)  # hooks removed: the direct path
    assert calls == []


def test_step_shows_in_the_profiler() -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mlp_step(model, data, target, opt)
    names = {event.name for event in prof.events()}
    assert "Optimizer.step#ELRA.step" in names
