"""Where the law runs (elra_fused.control_runner): restarts are warned about once, on
the host law at once and on the device law at the next read of the state."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from _lockstep import no_host_reads

from elra_fused import ELRA, control
from elra_fused.control_math import FLOAT_MATH, TENSOR_MATH
from elra_fused.control_runner import trusted_dot


def spiking_run(opt: ELRA, param: torch.nn.Parameter, steps: int) -> None:
    """A first accepted step, then losses far above anything seen: every step retraces."""
    for index in range(steps):
        opt.zero_grad()
        loss = (param * param).sum()
        loss.backward()
        opt.step(loss if index == 0 else loss.detach() * 1e6 + 1e6)


@pytest.mark.parametrize("host", [True, False], ids=["host_law", "device_law"])
def test_a_restart_is_warned_once(host: bool) -> None:
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = ELRA([param], max_retraces=5, backend="reference")
    opt.host_control = host
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spiking_run(opt, param, 1 + 5)  # the 5th retrace in a row restarts
        restarts = opt.restart_count  # the device law's warning comes with this read
        spiking_run(opt, param, 1 + 5)  # and a second restart: no second warning
        assert opt.restart_count == 2
    assert restarts == 1
    messages = [str(w.message) for w in caught if "retraces in a row" in str(w.message)]
    assert len(messages) == 1 and "1 restart(s)" in messages[0]
    assert opt.control_state[control.RESTARTS].item() == 2


def test_restart_returns_to_the_last_accepted_point() -> None:
    """After the restart the parameters are back at the last accepted point and the next
    step starts afresh from there (accepted, whatever its loss)."""
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = ELRA([param], max_retraces=4, backend="reference")
    spiking_run(opt, param, 1)
    before_accepted_step = param.detach().clone()
    with pytest.warns(UserWarning, match="retraces in a row"):
        spiking_run(opt, param, 1 + 4)  # one accepted step from here, then 4 retraces
    # The retraces moved back along the accepted step's gradient; the restart goes all
    # the way back, to where that step started.
    torch.testing.assert_close(param.detach(), before_accepted_step, rtol=0, atol=1e-15)
    opt.zero_grad()
    loss = (param * param).sum()
    loss.backward()
    opt.step(loss.detach() * 1e6)  # a first step after a restart is accepted
    assert not opt.last_step_retraced


@pytest.mark.parametrize(
    ("dot", "bound", "expected"),
    [
        (3.0, 1.0, 2.0),
        (-3.0, 1.0, -2.0),
        (0.5, 1.0, 0.0),
        (-0.5, 1.0, 0.0),
        (2.0, 0.0, 2.0),
        (2.0, math.inf, 0.0),
        (math.inf, 1.0, math.inf),
        (math.nan, 1.0, math.nan),
    ],
)
def test_trusted_dot_moves_towards_zero_by_the_bound(
    dot: float, bound: float, expected: float
) -> None:
    """The host and tensor laws take the same value: the one nearest 0 that the bound
    allows; NaN stays NaN (the law then retraces)."""
    on_host = trusted_dot(dot, bound, FLOAT_MATH)
    on_device = trusted_dot(
        torch.tensor(dot, dtype=torch.float64),
        torch.tensor(bound, dtype=torch.float64),
        TENSOR_MATH,
    ).item()
    if math.isnan(expected):
        assert math.isnan(on_host) and math.isnan(on_device)
    else:
        assert on_host == on_device == expected


@pytest.mark.parametrize("value", [0.1, 3, -0.0, 1e300, 5e-324, math.inf, math.nan])
def test_a_number_loss_reaches_the_device_law_without_a_copy(
    value: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Python-number loss becomes the device law's 0-d fp64 tensor by a fill kernel
    (torch.full), not torch.tensor: a host-to-device copy blocks, syncs the GPU and fails
    under CUDA-graph capture. Same bits as the copy would give."""
    expected = torch.tensor(float(value), dtype=torch.float64)
    opt = ELRA([torch.nn.Parameter(torch.ones(3))], backend="reference")
    law = opt._law
    law.host = False

    def copied(*args, **kwargs):
        raise AssertionError("a host-to-device copy of the loss")

    with no_host_reads(monkeypatch), monkeypatch.context() as patch:
        for name in ("tensor", "as_tensor", "scalar_tensor"):
            patch.setattr(torch, name, copied)
        got = law.loss_value(value)
    assert isinstance(got, torch.Tensor)
    assert got.dtype == torch.float64 and got.shape == () and got.device == law.state.device
    assert torch.equal(got.view(torch.int64), expected.view(torch.int64))  # the bits
