"""The two layouts (elra_fused.layouts): per-parameter tensor lists and flat buffers; what
each does with zero_grad, missing gradients, moved parameters, groups and a state dict
saved by the other. What only the per-parameter layout does (G_{t-1} by reference, the
one-call check, sharded models) is in test_list_layout.py."""

from __future__ import annotations

import io

import pytest
import torch
from _backends import fused_backends
from _lockstep import (
    Shadow,
    data,
    forward_backward,
    make_model,
    run_steps,
)

from elra_fused import ELRA
from elra_fused.flat import ParameterMovedError

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


def _fail_once(target: object, name: str, patch: pytest.MonkeyPatch) -> None:
    """``target.name`` raises an out-of-memory error on its first call, then works."""
    original = getattr(target, name)
    failed = []

    def flaky(*args, **kwargs):
        if not failed:
            failed.append(True)
            raise torch.OutOfMemoryError("injected")
        return original(*args, **kwargs)

    patch.setattr(target, name, flaky)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "lists"])
def test_an_allocation_failing_while_a_group_is_added_leaves_no_trace(flat: bool) -> None:
    """add_param_group whose layout runs out of memory: the group is not kept (not only
    for a ValueError), no state entry is left for its parameters, and adding it again
    works -- the optimizer trains on with it."""
    model = make_model()
    params = list(model.parameters())
    opt = ELRA(params[:2], flat=flat)
    run_steps(opt, model, range(2))
    with pytest.MonkeyPatch.context() as patch:
        _fail_once(torch, "zeros_like", patch)
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            opt.add_param_group({"params": params[2:]})
    assert len(opt.param_groups) == 1
    assert all(not opt.state.get(p) for p in params[2:])
    opt.state_dict()  # no entry for a parameter that no group holds
    opt.add_param_group({"params": params[2:]})
    before = [p.detach().clone() for p in params[2:]]
    run_steps(opt, model, range(2, 4))
    assert all(not torch.equal(p, b) for p, b in zip(params[2:], before, strict=True))


def test_an_allocation_failing_while_an_unfrozen_parameter_joins_retries_next_step() -> None:
    """Flat layout: a parameter unfrozen mid-run joins a new buffer at the next step; if
    making its store runs out of memory, that step fails before anything is written and
    the parameter is still waiting -- the next step adopts it and trains it (it was left
    neither frozen nor in a buffer, or the layout kept a buffer without its store)."""
    from elra_fused.flat_layout import FlatLayout

    model = make_model()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    opt = ELRA(model.parameters(), flat=True)
    run_steps(opt, model, range(2))
    frozen.requires_grad_(True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.MonkeyPatch.context() as patch:
        _fail_once(FlatLayout, "_make_store", patch)
        with pytest.raises(torch.OutOfMemoryError, match="injected"):
            run_steps(opt, model, range(2, 3))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    value = frozen.detach().clone()
    run_steps(opt, model, range(3, 5))
    assert not torch.equal(frozen.detach(), value)
    assert len(opt.layout.buffers) == len(opt.layout.stores)
