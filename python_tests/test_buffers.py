"""RetraceBuffers: BatchNorm running statistics follow ELRA's accept / retrace decisions.

The models train with BatchNorm in train mode, where the forward pass normalizes with the
batch's own statistics: the running statistics never feed back into the loss or the
gradients. So a model with the helper and a twin without it take bit-identical steps,
and the only difference is what their running statistics hold after a retrace.
"""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
from _backends import needs_cuda
from _lockstep import no_host_reads

import elra_fused
from elra_fused import control
from elra_fused.buffers import RetraceBuffers

ELRA = functools.partial(elra_fused.ELRA, backend="reference")

#: Step indices (from 0) of the injected loss spike in the training runs below.
SPIKE = 4


def make_cnn(seed: int = 0, momentum: float | None = 0.1) -> torch.nn.Module:
    """Two conv + BatchNorm2d blocks and a linear head (10 classes)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8, momentum=momentum),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, stride=2),
        torch.nn.BatchNorm2d(8, momentum=momentum),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )


def batch(step_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh random batch per step (seeded by the step index)."""
    gen = torch.Generator().manual_seed(100 + step_index)
    return torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def stats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the BatchNorm buffers (running_mean, running_var, num_batches_tracked)."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def assert_stats_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def stats_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


def forward_backward(
    model: torch.nn.Module, step_index: int, spike: int | None = SPIKE, scale: float = 1.0
) -> torch.Tensor:
    """Cross entropy on the step's batch (inputs times ``scale``) and its gradients; the
    loss passed to ELRA is multiplied by 1e3 at ``spike`` (a forced retrace)."""
    inputs, labels = batch(step_index)
    loss = torch.nn.functional.cross_entropy(model(inputs * scale), labels)
    loss.backward()
    return loss.detach() * 1e3 if step_index == spike else loss.detach()


def test_retrace_restores_the_stats_of_the_last_accepted_step() -> None:
    model, twin = make_cnn(), make_cnn()
    opt, twin_opt = ELRA(model.parameters()), ELRA(twin.parameters())
    keeper = RetraceBuffers(model)
    accepted = stats(model)
    for step_index in range(SPIKE + 4):
        for m, o in ((model, opt), (twin, twin_opt)):
            o.zero_grad()
            o.step(forward_backward(m, step_index))
        after_forward = stats(model)
        if step_index <= SPIKE:  # same steps, same statistics until the helper acts
            assert_stats_equal(after_forward, stats(twin))
        keeper.after_step(opt)
        assert opt.last_step_retraced == (step_index == SPIKE) == twin_opt.last_step_retraced
        if step_index == SPIKE:
            # The helper undid the rejected forward pass exactly; the twin keeps it.
            assert stats_differ(after_forward, accepted)
            assert_stats_equal(stats(model), accepted)
            assert stats_differ(stats(twin), accepted)
            for name in ("1.num_batches_tracked", "4.num_batches_tracked"):
                assert model.get_buffer(name).item() == SPIKE
                assert twin.get_buffer(name).item() == SPIKE + 1
        else:
            # Accepted: the new statistics stay and are remembered.
            assert_stats_equal(stats(model), after_forward)
            accepted = after_forward
        # The parameters never depend on the running statistics (train-mode BN).
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p, q)
    assert opt.retrace_count == 1


def test_retraced_first_step_restores_the_initial_stats() -> None:
    # A non-finite first loss: ELRA skips the step (LAST_RETRACED = 1).
    model = make_cnn(momentum=None)  # cumulative average: num_batches_tracked matters
    initial = stats(model)
    opt = ELRA(model.parameters())
    keeper = RetraceBuffers(model)
    forward_backward(model, 0)
    assert stats_differ(stats(model), initial)
    opt.step(torch.tensor(math.nan))
    keeper.after_step(opt)
    assert opt.last_step_retraced
    assert_stats_equal(stats(model), initial)


def test_non_finite_stats_of_a_rejected_step_are_undone_bit_for_bit() -> None:
    # Inputs of 1e30 overflow the running variance to inf (and the loss spikes): ELRA
    # retraces; where() restores the old bits (a blend would leave nan behind).
    model = make_cnn()
    opt = ELRA(model.parameters())
    keeper = RetraceBuffers(model)
    for step_index in range(3):
        opt.zero_grad()
        opt.step(forward_backward(model, step_index, spike=None))
        keeper.after_step(opt)
    accepted = stats(model)
    opt.zero_grad()
    loss = forward_backward(model, 3, spike=3, scale=1e30)
    assert not torch.isfinite(model.get_buffer("1.running_var")).all()
    opt.step(loss)
    keeper.after_step(opt)
    assert opt.last_step_retraced
    assert_stats_equal(stats(model), accepted)


def test_update_makes_no_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_cnn()
    opt = ELRA(model.parameters())
    opt.host_control = False  # the law in device tensors, as on a GPU
    keeper = RetraceBuffers(model)
    for step_index in range(SPIKE):
        opt.zero_grad()
        opt.step(forward_backward(model, step_index))
        keeper.after_step(opt)
    accepted = stats(model)
    for step_index in (SPIKE, SPIKE + 1):  # a retrace, then an accepted step
        opt.zero_grad()
        loss = forward_backward(model, step_index)
        after_forward = stats(model)
        with no_host_reads(monkeypatch):
            opt.step(loss)
            keeper.after_step(opt)
            keeper.update(opt.control_state[control.LAST_RETRACED])  # twice: idempotent
        expected = accepted if step_index == SPIKE else after_forward
        assert opt.last_step_retraced == (step_index == SPIKE)
        assert_stats_equal(stats(model), expected)


def test_flags_and_dtypes_without_an_optimizer() -> None:
    floats = torch.tensor([1.0, -2.0])
    counts = torch.tensor(7)
    mask = torch.tensor([True, False])
    keeper = RetraceBuffers([floats, counts, mask, floats])  # the duplicate is tracked once
    assert keeper.names == ["0", "1", "2"]
    assert keeper.nbytes == 2 * 4 + 8 + 2

    def scribble() -> None:
        floats.fill_(math.inf)
        counts.add_(1)
        mask.logical_not_()

    for retraced in (True, 1.0, torch.tensor(1.0, dtype=torch.float64), torch.tensor([math.nan])):
        scribble()
        keeper.update(retraced)  # nonzero (NaN too): restore
        assert torch.equal(floats, torch.tensor([1.0, -2.0]))
        assert counts.item() == 7 and mask.tolist() == [True, False]
    scribble()
    keeper.update(torch.tensor(0.0))  # accepted: remember
    scribble()
    keeper.update(False)
    assert torch.equal(floats, torch.full((2,), math.inf))
    assert counts.item() == 9 and mask.tolist() == [True, False]
    keeper.update(True)  # restores what the accepted update remembered
    assert counts.item() == 9


def test_non_contiguous_buffer() -> None:
    base = torch.arange(6.0).reshape(2, 3)
    transposed = base.t()  # a non-contiguous view: gathered by a copy, restored in place
    keeper = RetraceBuffers([transposed, torch.zeros(2)])
    base.mul_(-1)
    keeper.update(torch.tensor(1.0))
    assert torch.equal(base, torch.arange(6.0).reshape(2, 3))
    base.add_(1)
    keeper.update(torch.tensor(0.0))
    base.zero_()
    keeper.update(torch.tensor(1.0))
    assert torch.equal(base, torch.arange(1.0, 7.0).reshape(2, 3))


def test_default_tracks_running_stats_only() -> None:
    shared = torch.nn.BatchNorm1d(4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), shared, shared, torch.nn.LayerNorm(4))
    model.register_buffer("mask", torch.ones(4, 4))
    no_stats = torch.nn.BatchNorm1d(4, track_running_stats=False)
    model.append(no_stats)
    stats_names = ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert RetraceBuffers(model).names == stats_names
    assert RetraceBuffers(model, all_buffers=True).names == ["mask", *stats_names]


def test_state_dict_round_trip() -> None:
    model = make_cnn()
    opt = ELRA(model.parameters())
    keeper = RetraceBuffers(model)

    def run(model, opt, keeper, indices: range) -> None:
        for step_index in indices:
            opt.zero_grad()
            opt.step(forward_backward(model, step_index))
            keeper.after_step(opt)

    run(model, opt, keeper, range(SPIKE - 2))
    buffer = io.BytesIO()
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "keeper": keeper.state_dict()}
    torch.save(saved, buffer)
    run(model, opt, keeper, range(SPIKE - 2, SPIKE + 3))  # with the retrace at SPIKE

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = make_cnn(seed=5)
    keeper2 = RetraceBuffers(model2)  # remembers seed 5's statistics ...
    model2.load_state_dict(saved["model"])  # ... in place: same tensors, new values
    keeper2.load_state_dict(saved["keeper"])  # ... until the saved ones are loaded
    opt2 = ELRA(model2.parameters())
    opt2.load_state_dict(saved["opt"])
    run(model2, opt2, keeper2, range(SPIKE - 2, SPIKE + 3))
    assert opt2.retrace_count == opt.retrace_count == 1
    assert_stats_equal(stats(model2), stats(model))
    assert_stats_equal(keeper2.state_dict()["buffers"], keeper.state_dict()["buffers"])
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_a_mismatch() -> None:
    keeper = RetraceBuffers(make_cnn())
    good = keeper.state_dict()
    before = good["buffers"]["1.running_mean"].clone()
    with pytest.raises(ValueError, match="'buffers' entry"):
        keeper.load_state_dict({"control": good["buffers"]})
    with pytest.raises(ValueError, match=r"missing: \['4.num_batches_tracked'\]"):
        keeper.load_state_dict(
            {"buffers": {k: v for k, v in good["buffers"].items() if "4.num" not in k}}
        )
    bad_shape = {"buffers": {**good["buffers"], "1.running_var": torch.ones(3)}}
    bad_shape["buffers"]["1.running_mean"] = torch.full((8,), 5.0)
    with pytest.raises(ValueError, match="'1.running_var' has shape"):
        keeper.load_state_dict(bad_shape)
    # Validated before anything is applied: the good entry was not loaded either.
    assert torch.equal(keeper.state_dict()["buffers"]["1.running_mean"], before)


def test_replaced_buffers_raise_until_rebind() -> None:
    model = make_cnn()
    keeper = RetraceBuffers(model)
    model.double()  # new tensors in the module; the helper's are dead
    with pytest.raises(RuntimeError, match=r"'1.running_mean' was replaced.*rebind\(\)"):
        keeper.update(torch.tensor(1.0))
    keeper.rebind()
    assert keeper.state_dict()["buffers"]["1.running_mean"].dtype == torch.float64
    model.get_buffer("1.running_mean").fill_(3.0)
    keeper.update(True)
    assert (model.get_buffer("1.running_mean") == 0).all()

    model.load_state_dict(make_cnn(seed=1).double().state_dict(), assign=True)
    with pytest.raises(RuntimeError, match="was replaced"):
        keeper.update(False)

    tensor = torch.zeros(3)
    bare = RetraceBuffers(tensor)
    tensor.data = torch.zeros(4)
    with pytest.raises(RuntimeError, match="'0' got new storage.*new RetraceBuffers"):
        bare.update(False)
    with pytest.raises(ValueError, match="built from tensors"):
        bare.rebind()


@pytest.mark.parametrize(
    ("source", "kwargs", "error", "match"),
    [
        (3, {}, TypeError, "expected a torch.nn.Module, a tensor or an iterable"),
        ("buffers", {}, TypeError, "got str"),
        ([torch.zeros(2), 1.0], {}, TypeError, "element 1 is a float, not a tensor"),
        ([], {}, ValueError, "got no tensors"),
        ([torch.zeros(2)], {"all_buffers": True}, ValueError, "needs a module"),
        (torch.nn.Linear(2, 2), {}, ValueError, "Linear has no normalization layer"),
        (torch.nn.Linear(2, 2), {"all_buffers": True}, ValueError, "Linear has no buffers"),
        ([torch.nn.Parameter(torch.zeros(2))], {}, TypeError, "is a parameter"),
        (torch.nn.LazyBatchNorm1d(), {}, ValueError, "not materialized"),
        ([torch.zeros(2).to_sparse()], {}, ValueError, "only dense"),
    ],
    ids=[
        "int",
        "str",
        "non-tensor",
        "empty",
        "all_buffers-tensors",
        "no-bn",
        "no-buffers",
        "parameter",
        "lazy",
        "sparse",
    ],
)
def test_bad_source_raises(source, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        RetraceBuffers(source, **kwargs)


def test_bad_flag_raises() -> None:
    keeper = RetraceBuffers([torch.zeros(2)])
    with pytest.raises(ValueError, match="one element"):
        keeper.update(torch.zeros(2))
    with pytest.raises(TypeError, match="got str"):
        keeper.update("yes")  # type: ignore[arg-type]


@needs_cuda
def test_cuda_update_is_sync_free_and_graph_capturable() -> None:
    model = make_cnn().cuda()
    keeper = RetraceBuffers(model)
    flag = torch.zeros((), dtype=torch.float64, device="cuda")
    inputs = batch(0)[0].cuda()
    before = stats(model)
    model(inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        flag.fill_(1.0)
        keeper.update(flag)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_stats_equal(stats(model), before)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        keeper.update(flag)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keeper.update(flag)
    model(inputs)
    after_forward = stats(model)
    flag.fill_(0.0)
    graph.replay()  # accepted: remembered
    model(inputs)
    flag.fill_(1.0)
    graph.replay()  # retraced: back to after_forward
    torch.cuda.synchronize()
    assert_stats_equal(stats(model), after_forward)


def test_elra_buffers_argument_restores_on_retrace_and_checkpoints() -> None:
    """``ELRA(..., buffers=model)``: the optimizer restores the BatchNorm statistics on
    its own retraces, and its state dict carries them."""
    model = make_cnn()
    opt = ELRA(model.parameters(), buffers=model)
    accepted = stats(model)
    for step_index in range(SPIKE + 1):
        opt.zero_grad()
        opt.step(forward_backward(model, step_index))
        if step_index < SPIKE:
            accepted = stats(model)
    assert opt.last_step_retraced
    assert_stats_equal(stats(model), accepted)
    saved = opt.state_dict()
    assert set(saved["elra_control"]["buffers"]["buffers"]) == set(accepted)

    copy = make_cnn(seed=3)
    copy.load_state_dict(model.state_dict())
    opt2 = ELRA(copy.parameters(), buffers=copy)
    opt2.load_state_dict(saved)
    for m, o in ((model, opt), (copy, opt2)):
        o.zero_grad()
        o.step(forward_backward(m, SPIKE + 1, spike=SPIKE + 1))  # another retrace
    assert_stats_equal(stats(copy), stats(model))
    assert_stats_equal(stats(copy), accepted)


def test_elra_with_a_replaced_buffer_fails_before_anything_moves() -> None:
    """A step (or a load) that would fail on a replaced buffer leaves parameters, state
    and buffers exactly as they were."""
    model = make_cnn()
    opt = ELRA(model.parameters(), buffers=model)
    opt.zero_grad()
    opt.step(forward_backward(model, 0))
    saved = opt.state_dict()
    model[1].running_mean = model[1].running_mean.clone()  # replaced in its module
    opt.zero_grad()
    loss = forward_backward(model, 1)
    before = [p.detach().clone() for p in model.parameters()]
    control_before = opt.control_state.clone()
    with pytest.raises(RuntimeError, match="was replaced"):
        opt.step(loss)
    with pytest.raises(RuntimeError, match="was replaced"):
        opt.load_state_dict(saved)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert torch.equal(opt.control_state, control_before)


def test_saved_buffers_an_optimizer_without_buffers_cannot_take_are_named() -> None:
    """A state saved with ``buffers=model`` loaded into an optimizer built without it:
    the control state loads, and a warning says the saved BatchNorm statistics had
    nowhere to go (they were dropped silently)."""
    model = make_cnn()
    opt = ELRA(model.parameters(), buffers=model)
    opt.zero_grad()
    opt.step(forward_backward(model, 0))
    plain = ELRA(model.parameters())
    with pytest.warns(UserWarning, match="retrace buffers saved, none here"):
        plain.load_state_dict(opt.state_dict())
    assert torch.equal(plain.control_state, opt.control_state)
