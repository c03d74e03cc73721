"""The torch-private glue (elra_fused._torch_compat): ELRA's step behaves as torch's
wrapped step for hooks and the profiler, DTensor detection and local shards."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import torch
from _lockstep import free_port, mlp_setup, mlp_step
from torch.optim.optimizer import register_optimizer_step_pre_hook

import elra_fused
from elra_fused._torch_compat import local_shard

ELRA = functools.partial(elra_fused.ELRA, backend="reference")
F64 = torch.float64


def test_step_hooks_run_as_with_torch_optimizers() -> None:
    # ELRA skips torch's step wrapper only while no hook is registered and no profiler
    # runs; with any of them the wrapper (and so torch's hook semantics) is back.
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters())
    calls: list[str] = []
    replaced_loss = torch.tensor(123.0, dtype=F64)

    def pre_hook(optimizer, args, kwargs):
        assert optimizer is opt
        calls.append("pre")
        return (args[0], replaced_loss), kwargs  # may replace the arguments (args[0]: opt)

    def post_hook(optimizer, args, kwargs):
        calls.append(f"post {float(args[1])}")

    def global_pre_hook(optimizer, args, kwargs):
        calls.append("global pre")

    handles = [opt.register_step_pre_hook(pre_hook), opt.register_step_post_hook(post_hook)]
    handles.append(register_optimizer_step_pre_hook(global_pre_hook))
    try:
        mlp_step(model, data, target, opt)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global pre", "pre", "post 123.0"]
    assert opt.control_state[elra_fused.control.LOSS_PREV].item() == 123.0  # the replaced loss

    calls.clear()
    mlp_step(model, data, target, opt)  # hooks removed: the direct path
    assert calls == []


def test_step_shows_in_the_profiler() -> None:
    model, data, target = mlp_setup()
    opt = ELRA(model.parameters())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        mlp_step(model, data, target, opt)
    names = {event.name for event in prof.events()}
    assert "Optimizer.step#ELRA.step" in names


_LOCAL_SHARD_OF_A_DTENSOR = r"""
import os
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from elra_fused._torch_compat import dtensor_class, local_shard

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["ELRA_TEST_PORT"])
dist.init_process_group("gloo", rank=0, world_size=1)
try:
    from torch.distributed.tensor import Shard, distribute_tensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import Shard, distribute_tensor
mesh = init_device_mesh("cpu", (1,))
d = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
view = d.to_local()
local = local_shard(d)
print(type(local) is torch.Tensor, not isinstance(local, dtensor_class()),
      local.data_ptr() == view.data_ptr(), local.shape == view.shape,
      local.stride() == view.stride())
dist.destroy_process_group()
"""


def test_local_shard_is_the_storage_to_local_views() -> None:
    """A DTensor's local shard without to_local()'s autograd Function: a plain tensor on
    the storage, shape and strides that to_local() returns a view of (checked on a real
    one-rank DTensor); objects without the private attribute go through to_local()."""

    class Sharded:
        def to_local(self) -> torch.Tensor:
            return torch.ones(2)

    assert torch.equal(local_shard(Sharded()), torch.ones(2))  # type: ignore[arg-type]
    if not torch.distributed.is_available():
        return
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-c", _LOCAL_SHARD_OF_A_DTENSOR],
        env={**os.environ, "ELRA_TEST_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True"] * 5, result.stdout
