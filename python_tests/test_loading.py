"""``ELRA.load_state_dict`` is a transaction: a state that does not fit is rejected with one
clear ValueError before anything changes (:mod:`elra_fused.loading`), and a failure while
applying is undone.

The corruption corpus below runs every bad state against the flat layout, the
per-parameter layout and the recover memory mode. Each case checks the message, that the
optimizer (parameters, ``state_dict()`` tensor by tensor, param groups, control state,
flat stores) is bit-identical to before, and that it then steps exactly like a twin that
never saw the bad load.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _lockstep import make_model, run_steps

from elra_fused import ELRA, checks, control, ops
from elra_fused.control_runner import upgrade_state
from elra_fused.memory import GRAD_PREV_KEY, POINT_MODES, X_PREV_KEY

BACKEND = "cpp" if "cpp" in ops.available_backends("cpu") else "reference"
#: Layouts and memory modes: the corpus runs on the first three (both layouts, a point
#: mode); the loads that must succeed or be undone also on offload and the swapping store.
SETUPS = {
    "flat": {"flat": True},
    "lists": {"flat": False},
    "recover": {"flat": True, "memory": "recover"},
    "offload": {"memory": "offload", "offload_chunk": 37},
    "swap": {"flat": True, "reuse_grad_buffer": True},
}
CORPUS_SETUPS = ("flat", "lists", "recover")
#: Steps both twins take before the bad load, and after it.
BEFORE, AFTER = 8, 6
PREFIX = r"^ELRA\.load_state_dict: "


def groups_of(
    model: torch.nn.Module, wds: tuple[float, float] = (0.999, 1.0), named: bool = False
) -> list[dict[str, Any]]:
    """Two param groups (the two linear layers), with their own wd; ``named``: from
    ``named_parameters()`` (torch >= 2.6 then keeps each group's ``param_names``)."""
    return [
        {
            "params": list(model[index].named_parameters(prefix=str(index)))
            if named
            else list(model[index].parameters()),
            "wd": wd,
        }
        for index, wd in zip((0, 2), wds, strict=True)
    ]


def build(model: torch.nn.Module, setup: str, wds: tuple[float, float] = (0.999, 1.0)) -> ELRA:
    return ELRA(groups_of(model, wds), backend=BACKEND, cycle_steps=5, **SETUPS[setup])


def prev_key(setup: str) -> str:
    return X_PREV_KEY if SETUPS[setup].get("memory") in POINT_MODES else GRAD_PREV_KEY


def saved_state(setup: str) -> dict:
    """A valid state of ``setup`` from another run (other weights, other wd, five steps
    in): loading it would change everything a half-applied load could leave behind."""
    model = make_model(seed=3)
    opt = build(model, setup, wds=(0.9, 0.95))
    run_steps(opt, model, range(5))
    return copy.deepcopy(opt.state_dict())


def param_names() -> list[str]:
    """How messages name the parameters of the model's two groups."""
    model = make_model()
    return [
        checks.describe(group_index, index, param)
        for group_index, layer in enumerate((model[0], model[2]))
        for index, param in enumerate(layer.parameters())
    ]


NAMES = param_names()  # ids 0..3: weight (16, 6), bias (16,); weight (1, 16), bias (1,)


# ---------------------------------------------------------------------------------------
# The corpus: each case corrupts a valid state of the setup (in place or by replacing it)
# ---------------------------------------------------------------------------------------
def _set_prev(param_id: int, make: Callable[[torch.Tensor], Any]) -> Callable[[dict, str], dict]:
    def corrupt(sd: dict, setup: str) -> dict:
        entry = sd["state"][param_id]
        entry[prev_key(setup)] = make(entry[prev_key(setup)])
        return sd

    return corrupt


def _poke(index: tuple[int, ...], value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def make(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor[index] = value
        return tensor

    return make


def _set_control(entry: int, value: float) -> Callable[[dict, str], dict]:
    def corrupt(sd: dict, setup: str) -> dict:
        sd["elra_control"]["control"][entry] = value
        return sd

    return corrupt


def _edit(edit: Callable[[dict], None]) -> Callable[[dict, str], dict]:
    def corrupt(sd: dict, setup: str) -> dict:
        edit(sd)
        return sd

    return corrupt


def _overflowing(tensor: torch.Tensor) -> torch.Tensor:
    wide = tensor.double()
    wide[0, 0] = 1e300  # finite in float64, inf once cast to the float32 parameter
    return wide


def _other_model(sd: dict, setup: str) -> dict:
    """Same groups and parameter counts, other shapes."""
    torch.manual_seed(7)
    other = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = build(other, setup)
    for _ in range(3):
        opt.zero_grad()
        loss = other(torch.randn(5, 3)).square().mean()
        loss.backward()
        opt.step(loss)
    return copy.deepcopy(opt.state_dict())


def _adam_state() -> dict:
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    torch.nn.functional.mse_loss(model(torch.ones(4, 6)), torch.zeros(4, 1)).backward()
    adam.step()
    return adam.state_dict()


def _adam_grafted(sd: dict, setup: str) -> dict:
    sd["state"] = _adam_state()["state"]  # exp_avg / exp_avg_sq / step per parameter
    return sd


def _other_memory(sd: dict, setup: str) -> dict:
    return saved_state("flat" if prev_key(setup) == X_PREV_KEY else "recover")


def _move_param(sd: dict) -> None:
    first, second = sd["param_groups"]
    first["params"].append(second["params"].pop(0))


def _pop(key: str) -> Callable[[dict], None]:
    return lambda sd: sd.pop(key)


def _pop_elra_entry(sd: dict) -> None:
    """Drop the ELRA entry and its mirror in the first param group (which
    torch.distributed.checkpoint's state dicts carry alone)."""
    sd.pop("elra_control")
    sd["param_groups"][0].pop("elra_control")


CASES = [
    # (id, corruption, parameter the message names (index into NAMES) or None, pattern)
    ("wrong_shape", _set_prev(0, lambda t: torch.zeros(16, 5)), 0, r"shape \(16, 5\)"),
    ("transposed", _set_prev(0, lambda t: t.t().contiguous()), 0, r"shape \(6, 16\)"),
    ("broadcast_shape_1", _set_prev(1, lambda t: torch.zeros(1)), 1, r"shape \(1,\)"),
    ("nan_prev", _set_prev(0, _poke((3, 2), math.nan)), 0, "NaN or inf"),
    ("inf_prev", _set_prev(2, _poke((0, 5), math.inf)), 2, "NaN or inf"),
    ("overflows_param_dtype", _set_prev(0, _overflowing), 0, "overflows torch.float32"),
    ("int64_prev", _set_prev(1, lambda t: t.long()), 1, "dtype torch.int64"),
    ("complex_prev", _set_prev(3, lambda t: torch.complex(t, t)), 3, "dtype torch.complex64"),
    ("list_not_tensor", _set_prev(1, lambda t: t.tolist()), 1, "must be a tensor, got list"),
    ("entry_not_dict", _edit(lambda sd: sd["state"].update({1: torch.zeros(16)})), 1, "dict"),
    ("unknown_state_id", _edit(lambda sd: sd["state"].update({99: {}})), None, "id 99"),
    ("nan_alpha", _set_control(control.ALPHA, math.nan), None, f"entry {control.ALPHA} is nan"),
    ("negative_alpha", _set_control(control.ALPHA, -1e-3), None, r"ALPHA \(alpha\) is -0\.001"),
    ("zero_alpha", _set_control(control.ALPHA, 0.0), None, r"ALPHA \(alpha\) is 0\.0"),
    (
        "inf_loss_prev",
        _set_control(control.LOSS_PREV, math.inf),
        None,
        f"{control.LOSS_PREV} is inf",
    ),
    ("negative_counter", _set_control(control.ACCEPTED, -1.0), None, "ACCEPTED is -1.0"),
    ("fractional_counter", _set_control(control.RETRACES, 0.5), None, "RETRACES is 0.5"),
    ("flag_not_0_or_1", _set_control(control.LAST_RETRACED, 2.0), None, "LAST_RETRACED"),
    ("sigma_scale_below_1", _set_control(control.SIGMA_SCALE, 0.5), None, "SIGMA_SCALE"),
    ("negative_damper", _set_control(control.GROWTH_DAMPER, -1.0), None, "GROWTH_DAMPER"),
    ("damper_flag_not_0_or_1", _set_control(control.DAMPERS_STARTED, 0.5), None, "DAMPERS_STARTED"),
    (
        "truncated_control",
        _edit(lambda sd: sd["elra_control"].update(control=sd["elra_control"]["control"][:10])),
        None,
        r"control state must be a tensor of .* shape \(10,\)",
    ),
    (
        "control_not_tensor",
        _edit(lambda sd: sd["elra_control"].update(control=[0.0] * 21)),
        None,
        "control state must be a tensor",
    ),
    (
        "int_control",
        _edit(lambda sd: sd["elra_control"].update(control=torch.zeros(21, dtype=torch.int64))),
        None,
        "dtype torch.int64",
    ),
    ("missing_control", _edit(lambda sd: sd["elra_control"].pop("control")), None, "'control'"),
    ("missing_state", _edit(_pop("state")), None, "no 'state' entry"),
    ("missing_param_groups", _edit(_pop("param_groups")), None, "no 'param_groups' entry"),
    ("missing_elra_entry", _edit(_pop_elra_entry), None, "no ELRA control state"),
    ("not_a_dict", lambda sd, setup: list(sd.items()), None, "got list"),
    ("other_model_same_counts", _other_model, 0, r"shape \(8, 3\); expected .*\(16, 6\)"),
    ("adam_state_dict", lambda sd, setup: _adam_state(), None, "no ELRA control state"),
    ("adam_entries", _adam_grafted, 0, "exp_avg"),
    ("other_memory_mode", _other_memory, None, "saved with memory="),
    ("unknown_memory", _edit(lambda sd: sd["elra_control"].update(memory="disk")), None, "disk"),
    (
        "one_group_missing",
        _edit(lambda sd: sd["param_groups"].pop()),
        None,
        r"1 param group\(s\), this optimizer 2",
    ),
    ("params_per_group", _edit(_move_param), None, "group 0 of the state has 3 parameter"),
    (
        "duplicate_param_id",
        _edit(lambda sd: sd["param_groups"][1]["params"].__setitem__(0, 0)),
        None,
        "listed twice",
    ),
    ("unknown_group_key", _edit(lambda sd: sd["param_groups"][0].update(betas=0)), None, "betas"),
    (
        "param_names_too_few",  # torch's loader would keep names for the wrong parameters
        _edit(lambda sd: sd["param_groups"][0].update(param_names=["0.weight"])),
        None,
        r"group 0 of the state names 1 parameter\(s\) in 'param_names' but lists 2",
    ),
    (
        "param_names_not_str",
        _edit(lambda sd: sd["param_groups"][1].update(param_names=[2, 3])),
        None,
        "'param_names' must be a list of str",
    ),
    ("wd_nan", _edit(lambda sd: sd["param_groups"][1].update(wd=math.nan)), None, "wd .* nan"),
    ("wd_zero", _edit(lambda sd: sd["param_groups"][0].update(wd=0.0)), None, r"\(0, 1\]"),
    ("wd_missing", _edit(lambda sd: sd["param_groups"][0].pop("wd")), None, "no 'wd'"),
    (
        "steps_in_cycle_negative",
        _edit(lambda sd: sd["elra_control"].update(steps_in_cycle=-1)),
        None,
        "steps_in_cycle must be an int >= 0, got -1",
    ),
    (
        "steps_in_cycle_float",
        _edit(lambda sd: sd["elra_control"].update(steps_in_cycle=2.5)),
        None,
        "got 2.5",
    ),
    ("config_not_dict", _edit(lambda sd: sd["elra_control"].update(config="x")), None, "config"),
    (
        "config_tensor_value",
        _edit(lambda sd: sd["elra_control"]["config"].update(alpha0=torch.ones(3))),
        None,
        "'alpha0' must be a plain value",
    ),
]


def capture(opt: ELRA, model: torch.nn.Module) -> dict[str, Any]:
    """Everything a load could change, as copies (state_dict() holds live views)."""
    saved = opt.state_dict()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": {
            k: {name: t.clone() for name, t in entry.items()} for k, entry in saved["state"].items()
        },
        "param_groups": copy.deepcopy(saved["param_groups"]),
        "elra": copy.deepcopy(saved["elra_control"]),
        "groups": [(g["wd"], list(g["params"]), sorted(g)) for g in opt.param_groups],
        "control": opt.control_state.clone(),
        "steps_in_cycle": opt._steps_in_cycle,
        "stores": [s.tensor.clone() for s in getattr(opt.layout, "stores", [])],
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    def same(a: Any, b: Any) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a is b if isinstance(a, torch.nn.Parameter) else a == b

    for key in before:
        assert same(before[key], after[key]), key


def assert_unchanged_and_steps_like_twin(
    opt: ELRA, model: torch.nn.Module, twin: ELRA, twin_model: torch.nn.Module, before: dict
) -> None:
    assert_same(before, capture(opt, model))
    assert_same(capture(twin, twin_model), before)  # the twin is where opt was
    span = range(BEFORE, BEFORE + AFTER)
    assert run_steps(opt, model, span) == run_steps(twin, twin_model, span)
    assert_same(capture(opt, model), capture(twin, twin_model))


def twins(setup: str) -> tuple[ELRA, torch.nn.Module, ELRA, torch.nn.Module]:
    """Two identical optimizers on identical models, BEFORE steps in."""
    model, twin_model = make_model(), make_model()
    opt, twin = build(model, setup), build(twin_model, setup)
    run_steps(opt, model, range(BEFORE))
    run_steps(twin, twin_model, range(BEFORE))
    return opt, model, twin, twin_model


@pytest.mark.parametrize("setup", CORPUS_SETUPS)
@pytest.mark.parametrize(
    ("corrupt", "named", "pattern"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_state_is_rejected_and_changes_nothing(
    setup: str, corrupt: Callable[[dict, str], Any], named: int | None, pattern: str
) -> None:
    opt, model, twin, twin_model = twins(setup)
    bad = corrupt(saved_state(setup), setup)
    before = capture(opt, model)
    with pytest.raises(ValueError, match=PREFIX) as info:
        opt.load_state_dict(bad)
    message = str(info.value)
    assert re.search(pattern, message), message
    if named is not None:
        assert NAMES[named] in message, message
    assert_unchanged_and_steps_like_twin(opt, model, twin, twin_model, before)


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 15
    assert len({case[0] for case in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------
# What still loads
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", SETUPS)
def test_a_valid_state_loads_completely(setup: str) -> None:
    """The uncorrupted state of the corpus loads: wd, per-parameter state, control state
    and the step within the cycle all come from it."""
    opt, model, _, _ = twins(setup)
    good = saved_state(setup)
    opt.load_state_dict(good)
    assert [g["wd"] for g in opt.param_groups] == [0.9, 0.95]
    assert torch.equal(opt.control_state, good["elra_control"]["control"])
    assert opt._steps_in_cycle == good["elra_control"]["steps_in_cycle"]
    key = prev_key(setup)
    for index, param in enumerate(model.parameters()):
        assert torch.equal(opt.state[param][key], good["state"][index][key])
    run_steps(opt, model, range(BEFORE, BEFORE + AFTER))


@pytest.mark.parametrize("setup", SETUPS)
def test_legacy_control_state_loads(setup: str) -> None:
    """A control state saved before the guards (14 entries) is upgraded on load."""
    opt, model, _, _ = twins(setup)
    good = saved_state(setup)
    legacy = good["elra_control"]["control"][: control.LEGACY_STATE_SIZE].clone()
    good["elra_control"]["control"] = legacy
    opt.load_state_dict(good)
    assert torch.equal(opt.control_state, upgrade_state(legacy))
    run_steps(opt, model, range(BEFORE, BEFORE + AFTER))


def test_other_config_warns_and_keeps_the_optimizers_settings() -> None:
    """A state saved under other control-law settings loads; the optimizer keeps its own
    and says which differ."""
    source = ELRA(make_model().parameters(), backend=BACKEND, kappa_gain=0.3)
    opt = ELRA(make_model().parameters(), backend=BACKEND)
    with pytest.warns(UserWarning, match=r"kappa_gain: saved 0\.3, here 0\.15"):
        opt.load_state_dict(source.state_dict())
    assert opt.config.kappa_gain == 0.15


# ---------------------------------------------------------------------------------------
# A failure while applying is undone
# ---------------------------------------------------------------------------------------
def _fail_after(real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, then an injected failure: the part already applied must be undone."""

    def failing(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        raise RuntimeError("injected")

    return failing


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("where", ["layout", "control"])
def test_failure_while_applying_is_undone(
    setup: str, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After torch's loader replaced state and groups and the layout wrote its stores
    (flat: in place), a failure restores the optimizer bit for bit."""
    opt, model, twin, twin_model = twins(setup)
    good = saved_state(setup)
    before = capture(opt, model)
    if where == "layout":
        monkeypatch.setattr(opt.layout, "load_state", _fail_after(opt.layout.load_state))
    else:
        monkeypatch.setattr(opt._law, "load", _fail_after(opt._law.load))
    with pytest.raises(RuntimeError, match="injected"):
        opt.load_state_dict(good)
    monkeypatch.undo()
    assert_unchanged_and_steps_like_twin(opt, model, twin, twin_model, before)


def test_bad_retrace_buffers_change_nothing() -> None:
    """Saved retrace buffers that do not fit are one ELRA.load_state_dict error, and the
    remembered values stay."""
    tracked = torch.arange(3.0)
    opt = ELRA(make_model().parameters(), backend=BACKEND, buffers=[tracked])
    bad = copy.deepcopy(opt.state_dict())
    bad["elra_control"]["buffers"]["buffers"]["0"] = torch.zeros(4)
    bad["elra_control"]["control"][control.ALPHA] = 0.5  # would show a partial load
    control_before = opt.control_state.clone()
    with pytest.raises(ValueError, match=PREFIX + "the saved retrace buffers do not fit"):
        opt.load_state_dict(bad)
    assert torch.equal(opt.control_state, control_before)
    assert torch.equal(opt.retrace_buffers.state_dict()["buffers"]["0"], torch.arange(3.0))


def _one_cycle_and_swa(opt: ELRA) -> list[Any]:
    """OneCycleLR (no momentum cycling: ELRA has none) then SWALR: between them they write
    initial_lr, max_lr, min_lr and swa_lr into the param groups."""
    sched = torch.optim.lr_scheduler
    one_cycle = sched.OneCycleLR(opt, max_lr=1.0, total_steps=40, cycle_momentum=False)
    return [one_cycle, torch.optim.swa_utils.SWALR(opt, swa_lr=0.5, anneal_epochs=3)]


@pytest.mark.parametrize("setup", ["lists", "flat"])
def test_state_with_lr_scheduler_keys_round_trips(setup: str) -> None:
    """A checkpoint taken under torch's schedulers resumes: the keys they put into the
    param groups load (as torch's optimizers keep them), and the resumed run takes the
    uninterrupted run's steps bit for bit. Keys no scheduler writes are still refused."""

    def train(opt: ELRA, model: torch.nn.Module, schedulers: list[Any], steps: range) -> None:
        for step_index in steps:
            run_steps(opt, model, [step_index])
            for scheduler in schedulers:
                scheduler.step()

    model, twin_model = make_model(seed=0), make_model(seed=0)
    opt, twin = build(model, setup), build(twin_model, setup)
    schedulers, twin_schedulers = _one_cycle_and_swa(opt), _one_cycle_and_swa(twin)
    train(opt, model, schedulers, range(BEFORE))
    saved = copy.deepcopy(opt.state_dict())
    assert {"initial_lr", "max_lr", "min_lr", "swa_lr"} <= set(saved["param_groups"][0])
    twin_schedulers_state = [s.state_dict() for s in schedulers]
    twin_model.load_state_dict(model.state_dict())
    twin.load_state_dict(saved)
    for scheduler, state in zip(twin_schedulers, twin_schedulers_state, strict=True):
        scheduler.load_state_dict(state)
    train(opt, model, schedulers, range(BEFORE, BEFORE + AFTER))
    train(twin, twin_model, twin_schedulers, range(BEFORE, BEFORE + AFTER))
    for p, q in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(p, q)
    adam_like = copy.deepcopy(saved)
    adam_like["param_groups"][0]["betas"] = (0.9, 0.999)
    with pytest.raises(ValueError, match=r"\['betas'\], which ELRA does not use"):
        twin.load_state_dict(adam_like)


@pytest.mark.parametrize("setup", ["lists", "flat"])
@pytest.mark.parametrize("saved_named", [True, False], ids=["named_to_plain", "plain_to_named"])
def test_param_names_load_as_torch_loads_them(setup: str, saved_named: bool) -> None:
    """A state saved by an optimizer built from ``named_parameters()`` loads into one
    built from ``parameters()`` and back, as torch.optim.Adam's does: the saved names are
    kept, else the optimizer's own; the loaded run takes the saver's steps bit for bit."""
    model, twin_model = make_model(seed=0), make_model(seed=0)
    named = ELRA(groups_of(model, named=True), backend=BACKEND, cycle_steps=5, **SETUPS[setup])
    if "param_names" not in named.param_groups[0]:
        pytest.skip("this torch keeps no param_names (torch < 2.6)")
    plain = build(twin_model, setup)
    saver, saver_model, loader, loader_model = (
        (named, model, plain, twin_model) if saved_named else (plain, twin_model, named, model)
    )
    run_steps(saver, saver_model, range(BEFORE))
    loader_model.load_state_dict(saver_model.state_dict())
    loader.load_state_dict(copy.deepcopy(saver.state_dict()))

    def adam(named: bool) -> torch.optim.Adam:
        groups = groups_of(make_model(), named=named)
        return torch.optim.Adam([{"params": group["params"]} for group in groups])

    adam_loader = adam(named=not saved_named)  # torch's rule: Adam loading the same way
    adam_loader.load_state_dict(adam(named=saved_named).state_dict())
    expected = [group.get("param_names") for group in adam_loader.param_groups]
    assert expected == [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    assert [group.get("param_names") for group in loader.param_groups] == expected
    assert [group["wd"] for group in loader.param_groups] == [0.999, 1.0]
    span = range(BEFORE, BEFORE + AFTER)
    assert run_steps(loader, loader_model, span) == run_steps(saver, saver_model, span)
    for p, q in zip(loader_model.parameters(), saver_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert torch.equal(loader.control_state, saver.control_state)


@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flat"])
def test_a_flattened_distributed_checkpoint_round_trips(flat: bool, tmp_path: Any) -> None:
    """torch.distributed.checkpoint with ``flatten_optimizer_state_dict=True``
    (torchtitan's setting) rebuilds each param group from the live optimizer's keys on
    load: ELRA's first group keeps a slot for its control state, so a flattened
    checkpoint saved and loaded (one process) continues as the original does, bit for
    bit; the slot survives a load and is no control state in torch's own state dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model = make_model()
    opt = ELRA(model.parameters(), flat=flat)
    run_steps(opt, model, range(4))
    flattened = get_optimizer_state_dict(model, opt, options=options)
    assert not any(key == "elra_control" for key in flattened)  # only under param_groups.*
    dcp.save({"optim": flattened}, checkpoint_id=str(tmp_path / "ckpt"))

    twin = make_model()
    twin.load_state_dict(model.state_dict())
    twin_opt = ELRA(twin.parameters(), flat=flat)
    state = {"optim": get_optimizer_state_dict(twin, twin_opt, options=options)}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    set_optimizer_state_dict(twin, twin_opt, state["optim"], options=options)
    assert torch.equal(twin_opt.control_state, opt.control_state)
    assert "elra_control" in twin_opt.param_groups[0]  # kept for the next flattened load
    run_steps(opt, model, range(4, 8))
    run_steps(twin_opt, twin, range(4, 8))
    pairs = zip(model.parameters(), twin.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert opt.alpha == twin_opt.alpha

    torch_only = torch.optim.Optimizer.state_dict(opt)  # the live slot, no control state
    with pytest.raises(ValueError, match="no ELRA control state"):
        twin_opt.load_state_dict(torch_only)
