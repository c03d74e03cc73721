"""The two layouts (elra_fused.layouts): per-parameter tensor lists with G_{t-1} kept by
reference, and flat buffers; what each does with zero_grad, missing gradients, moved
parameters, groups and a state dict saved by the other."""

from __future__ import annotations

import io
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
from elra_fused.flat import ParameterMovedError
from elra_fused.layouts import ListLayout

BACKENDS = fused_backends()


@pytest.mark.parametrize("saved_flat", [True, False], ids=["flat_to_lists", "lists_to_flat"])
def test_state_dict_moves_between_layouts(saved_flat: bool) -> None:
    """A state saved in one layout loads into the other and continues the same run (up to
    the summation order of the dots, which differs between the layouts)."""
    model = make_model()
    opt = ELRA(model.parameters(), backend=BACKENDS[0], flat=saved_flat, cycle_steps=6)
    run_steps(opt, model, range(8))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    model2 = make_model(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = ELRA(model2.parameters(), backend=BACKENDS[0], flat=not saved_flat, cycle_steps=6)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    pairs = list(zip(model.parameters(), model2.parameters(), strict=True))
    assert all(torch.equal(opt.state[p]["grad_prev"], opt2.state[q]["grad_prev"]) for p, q in pairs)
    assert run_steps(opt, model, range(8, 12)) == run_steps(opt2, model2, range(8, 12))
    for p, q in pairs:
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert opt2.alpha == pytest.approx(opt.alpha, rel=1e-5)


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


def test_flat_zero_grad_keeps_buffer_views() -> None:
    model = make_model()
    opt = ELRA(model.parameters(), backend="reference", flat=True)
    inputs, target = data()
    forward_backward(model, inputs, target, 0)
    opt.zero_grad()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.abs().sum() == 0 for g in grads)
    forward_backward(model, inputs, target, 0)
    assert all(g.abs().sum() > 0 for g in grads)  # autograd accumulated into the views


def test_set_to_none_grads_give_the_same_step() -> None:
    results = []
    for set_to_none in (False, True):
        model = make_model()
        inputs, target = data()
        opt = ELRA(model.parameters(), backend="reference", flat=True)
        for step_index in range(5):
            if set_to_none:
                model.zero_grad(set_to_none=True)
            else:
                opt.zero_grad()
            opt.step(forward_backward(model, inputs, target, step_index))
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_flat_skips_params_without_grad_even_with_weight_decay() -> None:
    model = make_model()
    extra = torch.nn.Parameter(torch.ones(4))
    opt = ELRA([*model.parameters(), extra], backend="reference", flat=True, wd=0.5)
    inputs, target = data()
    for step_index in range(4):
        model.zero_grad(set_to_none=True)
        extra.grad = None
        opt.step(forward_backward(model, inputs, target, step_index))
    assert torch.equal(extra.detach(), torch.ones(4))


def test_param_groups_frozen_params_and_group_wd_in_flat_mode() -> None:
    model = make_model()
    model[2].bias.requires_grad_(False)
    frozen_before = model[2].bias.detach().clone()
    opt = ELRA(
        [
            {"params": list(model[0].parameters()), "wd": 0.9},
            {"params": list(model[2].parameters())},
        ],
        backend="reference",
        flat=True,
    )
    reference_model = make_model()
    reference_model[2].bias.requires_grad_(False)
    reference = ELRA(
        [
            {"params": list(reference_model[0].parameters()), "wd": 0.9},
            {"params": list(reference_model[2].parameters())},
        ],
        backend="reference",
    )
    inputs, target = data()
    for step_index in range(10):
        opt.zero_grad()
        reference.zero_grad()
        opt.step(forward_backward(model, inputs, target, step_index))
        reference.step(forward_backward(reference_model, inputs, target, step_index))
    for p, r in zip(model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    assert torch.equal(model[2].bias.detach(), frozen_before)


def test_moved_model_raises_and_keeps_weights() -> None:
    model = make_model()
    opt = ELRA(model.parameters(), backend="reference", flat=True)
    inputs, target = data()
    model.double()
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.mse_loss(model(inputs.double()), target.double())
    loss.backward()
    with pytest.raises(ParameterMovedError, match="moved or re-allocated"):
        opt.step(loss)
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
def test_param_group_added_later(flat: bool) -> None:
    """A group added after construction gets its own flat buffer, or joins the lists."""
    model = make_model()
    opt = ELRA(list(model[0].parameters()), backend=BACKENDS[0], flat=flat)
    opt.add_param_group({"params": list(model[2].parameters()), "wd": 0.5})
    before = model[2].weight.detach().clone()
    inputs, target = data()
    opt.zero_grad()
    opt.step(forward_backward(model, inputs, target, 0))
    # first step: x_1 = wd x_0 - alpha_0 G_0 with wd = 0.5 for the added group
    expected = 0.5 * before - opt.alpha * model[2].weight.grad
    torch.testing.assert_close(model[2].weight.detach(), expected, rtol=1e-6, atol=1e-7)
    if opt.backend != "reference":
        bad = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        with pytest.raises(ValueError, match="does not support"):
            opt.add_param_group({"params": [bad]})
        assert len(opt.param_groups) == 2


# Every layout and memory mode the matrices below run in.
LAYOUTS = {
    "lists": {"flat": False},
    "flat": {"flat": True},
    "recover": {"memory": "recover"},
    "offload": {"memory": "offload", "offload_chunk": 37},
}


def _conv_net(seed: int = 0, channels_last: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3), torch.nn.Tanh(), torch.nn.Conv2d(6, 2, 3), torch.nn.Flatten()
    )
    return net.to(memory_format=torch.channels_last) if channels_last else net


def _conv_steps(net: torch.nn.Module, opt: ELRA, steps: int) -> None:
    gen = torch.Generator().manual_seed(11)
    for _ in range(steps):
        inputs = torch.randn(4, 3, 7, 7, generator=gen)
        if next(net.parameters()).is_contiguous(memory_format=torch.channels_last):
            inputs = inputs.to(memory_format=torch.channels_last)
        opt.zero_grad()
        loss = net(inputs).square().mean()
        loss.backward()
        opt.step(loss)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_tensor_listed_twice_is_an_error_at_construction(layout: str) -> None:
    """torch only warns; stepping it twice (lists) or aliasing it in a buffer (flat) would
    be wrong, so ELRA refuses, naming both places."""
    model = make_model()
    params = list(model.parameters())
    with pytest.raises(
        ValueError, match="parameter 4 of param group 0.*same tensor as parameter 0"
    ):
        ELRA([*params, params[0]], backend=BACKENDS[0], **LAYOUTS[layout])
    opt = ELRA(params, backend=BACKENDS[0], **LAYOUTS[layout])
    with pytest.raises(ValueError, match="same tensor"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))] * 2})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_element_parameters_change_nothing(layout: str) -> None:
    """An empty parameter (a zero-width layer) is stepped like the others -- nothing to
    do -- and the rest trains exactly as without it."""
    model, twin = make_model(), make_model()
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    opt = ELRA([empty, *model.parameters()], backend=BACKENDS[0], **LAYOUTS[layout])
    opt_twin = ELRA(twin.parameters(), backend=BACKENDS[0], **LAYOUTS[layout])
    inputs, target = data()
    for _ in range(12):
        for net, optimizer, with_empty in ((model, opt, True), (twin, opt_twin, False)):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(net(inputs), target)
            (loss + empty.sum() if with_empty else loss).backward()
            optimizer.step(loss)
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_parameter_unfrozen_later_is_trained_like_the_reference(layout: str) -> None:
    """Fine-tuning unfreezes a frozen layer after the optimizer was built: it trains from
    the next step on, in every layout, as the reference optimizer trains it."""
    model, twin = make_model(), make_model()
    for net in (model, twin):
        net[0].requires_grad_(False)
    opt = ELRA(model.parameters(), backend=BACKENDS[0], cycle_steps=6, **LAYOUTS[layout])
    reference = ELRA(twin.parameters(), backend="reference", flat=False, cycle_steps=6)
    inputs, target = data()
    frozen = model[0].weight.detach().clone()
    for step_index in range(16):
        if step_index == 5:
            for net in (model, twin):
                net[0].requires_grad_(True)
        for net, optimizer in ((model, opt), (twin, reference)):
            optimizer.zero_grad()
            optimizer.step(forward_backward(net, inputs, target, step_index))
        assert opt.last_step_retraced == reference.last_step_retraced, step_index
    assert not torch.equal(model[0].weight, frozen)
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_channels_last_weights_keep_their_format_and_train_like_contiguous_ones(
    layout: str,
) -> None:
    net = _conv_net(channels_last=True)
    twin = _conv_net()
    opt = ELRA(net.parameters(), backend=BACKENDS[0], **LAYOUTS[layout])
    opt_twin = ELRA(twin.parameters(), backend=BACKENDS[0], **LAYOUTS[layout])
    weights = [net[0].weight, net[2].weight]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    _conv_steps(net, opt, 10)
    _conv_steps(twin, opt_twin, 10)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    for mine, theirs in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    # A reloaded state (the loader's tensors are contiguous) steps the same way.
    opt2 = ELRA(net.parameters(), backend=BACKENDS[0], **LAYOUTS[layout])
    opt2.load_state_dict(opt.state_dict())
    _conv_steps(net, opt2, 3)
    _conv_steps(twin, opt_twin, 3)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    for mine, theirs in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# A parameter without gradient in a step: one meaning in every layout and memory mode
# ---------------------------------------------------------------------------------------
#: The layouts and memory modes of the matrix (constructor arguments).
UNUSED_LAYOUTS = {
    "lists": {"flat": False},
    "flat": {"flat": True},
    "flat_reuse": {"flat": True, "reuse_grad_buffer": True},
    "recover": {"memory": "recover"},
    "offload": {"memory": "offload", "offload_chunk": 37},
}
#: How the gradients are zeroed before each backward.
ZERO_VARIANTS = ("opt", "opt_keep", "model_none", "model_keep")
#: Whether each variant leaves an unused parameter's gradient None (torch's meaning).
ZERO_GIVES_NONE = {"opt": True, "opt_keep": False, "model_none": True, "model_keep": False}
#: Loss spikes (retraces): right after two steps without the second head, and one step
#: after a step with it (the retrace undoes its last step while it has no gradient).
UNUSED_SPIKES = (20, 31)


class _TwoHeads(torch.nn.Module):
    """A trunk with two heads; the second is used only every third step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.trunk = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 1)
        self.second = torch.nn.Linear(8, 1)

    def forward(self, inputs: torch.Tensor, step_index: int) -> torch.Tensor:
        hidden = torch.tanh(self.trunk(inputs))
        out = self.head(hidden)
        return out + self.second(hidden) if step_index % 3 == 0 else out


def _zero(variant: str, opt: ELRA, model: torch.nn.Module) -> None:
    if variant.startswith("opt"):
        opt.zero_grad(set_to_none=variant == "opt")
    else:
        model.zero_grad(set_to_none=variant == "model_none")


class _GradsBack:
    """``opt`` for :class:`Shadow`, whose ``step`` first gives back the ``.grad`` views
    the test hid from the shadow (see :func:`_two_heads_lockstep`)."""

    def __init__(self, opt: ELRA) -> None:
        self._opt = opt
        self.hidden: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._opt, name)

    def step(self, loss: torch.Tensor) -> None:
        for param, grad in self.hidden:
            param.grad = grad  # the same view: the flat layout still sees it untouched
        self.hidden = []
        self._opt.step(loss)


def _loss_of_step(model: _TwoHeads, step_index: int) -> torch.Tensor:
    inputs, target = data()
    loss = torch.nn.functional.mse_loss(model(inputs, step_index), target)
    loss.backward()
    return loss.detach() * 1e3 if step_index in UNUSED_SPIKES else loss


def _two_heads_lockstep(kwargs: dict, variant: str, wd: float, steps: int = 40) -> int:
    """``steps`` steps of the two-headed model, each in lock step with the float64
    per-parameter reference (:class:`Shadow`), which sees the gradients as torch does: an
    unused parameter's gradient is None after a set_to_none zeroing (the flat layout kept
    the view; it is hidden from the shadow), a zero tensor otherwise. Checks the rule
    directly at every accepted step without the second head: grad None keeps its bits
    and leaves G_{t-1} = 0 (a point mode: recovered from x_{t-1} up to one rounding), a
    zero gradient is decayed. Returns the number of retraces."""
    model = _TwoHeads()
    opt = ELRA(model.parameters(), wd=wd, cycle_steps=10, **kwargs)
    proxy = _GradsBack(opt)
    shadow = Shadow(proxy)  # type: ignore[arg-type]
    second = list(model.second.parameters())
    retraces = 0
    for step_index in range(steps):
        _zero(variant, opt, model)
        loss = _loss_of_step(model, step_index)
        if opt.memory != "standard":
            # The shadow reads the gradient buffers for the point modes' error bound
            # before opt.step copies in the gradients autograd allocated elsewhere.
            for buffer in opt.layout.buffers:
                buffer.gather_grads()
        unused = step_index % 3 != 0
        if unused and ZERO_GIVES_NONE[variant]:
            proxy.hidden = [(p, p.grad) for p in second if p.grad is not None]
            for param in second:
                param.grad = None
        before = [p.detach().clone() for p in second]
        shadow.step(loss)
        shadow.assert_matches(step_index)
        retraces += opt.last_step_retraced
        if not unused or opt.last_step_retraced:
            continue
        for param, old in zip(second, before, strict=True):
            if ZERO_GIVES_NONE[variant] or wd == 1.0:
                assert torch.equal(param.detach(), old), (step_index, variant)
            else:
                torch.testing.assert_close(param.detach(), old * wd, rtol=1e-6, atol=1e-7)
            entry = opt.state[param]
            if "x_prev" in entry:  # wd x_{t-1} - x_t = alpha G_{t-1}
                recovered = wd * entry["x_prev"].double() - param.detach().double()
                ulp = torch.finfo(param.dtype).eps * param.detach().double().abs()
                assert (recovered.abs() <= ulp + 1e-30).all(), step_index
            else:
                assert not entry["grad_prev"].any(), step_index
    return retraces


@pytest.mark.parametrize("wd", [1.0, 0.9], ids=["wd1", "wd0.9"])
@pytest.mark.parametrize("variant", ZERO_VARIANTS)
@pytest.mark.parametrize("layout", list(UNUSED_LAYOUTS))
def test_a_parameter_without_gradient_means_the_same_everywhere(
    layout: str, variant: str, wd: float
) -> None:
    """torch's rule in every layout, memory mode and way of zeroing: a parameter whose
    gradient is None after backward keeps its value on an accept (no decay, as AdamW
    skips it); one whose gradient exists and is zero takes an ordinary G = 0 step
    (decayed). Lock step with the float64 reference over 40 steps, retraces included.
    (model.zero_grad(set_to_none=False) is refused by the per-parameter layout, which
    keeps G_{t-1} by reference.)"""
    kwargs = {"backend": BACKENDS[0], **UNUSED_LAYOUTS[layout]}
    if layout == "lists" and variant == "model_keep":
        with pytest.raises(RuntimeError, match="modified in place"):
            _two_heads_lockstep(kwargs, variant, wd)
        return
    assert _two_heads_lockstep(kwargs, variant, wd) >= 2


@pytest.mark.parametrize("variant", ZERO_VARIANTS)
def test_lists_and_flat_train_the_same_with_an_unused_head(variant: str) -> None:
    """The symptom of issue 13: the same script, per-parameter (the CPU default) or flat
    (the CUDA default), with weight decay and a head used every third step, ends at the
    same weights (up to the dots' summation order), however the gradients are zeroed."""
    runs = {}
    for layout in ("lists", "flat", "flat_reuse"):
        if layout == "lists" and variant == "model_keep":
            continue  # refused (see above); opt.zero_grad(set_to_none=False) is the same
        model = _TwoHeads()
        opt = ELRA(
            model.parameters(),
            wd=0.9,
            cycle_steps=10,
            backend=BACKENDS[0],
            **UNUSED_LAYOUTS[layout],
        )
        decisions = []
        for step_index in range(40):
            _zero(variant, opt, model)
            opt.step(_loss_of_step(model, step_index))
            decisions.append(opt.last_step_retraced)
        runs[layout] = (decisions, [p.detach().clone() for p in model.parameters()])
    (decisions, expected), *others = runs.values()
    for other_decisions, params in others:
        assert other_decisions == decisions
        for mine, theirs in zip(params, expected, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


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
