"""The functional core (elra_fused.core.elra_step) without an optimizer object."""

from __future__ import annotations

import pytest
import torch

from elra_fused import control, ops
from elra_fused.control import ControlConfig
from elra_fused.control_runner import ControlRunner
from elra_fused.core import Segment, elra_step
from elra_fused.memory import GradPrevStore, PointPrevStore

F64 = torch.float64
CPU = torch.device("cpu")
KERNELS = ops.get_kernels("reference", CPU)


def runner(host: bool = False, **config) -> ControlRunner:
    return ControlRunner(ControlConfig(**config), CPU, host=host, compiled=False)


def test_first_step_then_retrace_by_hand() -> None:
    """Two segments with their own wd: x_1 = wd x_0 - alpha_0 G_0; a spike then moves
    back along G_0 by alpha_0 - alpha_1 (no decay), and keeps G_{t-1} = G_0."""
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, generator=gen, dtype=F64) for _ in range(2)]
    grads = [torch.randn(5, generator=gen, dtype=F64) for _ in range(2)]
    prevs = [torch.zeros(5, dtype=F64) for _ in range(2)]
    wds = (1.0, 0.9)
    x0 = [x.clone() for x in xs]
    segments = [
        Segment(x, g, GradPrevStore(p), wd, CPU)
        for x, g, p, wd in zip(xs, grads, prevs, wds, strict=True)
    ]
    law = runner(alpha0=0.1)
    decision = elra_step(segments, torch.tensor(1.0, dtype=F64), law, KERNELS)
    assert decision.accept.item() == 1.0
    for x, start, g, p, wd in zip(xs, x0, grads, prevs, wds, strict=True):
        torch.testing.assert_close(x, wd * start - 0.1 * g, rtol=0, atol=1e-15)
        assert torch.equal(p, g)  # G_0 became G_{t-1}

    x1 = [x.clone() for x in xs]
    g0 = [g.clone() for g in grads]
    for g in grads:
        g.copy_(torch.randn(5, generator=gen, dtype=F64))
    decision = elra_step(segments, torch.tensor(50.0, dtype=F64), law, KERNELS)
    alpha1 = law.state[control.ALPHA].item()
    assert decision.accept.item() == 0.0 and alpha1 < 0.1
    for x, start, g_prev, p in zip(xs, x1, g0, prevs, strict=True):
        torch.testing.assert_close(x, start + (0.1 - alpha1) * g_prev, rtol=0, atol=1e-15)
        assert torch.equal(p, g_prev)


class CountingStore(GradPrevStore):
    """A standard store that counts the coefficient tensors it is asked to build."""

    built = 0

    def update_coeffs(self, *args, **kwargs) -> torch.Tensor:
        CountingStore.built += 1
        return super().update_coeffs(*args, **kwargs)


def test_segments_of_one_kind_wd_and_device_share_coefficients() -> None:
    CountingStore.built = 0
    segments = [
        Segment(torch.ones(3), torch.ones(3), CountingStore(torch.zeros(3)), wd, CPU)
        for wd in (1.0, 1.0, 0.5, 1.0, 0.5)
    ]
    elra_step(segments, 1.0, runner(host=True), ops.get_kernels("reference", CPU))
    assert CountingStore.built == 2  # one per wd


@pytest.mark.parametrize("host", [False, True], ids=["device_law", "host_law"])
def test_point_store_takes_the_grad_store_step(host: bool) -> None:
    """From the same state, x_{t-1} (recover mode) and G_{t-1} (standard mode) give the
    same decisions and the same points, accepts and retraces alike."""
    gen = torch.Generator().manual_seed(3)
    wd, alpha0 = 0.99, 0.05
    x_start = torch.randn(9, generator=gen, dtype=F64)
    grad_seq = [torch.randn(9, generator=gen, dtype=F64) for _ in range(4)]
    losses = [1.0, 0.9, 80.0, 0.8]  # the spike retraces
    runs = []
    for make_store in (
        lambda x: GradPrevStore(torch.zeros_like(x)),
        lambda x: PointPrevStore(x.clone()),
    ):
        x = x_start.clone()
        grad = torch.zeros_like(x)
        segment = Segment(x, grad, make_store(x), wd, CPU)
        law = runner(host=host, alpha0=alpha0)
        decisions = []
        for loss, g in zip(losses, grad_seq, strict=True):
            grad.copy_(g)
            decision = elra_step([segment], torch.tensor(loss, dtype=F64), law, KERNELS)
            decisions.append(float(decision.accept))
        runs.append((decisions, x, law.state))
    (d_grad, x_grad, s_grad), (d_point, x_point, s_point) = runs
    assert d_grad == d_point == [1.0, 1.0, 0.0, 1.0]
    torch.testing.assert_close(x_point, x_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_point, s_grad, rtol=1e-9, atol=0)
