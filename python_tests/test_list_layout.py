"""The per-parameter layout (elra_fused.list_layout): G_{t-1} kept by reference (the
gradient tensor itself, copied where it is a view into a shared buffer, refused when
changed in place), the one-call check of the common step (ListLayout._gather_plain),
and sharded (DTensor) models stepped through their local shards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from _backends import fused_backends
from _lockstep import (
    NAN_GRAD,
    Shadow,
    data,
    forward_backward,
    free_port,
    make_model,
    run_steps,
)

from elra_fused import ELRA
from elra_fused.list_layout import ListLayout

BACKENDS = fused_backends()


# ---------------------------------------------------------------------------------------
# Per-parameter layout: G_{t-1} kept by reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_keep_the_gradient_as_grad_prev(backend: str) -> None:
    """After a step each G_{t-1} is the gradient tensor autograd made: no copy, no buffer."""
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend=backend, flat=False, cycle_steps=25)
    for step_index in (0, 1, NAN_GRAD):  # accepts, then a retrace
        opt.zero_grad()
        loss = forward_backward(model, inputs, target, step_index)
        grads = [p.grad for p in model.parameters()]
        opt.step(loss)
        params = list(model.parameters())
        assert all(opt.state[p]["grad_prev"] is g for p, g in zip(params, grads, strict=True))
    assert opt.last_step_retraced
    # The retrace copied G_{t-1} back over the rejected (NaN) gradient.
    assert all(torch.isfinite(opt.state[p]["grad_prev"]).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_copy_gradients_that_are_views_into_a_shared_buffer(backend: str) -> None:
    """DDP with gradient_as_bucket_view=True makes each .grad a view into its bucket and
    rewrites the bucket in place in the next backward. Such a G_t is copied into ELRA's
    own G_{t-1} instead of kept by reference: the run equals one with ordinary gradients,
    retraces and the NaN gradient included."""
    inputs, target = data()
    runs = []
    for as_views in (False, True):
        model = make_model()
        params = list(model.parameters())
        opt = ELRA(params, backend=backend, flat=False, cycle_steps=25)
        bucket = torch.zeros(sum(p.numel() for p in params))  # reused every step
        decisions = []
        for step_index in range(130):
            opt.zero_grad()
            loss = forward_backward(model, inputs, target, step_index)
            if as_views:
                offset = 0
                for p in params:
                    view = bucket[offset : offset + p.numel()].view_as(p)
                    view.copy_(p.grad)
                    p.grad = view
                    offset += p.numel()
            opt.step(loss)
            decisions.append(opt.last_step_retraced)
            assert all(opt.state[p]["grad_prev"]._base is None for p in params)
        runs.append((decisions, [p.detach().clone() for p in params]))
    (d_plain, p_plain), (d_views, p_views) = runs
    assert d_plain == d_views and sum(d_plain) >= 2
    assert all(torch.equal(a, b) for a, b in zip(p_plain, p_views, strict=True))


@pytest.mark.parametrize("change", ["model_zero_grad_in_place", "backward_without_zero_grad"])
def test_lists_refuse_a_grad_prev_changed_in_place(change: str) -> None:
    """The tensor kept as G_{t-1} was written after the step: a clear error, nothing changed."""
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend=BACKENDS[0], flat=False)
    opt.zero_grad()
    opt.step(forward_backward(model, inputs, target, 0))
    if change == "model_zero_grad_in_place":
        model.zero_grad(set_to_none=False)
    loss = forward_backward(model, inputs, target, 1)  # accumulates into G_{t-1}
    before = [p.detach().clone() for p in model.parameters()]
    state_before = opt.control_state.clone()
    with pytest.raises(RuntimeError, match="modified in place.*flat=True"):
        opt.step(loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert torch.equal(opt.control_state, state_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lists_zero_grad_without_none_and_repeated_steps(backend: str) -> None:
    """opt.zero_grad(set_to_none=False) (new zero tensors, G_{t-1} untouched) and a second
    step on the same gradient (G_t = G_{t-1}, held apart by one copy): lock step with
    the float64 reference."""
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend=backend, flat=False, cycle_steps=10)
    shadow = Shadow(opt)
    for step_index in range(40):
        opt.zero_grad(set_to_none=False)
        if step_index > 0:
            assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        loss = forward_backward(model, inputs, target, step_index)
        shadow.step(loss)
        shadow.assert_matches(step_index)
        if step_index % 7 == 3:  # no backward in between
            shadow.step(loss)
            shadow.assert_matches(step_index)


def test_lists_follow_a_model_moved_after_construction() -> None:
    """No buffer to fall out of: a parameter cast after the optimizer was built still
    trains (reference backend) or gets a clear dtype error (fused backends)."""
    inputs, target = data()

    def cast_and_backward(model: torch.nn.Module) -> torch.Tensor:
        model.double()
        loss = torch.nn.functional.mse_loss(model(inputs.double()), target.double())
        loss.backward()
        return loss

    model = make_model()
    opt = ELRA(model.parameters(), backend="reference", flat=False)
    loss = cast_and_backward(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(loss)
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    if BACKENDS[0] == "reference":
        return
    model = make_model()
    opt = ELRA(model.parameters(), backend=BACKENDS[0], flat=False)
    loss = cast_and_backward(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="float64"):
        opt.step(loss)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# ---------------------------------------------------------------------------------------
# Per-parameter layout: the one-call check of the common case (ListLayout._gather_plain)
# ---------------------------------------------------------------------------------------
def _gather_both(opt: ELRA, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """The layout's work for the current gradients from the one-call check and from the
    full loop alone (None where the one-call check declines)."""
    layout = opt.layout
    plain = layout._gather_plain(opt.param_groups, opt.state)
    monkeypatch.setattr(type(layout), "_gather_plain", lambda self, groups, state: None)
    full = layout.gather(opt.param_groups, opt.state)
    monkeypatch.undo()
    return plain, full


def _same_work(a, b) -> bool:
    """Same segments (wd, device, weight, by_reference) holding the same tensors."""

    def ids(ts: list) -> list[int]:
        return [id(t) for t in ts]

    if len(a.segments) != len(b.segments) or len(a.skipped) != len(b.skipped):
        return False
    for (pa, ga), (pb, gb) in zip(a.skipped, b.skipped, strict=True):
        if pa is not pb or ga is not gb:
            return False
    for sa, sb in zip(a.segments, b.segments, strict=True):
        if (sa.wd, sa.device, sa.weight) != (sb.wd, sb.device, sb.weight):
            return False
        ta, tb = sa.store, sb.store
        for name in ("xs", "grads", "prevs", "params", "grad_tensors", "param_states"):
            if ids(getattr(ta, name)) != ids(getattr(tb, name)):
                return False
        if ta.by_reference != tb.by_reference:
            return False
    return True


class _Tagged(torch.Tensor):
    """A tensor subclass (its metadata could differ in Python from C++)."""


PLAIN_CASES = {
    # three groups, two of them sharing a wd (one segment, as the loop merges them)
    "groups": dict(groups=[(0.9, [0]), (1.0, [1, 2]), (0.9, [3])]),
    "frozen": dict(frozen=[0, 1]),
    # a parameter that had gradients and has none in this step: listed for finish
    "unused parameter": dict(unused=[1]),
    # a first group without gradients creates no segment: the loop's order is (1.0, 0.9)
    "frozen group first": dict(groups=[(0.9, [0]), (1.0, [1, 2]), (0.9, [3])], frozen=[0]),
    "compact state": dict(state_dtype=torch.bfloat16),
    "view gradients": dict(view_grads=True),
    # an empty parameter (an FSDP2 rank's empty local shard looks the same): null address
    "zero-size parameter": dict(empty=True),
}


@pytest.mark.parametrize("case", list(PLAIN_CASES))
def test_the_one_call_check_gathers_what_the_full_loop_gathers(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain steps (groups with shared wd, frozen and unused parameters, a compact G_{t-1},
    gradients that are views into one buffer): the one-call check takes them, and its work is the
    full loop's, tensor for tensor; the run goes on as before."""
    spec = PLAIN_CASES[case]
    if BACKENDS[0] == "reference":
        pytest.skip("the one-call check is part of the C++ extension")
    model = make_model()
    if spec.get("empty"):
        model.register_parameter("empty", torch.nn.Parameter(torch.zeros(0)))
    params = list(model.parameters())
    for i in spec.get("frozen", []):
        params[i].requires_grad_(False)
    groups = [
        {"params": [params[i] for i in idx], "wd": wd} for wd, idx in spec.get("groups", [])
    ] or [{"params": params}]
    opt = ELRA(groups, backend=BACKENDS[0], flat=False, state_dtype=spec.get("state_dtype"))
    run_steps(opt, model, range(3))
    opt.zero_grad()
    forward_backward(model, *data(), 3)
    for i in spec.get("unused", []):
        params[i].grad = None
    if spec.get("empty"):
        model.empty.grad = torch.zeros(0)
    if spec.get("view_grads"):
        trainable = [p for p in params if p.grad is not None]
        buffer = torch.cat([p.grad.reshape(-1) for p in trainable])
        offset = 0
        for p in trainable:
            p.grad = buffer[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
    plain, full = _gather_both(opt, monkeypatch)
    assert plain is not None and _same_work(plain, full)
    assert len(plain.skipped) == len(spec.get("unused", []))
    if spec.get("view_grads") or spec.get("state_dtype"):
        assert not plain.segments[0].store.by_reference


@pytest.mark.parametrize(
    "change",
    [
        "non-contiguous parameter",
        "transposed gradient",
        "no backward",
        "grad_prev changed",
        "fresh parameter",
        "tensor subclass",
    ],
)
def test_the_one_call_check_declines_what_needs_the_full_loop(
    change: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each case the full loop must handle itself (a parameter or a gradient in another
    memory order, a second step without backward, a changed G_{t-1}, a parameter without
    G_{t-1}, a tensor subclass) makes the one-call check decline, so the loop's fix-up or
    error still happens."""
    if BACKENDS[0] == "reference":
        pytest.skip("the one-call check is part of the C++ extension")
    model = make_model()
    params = list(model.parameters())
    opt = ELRA(model.parameters(), backend=BACKENDS[0], flat=False)
    run_steps(opt, model, range(2))
    opt.zero_grad()
    forward_backward(model, *data(), 2)
    target = params[1]
    if change == "non-contiguous parameter":
        params[0].data = params[0].data.t().contiguous().t()
    elif change == "transposed gradient":
        params[0].grad = params[0].grad.t().contiguous().t()
    elif change == "no backward":
        target.grad = opt.state[target]["grad_prev"]
    elif change == "grad_prev changed":
        opt.state[target]["grad_prev"].mul_(2.0)
    elif change == "fresh parameter":
        del opt.state[target]["grad_prev"]
    elif change == "tensor subclass":
        target.grad = target.grad.as_subclass(_Tagged)
    assert opt.layout._gather_plain(opt.param_groups, opt.state) is None


# Sharded (FSDP2) models: every parameter a DTensor, checked on its local shards
@pytest.fixture
def one_rank_mesh() -> Iterator[object]:
    """A 1-rank gloo process group and a CPU device mesh over it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _sharded_steps(mesh: object, steps: int, state_dtype: torch.dtype | None = None) -> tuple:
    """An optimizer over DTensor parameters in two groups (two wd), stepped ``steps``
    times on DTensor gradients, then given the next step's gradients."""
    try:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import Replicate, Shard, distribute_tensor
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 3), (6,), (4, 5), (5,)]
    placements = [[Shard(0)], [Replicate()], [Shard(0)], [Replicate()]]
    params = [
        torch.nn.Parameter(distribute_tensor(torch.randn(shape, generator=gen), mesh, place))
        for shape, place in zip(shapes, placements, strict=True)
    ]
    groups = [{"params": params[:2], "wd": 0.9}, {"params": params[2:]}]
    opt = ELRA(groups, backend=BACKENDS[0], flat=False, state_dtype=state_dtype)

    def give_grads() -> None:
        for param, place in zip(params, placements, strict=True):
            grad = torch.randn(param.shape, generator=gen)
            param.grad = distribute_tensor(grad, mesh, place)

    for step in range(steps):
        opt.zero_grad()
        give_grads()
        opt.step(1.0 / (step + 1))
    opt.zero_grad()
    give_grads()
    return opt, params


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["swap", "compact"])
def test_the_one_call_check_takes_a_sharded_model_on_its_local_shards(
    one_rank_mesh: object, monkeypatch: pytest.MonkeyPatch, state_dtype: torch.dtype | None
) -> None:
    """Every parameter a DTensor (FSDP2): the one-call check runs on the local shards and
    gathers the full loop's work, tensor for tensor (the DTensors as state keys, their
    local shards for the kernels), with a parameter skipped; the steps go on."""
    if BACKENDS[0] == "reference":
        pytest.skip("the one-call check is part of the C++ extension")
    opt, params = _sharded_steps(one_rank_mesh, 3, state_dtype)
    params[1].grad = None
    plain, full = _gather_both(opt, monkeypatch)
    assert plain is not None and _same_work(plain, full)
    assert [seg.wd for seg in plain.segments] == [0.9, 1.0]
    assert len(plain.skipped) == 1
    assert plain.segments[0].store.xs[0] is params[0]._local_tensor
    assert plain.segments[0].store.params[0] is params[0]
    assert plain.segments[0].store.by_reference == (state_dtype is None)
    opt.step(0.1)


def test_a_sharded_model_and_its_loop_step_alike(one_rank_mesh: object) -> None:
    """The same sharded run with the one-call check and with the full loop alone ends
    with the same bits in every parameter and G_{t-1}."""
    if BACKENDS[0] == "reference":
        pytest.skip("the one-call check is part of the C++ extension")
    results = []
    for loop_only in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            if loop_only:
                patch.setattr(ListLayout, "_gather_plain", lambda self, groups, state: None)
            opt, params = _sharded_steps(one_rank_mesh, 5)
            opt.step(0.05)
        results.append(
            [p.to_local().clone() for p in params]
            + [opt.state[p]["grad_prev"].to_local().clone() for p in params]
        )
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("change", ["grad_prev changed", "plain gradient", "plain parameter"])
def test_the_one_call_check_declines_a_sharded_model_that_needs_the_loop(
    one_rank_mesh: object, change: str
) -> None:
    """A G_{t-1} DTensor changed in place since the last step, a plain gradient on a
    DTensor parameter, or a plain parameter beside DTensors: the full loop runs (and, for
    the changed G_{t-1}, raises its error before anything moves)."""
    if BACKENDS[0] == "reference":
        pytest.skip("the one-call check is part of the C++ extension")
    opt, params = _sharded_steps(one_rank_mesh, 2)
    if change == "grad_prev changed":
        opt.state[params[0]]["grad_prev"].mul_(2.0)
    elif change == "plain gradient":
        params[0].grad = params[0].grad.full_tensor()
    else:
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3))]})
    assert opt.layout._gather_plain(opt.param_groups, opt.state) is None
    if change == "grad_prev changed":
        before = [p.to_local().clone() for p in params]
        with pytest.raises(RuntimeError, match="modified in place"):
            opt.step(0.1)
        assert all(torch.equal(p.to_local(), b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("alias", ["itself", "view"])
def test_a_gradient_in_the_parameters_own_memory_is_copied(alias: str) -> None:
    """``w.grad = w.detach()`` (or a view of it) gives the update a G_t that its own
    write of x would change: the layout copies it first -- the one-call check declines,
    the loop copies -- and the step equals the one with a copied gradient (it was a
    kernel's "x and grad share memory" after the law ran)."""
    results = []
    for share in (True, False):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 3))
        opt = ELRA([weight], backend=BACKENDS[0], flat=False)
        for step_index in range(3):
            grad = weight.detach() if alias == "itself" else weight.detach().view(3, 4).t().t()
            grad = grad.view(4, 3)
            weight.grad = grad if share else grad.clone()
            opt.step(1.0 / (step_index + 1))
        results.append(weight.detach().clone())
    assert torch.equal(results[0], results[1])
