"""Sharded parameters: DTensors from FSDP2 (``fully_shard``) or tensor parallelism.

ELRA needs only two global scalars per step, <G_t, G_t> and <G_{t-1}, G_t> (and the
loss). Each rank runs the kernels on its local shards (``to_local()``: no gather, no
copy) and gets partial sums; one all-reduce of [<G,G>, <G_prev,G>, bound] in float64
over every rank of the mesh gives all ranks the same sums, so the control law, which is
deterministic, takes bit-identical decisions everywhere. The loss is averaged over the
same ranks (FSDP is data parallel: each rank's loss is that of its own batch), so a
spike or a NaN on one rank makes every rank retrace. Sharded training therefore costs
one extra all-reduce of three numbers per step.

A ``Replicate`` placement holds the same values on every rank of that mesh dimension
(HSDP's replica dimension, a replicated bias under tensor parallelism): its partials
are weighted by 1 / (number of copies) so that the sum counts each element once.
``Partial`` placements (pending reductions) hold no steppable value and are refused.

Sharded parameters use the per-parameter layout (FSDP2 owns their storage, so they
cannot move into flat buffers) and the standard memory mode (G_{t-1} as DTensors with
the parameters' placements, which ``torch.distributed.checkpoint`` saves per rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from . import checks
from ._torch_compat import is_dtensor

__all__ = ["Sharding", "loss_group", "replicas", "sharding_of"]


@dataclass(frozen=True)
class Sharding:
    """The mesh every sharded parameter lives on, and a process group over all its ranks
    (what the partial sums and the loss are reduced over)."""

    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    group: dist.ProcessGroup


def replicas(param: torch.Tensor) -> int:
    """How many ranks hold each local element of ``param`` (1 for plain tensors and for
    pure ``Shard`` placements): the product of the mesh sizes of its ``Replicate`` dims."""
    if not is_dtensor(param):
        return 1
    mesh = param.device_mesh
    return math.prod(
        mesh.size(dim) for dim, placement in enumerate(param.placements) if placement.is_replicate()
    )


def sharding_of(
    param_groups: list[dict[str, Any]], flat: bool | None, memory: str, reuse_grad_buffer: bool
) -> Sharding | None:
    """The :class:`Sharding` of the groups' parameters (None if none is a DTensor), after
    checking that ELRA can step them: all DTensors or none, one mesh, Shard or Replicate
    placements, the per-parameter layout and the standard memory mode."""
    params = [param for group in param_groups for param in group["params"]]
    dtensors = [p for p in params if is_dtensor(p)]
    if not dtensors:
        return None
    if len(dtensors) != len(params):
        raise ValueError(
            f"ELRA: {len(dtensors)} of {len(params)} parameters are DTensors (FSDP2 / tensor "
            "parallel) and the others plain tensors; the sums over the shards need every "
            "parameter sharded: apply fully_shard to the root module too (or to none). If "
            "the plain ones are frozen (a frozen embedding or head), pass only the trainable "
            "parameters: ELRA([p for p in model.parameters() if p.requires_grad])"
        )
    mesh = dtensors[0].device_mesh
    for param in dtensors:
        if param.device_mesh != mesh:
            raise ValueError(
                f"ELRA: the parameters live on different device meshes ({mesh} and "
                f"{param.device_mesh}); build one ELRA per mesh"
            )
        for placement in param.placements:
            if not (placement.is_shard() or placement.is_replicate()):
                raise ValueError(
                    f"ELRA: a parameter of shape {tuple(param.shape)} has the placement "
                    f"{placement}; ELRA steps Shard and Replicate placements (a Partial one "
                    "holds no value to step)"
                )
    if flat or memory != "standard" or reuse_grad_buffer:
        raise ValueError(
            "ELRA: sharded (DTensor) parameters are stepped in place per parameter: use "
            "flat=False (the default for them), memory='standard' and no reuse_grad_buffer "
            "(FSDP2 owns their storage, which flat buffers and point stores would move)"
        )
    return Sharding(mesh, _group_of(mesh))


def loss_group(
    sharded: Sharding | None, process_group: dist.ProcessGroup | None
) -> dist.ProcessGroup | None:
    """The group the loss is averaged over: the one given, else the mesh's (FSDP is data
    parallel: each rank's loss is that of its own batch). Plain parameters under
    torch.distributed without a group get DDP's warning."""
    if process_group is not None:
        return process_group
    if sharded is None:
        checks.warn_without_process_group()
        return None
    return sharded.group


def _group_of(mesh: Any) -> dist.ProcessGroup:
    """A process group over every rank of ``mesh`` (collective: every rank of the mesh
    builds the optimizer, so all of them get here)."""
    if mesh.ndim == 1:
        return mesh.get_group()
    ranks = sorted(mesh.mesh.flatten().tolist())
    if ranks == list(range(dist.get_world_size())):
        return dist.group.WORLD
    return dist.new_group(ranks)
