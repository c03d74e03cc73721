"""The framework-free helpers of elra_fused.integrations: finding the ELRA inside the
frameworks' optimizer wrappers, recording through them, closing cycles; and that no
framework is imported unless its integration module is."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from elra_fused import ELRA, control
from elra_fused.integrations import end_cycle, record_loss, unwrap_elra


def _elra(**kwargs: object) -> ELRA:
    return ELRA([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_unwrap_through_wrappers() -> None:
    """accelerate keeps the optimizer in ``.optimizer``, Lightning in ``._optimizer``;
    another optimizer, or a wrapper of itself, gives None."""
    elra = _elra()
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(_optimizer=elra))
    assert unwrap_elra(elra) is elra
    assert unwrap_elra(wrapped) is elra
    adam = torch.optim.Adam([torch.nn.Parameter(torch.ones(1))])
    assert unwrap_elra(adam) is None
    loop = SimpleNamespace()
    loop.optimizer = SimpleNamespace(optimizer=loop)
    assert unwrap_elra(loop) is None


def test_record_loss_through_a_wrapper_is_judged() -> None:
    """A loss recorded through a wrapper is the one the next step judges; with another
    optimizer nothing is recorded."""
    elra = _elra()
    param = elra.param_groups[0]["params"][0]
    param.grad = torch.ones(3)
    assert record_loss(SimpleNamespace(optimizer=elra), torch.tensor(2.5))
    elra.step()  # no loss passed: the recorded one
    assert float(elra.control_state[control.LOSS_PREV]) == 2.5
    assert not record_loss(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]), 1.0)


def test_end_cycle_respects_cycle_steps() -> None:
    """An ELRA with ``cycle_steps`` closes its own cycles: the epoch-end helper leaves it."""
    calls: list[str] = []
    manual, automatic = _elra(), _elra(cycle_steps=10)
    for name, elra in (("manual", manual), ("automatic", automatic)):
        elra.end_cycle = lambda name=name: calls.append(name)  # type: ignore[method-assign]
    assert end_cycle(SimpleNamespace(optimizer=manual))
    assert not end_cycle(automatic)
    assert end_cycle(automatic, respect_cycle_steps=False)
    assert calls == ["manual", "automatic"]


@pytest.mark.parametrize("module", ["elra_fused", "elra_fused.integrations"])
def test_no_framework_imported(module: str) -> None:
    """``import elra_fused`` (and the integrations package) needs no framework."""
    code = (
        f"import sys, {module}; "
        "loaded = [m for m in ('transformers', 'accelerate', 'pytorch_lightning', "
        "'lightning') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
