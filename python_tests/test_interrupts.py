"""A step is taken whole or not at all (elra_fused.interrupts, core.plan_step): a failure
before the first write -- here, the last coefficient of the last segment -- leaves
weights, optimizer state, control state and recorded losses as they were; a Ctrl-C
arriving while the writes run is raised after the step completed."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import pytest
import torch
from _lockstep import data, make_model

from elra_fused import ELRA, memory
from elra_fused.interrupts import uninterrupted

#: The layouts and memory modes a two-group model runs in (two segments each).
SETUPS = {
    "lists": {"flat": False},
    "flat": {"flat": True},
    "recover": {"memory": "recover"},
    "offload": {"memory": "offload", "offload_chunk": 37},
}


def _two_groups(setup: str) -> tuple[torch.nn.Module, ELRA]:
    """Two param groups with different wd: two segments, two update passes per step."""
    model = make_model()
    params = list(model.parameters())
    groups = [{"params": params[:2], "wd": 0.99}, {"params": params[2:]}]
    return model, ELRA(groups, **SETUPS[setup])


def _backward(model: torch.nn.Module, opt: ELRA, step_index: int) -> torch.Tensor:
    inputs, target = data()
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(inputs), target) * (1 + 0.1 * step_index)
    loss.backward()
    opt.record_loss(loss)
    return loss


def _snapshot(model: torch.nn.Module, opt: ELRA) -> list[torch.Tensor]:
    state = opt.state_dict()
    tensors = [t for entry in state["state"].values() for t in entry.values()]
    losses = opt._losses.total
    return [
        *(p.detach().clone() for p in model.parameters()),
        *(t.detach().clone() for t in tensors),
        opt.control_state.clone(),
        torch.as_tensor(-1.0 if losses is None else losses, dtype=torch.float64),
    ]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _run(setup: str, fault: Callable[[ELRA, pytest.MonkeyPatch], None] | None) -> list:
    """Three steps; the fault (if any) is armed for the third, which is retried."""
    model, opt = _two_groups(setup)
    for step_index in range(2):
        _backward(model, opt, step_index)
        opt.step()
    _backward(model, opt, 2)
    if fault is not None:
        before = _snapshot(model, opt)
        with pytest.MonkeyPatch.context() as patch:
            fault(opt, patch)
            with pytest.raises(RuntimeError, match="injected"):
                opt.step()
        assert _same(_snapshot(model, opt), before)
    opt.step()
    return _snapshot(model, opt)


def _fail_at_call(target: object, name: str, call: int, patch: pytest.MonkeyPatch) -> None:
    original = getattr(target, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    patch.setattr(target, name, failing)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_failure_in_the_last_coefficient_leaves_the_step_untaken(setup: str) -> None:
    """The second segment's update coefficients fail (an allocation of the last small
    tensor before the writes): the first segment is not stepped either (it was, when
    each segment's coefficients were built right before its pass), and the retry is the
    step that never failed."""

    def fault(opt: ELRA, patch: pytest.MonkeyPatch) -> None:
        calls = 2 if setup in ("lists", "flat") else 4  # point modes build dots coeffs too
        _fail_at_call(memory, "coefficient_tensor", calls, patch)

    assert _same(_run(setup, fault), _run(setup, None))


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_first_update_pass_that_fails_before_writing_changes_nothing(setup: str) -> None:
    """A kernel refuses its tensors before writing (the first update pass): the law's
    state and the recorded losses are put back as well, and the retry is the step that
    never failed."""

    def fault(opt: ELRA, patch: pytest.MonkeyPatch) -> None:
        kernels = opt._kernels
        names = ("update_", "update_recover_", "update_swap_", "update_list_", "update_swap_list_")

        def refuse(*args, **kwargs):
            raise RuntimeError("injected")

        patch.setattr(opt, "_kernels", kernels._replace(**dict.fromkeys(names, refuse)))

    assert _same(_run(setup, fault), _run(setup, None))


@pytest.mark.parametrize("setup", list(SETUPS))
def test_a_ctrl_c_during_the_writes_comes_after_the_whole_step(setup: str) -> None:
    """SIGINT while the first segment's update runs: the second segment is stepped too,
    the losses are cleared, the control state advanced -- the step equals an
    uninterrupted one -- and KeyboardInterrupt is raised when it is complete."""
    reference = _run(setup, None)
    model, opt = _two_groups(setup)
    for step_index in range(2):
        _backward(model, opt, step_index)
        opt.step()
    _backward(model, opt, 2)
    kernels = opt._kernels
    interrupted = []

    def interrupting(name: str) -> Callable:
        original = getattr(kernels, name)

        def run(*args, **kwargs):
            if not interrupted:
                interrupted.append(name)
                os.kill(os.getpid(), signal.SIGINT)
            return original(*args, **kwargs)

        return run

    names = ("update_", "update_recover_", "update_swap_", "update_list_", "update_swap_list_")
    opt._kernels = kernels._replace(**{name: interrupting(name) for name in names})
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    opt._kernels = kernels
    assert interrupted
    assert opt._losses.total is None
    assert _same(_snapshot(model, opt), reference)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_uninterrupted_leaves_other_handlers_and_threads_alone() -> None:
    """A handler a framework installed stays in charge, and outside the main thread
    (which never receives signals) nothing is replaced."""
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with uninterrupted():
            assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
            os.kill(os.getpid(), signal.SIGINT)
        assert seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
    errors: list[BaseException] = []

    def in_thread() -> None:
        try:
            with uninterrupted():
                pass
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert not errors
    with pytest.raises(RuntimeError, match="inside"):
        with uninterrupted():
            raise RuntimeError("inside")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
