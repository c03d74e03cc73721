"""Memory modes (paper 3.6): recover and offload make the standard mode's decisions."""

from __future__ import annotations

import pytest
import torch
from _lockstep import (
    Shadow,
    assert_nan_step_makes_no_host_sync,
    assert_round_trip,
    data,
    forward_backward,
    make_model,
    run_steps,
)

from elra_fused import ELRA, flat_layout, ops
from elra_fused.control_math import FLOAT_MATH
from elra_fused.control_runner import trusted_dot
from elra_fused.memory import PointPrevStore, SwapGradPrevStore
from elra_fused.offload import check_not_capturing

BACKEND = "cpp" if "cpp" in ops.available_backends("cpu") else "reference"
STEPS = 300
#: Offload chunk that divides neither the 129 parameters of the test model nor its layers.
ODD_CHUNK = 37


def build(model: torch.nn.Module, memory: str, **kwargs) -> ELRA:
    chunk = {"offload_chunk": ODD_CHUNK} if memory == "offload" else {}
    return ELRA(
        model.parameters(), backend=BACKEND, memory=memory, cycle_steps=25, **chunk, **kwargs
    )


@pytest.mark.parametrize("memory", ["standard", "recover", "offload"])
def test_lockstep_with_retraces_and_weight_decay(memory: str) -> None:
    model = make_model()
    inputs, target = data()
    opt = build(model, memory, wd=0.999)
    shadow = Shadow(opt)
    for step_index in range(STEPS):
        opt.zero_grad()
        shadow.step(forward_backward(model, inputs, target, step_index))
        # Point modes recover G_{t-1} = (wd x_{t-1} - x_t) / alpha from fp32 points. Right
        # after a retrace to a tiny alpha (~4e-6 here) that difference is ~1e-3 |x| (the
        # decay) plus ~1e-8 (the step): rounding of the decay term alone (~1e-11) moves
        # <G_{t-1}, G_t> by ~1e-3 relative, so alpha agrees to 1e-2 there, not 1e-5.
        point_mode = memory != "standard"
        shadow.assert_matches(
            step_index, rtol=1e-5, atol=1e-5, alpha_rtol=1e-2 if point_mode else 1e-5
        )
    assert opt.retrace_count >= 3
    assert opt.state_dict()["elra_control"]["memory"] == memory


@pytest.mark.parametrize("chunk", [1, 7, ODD_CHUNK, 128, 129, 130, 10_000])
def test_offload_matches_recover_step_by_step(chunk: int) -> None:
    """Offloading is a transport: from the same state it takes the recover mode's step.

    Only the order of the partial sums of the dots differs (per chunk), so parameters
    agree to rounding and decisions exactly. Chunk sizes below, at and above the 129
    parameters of the model, dividing it or not.
    """
    model = make_model()
    twin = make_model()
    inputs, target = data()
    recover = ELRA(model.parameters(), backend=BACKEND, memory="recover", wd=0.999)
    offload = ELRA(
        twin.parameters(), backend=BACKEND, memory="offload", wd=0.999, offload_chunk=chunk
    )
    for step_index in range(120):
        offload.load_state_dict(recover.state_dict())
        for mine, theirs in zip(twin.parameters(), model.parameters(), strict=True):
            mine.data.copy_(theirs.detach())
        recover.zero_grad()
        offload.zero_grad()
        recover.step(forward_backward(model, inputs, target, step_index))
        offload.step(forward_backward(twin, inputs, target, step_index))
        assert recover.last_step_retraced == offload.last_step_retraced, step_index
        for mine, theirs in zip(twin.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
    assert recover.retrace_count >= 2


@pytest.mark.parametrize("memory", ["recover", "offload"])
def test_param_groups_and_dtypes(memory: str) -> None:
    model = make_model()
    model[2].half()
    opt = ELRA(
        [
            {"params": list(model[0].parameters()), "wd": 0.99},
            {"params": list(model[2].parameters())},
        ],
        backend=BACKEND,
        memory=memory,
        offload_chunk=ODD_CHUNK,
    )
    dtypes = sorted(str(b.data.dtype) for b in opt.layout.buffers)
    assert dtypes == ["torch.float16", "torch.float32"]
    shadow = Shadow(opt)
    inputs, target = data()
    for step_index in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(
            model[2](model[1](model[0](inputs)).half()).float(), target
        )
        loss.backward()
        shadow.step(loss)
        # fp16 parameters round each update to 11 bits.
        shadow.assert_matches(step_index, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("memory", ["standard", "recover", "offload"])
def test_state_dict_round_trip(memory: str) -> None:
    assert_round_trip(lambda model: build(model, memory, wd=0.999))


def test_switching_between_point_modes_on_load_works() -> None:
    model = make_model()
    inputs, target = data()
    opt = build(model, "recover")
    for step_index in range(5):
        opt.zero_grad()
        opt.step(forward_backward(model, inputs, target, step_index))
    other = build(make_model(seed=2), "offload")
    other.load_state_dict(opt.state_dict())
    assert torch.equal(other.layout.stores[0].tensor, opt.layout.stores[0].tensor)


@pytest.mark.parametrize(("saved", "loading"), [("standard", "recover"), ("offload", "standard")])
def test_switching_between_gradient_and_point_modes_is_a_clear_error(
    saved: str, loading: str
) -> None:
    model = make_model()
    opt = build(model, saved)
    other = build(make_model(seed=2), loading)
    before = [p.detach().clone() for p in other.param_groups[0]["params"]]
    with pytest.raises(ValueError, match=f"saved with memory='{saved}'"):
        other.load_state_dict(opt.state_dict())
    for p, b in zip(other.param_groups[0]["params"], before, strict=True):
        assert torch.equal(p.detach(), b)


def test_bad_memory_arguments() -> None:
    params = make_model().parameters
    with pytest.raises(ValueError, match="memory must be one of"):
        ELRA(params(), memory="disk")
    with pytest.raises(ValueError, match="state_dtype applies to memory='standard'"):
        ELRA(params(), memory="recover", state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs flat buffers"):
        ELRA(params(), backend="reference", memory="recover", flat=False)
    with pytest.raises(ValueError, match="offload_chunk"):
        ELRA(params(), memory="offload", offload_chunk=0)


def test_offload_keeps_x_prev_on_the_host() -> None:
    model = make_model()
    opt = build(model, "offload")
    store = opt.layout.stores[0]
    assert store.tensor.device.type == "cpu"
    assert store.chunk == ODD_CHUNK
    assert len(store.staging) == 2 and all(s.numel() == ODD_CHUNK for s in store.staging)


def test_offload_refuses_cuda_graph_capture_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture of an offload step is refused on a CUDA device (the GPU test captures for
    real); the CPU path never asks CUDA and steps as before."""

    def capturing() -> bool:
        return True

    def never_asked() -> bool:
        raise AssertionError("the CPU path asked whether a CUDA stream captures")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", never_asked)
    check_not_capturing(torch.device("cpu"))
    model = make_model()
    opt = build(model, "offload")
    run_steps(opt, model, range(3))  # the CPU offload path: unchanged, nothing asked
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", capturing)
    with pytest.raises(RuntimeError, match=r"offload.*cannot be captured.*recover"):
        check_not_capturing(torch.device("cuda"))
    # The optimizer refuses before anything moves (a CUDA device faked on a CPU model:
    # the layout's check sees its buffers on "cuda").
    params = [p.detach().clone() for p in model.parameters()]
    state = opt.control_state.clone()
    x_prev = opt.layout.stores[0].tensor.clone()
    monkeypatch.setattr(
        flat_layout, "check_not_capturing", lambda device: check_not_capturing(torch.device("cuda"))
    )
    opt.zero_grad()
    inputs, target = data()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        opt.step(forward_backward(model, inputs, target, 3))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert torch.equal(opt.control_state, state)
    assert torch.equal(opt.layout.stores[0].tensor, x_prev)


@pytest.mark.parametrize("memory", ["recover", "offload"])
def test_point_modes_make_no_host_sync(memory: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    assert_nan_step_makes_no_host_sync(build(model, memory), model, monkeypatch)


@pytest.mark.parametrize("flat", [True, False])
def test_bf16_state_lockstep_and_storage(flat: bool) -> None:
    """G_{t-1} stored in bfloat16: 2 bytes/param, and each step is exact given that state."""
    model = make_model()
    inputs, target = data()
    opt = build(model, "standard", state_dtype=torch.bfloat16, wd=0.999, flat=flat)
    shadow = Shadow(opt)
    for step_index in range(STEPS):
        opt.zero_grad()
        shadow.step(forward_backward(model, inputs, target, step_index))
        shadow.assert_matches(step_index)
    assert opt.retrace_count >= 3
    assert all(opt.state[p]["grad_prev"].dtype == torch.bfloat16 for p in model.parameters())
    stored = opt.state_dict()["state"][0]["grad_prev"]
    assert stored.dtype == torch.bfloat16
    if flat:
        assert opt.layout.stores[0].tensor.dtype == torch.bfloat16


def test_bf16_state_in_the_reference_layout() -> None:
    model = make_model()
    inputs, target = data()
    opt = ELRA(model.parameters(), backend="reference", state_dtype=torch.bfloat16)
    for step_index in range(5):
        opt.zero_grad()
        opt.step(forward_backward(model, inputs, target, step_index))
    assert all(opt.state[p]["grad_prev"].dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("zero", ["opt", "model_none", "model_in_place"])
def test_reused_grad_buffer_gives_bit_identical_steps(zero: str) -> None:
    """Swapping buffers instead of copying G_t changes no bit, however grads are zeroed."""
    results = []
    for reuse in (False, True):
        model = make_model()
        opt = ELRA(
            model.parameters(),
            backend=BACKEND,
            flat=True,
            wd=0.999,
            cycle_steps=25,
            reuse_grad_buffer=reuse,
        )
        decisions = run_steps(opt, model, range(STEPS), zero)
        results.append((decisions, torch.cat([p.detach().reshape(-1) for p in model.parameters()])))
    assert results[0][0] == results[1][0]
    assert sum(results[0][0]) >= 3
    assert torch.equal(results[0][1], results[1][1])


def test_reused_grad_buffer_lockstep_and_round_trip() -> None:
    model = make_model()
    inputs, target = data()
    opt = build(model, "standard", wd=0.999, reuse_grad_buffer=True)
    assert isinstance(opt.layout.stores[0], SwapGradPrevStore)
    shadow = Shadow(opt)
    for step_index in range(60):
        opt.zero_grad()
        shadow.step(forward_backward(model, inputs, target, step_index))
        shadow.assert_matches(step_index)
    assert_round_trip(lambda m: build(m, "standard", wd=0.999, reuse_grad_buffer=True))


def test_reused_grad_buffer_state_dict_after_load_and_steps() -> None:
    """After load_state_dict the swapping store re-points the loaded state entries: a
    state_dict taken steps later holds the real G_{t-1}, as without the swap."""
    saved = []
    for reuse in (False, True):
        model = make_model()
        opt = build(model, "standard", flat=True, reuse_grad_buffer=reuse)
        run_steps(opt, model, range(6))
        opt.load_state_dict(opt.state_dict())
        run_steps(opt, model, range(6, 9))
        opt.zero_grad()
        saved.append([opt.state_dict()["state"][i]["grad_prev"] for i in range(4)])
    assert any(bool(t.abs().sum() > 0) for t in saved[0])
    for plain, swapped in zip(*saved, strict=True):
        assert torch.equal(plain, swapped)


def test_reused_grad_buffer_needs_standard_flat_mode() -> None:
    with pytest.raises(ValueError, match="reuse_grad_buffer"):
        ELRA(make_model().parameters(), memory="recover", reuse_grad_buffer=True)
    with pytest.raises(ValueError, match="reuse_grad_buffer"):
        ELRA(make_model().parameters(), flat=False, reuse_grad_buffer=True)
    assert ELRA(make_model().parameters(), reuse_grad_buffer=True).flat  # the default layout
    # A bf16 G_{t-1} cannot trade places with an fp32 gradient: copying store instead.
    opt = ELRA(make_model().parameters(), state_dtype=torch.bfloat16, reuse_grad_buffer=True)
    assert not isinstance(opt.layout.stores[0], SwapGradPrevStore)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recovered_dot_error_is_within_its_estimate(dtype: torch.dtype) -> None:
    """The issue's case: |x| ~ 0.05, |G| ~ 1e-3 per element. As alpha shrinks the
    recovered <G_{t-1}, G_t> loses its digits (x_t rounds the step away); the store's
    bound covers the error, and the trusted dot never claims more than the exact one
    (same sign or 0, not larger), while at steps well above x's resolution it is the
    exact one within 1%."""
    n = 1 << 18
    gen = torch.Generator().manual_seed(3)
    x_prev = (0.05 * torch.randn(n, generator=gen)).to(dtype)
    grad_prev = (1e-3 * torch.randn(n, generator=gen)).to(dtype)
    grad = (0.3 * grad_prev.double() + 1e-3 * torch.randn(n, generator=gen)).to(dtype)
    exact = torch.dot(grad_prev.double(), grad.double()).item()
    kernels = ops.get_kernels(BACKEND, "cpu")
    store = PointPrevStore(x_prev)
    for alpha in (1e-1, 1e-3, 1e-5, 1e-6, 1e-7):
        x = (x_prev.double() - alpha * grad_prev.double()).to(dtype)
        coeffs = store.dots_coeffs(1.0, alpha, torch.device("cpu"))
        grad_sq, recovered, bound = store.dots(kernels, x, grad, coeffs).tolist()
        assert abs(recovered - exact) <= bound, (alpha, recovered, exact, bound)
        trusted = trusted_dot(recovered, bound, FLOAT_MATH)
        assert 0.0 <= trusted <= exact, (alpha, trusted, exact)
        if alpha == 1e-1 and dtype == torch.float32:
            assert trusted == pytest.approx(exact, rel=1e-2)
    assert trusted == 0.0, "at alpha 1e-7 the steps are below x's resolution"


@pytest.mark.parametrize("memory", ["recover", "offload"])
def test_point_modes_take_a_warm_up_from_lr_zero(memory: str) -> None:
    """A schedule that starts at lr = 0 (linear warm-up): the point stores recover G_{t-1}
    from x_t - wd x_{t-1}, which a step of 0 leaves 0, so they take G_{t-1} = 0 then
    (it divided by the step taken: ZeroDivisionError on the host law, NaN weights on
    the device law). The lr = 0 step moves nothing, every weight stays finite, the loss
    falls, and the host and device laws agree bit for bit."""
    runs = []
    for host in (True, False):
        model = make_model()
        opt = build(model, memory, wd=0.999)
        opt.host_control = host
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 4))
        inputs, target = data()
        start = [p.detach().clone() for p in model.parameters()]
        losses = []
        for step_index in range(30):
            opt.zero_grad()
            loss = forward_backward(model, inputs, target, step_index)
            opt.step(loss)
            if step_index == 0:  # lr = 0: no move (an accept at lr 0 still decays by wd)
                assert all(
                    torch.equal(p.detach(), (0.999 * s).to(s.dtype))
                    for p, s in zip(model.parameters(), start, strict=True)
                )
            schedule.step()
            losses.append(float(loss.detach()))
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert losses[-1] < 0.5 * losses[1]
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("memory", ["recover", "offload"])
def test_a_parameter_unfrozen_later_joins_point_modes_without_a_false_grad_prev(
    memory: str,
) -> None:
    """wd != 1: a parameter frozen at construction and unfrozen mid-run joins a point
    store with x_{t-1} = x / wd, so the G_{t-1} recovered for it is 0 (as the standard
    mode's fresh G_{t-1}); x_{t-1} = x read as the decay, (wd - 1) x / alpha, and pulled
    alpha far below the standard mode's."""
    gen = torch.Generator().manual_seed(0)
    inputs, target = torch.randn(32, 4, generator=gen), torch.randn(32, 2, generator=gen)
    alphas = {}
    for mode in ("standard", memory):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        frozen = model[0].weight
        frozen.requires_grad_(False)
        opt = ELRA(model.parameters(), backend=BACKEND, memory=mode, wd=0.9, flat=True)
        for step_index in range(4):
            if step_index == 3:
                frozen.requires_grad_(True)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), target)
            loss.backward()
            opt.step(loss)
        alphas[mode] = opt.alpha
    assert alphas[memory] == pytest.approx(alphas["standard"], rel=1e-3)


@pytest.mark.parametrize("memory", ["recover", "offload"])
def test_a_loaded_state_without_an_entry_gives_a_zero_recovered_grad_prev(memory: str) -> None:
    """A state dict without the x_{t-1} of a parameter (saved before it was trained):
    the point store takes x / wd for it, as for a parameter without gradient, so the
    G_{t-1} recovered for it is 0, not the decay (wd - 1) x / alpha."""
    model = make_model()
    opt = build(model, memory, wd=0.9)
    run_steps(opt, model, range(3))
    saved = opt.state_dict()
    first = next(iter(saved["state"]))
    del saved["state"][first]
    fresh = build(model, memory, wd=0.9)
    fresh.load_state_dict(saved)
    param = next(model.parameters())
    expected = (param.detach().double() / 0.9).to(param.dtype)
    assert torch.equal(fresh.state_dict()["state"][first]["x_prev"], expected)
