"""Dynamic batch size (paper 3.3), gradient decay (3.4), grouping and skip-last (3.5)."""

from __future__ import annotations

import pytest
import torch

from elra_fused import ELRA, control
from elra_fused.batching import (
    BatchSizeController,
    DynamicBatchSize,
    GroupedBatches,
    batch_length,
    round_half_up,
)

NONE = (False, False, False)


def quiet_history(controller: BatchSizeController, means: list[float], sigma: float) -> None:
    """Feed cycles that trigger nothing (asserted), to build a history."""
    for mean in means:
        decision = controller.observe(mean, sigma)
        assert decision.conditions == NONE and decision.change == 0


# ----------------------------------------------------------------------------- controller
def test_condition_1_loss_worse_than_previous_by_sigma_over_10() -> None:
    controller = BatchSizeController(m0=2)
    quiet_history(controller, [2.0, 1.5, 1.0], sigma=0.1)
    assert controller.conditions(1.0 + 0.1 / 10 - 1e-9, 0.1) == NONE  # just below the margin
    decision = controller.observe(1.0 + 0.1 / 10 + 1e-9, 0.1)
    assert decision.conditions == (True, False, False)
    assert decision.change == 1 and decision.m_before == 2 and decision.m_after == 3


def test_condition_2_relative_noise_above_one_half() -> None:
    controller = BatchSizeController(m0=2)
    quiet_history(controller, [2.0, 1.5, 1.0], sigma=0.1)
    assert controller.conditions(0.9, 0.449) == NONE
    decision = controller.observe(0.9, 0.451)
    assert decision.conditions == (False, True, False)
    assert controller.m == 3


def test_condition_3_no_progress_for_three_cycles() -> None:
    controller = BatchSizeController(m0=2)
    # Means within sigma/10 of each other, relative noise 0.4: neither (1) nor (2).
    quiet_history(controller, [1.0, 1.02, 1.01], sigma=0.4)
    assert controller.conditions(0.999, 0.4) == NONE  # better than f_{s-3}: progress
    decision = controller.observe(1.005, 0.4)
    assert decision.conditions == (False, False, True)
    assert controller.m == 3


def test_condition_3_needs_all_three_later_cycles_worse() -> None:
    controller = BatchSizeController(m0=2)
    quiet_history(controller, [1.0, 0.99, 1.01], sigma=0.4)  # f_{s-2} better than f_{s-3}
    assert controller.observe(1.005, 0.4).conditions == NONE


def test_first_cycle_only_noise_condition_applies() -> None:
    controller = BatchSizeController(m0=2)
    assert controller.conditions(5.0, 1.0) == NONE  # no history: (1) and (3) cannot hold
    assert controller.conditions(5.0, 3.0) == (False, True, False)


def test_cascade_up_up_down_and_integer_rounding() -> None:
    controller = BatchSizeController(m0=2)
    changes, sizes = [], []
    for _ in range(9):
        decision = controller.observe(1.0, 0.9)  # condition (2) every cycle
        changes.append(decision.change)
        sizes.append(decision.m_after)
    assert changes == [1, 1, -1] * 3
    # m_t = round_half_up(2 * 1.5**e), e = 1, 2, 1, 2, 3, 2, 3, 4, 3
    assert sizes == [3, 5, 3, 5, 7, 5, 7, 10, 7]
    assert controller.changes == 9 and controller.exponent == 3


def test_non_finite_statistics_change_nothing() -> None:
    controller = BatchSizeController(m0=2)
    decision = controller.observe(float("nan"), float("inf"))
    assert decision.change == 0 and controller.m == 2


def test_floor_and_cap() -> None:
    # Every change a decrease: the floor holds m up.
    controller = BatchSizeController(m0=3, m_min=2, cascade_period=1)
    sizes = [controller.observe(1.0, 1.0).m_after for _ in range(4)]
    assert sizes == [2, 2, 2, 2]
    assert controller.exponent == -1  # held at the floor: no wind-up below it
    controller = BatchSizeController(m0=1, cascade_period=1)
    assert [controller.observe(1.0, 1.0).m_after for _ in range(3)] == [1, 1, 1]
    controller = BatchSizeController(m0=2, m_max=4)
    assert [controller.observe(1.0, 1.0).m_after for _ in range(5)] == [3, 4, 3, 4, 4]
    # Many ups at the cap, then the cascade's down: m leaves the cap at once (a wound-up
    # exponent would keep it there for as many downs as there were ups at the cap).
    controller = BatchSizeController(m0=2, m_max=4, cascade_period=10)
    sizes = [controller.observe(1.0, 1.0).m_after for _ in range(10)]
    assert sizes == [3, 4, 4, 4, 4, 4, 4, 4, 4, 3]


def test_round_half_up() -> None:
    assert [round_half_up(v) for v in (0.5, 1.49, 1.5, 2.5, 4.5, 6.75)] == [1, 1, 2, 3, 5, 7]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="m_min"):
        BatchSizeController(m_min=0)
    with pytest.raises(ValueError, match="m0"):
        BatchSizeController(m0=1, m_min=2)
    with pytest.raises(ValueError, match="m_max"):
        BatchSizeController(m0=4, m_max=3)
    with pytest.raises(ValueError, match="leftover"):
        GroupedBatches([], 1, leftover="keep")
    with pytest.raises(ValueError, match="fixed m"):
        GroupedBatches([], 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"m0": True}, "m0"),  # a bool is not a count
        ({"m_min": True}, "m_min"),
        ({"m_max": True}, "m_max"),
        ({"cascade_period": True}, "cascade_period"),
        ({"gradient_decay": "no"}, "gradient_decay"),  # a non-empty string is truthy
        ({"growth": float("inf")}, "growth"),  # overflowed m at the first change
        ({"growth": float("nan")}, "growth"),
        ({"growth": "2"}, "growth"),
    ],
)
def test_controller_refuses_arguments_of_the_wrong_kind(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchSizeController(**{"m0": 2, **kwargs})


@pytest.mark.parametrize(
    ("sizer", "kwargs", "error"),
    [
        (0.5, {}, TypeError),  # failed only at iteration, with an AttributeError
        ("2", {}, TypeError),
        (True, {}, ValueError),
        (2, {"cycle_samples": True}, ValueError),
        (2, {"skip_short_last": "yes"}, ValueError),
        (2, {"batch_len": 5}, TypeError),
    ],
)
def test_grouped_batches_checks_its_arguments_at_construction(
    sizer: object, kwargs: dict, error: type[Exception]
) -> None:
    with pytest.raises(error, match="GroupedBatches"):
        GroupedBatches([torch.zeros(4, 2)] * 3, sizer, **kwargs)


def _state_after_two_changes() -> dict:
    controller = BatchSizeController(m0=2)
    for mean in (1.0, 1.0):
        controller.observe(mean, 0.9)  # noisy: both cycles grow m
    return controller.state_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"exponent": 5, "changes": "x"}, "changes"),  # exponent was set before the error
        ({"changes": -1}, "changes"),
        ({"changes": True}, "changes"),
        ({"exponent": 1e9}, "exponent"),  # not an int, and |exponent| > changes
        ({"exponent": 3}, "exponent"),  # two changes move it by two at most
        ({"exponent": 2.5}, "exponent"),
        ({"exponent": 10**6, "changes": 10**6}, "overflows"),  # the next .m overflowed
        ({"means": ["1.0"]}, "means"),
        ({"means": None}, "means"),
        ({"exponent": None}, "exponent"),
    ],
)
def test_controller_load_checks_the_whole_state_before_changing_anything(
    change: dict, message: str
) -> None:
    controller = BatchSizeController(m0=2)
    controller.observe(1.0, 0.9)
    before, m_before = controller.state_dict(), controller.m
    with pytest.raises(ValueError, match=message):
        controller.load_state_dict({**_state_after_two_changes(), **change})
    assert controller.state_dict() == before and controller.m == m_before
    with pytest.raises(ValueError, match="lacks"):
        controller.load_state_dict({"exponent": 0, "changes": 0})
    assert controller.state_dict() == before
    controller.load_state_dict(_state_after_two_changes())  # a good state still loads
    assert controller.m == 5


def test_controller_state_round_trip() -> None:
    controller = BatchSizeController(m0=2)
    for mean in (1.0, 1.0, 1.0, 0.5):
        controller.observe(mean, 0.9)
    restored = BatchSizeController(m0=2)
    restored.load_state_dict(controller.state_dict())
    assert restored.m == controller.m
    assert restored.observe(1.0, 0.9) == controller.observe(1.0, 0.9)


# ----------------------------------------------------------------------------- gradient decay
def test_gradient_decay_scale() -> None:
    controller = BatchSizeController(m0=2, gradient_decay=True)
    assert controller.grad_scale == pytest.approx(1 / 2)
    controller.observe(1.0, 1.0)
    controller.observe(1.0, 1.0)  # m = 5
    assert controller.m == 5
    assert controller.decay_factor == pytest.approx(2 / 5)
    assert controller.grad_scale == pytest.approx((2 / 5) / 5)
    plain = BatchSizeController(m0=2)
    plain.observe(1.0, 1.0)
    assert plain.grad_scale == pytest.approx(1 / 3) and plain.decay_factor == 1.0


@pytest.mark.parametrize("decay", [False, True])
def test_group_scale_gives_decayed_mean_gradient(decay: bool) -> None:
    torch.manual_seed(0)
    controller = BatchSizeController(m0=2, gradient_decay=decay)
    controller.observe(1.0, 1.0)  # m = 3
    weight = torch.randn(5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(12, 5, dtype=torch.float64)
    batches = [x[i : i + 4] for i in range(0, 12, 4)]
    (group,) = list(GroupedBatches(batches, controller))
    total = torch.zeros((), dtype=torch.float64)
    for xb in group:
        loss = torch.tanh(xb @ weight).square().mean()
        (loss * group.scale).backward()
        total = total + loss.detach()
    mean_loss = total / len(group)
    reference = weight.detach().clone().requires_grad_(True)
    full = torch.tanh(x @ reference).square().mean()
    full.backward()
    factor = 2 / 3 if decay else 1.0
    torch.testing.assert_close(weight.grad, factor * reference.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(mean_loss, full.detach(), rtol=1e-12, atol=0)  # loss unscaled


# ----------------------------------------------------------------------------- grouping
def sizes(batches: list[torch.Tensor]) -> list[int]:
    return [len(b) for b in batches]


def test_skips_exactly_the_short_last_batch() -> None:
    loader = [torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(2)]
    grouped = GroupedBatches(loader, 1)
    groups = list(grouped)
    assert [sizes(g) for g in groups] == [[4], [4], [4]]
    assert grouped.skipped_batches == 1
    full = [torch.zeros(4)] * 4
    grouped = GroupedBatches(full, 1)
    assert len(list(grouped)) == 4 and grouped.skipped_batches == 0
    kept = GroupedBatches(loader, 1, skip_short_last=False)
    assert [sizes(g) for g in kept] == [[4], [4], [4], [2]]


def test_skip_short_last_with_a_dataloader_and_tuple_batches() -> None:
    dataset = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    grouped = GroupedBatches(loader, 1)
    groups = list(grouped)
    assert len(groups) == 2 and all(g.samples == 4 for g in groups)
    assert batch_length(groups[0][0]) == 4 and grouped.skipped_batches == 1
    single = GroupedBatches([torch.zeros(3)], 1)  # one batch: nothing to compare, kept
    assert len(list(single)) == 1


def test_m_change_mid_epoch_applies_to_the_next_group() -> None:
    controller = BatchSizeController(m0=2)
    loader = [torch.full((2,), float(i)) for i in range(14)]
    grouped = GroupedBatches(loader, controller)
    seen = []
    for group in grouped:
        seen.append(len(group))
        assert group.scale == pytest.approx(1 / len(group))
        if group.index in (1, 2):  # the user changes m mid-epoch: 2 -> 3 -> 5
            controller.observe(1.0, 1.0)
    assert seen == [2, 2, 3, 5]  # 12 micro-batches used, 2 carried over
    assert grouped.samples_seen == 24
    # The two leftover micro-batches open the next pass (no data lost, order kept).
    first = next(iter(grouped))
    assert [b[0].item() for b in first[:2]] == [12.0, 13.0]
    assert len(first) == 5


def test_leftover_drop() -> None:
    loader = [torch.zeros(1)] * 7
    grouped = GroupedBatches(loader, 3, leftover="drop")
    assert [len(g) for g in grouped] == [3, 3]
    assert grouped.dropped_batches == 1
    assert [len(g) for g in grouped] == [3, 3]  # nothing carried into the next pass


class StubOptimizer:
    """Records end_cycle calls and serves fixed cycle statistics."""

    def __init__(self, stats: tuple[float, float] | None, log: list[str]) -> None:
        self.stats, self.log = stats, log

    def end_cycle(self) -> None:
        self.log.append("end_cycle")

    def cycle_statistics(self) -> tuple[float, float] | None:
        return self.stats


def test_sample_cycles_close_through_the_sizer_and_change_m() -> None:
    log: list[str] = []
    sizer = DynamicBatchSize(StubOptimizer((1.0, 0.9), log), m0=2)  # (2) holds every cycle
    grouped = GroupedBatches([torch.zeros(1)] * 14, sizer, cycle_samples=4)
    seen = []
    for group in grouped:
        log.append(f"step {len(group)}")
        seen.append((len(group), group.ends_cycle))
    assert seen == [(2, False), (2, True), (3, False), (3, True)]
    assert log == ["step 2", "step 2", "end_cycle", "step 3", "step 3", "end_cycle"]
    assert sizer.m == 5 and grouped.cycles_closed == 2


def test_epoch_cycle_closes_after_the_last_step_of_each_pass() -> None:
    log: list[str] = []
    sizer = DynamicBatchSize(StubOptimizer(None, log), m0=2)  # no statistics yet: m stays
    grouped = GroupedBatches([torch.zeros(3)] * 5, sizer)
    for _ in range(2):
        for group in grouped:
            log.append(f"step {len(group)}")
    # pass 1: 4 micro-batches used, 1 carried; pass 2: 1 + 5 = 6 -> 3 groups
    assert log == ["step 2"] * 2 + ["end_cycle"] + ["step 2"] * 3 + ["end_cycle"]
    assert grouped.cycles_closed == 2


def test_dynamic_batch_size_reads_the_optimizers_statistics_once_per_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(40, 4), torch.randn(40, 1)
    loader = [(x[i : i + 5], y[i : i + 5]) for i in range(0, 40, 5)]
    opt = ELRA(model.parameters(), min_cycle_losses=1, sigma_inflation=1.0)  # measured sigma
    opt.host_control = False  # the law as device tensor ops, as on a GPU
    sizer = DynamicBatchSize(opt, m0=2)
    grouped = GroupedBatches(loader, sizer)
    losses: list[list[torch.Tensor]] = []
    epoch_losses: list[torch.Tensor] = []
    reads = []
    real_tolist = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor) -> object:
        reads.append(1)
        return real_tolist(self)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host sync in the training loop")

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", counting_tolist)
        for name in ("item", "__bool__", "__float__", "__int__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, forbidden)
        for _ in range(3):
            for group in grouped:
                total = torch.zeros(())
                for xb, yb in group:
                    loss = torch.nn.functional.mse_loss(model(xb), yb)
                    (loss * group.scale).backward()
                    total = total + loss.detach()
                opt.step(total / len(group))
                opt.zero_grad()
                accepted = 1 - opt.control_state[control.LAST_RETRACED]  # device scalar
                epoch_losses.append(torch.stack([total / len(group), accepted.float()]))
            losses.append(epoch_losses)
            epoch_losses = []
    assert len(reads) == 3  # one cycle_statistics() per epoch, nothing per step
    decisions = sizer.controller.decisions
    assert len(decisions) == 3
    # One source: the controller saw exactly the optimizer's statistics of the last cycle.
    assert (decisions[-1].mean, decisions[-1].sigma) == opt.cycle_statistics()
    # The statistics are over the accepted steps (a retraced loss is an outlier).
    last_epoch = torch.stack(losses[-1]).double()
    last_epoch = last_epoch[last_epoch[:, 1] > 0, 0]
    assert 0 < len(last_epoch) <= len(losses[-1])
    assert decisions[-1].mean == pytest.approx(last_epoch.mean().item(), rel=1e-12)
    assert decisions[-1].sigma == pytest.approx(last_epoch.std(correction=0).item(), rel=1e-9)


def test_dynamic_batch_size_refuses_an_optimizer_that_closes_cycles_itself() -> None:
    opt = ELRA([torch.nn.Parameter(torch.ones(2))], cycle_steps=5)
    with pytest.raises(ValueError, match="cycle_steps=None"):
        DynamicBatchSize(opt, m0=2)


def test_dynamic_batch_size_refuses_a_controller_of_another_type() -> None:
    """An int passed as the controller failed only at the first read of m."""
    opt = ELRA([torch.nn.Parameter(torch.ones(2))])
    with pytest.raises(TypeError, match="controller must be a BatchSizeController"):
        DynamicBatchSize(opt, controller=2)  # type: ignore[arg-type]
