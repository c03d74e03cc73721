"""Sharded parameters (elra_fused/sharding.py): FSDP2 ``fully_shard`` over 2 CPU processes
(gloo, loopback) takes the single-process steps, DCP checkpoints save per rank and load
on 2 ranks and on 1, and what ELRA cannot step is refused before anything changes."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from _lockstep import free_port

from elra_fused import ELRA

STEPS = 100
SPIKE = 30  # rank 1 alone reports a spiked loss: the averaged loss retraces
NAN_STEP = 55  # rank 1's shard of one gradient gets a NaN: every rank retraces
WORLD = 2


def _model() -> torch.nn.Sequential:
    """A small stack of transformer-like blocks: several FSDP units, shapes that 2 does
    not divide (7, 5, 3), norms and biases."""
    torch.manual_seed(0)

    def block() -> torch.nn.Sequential:
        return torch.nn.Sequential(
            torch.nn.LayerNorm(6), torch.nn.Linear(6, 7), torch.nn.GELU(), torch.nn.Linear(7, 6)
        )

    return torch.nn.Sequential(torch.nn.Linear(5, 6), block(), block(), torch.nn.Linear(6, 3))


def _batch(step_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step_index)
    inputs = torch.randn(16, 5, generator=gen)
    return inputs, torch.sin(inputs[:, :3]) + 0.1 * torch.randn(16, 3, generator=gen)


def _shard_model(model: torch.nn.Sequential) -> None:
    from torch.distributed.fsdp import fully_shard

    for unit in (model[1], model[2]):
        fully_shard(unit)
    fully_shard(model)


#: The NaN goes into the first row of rank 1's shard of this weight (torch.chunk rows).
NAN_PARAM = "1.1.weight"  # Linear(6, 7): 7 rows, rank 0 holds 4, rank 1 holds 3
NAN_ROW = math.ceil(7 / WORLD)


def _losses(model: torch.nn.Module, step_index: int, ranks: list[int]) -> list[torch.Tensor]:
    inputs, target = _batch(step_index)
    return [torch.nn.functional.mse_loss(model(inputs[r::WORLD]), target[r::WORLD]) for r in ranks]


def _train(model: torch.nn.Module, opt: ELRA, steps: range, rank: int | None) -> list[bool]:
    """rank None: one process, the mean of both ranks' losses (what FSDP averages)."""
    decisions = []
    named = dict(model.named_parameters())
    for step_index in steps:
        opt.zero_grad()
        losses = _losses(model, step_index, [0, 1] if rank is None else [rank])
        loss = sum(losses) / len(losses)
        loss.backward()
        if step_index == NAN_STEP:
            grad = named[NAN_PARAM].grad
            if rank is None:
                grad[NAN_ROW, 0] = math.nan
            elif rank == 1:
                grad.to_local()[0, 0] = math.nan
        if step_index == SPIKE and rank != 0:
            # the single process averages rank 1's spiked loss with rank 0's
            loss = (
                loss.detach() * 1e3
                if rank == 1
                else 0.5 * (losses[0].detach() + losses[1].detach() * 1e3)
            )
        opt.step(loss)
        decisions.append(opt.last_step_retraced)
    return decisions


def _full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for name, p in model.named_parameters()
    }


def _init(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )


def _finish() -> None:
    """Leave together: every rank waits for the others before the group (and rank 0's
    store) goes away, so no rank's gloo threads lose their peer while still running."""
    dist.barrier()
    dist.destroy_process_group()


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        flatten = StateDictOptions(flatten_optimizer_state_dict=True)  # torchtitan's
        model = _model()
        _shard_model(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "no process_group" warning under FSDP
            opt = ELRA(model.parameters(), cycle_steps=10)
        decisions = _train(model, opt, range(STEPS), rank)
        full = _full(model)
        # Checkpoint mid-run, continue, then load the checkpoint into a fresh pair.
        checkpoint = os.path.join(out_dir, "dcp")
        for suffix, options in (("", None), ("_flat", flatten)):
            dcp.save(
                {
                    "model": get_model_state_dict(model),
                    "optim": get_optimizer_state_dict(model, opt, options=options),
                },
                checkpoint_id=checkpoint + suffix,
            )
        continued = _train(model, opt, range(STEPS, STEPS + 20), rank)
        reloads = {}
        for suffix, options in (("", None), ("_flat", flatten)):
            model2 = _model()
            _shard_model(model2)
            opt2 = ELRA(model2.parameters(), cycle_steps=10)
            state = {
                "model": get_model_state_dict(model2),
                "optim": get_optimizer_state_dict(model2, opt2, options=options),
            }
            dcp.load(state, checkpoint_id=checkpoint + suffix)
            set_model_state_dict(model2, state["model"])
            set_optimizer_state_dict(model2, opt2, state["optim"], options=options)
            reloads[suffix] = (_train(model2, opt2, range(STEPS, STEPS + 20), rank), _full(model2))
        results = {
            "decisions": decisions,
            "full": full,
            "alpha": opt.alpha,
            "continued": (continued, _full(model)),
            "reloaded": reloads[""],
            "reloaded_flattened": reloads["_flat"],
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        _finish()


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    out_dir = str(tmp_path_factory.mktemp("fsdp"))
    torch.multiprocessing.spawn(_fsdp_worker, args=(free_port(), out_dir), nprocs=WORLD, join=True)
    return out_dir, [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def test_fsdp2_takes_the_single_process_steps(fsdp_run) -> None:
    """Same decisions on both ranks and as one process on the whole batch (a spike on
    one rank and a NaN in one rank's shard both retrace everywhere); parameters within
    fp32 tolerance (the shard sums add in another order)."""
    _, ranks = fsdp_run
    model = _model()
    opt = ELRA(model.parameters(), cycle_steps=10)
    decisions = _train(model, opt, range(STEPS), None)
    assert decisions[SPIKE] and decisions[NAN_STEP]
    for result in ranks:
        assert result["decisions"] == decisions
        assert result["alpha"] == ranks[0]["alpha"]  # bit-identical decisions
        for name, param in model.named_parameters():
            torch.testing.assert_close(result["full"][name], param.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["reloaded", "reloaded_flattened"])
def test_dcp_checkpoint_loads_on_the_same_ranks_and_continues_identically(
    fsdp_run, kind: str
) -> None:
    """Also with ``flatten_optimizer_state_dict=True`` (torchtitan's setting), whose
    loader rebuilds the groups from the live optimizer's keys."""
    _, ranks = fsdp_run
    for result in ranks:
        decisions, full = result["continued"]
        reloaded_decisions, reloaded = result[kind]
        assert reloaded_decisions == decisions
        for name, value in full.items():
            assert torch.equal(reloaded[name], value), name


def test_dcp_checkpoint_saved_on_two_ranks_loads_on_one(fsdp_run) -> None:
    """2 -> 1: the sharded G_{t-1} is gathered into plain tensors; the one process
    continues with the 2-rank run's decisions and parameters (fp32 tolerance)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    out_dir, ranks = fsdp_run
    model = _model()
    opt = ELRA(model.parameters(), cycle_steps=10)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    decisions = _train(model, opt, range(STEPS, STEPS + 20), None)
    expected_decisions, expected = ranks[0]["continued"]
    assert decisions == expected_decisions
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-4, atol=1e-5)


def _refusal_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Partial, Shard

        messages = {}

        def refused(name: str, build) -> None:
            try:
                build()
            except ValueError as exc:
                messages[name] = str(exc)

        model = _model()
        _shard_model(model[1])  # only one block sharded: the rest plain
        refused("mixed", lambda: ELRA(model.parameters()))
        sharded = _model()
        _shard_model(sharded)
        before = [p.to_local().clone() for p in sharded.parameters()]
        refused("flat", lambda: ELRA(sharded.parameters(), flat=True))
        refused("recover", lambda: ELRA(sharded.parameters(), memory="recover"))
        mesh = init_device_mesh("cpu", (WORLD,))
        partial = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Partial()]))
        refused("partial", lambda: ELRA([partial]))
        other = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("other",))
        on_mesh = torch.nn.Parameter(DTensor.from_local(torch.ones(3), mesh, [Shard(0)]))
        on_other = torch.nn.Parameter(DTensor.from_local(torch.ones(3), other, [Shard(0)]))
        refused("meshes", lambda: ELRA([on_mesh, on_other]))
        # A full (unsharded) state dict loaded straight into a sharded optimizer.
        opt = ELRA(sharded.parameters())
        full_state = opt.state_dict()
        for entry in full_state["state"].values():
            entry["grad_prev"] = entry["grad_prev"].full_tensor()
        refused("plain_state", lambda: opt.load_state_dict(full_state))
        unchanged = all(
            torch.equal(p.to_local(), b) for p, b in zip(sharded.parameters(), before, strict=True)
        )
        torch.save((messages, unchanged), os.path.join(out_dir, f"refusals{rank}.pt"))
    finally:
        _finish()


def test_what_elra_cannot_step_is_refused_clearly(tmp_path) -> None:
    torch.multiprocessing.spawn(
        _refusal_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True
    )
    messages, unchanged = torch.load(tmp_path / "refusals0.pt")
    assert unchanged
    assert "DTensors" in messages["mixed"] and "fully_shard to the root" in messages["mixed"]
    assert "flat=False" in messages["flat"]
    assert "memory='standard'" in messages["recover"]
    assert "Partial" in messages["partial"]
    assert "different device meshes" in messages["meshes"]
    assert "set_optimizer_state_dict" in messages["plain_state"]


# ------------------------------------------------------------------ dynamic batch size
DBS_EPOCHS = 8
DBS_SAMPLES = 256
MICRO_BATCH = 4


def _dbs_dataset() -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(5)
    inputs = torch.randn(DBS_SAMPLES, 5, generator=gen)
    target = torch.sin(inputs[:, :3]) + 0.3 * torch.randn(DBS_SAMPLES, 3, generator=gen)
    return torch.utils.data.TensorDataset(inputs, target)


def _rank_loader(rank: int) -> torch.utils.data.DataLoader:
    """Rank ``rank``'s share: DistributedSampler semantics, no sample twice per epoch."""
    sampler = torch.utils.data.DistributedSampler(
        _dbs_dataset(), num_replicas=WORLD, rank=rank, shuffle=True, seed=3
    )
    return torch.utils.data.DataLoader(_dbs_dataset(), batch_size=MICRO_BATCH, sampler=sampler)


class _GlobalBatches:
    """One process: micro-batch k is the union of every rank's micro-batch k."""

    def __init__(self) -> None:
        self.loaders = [_rank_loader(r) for r in range(WORLD)]

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.sampler.set_epoch(epoch)

    def __iter__(self):
        for parts in zip(*self.loaders, strict=True):
            yield tuple(torch.cat(tensors) for tensors in zip(*parts, strict=True))


def _dbs_train(model: torch.nn.Module, loader, set_epoch) -> tuple[list[int], list[bool]]:
    """ELRA with the dynamic batch size (paper 3.3): returns m per step and decisions."""
    from elra_fused.batching import DynamicBatchSize, GroupedBatches

    opt = ELRA(model.parameters(), min_cycle_losses=4)
    sizer = DynamicBatchSize(opt, m0=2, gradient_decay=True)
    grouped = GroupedBatches(loader, sizer)
    ms, decisions = [], []
    for epoch in range(DBS_EPOCHS):
        set_epoch(epoch)
        for group in grouped:
            total = 0.0
            for inputs, target in group:
                loss = torch.nn.functional.mse_loss(model(inputs), target)
                (loss * group.scale).backward()
                total = total + loss.detach()
            opt.step(total / len(group))
            opt.zero_grad()
            ms.append(len(group))
            decisions.append(opt.last_step_retraced)
    return ms, decisions


def _dbs_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    try:
        model = _model()
        _shard_model(model)
        loader = _rank_loader(rank)
        ms, decisions = _dbs_train(model, loader, loader.sampler.set_epoch)
        torch.save((ms, decisions, _full(model)), os.path.join(out_dir, f"dbs{rank}.pt"))
    finally:
        _finish()


def test_dynamic_batch_size_grows_every_ranks_share_at_the_same_step(tmp_path) -> None:
    """Each rank reads its own DistributedSampler share; the batch-size rule decides from
    the all-reduced statistics, so every rank takes m_t micro-batches at the same step
    (the global batch is WORLD * m_t * bs_min), with gradient decay, and the run is the
    single-process run on the union of the shares."""
    torch.multiprocessing.spawn(
        _dbs_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True
    )
    ranks = [torch.load(tmp_path / f"dbs{r}.pt") for r in range(WORLD)]
    model = _model()
    batches = _GlobalBatches()
    ms, decisions = _dbs_train(model, batches, batches.set_epoch)
    assert len(set(ms)) > 1, "the batch size changed during the run"
    for rank_ms, rank_decisions, full in ranks:
        assert rank_ms == ms
        assert rank_decisions == decisions
        for name, param in model.named_parameters():
            torch.testing.assert_close(full[name], param.detach(), rtol=1e-4, atol=1e-5)
