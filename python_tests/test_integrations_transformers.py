"""ELRA in Hugging Face ``transformers.Trainer`` (elra_fused.integrations.transformers).

A tiny Llama from a config on synthetic tokens, a few dozen steps per run: ELRATrainer
must amount to the plain loop (bit for bit, with Trainer's default clipping and linear
schedule, with and without gradient accumulation), judge the loss of the accumulated
gradient, let the schedule act, train under bf16 autocast, and resume a checkpoint bit
for bit.
"""

from __future__ import annotations

from pathlib import Path
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

transformers = require("transformers")
require("accelerate")

from elra_fused.integrations.transformers import ELRATrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

EXAMPLES = 64  # 16 micro-batches per epoch


def _args(tmp_path: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": BATCH_SIZE,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "sequential",  # the hand loop's order
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def _train(
    tmp_path: Path, steps: int, accumulation: int = 1, **overrides: Any
) -> tuple[torch.nn.Module, ELRA, StepSpy]:
    model = tiny_llama(0)
    opt = ELRA(model.parameters())
    spy = StepSpy(opt)
    args = _args(tmp_path, max_steps=steps, gradient_accumulation_steps=accumulation, **overrides)
    trainer = ELRATrainer(
        model=model, args=args, train_dataset=TokenDataset(EXAMPLES), optimizers=(opt, None)
    )
    trainer.train()
    return model, opt, spy


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_is_the_plain_loop(tmp_path: Path, accumulation: int) -> None:
    """ELRATrainer with Trainer's defaults (max_grad_norm=1.0, linear schedule from lr=1)
    gives the parameters of the hand-written loop bit for bit, ELRA judged the sum of
    the micro-batch losses at every step, and a cycle closes at each epoch end."""
    steps = 24
    dataset = TokenDataset(EXAMPLES)
    model, opt, spy = _train(tmp_path, steps, accumulation)
    spy.check_judged_recorded_sums(accumulation)
    epoch_steps = EXAMPLES // BATCH_SIZE // accumulation
    assert spy.cycles_closed == -(-steps // epoch_steps)  # and one where max_steps stops it

    reference = tiny_llama(0)
    ref_opt = ELRA(reference.parameters())
    schedule = transformers.get_scheduler("linear", ref_opt, 0, steps)
    judged = hand_loop(
        reference,
        ref_opt,
        dataset,
        batch_size=BATCH_SIZE,
        accumulation=accumulation,
        steps=steps,
        max_grad_norm=1.0,
        scheduler=schedule,
        token_normalised=True,  # Llama takes num_items_in_batch: Trainer passes it
        epoch_steps=epoch_steps,
    )
    assert [sum(r.recorded) for r in spy.steps] == pytest.approx(judged, rel=1e-6)
    assert same_parameters(model, reference), max_difference(model, reference)
    assert opt.alpha == ref_opt.alpha
    assert mean_loss(model, dataset) < 0.8 * mean_loss(tiny_llama(0), dataset)


def test_trainer_schedule_changes_the_trajectory(tmp_path: Path) -> None:
    """The groups' lr is what Trainer's scheduler drives: linear decay and a constant
    schedule take different steps (the step is lr * alpha)."""
    steps = 12
    linear, _, linear_spy = _train(tmp_path, steps)
    constant, _, constant_spy = _train(tmp_path, steps, lr_scheduler_type="constant")
    assert [r.lr for r in constant_spy.steps] == [1.0] * steps
    assert [r.lr for r in linear_spy.steps] == pytest.approx(
        [1.0 - i / steps for i in range(steps)]
    )
    assert not same_parameters(linear, constant)


def test_trainer_builds_elra_from_cls_and_kwargs(tmp_path: Path) -> None:
    """``optimizer_cls_and_kwargs=(ELRA, {...})``: Trainer builds the groups itself, with
    ``weight_decay`` (args.weight_decay, 0.0 for biases and norms), and its scheduler."""
    model = tiny_llama(0)
    dataset = TokenDataset(EXAMPLES)
    before = mean_loss(model, dataset)
    args = _args(tmp_path, max_steps=32, weight_decay=0.001)  # alpha0 = 1e-3 needs ~30
    trainer = ELRATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        optimizer_cls_and_kwargs=(ELRA, {"alpha0": 1e-3}),
    )
    trainer.train()
    elra = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer wraps it
    assert isinstance(elra, ELRA)
    groups = sorted(elra.param_groups, key=lambda g: g["weight_decay"])
    assert [g["weight_decay"] for g in groups] == [0.0, 0.001]
    assert [g["wd"] for g in groups] == pytest.approx([1.0, 0.999])  # wd = 1 - weight_decay
    assert mean_loss(model, dataset) < 0.8 * before


def test_trainer_bf16_autocast(tmp_path: Path) -> None:
    """``bf16=True`` on the CPU (accelerate's autocast) with gradient accumulation: the
    loss falls and ELRA judged the accumulated loss."""
    dataset = TokenDataset(EXAMPLES)
    before = mean_loss(tiny_llama(0), dataset)
    model, _, spy = _train(tmp_path, 24, accumulation=2, bf16=True)
    spy.check_judged_recorded_sums(2)
    assert mean_loss(model, dataset) < 0.8 * before


def test_trainer_checkpoint_resumes_bit_identically(tmp_path: Path) -> None:
    """Train 2N steps saving at N; a fresh trainer resumed from checkpoint-N reaches the
    uninterrupted run's parameters and alpha bit for bit (the ELRA control state, the
    schedule and the data position all come back; an epoch end lies in between)."""
    n = 10  # an epoch is 8 steps (accumulation 2): the epoch end is between N and 2N
    common = {"gradient_accumulation_steps": 2, "max_steps": 2 * n}
    full = tiny_llama(0)
    full_opt = ELRA(full.parameters())
    ELRATrainer(
        model=full,
        args=_args(tmp_path, save_strategy="steps", save_steps=n, **common),
        train_dataset=TokenDataset(EXAMPLES),
        optimizers=(full_opt, None),
    ).train()
    checkpoint = tmp_path / "out" / f"checkpoint-{n}"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed = tiny_llama(1)  # other weights: the checkpoint must bring them back
    resumed_opt = ELRA(resumed.parameters())
    ELRATrainer(
        model=resumed,
        args=_args(tmp_path, **common),
        train_dataset=TokenDataset(EXAMPLES),
        optimizers=(resumed_opt, None),
    ).train(resume_from_checkpoint=str(checkpoint))
    assert same_parameters(full, resumed), max_difference(full, resumed)
    assert torch.equal(full_opt.control_state, resumed_opt.control_state)
