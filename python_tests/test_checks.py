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
    with pytest.raises(ValueError, match="floating-point"):
        ELRA([torch.ones(2, dtype=torch.int64)])
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
