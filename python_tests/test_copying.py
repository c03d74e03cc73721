"""``copy.deepcopy`` and pickling of an ELRA optimizer (:mod:`elra_fused.copying`).

A copy must train on exactly as the original would: each test trains a twin that was
never copied, the original and its copy on the same batches -- with retraces (loss
spikes, a NaN gradient) and BatchNorm statistics restored on them -- and compares the
weights, the buffers and the control state bit for bit after every step.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from elra_fused import ELRA, control, ops

BACKEND = "cpp" if "cpp" in ops.available_backends("cpu") else "reference"
SETUPS = {
    "lists": {"flat": False},
    "flat": {"flat": True},
    "recover": {"flat": True, "memory": "recover"},
    "swap": {"flat": True, "reuse_grad_buffer": True},
    "bf16_state": {"flat": False, "state_dtype": torch.bfloat16},
}
#: Steps before the copy and after it; the batches at these indices misbehave.
BEFORE, AFTER = 4, 8
SPIKE, NAN_GRAD = 6, 9


def make_model(seed: int = 0) -> torch.nn.Module:
    """An MLP with BatchNorm: its running statistics follow the retraces (``buffers=``)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12), torch.nn.Tanh(), torch.nn.Linear(12, 1)
    )


def build(model: torch.nn.Module, setup: str) -> ELRA:
    """Two groups with their own wd (a decaying group tracks which parameters backward
    reaches in the flat layout), alpha0 and wd given positionally, BatchNorm statistics
    restored on retraces, a control cycle every 5 steps."""
    groups = [
        {"params": list(model[0].parameters()), "wd": 0.999},
        {"params": [*model[1].parameters(), *model[3].parameters()]},
    ]
    return ELRA(groups, 2e-3, 1.0, backend=BACKEND, cycle_steps=5, buffers=model, **SETUPS[setup])


def batch(step_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step_index)
    inputs = torch.randn(16, 6, generator=gen)
    return inputs, inputs[:, :1] * 2 - inputs[:, 1:2]


def train_step(opt: ELRA, model: torch.nn.Module, step_index: int) -> None:
    """zero_grad, forward (BatchNorm statistics move), backward, step; the batch at
    ``SPIKE`` reports a loss spike (a retrace), the one at ``NAN_GRAD`` a NaN gradient."""
    opt.zero_grad()
    inputs, target = batch(step_index)
    loss = torch.nn.functional.mse_loss(model(inputs), target)
    loss.backward()
    if step_index == NAN_GRAD:
        model[0].weight.grad[0, 0] = math.nan
    opt.step(loss.detach() * 1e3 if step_index == SPIKE else loss)


def snapshot(opt: ELRA, model: torch.nn.Module) -> list[torch.Tensor]:
    """Weights, buffers, the control state and every state-dict tensor, as copies."""
    tensors = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    tensors.append(opt.control_state.clone())
    state = opt.state_dict()["state"]
    tensors.extend(entry[key].clone() for entry in state.values() for key in sorted(entry))
    return tensors


def assert_same(left: list[torch.Tensor], right: list[torch.Tensor]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def assert_trains_like(
    pairs: list[tuple[ELRA, torch.nn.Module]], steps: range, min_retraces: int
) -> None:
    """Train every (optimizer, model) pair on the same batches; all stay bit-identical
    after every step, and the steps include at least ``min_retraces`` retraces."""
    before = pairs[0][0].retrace_count
    for step_index in steps:
        for opt, model in pairs:
            train_step(opt, model, step_index)
        expected = snapshot(*pairs[0])
        for opt, model in pairs[1:]:
            assert_same(snapshot(opt, model), expected)
            assert opt.alpha == pairs[0][0].alpha
    assert pairs[0][0].retrace_count - before >= min_retraces


@pytest.mark.parametrize("setup", list(SETUPS))
def test_deepcopy_of_model_and_optimizer_trains_on_bit_identically(setup: str) -> None:
    """``copy.deepcopy((model, opt))``: the copy steps the copied model's parameters (its
    own flat buffers), restores the copied model's BatchNorm statistics on its retraces,
    keeps the options and a group key set after construction, and trains on exactly as
    the original does -- which itself still trains like a twin that was never copied."""
    twin_model, model = make_model(), make_model()
    twin, opt = build(twin_model, setup), build(model, setup)
    opt.param_groups[1]["tag"] = "head"  # a key of the user's own, set after construction
    twin.param_groups[1]["tag"] = "head"
    for step_index in range(BEFORE):
        train_step(twin, twin_model, step_index)
        train_step(opt, model, step_index)
    copy_model, copy_opt = copy.deepcopy((model, opt))
    assert type(copy_opt) is ELRA
    for group, copied in zip(opt.param_groups, copy_opt.param_groups, strict=True):
        assert {k: v for k, v in copied.items() if k != "params"} == {
            k: v for k, v in group.items() if k != "params"
        }
    copied_params = copy_opt.param_groups[0]["params"]
    assert all(a is b for a, b in zip(copied_params, copy_model[0].parameters(), strict=True))
    assert (copy_opt.config, copy_opt.flat, copy_opt.memory, copy_opt.backend) == (
        opt.config,
        opt.flat,
        opt.memory,
        opt.backend,
    )
    assert copy_opt.cycle_steps == 5 and copy_opt.config.alpha0 == 2e-3
    if opt.flat:  # the copy's parameters live in its own buffers
        assert copy_model[0].weight.data_ptr() == copy_opt.layout.buffers[0].data.data_ptr()
    assert_same(snapshot(copy_opt, copy_model), snapshot(opt, model))
    pairs = [(twin, twin_model), (copy_opt, copy_model), (opt, model)]  # the copy first
    assert_trains_like(pairs, range(BEFORE, BEFORE + AFTER), min_retraces=2)


def test_optimizer_before_model_in_one_deepcopy_and_named_parameters() -> None:
    """``copy.deepcopy((opt, model))``: the optimizer is copied first and takes the
    parameters the model's copy then shares; torch's ``param_names`` stay."""
    model, twin_model = make_model(), make_model()
    opt, twin = (
        ELRA(m.named_parameters(), backend=BACKEND, flat=True, buffers=m)
        for m in (model, twin_model)
    )
    for step_index in range(BEFORE):
        train_step(opt, model, step_index)
        train_step(twin, twin_model, step_index)
    copy_opt, copy_model = copy.deepcopy((opt, model))
    assert copy_opt.param_groups[0]["params"][0] is copy_model[0].weight
    assert copy_opt.param_groups[0].get("param_names") == opt.param_groups[0].get("param_names")
    pairs = [(twin, twin_model), (copy_opt, copy_model), (opt, model)]
    assert_trains_like(pairs, range(BEFORE, BEFORE + AFTER), min_retraces=2)


def test_a_retrace_of_the_copy_restores_the_copys_batchnorm_statistics() -> None:
    """``buffers=model`` maps to the copied model: a retrace of the copy puts back the
    copy's statistics, and neither optimizer touches the other's model."""
    model = make_model()
    opt = build(model, "flat")
    for step_index in range(BEFORE):
        train_step(opt, model, step_index)
    copy_model, copy_opt = copy.deepcopy((model, opt))
    at_copy = [b.clone() for b in copy_model.buffers()]
    train_step(opt, model, BEFORE)  # accepted: the original's statistics move on
    assert not opt.last_step_retraced
    original = [b.clone() for b in model.buffers()]
    assert not torch.equal(original[0], at_copy[0])
    train_step(copy_opt, copy_model, SPIKE)  # the forward moves them, the retrace undoes it
    assert copy_opt.last_step_retraced
    assert_same([b.clone() for b in copy_model.buffers()], at_copy)
    assert_same([b.clone() for b in model.buffers()], original)


def test_stepping_the_copy_leaves_the_original_alone() -> None:
    model = make_model()
    opt = build(model, "flat")
    for step_index in range(BEFORE):
        train_step(opt, model, step_index)
    before = snapshot(opt, model)
    copy_model, copy_opt = copy.deepcopy((model, opt))
    for step_index in range(BEFORE, BEFORE + AFTER):
        train_step(copy_opt, copy_model, step_index)
    assert copy_opt.retrace_count > opt.retrace_count
    assert_same(snapshot(opt, model), before)


@pytest.mark.parametrize("setup", ["lists", "flat"])
def test_losses_recorded_before_the_copy_are_judged_by_its_step(setup: str) -> None:
    """Gradient accumulation with ``record_loss`` (what the framework integrations do),
    copied between the micro-batches' backward and ``step()``: the copy's step judges
    the same recorded sum."""
    model = make_model()
    opt = build(model, setup)
    for step_index in range(BEFORE):
        train_step(opt, model, step_index)
    opt.zero_grad()
    for micro in range(2):
        inputs, target = batch(50 + micro)
        loss = torch.nn.functional.mse_loss(model(inputs), target) / 2
        loss.backward()
        opt.record_loss(loss)
    copy_model, copy_opt = copy.deepcopy((model, opt))
    for source, target_param in zip(model.parameters(), copy_model.parameters(), strict=True):
        target_param.grad = source.grad.clone()  # deep copies of parameters drop .grad
    opt.step()
    copy_opt.step()  # without the recorded losses: "ELRA.step needs the loss"
    assert_same(snapshot(copy_opt, copy_model), snapshot(opt, model))
    assert_trains_like([(opt, model), (copy_opt, copy_model)], range(BEFORE, BEFORE + 2), 0)


@pytest.mark.parametrize("setup", ["lists", "flat", "recover"])
def test_torch_save_of_model_and_optimizer_resumes_bit_identically(setup: str) -> None:
    """``torch.save`` of the whole objects, ``torch.load(weights_only=False)``: the loaded
    optimizer steps the loaded model's parameters and restores its buffers."""
    model = make_model()
    opt = build(model, setup)
    opt.host_control = False  # a runtime switch set after construction is kept
    for step_index in range(BEFORE):
        train_step(opt, model, step_index)
    file = io.BytesIO()
    torch.save({"model": model, "opt": opt}, file)
    file.seek(0)
    loaded = torch.load(file, weights_only=False)
    new_model, new_opt = loaded["model"], loaded["opt"]
    assert new_opt.param_groups[0]["params"][0] is new_model[0].weight
    assert new_opt.host_control is False
    pairs = [(opt, model), (new_opt, new_model)]
    assert_trains_like(pairs, range(BEFORE, BEFORE + AFTER), min_retraces=2)


def test_pickle_of_the_optimizer_alone_keeps_its_state() -> None:
    """The probe's case: ``pickle.loads(pickle.dumps(opt))`` gives a working optimizer
    with the same state dict, stepping its own copies of the parameters."""
    model = make_model()
    opt = build(model, "flat")
    for step_index in range(BEFORE):
        train_step(opt, model, step_index)
    restored = pickle.loads(pickle.dumps(opt))
    saved, loaded = opt.state_dict(), restored.state_dict()
    for saved_group, loaded_group in zip(
        saved["param_groups"], loaded["param_groups"], strict=True
    ):
        assert saved_group.keys() == loaded_group.keys()
        for key, value in saved_group.items():
            if key != "elra_control":  # the control state: compared below
                assert loaded_group[key] == value
    assert torch.equal(loaded["elra_control"]["control"], saved["elra_control"]["control"])
    for param_id, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(loaded["state"][param_id][key], value)
    assert restored.alpha == opt.alpha
    params = [p for group in restored.param_groups for p in group["params"]]
    assert not any(p is q for p, q in zip(params, model.parameters(), strict=True))
    restored.zero_grad()
    restored.step(1.0)  # runs: a layout, a control law, a loss record


def test_a_shallow_copy_is_refused() -> None:
    opt = build(make_model(), "flat")
    with pytest.raises(TypeError, match="copy.deepcopy"):
        copy.copy(opt)


@pytest.fixture
def one_rank_group() -> Iterator[dist.ProcessGroup]:
    """A one-process gloo group (DDP's ``process_group=``), torn down after the test."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_process_group_is_shared_by_a_deepcopy_and_refused_by_pickle(
    one_rank_group: dist.ProcessGroup,
) -> None:
    """A ProcessGroup belongs to the running process: a deep copy averages its loss over
    the same group; pickling says which option cannot be pickled, and changes nothing."""
    model = make_model()
    opt = ELRA(model.parameters(), backend=BACKEND, process_group=one_rank_group)
    twin_model = copy.deepcopy(model)
    twin = ELRA(twin_model.parameters(), backend=BACKEND)
    for step_index in range(BEFORE):
        train_step(opt, model, step_index)
        train_step(twin, twin_model, step_index)
    copy_model, copy_opt = copy.deepcopy((model, opt))
    assert copy_opt.process_group is opt.process_group
    before = snapshot(opt, model)
    with pytest.raises(TypeError, match="process_group"):
        pickle.dumps(opt)
    with pytest.raises(TypeError, match="process_group"):
        torch.save(opt, io.BytesIO())
    assert_same(snapshot(opt, model), before)
    pairs = [(twin, twin_model), (opt, model), (copy_opt, copy_model)]
    assert_trains_like(pairs, range(BEFORE, BEFORE + AFTER), min_retraces=2)


def test_retrace_flag_of_the_copy_is_its_own() -> None:
    """The copy's control state is a tensor of its own (loaded, not shared)."""
    model = make_model()
    opt = build(model, "lists")
    train_step(opt, model, 0)
    copy_opt = copy.deepcopy(opt)
    assert copy_opt.control_state.data_ptr() != opt.control_state.data_ptr()
    assert copy_opt.control_state[control.ALPHA] == opt.control_state[control.ALPHA]
