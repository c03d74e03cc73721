"""ELRA in PyTorch Lightning (elra_fused.integrations.lightning).

Lightning's automatic optimization calls ``ELRA.step(closure=...)``; with
``accumulate_grad_batches`` the closure runs only the last micro-batch. With
``ELRACallback`` ELRA must judge the sum of all micro-batch losses and the run must be
the plain loop bit for bit; bf16 autocast, fp16 with Lightning's GradScaler and a step
scheduler must work.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _frameworks import (
    BATCH_SIZE,
    StepSpy,
    TokenDataset,
    hand_loop,
    max_difference,
    mean_loss,
    one_thread,  # noqa: F401  (fixture)
    require,
    same_parameters,
    tiny_llama,
)

from elra_fused import ELRA
from elra_fused._torch_compat import grad_scaler_scale

pl = require("pytorch_lightning")
require("transformers")

from elra_fused.integrations.lightning import ELRACallback, callback_class  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = 64  # 16 micro-batches per epoch


class LitLM(pl.LightningModule):
    """The tiny Llama with a prepared ELRA (and optionally a step scheduler)."""

    def __init__(self, model: torch.nn.Module, opt: ELRA, scheduler: Any = None) -> None:
        super().__init__()
        self.model = model
        self.opt = opt
        self.scheduler = scheduler

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        if self.scheduler is None:
            return self.opt
        return {
            "optimizer": self.opt,
            "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"},
        }


#: The Trainer arguments every fit here shares: one CPU device, nothing written or shown.
QUIET_CPU: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


def _loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        TokenDataset(EXAMPLES), batch_size=BATCH_SIZE, shuffle=False, num_workers=0
    )


def _fit(
    steps: int,
    accumulation: int = 1,
    precision: str = "32-true",
    schedule: bool = False,
    callback: bool = True,
    plugins: list[Any] | None = None,
) -> tuple[torch.nn.Module, ELRA, StepSpy]:
    model = tiny_llama(0)
    opt = ELRA(model.parameters())
    spy = StepSpy(opt)
    scheduler = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)) if schedule else None
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulation,
        precision=None if plugins else precision,
        plugins=plugins,
        callbacks=[ELRACallback()] if callback else [],
        **QUIET_CPU,
    )
    trainer.fit(LitLM(model, opt, scheduler), _loader())
    return model, opt, spy


@pytest.mark.parametrize("accumulation", [1, 2])
def test_lightning_is_the_plain_loop(accumulation: int) -> None:
    """ELRACallback + ``accumulate_grad_batches``: every ``step(closure=...)`` judged the
    sum of the micro-batch losses (not the closure's last one), a cycle closed at each
    epoch end, and the parameters are the hand-written loop's bit for bit."""
    steps = 24
    dataset = TokenDataset(EXAMPLES)
    model, opt, spy = _fit(steps, accumulation)
    assert all(r.closure for r in spy.steps)
    spy.check_judged_recorded_sums(accumulation)
    epoch_steps = EXAMPLES // BATCH_SIZE // accumulation
    assert spy.cycles_closed >= steps // epoch_steps

    reference = tiny_llama(0)
    ref_opt = ELRA(reference.parameters())
    judged = hand_loop(
        reference,
        ref_opt,
        dataset,
        batch_size=BATCH_SIZE,
        accumulation=accumulation,
        steps=steps,
        epoch_steps=epoch_steps,
    )
    assert [sum(r.recorded) for r in spy.steps] == pytest.approx(judged, rel=1e-6)
    assert same_parameters(model, reference), max_difference(model, reference)
    assert opt.alpha == ref_opt.alpha
    assert mean_loss(model, dataset) < 0.8 * mean_loss(tiny_llama(0), dataset)


def test_lightning_without_callback_judges_the_last_micro_batch() -> None:
    """Why the callback: without it ELRA only gets the closure's loss, that of the last
    micro-batch (half the accumulated loss here)."""
    _, _, spy = _fit(4, accumulation=2, callback=False)
    assert all(r.recorded == [] and r.closure for r in spy.steps)


class ManualLM(LitLM):
    """Manual optimization: ``training_step`` runs backward and ``opt.step()`` itself."""

    def __init__(self, model: torch.nn.Module, opt: ELRA, step_loss: bool) -> None:
        super().__init__(model, opt)
        self.automatic_optimization = False
        self.step_loss = step_loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        loss = self.model(**batch).loss
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step(loss=loss) if self.step_loss else opt.step()


@pytest.mark.parametrize("how", ["callback", "step(loss=)", "neither"])
def test_lightning_manual_optimization(how: str) -> None:
    """Manual optimization: ``opt.step()`` reaches ELRA with Lightning's placeholder
    closure, which returns no loss. With the callback (records the loss in
    manual_backward) or ``opt.step(loss=loss)`` it steps as the plain loop; with
    neither it is the clear missing-loss error, not a silent step-less run."""
    model = tiny_llama(0)
    opt = ELRA(model.parameters())
    spy = StepSpy(opt)
    trainer = pl.Trainer(
        max_steps=3, callbacks=[ELRACallback()] if how == "callback" else [], **QUIET_CPU
    )
    module = ManualLM(model, opt, step_loss=how == "step(loss=)")
    if how == "neither":
        with pytest.raises(TypeError, match="manual optimization"):
            trainer.fit(module, _loader())
        assert same_parameters(model, tiny_llama(0))
        return
    trainer.fit(module, _loader())
    reference = tiny_llama(0)
    ref_opt = ELRA(reference.parameters())
    hand_loop(
        reference, ref_opt, TokenDataset(EXAMPLES), batch_size=BATCH_SIZE, accumulation=1, steps=3
    )
    assert len(spy.steps) == 3
    assert same_parameters(model, reference), max_difference(model, reference)
    assert opt.alpha == ref_opt.alpha


def test_lightning_bf16_mixed() -> None:
    """``precision="bf16-mixed"`` (CPU autocast) with accumulation: the loss falls and
    ELRA judged the accumulated loss."""
    dataset = TokenDataset(EXAMPLES)
    model, _, spy = _fit(24, accumulation=2, precision="bf16-mixed")
    spy.check_judged_recorded_sums(2)
    assert mean_loss(model, dataset) < 0.8 * mean_loss(tiny_llama(0), dataset)


def test_lightning_16_mixed_grad_scaler() -> None:
    """fp16 with Lightning's GradScaler: the precision plugin scales the loss before
    ``on_before_backward``; the callback divides the scale out (ELRA compares unscaled
    losses) and ``scaler.step(ELRA)`` hands ELRA the scaled gradients. (On the CPU
    ``precision="16-mixed"`` falls back to bf16, so the plugin is built by hand.)"""
    scaler = torch.amp.GradScaler("cpu")
    plugin = pl.plugins.precision.MixedPrecision("16-mixed", device="cpu", scaler=scaler)
    dataset = TokenDataset(EXAMPLES)
    model, _, spy = _fit(32, accumulation=2, plugins=[plugin])
    assert scaler.get_scale() > 1000  # the loss really went through the scaler
    spy.check_judged_recorded_sums(2)
    assert all(0 < loss < 5 for r in spy.steps for loss in r.recorded)  # scale 2**16 gone
    assert mean_loss(model, dataset) < 0.8 * mean_loss(tiny_llama(0), dataset)


def test_lightning_step_scheduler_drives_lr() -> None:
    """A scheduler with ``interval="step"`` sets the lr each ELRA step takes."""
    steps = 6
    _, _, spy = _fit(steps, schedule=True)
    assert [r.lr for r in spy.steps] == pytest.approx([1.0 / (1 + i) for i in range(steps)])


def test_callback_class_for_each_package() -> None:
    """``ELRACallback`` is the installed package's Callback; an unknown name is refused."""
    assert issubclass(ELRACallback, pl.Callback)
    assert callback_class("pytorch_lightning") is ELRACallback
    with pytest.raises(ValueError, match="package must be one of"):
        callback_class("lightning_fabric")


def test_grad_scaler_scale_is_the_scale_tensor() -> None:
    """The helper returns the scale GradScaler multiplies by, as a tensor."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert float(grad_scaler_scale(scaler)) == 1024.0  # before any scale(): lazily made
    scaled = scaler.scale(torch.tensor(3.0))
    assert float(scaled / grad_scaler_scale(scaler)) == 3.0


def _resumable_fit(
    epochs: int, checkpoint: Any, resume: bool = False
) -> tuple[torch.nn.Module, ELRA]:
    """A fit of ``epochs`` epochs with a OneCycleLR (step interval, no momentum cycling)
    over two epochs; saves ``checkpoint`` at the end, or resumes from it (``resume``)."""
    model = tiny_llama(5 if resume else 0)  # resumed: the checkpoint's weights must win
    opt = ELRA(model.parameters())
    steps = 2 * EXAMPLES // BATCH_SIZE
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1.0, total_steps=steps, cycle_momentum=False
    )
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[ELRACallback()], **QUIET_CPU)
    trainer.fit(LitLM(model, opt, scheduler), _loader(), ckpt_path=checkpoint if resume else None)
    if not resume:
        trainer.save_checkpoint(checkpoint)
    return model, opt


def test_lightning_checkpoint_resumes_bit_identically(tmp_path: Any) -> None:
    """Lightning saves ELRA's state (and the OneCycleLR keys in its param groups) after
    epoch 1; ``fit(ckpt_path=...)`` on a fresh model and optimizer runs epoch 2 exactly
    as the uninterrupted two-epoch run: same parameters, same alpha, same lr."""
    full, full_opt = _resumable_fit(2, tmp_path / "full.ckpt")
    _resumable_fit(1, tmp_path / "epoch1.ckpt")
    resumed, resumed_opt = _resumable_fit(2, tmp_path / "epoch1.ckpt", resume=True)
    assert same_parameters(full, resumed), max_difference(full, resumed)
    assert resumed_opt.alpha == full_opt.alpha
    assert resumed_opt.param_groups[0]["lr"] == full_opt.param_groups[0]["lr"]
