"""Bad input (elra_fused.checks): a clear error naming the culprit, nothing changed."""

from __future__ import annotations

import functools

import pytest
import torch
from _lockstep import free_port, make_model, mlp_setup

import elra_fused

ELRA = functools.partial(elra_fused.ELRA, backend="reference")


def test_bad_loss_arguments() -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters())
    torch.nn.functional.mse_loss(model(data), target).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match="needs the loss"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(torch.ones(3))
    with pytest.raises(TypeError, match="loss must be"):
        opt.step("0.5")
    with pytest.raises(TypeError, match="real"):
        opt.step(torch.tensor(1.0 + 1.0j))
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)
    assert opt.retrace_count == 0


def test_sparse_gradient_is_rejected_and_weights_kept() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = ELRA(embedding.parameters())
    before = embedding.weight.detach().clone()
    loss = embedding(torch.tensor([1, 2])).sum()
    loss.backward()
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 .*sparse"):
        opt.step(loss)
    assert torch.equal(embedding.weight.detach(), before)


def test_complex_and_integer_params_rejected() -> None:
    with pytest.raises(ValueError, match="complex"):
        ELRA([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="steps float32"):
        ELRA([torch.ones(2, dtype=torch.int64)])
    float8 = getattr(torch, "float8_e4m3fn", None)
    if float8 is not None:  # no backend steps it: refused at construction, not each step
        with pytest.raises(ValueError, match="steps float32"):
            ELRA([torch.nn.Parameter(torch.ones(2).to(float8))])
    with pytest.raises(ValueError, match="empty"):
        ELRA([])
    opt = ELRA([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="complex"):  # a group added later ...
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.cfloat))]})
    assert len(opt.param_groups) == 1  # ... is not kept


def test_dtensor_params_on_one_rank_step_like_plain_ones() -> None:
    """A DTensor parameter (here on a 1-rank mesh) is stepped through its local shard,
    with the same bits as the plain tensor; flat buffers are refused for it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.tensor import Shard, distribute_tensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import Shard, distribute_tensor
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        start = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
        sharded = torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)]))
        plain = torch.nn.Parameter(start.clone())
        with pytest.raises(ValueError, match="flat=False"):
            ELRA([sharded], flat=True)
        optimizers = [ELRA([sharded]), ELRA([plain])]
        for _ in range(5):
            for param, opt in zip((sharded, plain), optimizers, strict=True):
                opt.zero_grad()
                loss = (param * param).sum()
                loss.backward()
                opt.step(loss)
        assert torch.equal(sharded.to_local(), plain.detach())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wd", [0.0, 1.5, -0.1, True])
def test_bad_wd_rejected(wd: float) -> None:
    with pytest.raises(ValueError, match="wd"):
        ELRA([torch.nn.Parameter(torch.ones(2))], wd=wd)


@pytest.mark.parametrize("key", ["momentum", "betas", "eps"])
def test_unsupported_group_keys_rejected(key: str) -> None:
    with pytest.raises(ValueError, match=f"param group keys \\['{key}'\\] are not supported"):
        ELRA([{"params": [torch.nn.Parameter(torch.ones(2))], key: 0.9}])


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ({"lr": -0.1}, "lr scales the step"),
        ({"lr": float("nan")}, "lr scales the step"),
        ({"weight_decay": 1.0}, "weight_decay"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"wd": 0.9, "weight_decay": 0.2}, "they are one setting"),
    ],
)
def test_bad_lr_and_weight_decay_rejected(group: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ELRA([{"params": [torch.nn.Parameter(torch.ones(2))], **group}])


def test_process_group_must_be_a_process_group() -> None:
    with pytest.raises(TypeError, match="process_group must be a torch.distributed"):
        ELRA(make_model().parameters(), process_group="world")


def test_a_compact_state_dtype_limits_the_gradient_norm() -> None:
    """A G_{t-1} that would round to inf in bfloat16 is never accepted."""
    model, _, _ = mlp_setup()
    opt = elra_fused.ELRA(model.parameters(), state_dtype=torch.bfloat16, max_grad_norm=1e40)
    assert opt.config.max_grad_norm < torch.finfo(torch.bfloat16).max
    assert elra_fused.ELRA(model.parameters()).config.max_grad_norm is None
    with pytest.raises(ValueError, match="max_grad_norm"):
        ELRA(model.parameters(), max_grad_norm=-1.0)


# ---------------------------------------------------------------------------------------
# Settings written into the param groups after construction (users, schedules), checked
# by every step before anything moves
# ---------------------------------------------------------------------------------------
def _two_groups(flat: bool, **group0: object) -> tuple:
    """A model in two param groups (the fastest backend), one step taken, the next
    gradients in place; with a snapshot of its weights and state."""
    model, data, target = mlp_setup()
    params = list(model.parameters())
    opt = elra_fused.ELRA(
        [{"params": params[:2], **group0}, {"params": params[2:]}], wd=0.99, flat=flat
    )
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(data), target)
        loss.backward()
        opt.step(loss)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(data), target).backward()
    snapshot = ([p.detach().clone() for p in params], _state_copy(opt))
    return model, opt, params, snapshot


def _state_copy(opt: elra_fused.ELRA) -> list[torch.Tensor]:
    sd = opt.state_dict()
    tensors = [t for s in sd["state"].values() for t in s.values() if isinstance(t, torch.Tensor)]
    return [t.clone() for t in tensors] + [opt.control_state.clone()]


def _unchanged(opt: elra_fused.ELRA, params: list, snapshot: tuple) -> bool:
    weights, state = snapshot
    same_weights = all(torch.equal(p.detach(), w) for p, w in zip(params, weights, strict=True))
    return same_weights and all(
        torch.equal(a, b) for a, b in zip(_state_copy(opt), state, strict=True)
    )


@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flat"])
@pytest.mark.parametrize("bad", [float("nan"), 0.0, 1.5, torch.tensor(0.9), "0.99", None])
def test_a_bad_wd_written_into_a_later_group_fails_before_anything_moves(
    flat: bool, bad: object
) -> None:
    """wd written into group 1 after construction is checked by the step: a clear error
    naming the group, and group 0 is not stepped either (the update of one segment
    before the failing one would make a retry step it twice)."""
    model, opt, params, snapshot = _two_groups(flat)
    opt.param_groups[1]["wd"] = bad
    with pytest.raises(ValueError, match=r"wd .*\(param group 1\)"):
        opt.step(1.0)
    assert _unchanged(opt, params, snapshot)
    opt.param_groups[1]["wd"] = 0.99  # fixed: the retry steps once
    opt.step(1.0)
    assert not torch.equal(params[0].detach(), snapshot[0][0])


def _step_with(group0: dict, edit: dict) -> tuple[list[torch.Tensor], dict]:
    """Weights after one step of a two-group model whose group 0 was built with
    ``group0`` and then edited by ``edit``; and that group as the step left it."""
    torch.manual_seed(0)
    model, data, target = mlp_setup()
    params = list(model.parameters())
    opt = elra_fused.ELRA([{"params": params[:2], **group0}, {"params": params[2:]}])
    opt.param_groups[0].update(edit)
    loss = torch.nn.functional.mse_loss(model(data), target)
    loss.backward()
    opt.step(loss)
    return [p.detach().clone() for p in params], opt


def test_a_scheduled_weight_decay_is_the_decay_the_step_takes() -> None:
    """A group built with torch's weight_decay and then given a new one (a weight-decay
    schedule, as timm and DINO write it) steps with that decay, bit for bit as a group
    built with it; wd follows, and the state saved afterwards loads (one decay)."""
    edited, opt = _step_with({"weight_decay": 0.1}, {"weight_decay": 0.3})
    built, _ = _step_with({"weight_decay": 0.3}, {})
    assert all(torch.equal(a, b) for a, b in zip(edited, built, strict=True))
    assert opt.param_groups[0]["wd"] == 1.0 - 0.3
    model, _, _ = mlp_setup()
    params = list(model.parameters())
    fresh = elra_fused.ELRA([{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:]}])
    opt.param_groups[0]["weight_decay"] = 0.2  # edited after the last step: saved as one
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["wd"] == 1.0 - 0.2


def test_wd_edited_in_a_group_built_with_weight_decay_moves_both() -> None:
    """ELRA's own wd edited in a group that also holds torch's weight_decay: the step
    takes wd and weight_decay follows; both edited apart is an error."""
    edited, opt = _step_with({"weight_decay": 0.1}, {"wd": 0.7})
    built, _ = _step_with({"wd": 0.7}, {})
    assert all(torch.equal(a, b) for a, b in zip(edited, built, strict=True))
    assert opt.param_groups[0]["weight_decay"] == 1.0 - 0.7
    opt.param_groups[0].update(wd=0.5, weight_decay=0.1)
    with pytest.raises(ValueError, match="one setting"):
        opt.step(1.0)
    opt.param_groups[0]["weight_decay"] = 2.0
    opt.param_groups[0]["wd"] = 1.0 - 0.3  # consistent again except the bad decay ...
    opt.param_groups[0]["weight_decay"] = 0.3
    opt.step(1.0)  # ... fixed: a consistent pair steps


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_tensor_lr_is_checked_by_value(bad: float) -> None:
    """lr as a tensor (schedulers may keep it one) is refused like the number: at
    construction, and when written into the groups before a step (nothing moves)."""
    with pytest.raises(ValueError, match="lr"):
        ELRA([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(bad))
    model, opt, params, snapshot = _two_groups(False)
    for group in opt.param_groups:
        group["lr"] = lr = torch.tensor(bad, dtype=torch.float64)
        assert group["lr"] is lr
    with pytest.raises(ValueError, match="lr"):
        opt.step(1.0)
    assert _unchanged(opt, params, snapshot)


def test_a_device_lr_that_cannot_be_read_makes_no_step() -> None:
    """The device law cannot read a device tensor lr without a sync: a non-finite or
    negative one is taken as 0 there (no move), a valid one as it is; the host law reads
    it and refuses it."""
    from elra_fused.control_runner import ControlRunner, _host_lr

    runner = ControlRunner(
        elra_fused.ControlConfig(), torch.device("cpu"), host=False, compiled=False
    )
    for value, taken in [(float("nan"), 0.0), (float("inf"), 0.0), (-2.0, 0.0), (0.25, 0.25)]:
        assert runner._lr_tensor(torch.tensor(value)).item() == taken
    with pytest.raises(ValueError, match="lr"):
        _host_lr(torch.tensor(float("nan")))
    assert _host_lr(torch.tensor(0.5)) == 0.5


@pytest.mark.parametrize("flat", [False, True], ids=["lists", "flat"])
def test_state_dtype_that_no_kernel_stores_is_refused_at_construction(flat: bool) -> None:
    """G_{t-1} lives in the parameter's dtype or in bfloat16: any other state_dtype is a
    clear error at construction (not at every step), also for a group added later,
    which is not kept; the parameter's own dtype is the default."""
    fp32 = torch.nn.Parameter(torch.ones(3))
    for bad in (torch.float16, torch.float64):
        with pytest.raises(ValueError, match="state_dtype"):
            elra_fused.ELRA([torch.nn.Parameter(torch.ones(3))], state_dtype=bad, flat=flat)
    opt = elra_fused.ELRA([fp32], state_dtype=torch.float32, flat=flat)
    bf16 = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="state_dtype"):
        opt.add_param_group({"params": [bf16]})
    assert len(opt.param_groups) == 1
    fp32.grad = torch.ones(3)
    opt.step(1.0)
    assert ELRA([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))], state_dtype=torch.float64)


def test_a_loss_without_a_value_is_refused_when_recorded() -> None:
    """A meta (or sparse) tensor cannot be judged: record_loss refuses it (instead of
    every later step failing), and so does step."""
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters())
    for bad in (torch.tensor(1.0, device="meta"), torch.tensor([2.0]).to_sparse()):
        with pytest.raises(TypeError, match="hold its value"):
            opt.record_loss(bad)
        with pytest.raises(TypeError, match="hold its value"):
            opt.step(bad)
    opt.record_loss(torch.tensor(0.5))
    torch.nn.functional.mse_loss(model(data), target).backward()
    opt.step()


def test_a_group_with_another_lr_is_refused_when_added() -> None:
    """Every group needs group 0's lr (one global step): a group with another is refused
    when it is added (constructor or add_param_group, e.g. Lightning's
    BackboneFinetuning at lr / 10) and not kept, instead of every later step failing."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="same lr"):
        ELRA([{"params": [a]}, {"params": [b], "lr": 0.1}])
    opt = ELRA([a], lr=0.5)
    with pytest.raises(ValueError, match="same lr"):
        opt.add_param_group({"params": [b], "lr": 0.05})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [b]})  # the default lr is the constructor's
    assert opt.param_groups[1]["lr"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"reuse_grad_buffer": "no"}, TypeError),
        ({"flat": "yes"}, TypeError),
        ({"flat": 1}, TypeError),
        ({"cycle_steps": True}, ValueError),
        ({"gamma_max": 0.5}, ValueError),
        ({"kappa_gain": float("inf")}, ValueError),
        ({"alpha0": True}, ValueError),
        ({"warmup_steps": True}, ValueError),
        ({"step_crop": True}, ValueError),
        ({"max_grad_norm": True}, ValueError),
        ({"compile_control": "no"}, TypeError),
    ],
)
def test_options_of_the_wrong_kind_are_refused(kwargs: dict, error: type) -> None:
    """A truthy string is not a flag (``reuse_grad_buffer="no"`` switched reuse on), a bool
    is not a count or a size, alpha must be able to grow (gamma_max >= 1), and the noise
    gain is finite."""
    with pytest.raises(error, match="ELRA"):
        elra_fused.ELRA([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_numpy_and_integer_losses_are_numbers() -> None:
    """A numpy float (float32 as well as float64) or an int is a loss like a Python float."""
    np = pytest.importorskip("numpy")
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters())
    for loss in (np.float32(0.5), np.float64(0.4), 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(data), target).backward()
        opt.step(loss)
    with pytest.raises(TypeError, match="loss must be"):
        opt.step(np.bool_(True))


def test_a_parameter_resized_after_construction_is_named() -> None:
    """A parameter replaced by one of another size (``param.data = ...``) after the
    optimizer was built: the per-parameter layout names it (not a kernel's message about
    list element 0), and nothing moves."""
    model, data, target = mlp_setup()
    opt = elra_fused.ELRA(model.parameters(), flat=False)
    params = list(model.parameters())
    params[1].data = torch.zeros(params[1].numel() + 1)
    params[1].grad = torch.ones_like(params[1])
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"parameter 1 of param group 0 .*another size"):
        opt.step(1.0)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
    with pytest.raises(TypeError, match="bool tensor"):
        opt.step(torch.tensor(True))


@pytest.mark.parametrize(
    ("kwargs", "bad_group"),
    [
        ({"flat": True}, True),  # group 1 holds a float64 parameter the cpp kernels refuse
        ({"memory": "offload", "offload_chunk": 0}, False),
        ({"memory": "recover"}, True),
    ],
)
def test_a_refused_constructor_leaves_the_model_as_it_was(kwargs: dict, bad_group: bool) -> None:
    """Every group and option is checked before the flat layout moves any parameter into
    its buffers: a refused constructor leaves each parameter's storage and its None
    gradient as they were (group 0 was moved before group 1 was refused)."""
    if "cpp" not in elra_fused.ops.available_backends("cpu"):
        pytest.skip("needs a backend that refuses float64")
    model, _, _ = mlp_setup()
    params = list(model.parameters())
    groups = [{"params": params}]
    if bad_group:
        groups.append({"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]})
    pointers = [p.data_ptr() for p in params]
    with pytest.raises(ValueError, match="float64|offload_chunk"):
        elra_fused.ELRA(groups, backend="cpp", **kwargs)
    assert [p.data_ptr() for p in params] == pointers
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("after", ["load_state_dict", "add_param_group", "deepcopy"])
def test_a_scheduled_weight_decay_is_followed_after_a_load_an_add_or_a_copy(after: str) -> None:
    """The groups' decay is followed from the first step after a resume, an added group
    or a copy, whose group dicts are new (the edit was refused as two decays, forever)."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = elra_fused.ELRA([{"params": [model.weight], "weight_decay": 0.01}])
    loss = model(torch.randn(3, 4)).pow(2).mean()
    loss.backward()
    opt.step(loss)
    if after == "load_state_dict":
        fresh = elra_fused.ELRA([{"params": [model.weight], "weight_decay": 0.01}])
        fresh.load_state_dict(opt.state_dict())
        opt = fresh
    elif after == "add_param_group":
        opt.add_param_group({"params": [model.bias], "weight_decay": 0.01})
    else:
        model, opt = copy.deepcopy((model, opt))
    for group in opt.param_groups:
        group["weight_decay"] = 0.02  # the schedule's next value
    opt.zero_grad()
    loss = model(torch.randn(3, 4)).pow(2).mean()
    loss.backward()
    opt.step(loss)
    assert all(group["wd"] == 1.0 - 0.02 for group in opt.param_groups)
    opt.param_groups[0]["wd"] = 0.3  # ELRA's own key: weight_decay follows, and the
    opt.step(loss)  # state (1 - (1 - 0.3) is not 0.3 in floats) still loads
    elra_fused.ELRA(opt.param_groups).load_state_dict(opt.state_dict())


def test_groups_of_another_elra_build_a_new_one() -> None:
    """``ELRA(opt.param_groups)``: the first group's control-state slot is not a setting
    (it was refused as an unknown key)."""
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
    opt = elra_fused.ELRA([{"params": params[:1]}, {"params": params[1:], "wd": 0.9}])
    again = elra_fused.ELRA(opt.param_groups)
    assert [g["wd"] for g in again.param_groups] == [1.0, 0.9]


def test_state_dtype_covers_frozen_parameters() -> None:
    """A frozen parameter may be unfrozen later, when its G_{t-1} is made in state_dtype:
    a dtype the kernels cannot take for it is refused at construction (a bf16 part
    unfrozen later failed every step in the kernel)."""
    frozen = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16), requires_grad=False)
    with pytest.raises(ValueError, match="state_dtype"):
        elra_fused.ELRA([torch.nn.Parameter(torch.ones(3)), frozen], state_dtype=torch.float32)


@pytest.mark.parametrize("name", ["compile_control", "host_control"])
def test_law_switches_are_bools(name: str) -> None:
    """compile_control / host_control take True or False ("no" would switch them on)."""
    opt = elra_fused.ELRA([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match=name):
        setattr(opt, name, "no")
    if name == "compile_control":
        with pytest.raises(TypeError, match=name):
            elra_fused.ELRA([torch.nn.Parameter(torch.ones(2))], compile_control=0)
