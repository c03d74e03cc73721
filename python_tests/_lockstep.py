"""Shared by the optimizer tests: a tiny model, its data, and the lock-step oracle check.

Lock step: before every step the float64 oracle (the functional core on the reference
kernels, per-parameter passes, ``memory="standard"``) takes the tested optimizer's exact
state -- parameters, gradients, the previous-step vector and the control state -- and
the same step.
Comparing single steps from a shared state keeps the check sharp: over hundreds of steps
two correct implementations drift apart chaotically (alpha reacts exponentially to
rounding), so whole-trajectory comparisons would test the landscape, not the code.
"""

from __future__ import annotations

import contextlib
import io
import math
import socket
from collections.abc import Callable, Iterable, Iterator

import pytest
import torch

from elra_fused import ELRA, control, ops
from elra_fused.control_runner import ControlRunner
from elra_fused.core import elra_step
from elra_fused.list_layout import ListLayout
from elra_fused.memory import POINT_MODES, PointCoefficients

#: Injected failures: loss spikes (retraced by the f_0 / 5 sigma rules) and a NaN gradient.
SPIKES = (50, 200)
NAN_GRAD = 120
#: The GPU tests' 80 steps (:func:`short_schedule`): where each injected failure falls.
SHORT_FAILURES = {SPIKES[0]: SPIKES[0], 65: NAN_GRAD, 75: SPIKES[1]}
SHORT_STEPS = 80


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(
        dtype
    )


def data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 6, generator=gen)
    return inputs.to(dtype), (inputs[:, :1] * 2 - inputs[:, 1:2]).to(dtype)


def forward_backward(model, inputs, target, step_index: int) -> torch.Tensor:
    """Loss and gradients, with the injected failures at their step indices."""
    loss = torch.nn.functional.mse_loss(
        model(inputs.to(model[0].weight.dtype)), target.to(model[0].weight.dtype)
    )
    loss.backward()
    if step_index == NAN_GRAD:
        model[0].weight.grad[0, 0] = math.nan
    if step_index in SPIKES:
        loss = loss.detach() * 1e3
    return loss


def short_schedule() -> list[int]:
    """Step indices for :func:`forward_backward` that meet all three injected failures in
    :data:`SHORT_STEPS` steps: the spike at step 50, the NaN gradient at 65, the second
    spike at 75 (replayed on the CPU, each is a retrace: test_optimizer_backends)."""
    return [SHORT_FAILURES.get(index, index) for index in range(SHORT_STEPS)]


#: Tensor methods that read a device value back to the host.
HOST_READS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def no_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside the block, any host read of a tensor value raises AssertionError."""

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in ELRA.step")

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, forbidden)
        yield


def run_steps(
    opt: ELRA, model: torch.nn.Module, indices: Iterable[int], zero: str = "opt"
) -> list[bool]:
    """Zero the grads, forward/backward (with the injected failures), step; the decisions.

    ``zero``: "opt" (opt.zero_grad()), "model_none" (model.zero_grad(set_to_none=True))
    or "model_in_place" (model.zero_grad(set_to_none=False)).
    """
    inputs, target = data()
    decisions = []
    for step_index in indices:
        if zero == "opt":
            opt.zero_grad()
        else:
            model.zero_grad(set_to_none=zero == "model_none")
        opt.step(forward_backward(model, inputs, target, step_index))
        decisions.append(opt.last_step_retraced)
    return decisions


def assert_nan_step_makes_no_host_sync(
    opt: ELRA, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three steps, then the NaN-gradient step (a retrace) and zero_grad with every host
    read forbidden. The control law runs as device tensor ops, as on a GPU (on the CPU
    it runs on Python floats by default: ``host_control``)."""
    opt.host_control = False
    run_steps(opt, model, range(3))
    opt.zero_grad()
    inputs, target = data()
    loss = forward_backward(model, inputs, target, NAN_GRAD)
    with no_host_reads(monkeypatch):
        opt.step(loss)
        opt.zero_grad()
    assert opt.last_step_retraced


def assert_round_trip(
    make_opt: Callable[[torch.nn.Module], ELRA], before: int = 8, after: int = 17
) -> None:
    """Save model and optimizer mid-run, load both into fresh objects (weights_only):
    the continuation takes the same decisions and reaches bit-identical parameters."""
    model = make_model()
    opt = make_opt(model)
    run_steps(opt, model, range(before))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    expected_decisions = run_steps(opt, model, range(before, before + after))
    expected = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = make_model(seed=5)
    model2.load_state_dict(saved["model"])
    opt2 = make_opt(model2)
    opt2.load_state_dict(saved["opt"])
    assert run_steps(opt2, model2, range(before, before + after)) == expected_decisions
    for p, e in zip(model2.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), e)
    assert opt2.alpha == opt.alpha


class _BoundedRunner(ControlRunner):
    """The law with extra partials: the point modes' error estimates, which the shadow's
    G_{t-1} vectors do not carry (see :meth:`Shadow.step`)."""

    extra: list[torch.Tensor] = []

    def step(
        self, loss: torch.Tensor, partials: list[torch.Tensor], *args: object
    ) -> control.Decision:
        return super().step(loss, [*partials, *self.extra], *args)


class Shadow:
    """The float64 oracle beside ``opt``: the functional core (:func:`elra_step`) on the
    reference kernels, over float64 copies of ``opt``'s parameters in the per-parameter
    layout, with G_{t-1} kept as a vector (``memory="standard"``). For a point mode it
    recovers G_{t-1} from ``opt``'s points and gives the law the same error estimate of
    <G_{t-1}, G_t> as ``opt``'s stores (per flat buffer, from its x and G)."""

    def __init__(self, opt: ELRA) -> None:
        self.opt = opt
        self.groups = [list(g["params"]) for g in opt.param_groups]
        self.params = [
            [torch.nn.Parameter(p.detach().double().clone()) for p in group]
            for group in self.groups
        ]
        self.kernels = ops.get_kernels("reference", "cpu")
        self.law = _BoundedRunner(opt.config, torch.device("cpu"), host=False, compiled=False)

    def step(self, loss: torch.Tensor) -> None:
        """Take opt's exact state (parameters, gradients, G_{t-1}, control state), then
        step both; the caller compares afterwards."""
        self.law.state.copy_(self.opt.control_state)
        alpha_prev = self.law.state[control.ALPHA].item()
        state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for mine_group, theirs_group, group in zip(
            self.params, self.groups, self.opt.param_groups, strict=True
        ):
            for mine, theirs in zip(mine_group, theirs_group, strict=True):
                mine.data.copy_(theirs.detach())
                mine.grad = None if theirs.grad is None else theirs.grad.detach().double().clone()
                entry = self.opt.state.get(theirs, {})
                if "x_prev" in entry:  # point modes: G_{t-1} = (wd x_{t-1} - x_t) / alpha
                    grad_prev = (
                        group["wd"] * entry["x_prev"].double() - theirs.detach().double()
                    ) / alpha_prev
                else:
                    grad_prev = entry.get("grad_prev", torch.zeros_like(theirs)).double()
                state[mine] = {"grad_prev": grad_prev.clone()}
        groups = [
            {"params": mine, "wd": g["wd"]}
            for mine, g in zip(self.params, self.opt.param_groups, strict=True)
        ]
        self.law.extra = []
        if self.opt.memory in POINT_MODES:
            inv_alpha = torch.tensor([0.0, 1.0 / alpha_prev], dtype=torch.float64)
            for buffer in self.opt.layout.buffers:
                grad = buffer.grad.double()
                dots = torch.stack([torch.dot(grad, grad), torch.zeros((), dtype=torch.float64)])
                bounded = PointCoefficients.with_error_bound(dots, buffer.data, inv_alpha)
                self.law.extra.append(bounded * torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        layout = ListLayout(None, "reference", ops.REFERENCE_DTYPES)
        work = layout.gather(groups, state)
        self.opt.step(loss)
        decision = elra_step(
            work.segments, self.law.loss_value(loss.double()), self.law, self.kernels
        )
        layout.finish(work, decision)

    def assert_matches(
        self, step_index: int, rtol: float = 2e-6, atol: float = 2e-6, alpha_rtol: float = 1e-5
    ) -> None:
        retraced = self.law.state[control.LAST_RETRACED].item() > 0
        alpha = self.law.state[control.ALPHA].item()
        assert self.opt.last_step_retraced == retraced, step_index
        assert math.isclose(self.opt.alpha, alpha, rel_tol=alpha_rtol, abs_tol=1e-12), (
            step_index,
            self.opt.alpha,
            alpha,
        )
        for mine_group, theirs_group in zip(self.params, self.groups, strict=True):
            for mine, theirs in zip(mine_group, theirs_group, strict=True):
                torch.testing.assert_close(
                    theirs.detach().double(), mine.detach(), rtol=rtol, atol=atol
                )


def free_port() -> int:
    """A free TCP port on the loopback address (for a gloo process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlp_setup(
    seed: int = 0,
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The tiny MLP of make_model() with its own random data (seeded globally)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    data = torch.randn(64, 6)
    target = data[:, :1] * 2 - data[:, 1:2]
    return model, data, target


def mlp_step(model, data, target, opt: ELRA) -> torch.Tensor:
    """zero_grad, forward, backward, step; the loss."""
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(data), target)
    loss.backward()
    opt.step(loss)
    return loss.detach()
