"""Mean value boosting (paper 3.7): exact averages, exact restore, state round trip."""

from __future__ import annotations

import io

import pytest
import torch

from elra_fused.boost import Booster

F64 = torch.float64


def small_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(7, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 3)
    ).to(dtype)


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)


def bits(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 != 0.0 and NaN payloads count)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.detach().reshape(-1).view(ints[tensor.element_size()])


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(as_bits(x), as_bits(y))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_mean_equals_the_mean_of_the_iterates(dtype: torch.dtype) -> None:
    model = small_model(dtype)
    booster = Booster(model.parameters())
    iterates = []
    for _ in range(37):
        perturb(model)
        booster.update()
        iterates.append([p.detach().to(F64).clone() for p in model.parameters()])
    expected = [torch.stack(column).mean(0) for column in zip(*iterates, strict=True)]
    assert booster.end_window()
    assert booster.averaged_count == 37
    for got, want in zip(booster.mean(), expected, strict=True):
        assert got.dtype == dtype
        if dtype == F64:
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)
        else:  # the float64 mean, rounded once to float32
            torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)


def test_windows_are_independent_and_auto_close() -> None:
    param = torch.nn.Parameter(torch.zeros(3, dtype=F64))
    booster = Booster([param], window=4)
    for value in range(1, 9):  # windows {1,2,3,4} and {5,6,7,8}
        with torch.no_grad():
            param.fill_(value)
        booster.update()
        if value == 4:
            assert booster.windows_closed == 1
            torch.testing.assert_close(booster.mean()[0], torch.full((3,), 2.5, dtype=F64))
    assert booster.windows_closed == 2 and booster.count == 0
    torch.testing.assert_close(booster.mean()[0], torch.full((3,), 6.5, dtype=F64))
    assert not booster.end_window()  # empty window: the last mean stays
    torch.testing.assert_close(booster.mean()[0], torch.full((3,), 6.5, dtype=F64))


def test_open_window_mean_before_any_close_and_error_without_iterates() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    booster = Booster([param])
    with pytest.raises(RuntimeError, match="no iterates"):
        booster.mean()
    with torch.no_grad():
        param.fill_(4.0)
    booster.update()
    with torch.no_grad():
        param.fill_(2.0)
    booster.update()
    torch.testing.assert_close(booster.mean()[0], torch.full((2,), 3.0))


def test_boosted_swaps_in_the_mean_and_restores_bitwise() -> None:
    model = small_model()
    booster = Booster(model.parameters())
    for _ in range(5):
        perturb(model)
        booster.update()
    booster.end_window()
    perturb(model)
    original = bits(list(model.parameters()))
    weight_view = model[0].weight  # the same tensor objects must be reused (views stay valid)
    with booster.boosted(model):
        for param, mean in zip(model.parameters(), booster.mean(), strict=True):
            assert torch.equal(param, mean)
        assert model[0].weight is weight_view
    assert_bitwise(list(model.parameters()), original)


def test_boosted_restores_bitwise_when_the_body_raises() -> None:
    model = small_model()
    booster = Booster(model.parameters())
    perturb(model)
    booster.update()
    perturb(model)
    original = bits(list(model.parameters()))
    buffers = bits(list(model.buffers()))
    with pytest.raises(ZeroDivisionError):
        with booster.boosted(model, bn_data=[torch.randn(8, 7)]):
            with torch.no_grad():
                model[0].weight.mul_(3.0)  # even a body that writes the weights
            raise ZeroDivisionError
    assert_bitwise(list(model.parameters()), original)
    assert_bitwise(list(model.buffers()), buffers)
    assert model.training


def test_batchnorm_statistics_recomputed_at_the_boosted_point_then_restored() -> None:
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm1d(4)
    model = torch.nn.Sequential(bn)
    booster = Booster(model.parameters())
    booster.update()
    data = [torch.randn(16, 4) * 3 + 1 for _ in range(3)]
    before = bits(list(model.buffers()))
    with booster.boosted(model, bn_data=data):
        everything = torch.cat(data)
        torch.testing.assert_close(bn.running_mean, everything.mean(0), rtol=1e-5, atol=1e-5)
        assert not model.training
    assert_bitwise(list(model.buffers()), before)
    assert bn.momentum == 0.1
    # Default: the current running statistics are kept untouched.
    with booster.boosted(model):
        assert_bitwise(list(model.buffers()), before)


def test_state_round_trip_mid_window() -> None:
    model = small_model()
    booster = Booster(model.parameters(), window=10)
    for _ in range(13):  # one closed window + 3 open iterates
        perturb(model)
        booster.update()
    buffer = io.BytesIO()
    torch.save(booster.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    twin = Booster(model.parameters(), window=10)
    twin.load_state_dict(state)
    assert_bitwise(twin.mean(), booster.mean())
    for _ in range(7):  # both close the second window
        perturb(model)
        booster.update()
        twin.update()
    assert booster.windows_closed == twin.windows_closed == 2
    assert_bitwise(twin.mean(), booster.mean())
    with pytest.raises(ValueError, match="does not match"):
        Booster([torch.nn.Parameter(torch.zeros(2))]).load_state_dict(state)


def test_update_is_sync_free(monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_model()
    booster = Booster(model.parameters(), window=3)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host sync in Booster.update")

    with monkeypatch.context() as patch:
        for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, forbidden)
        for _ in range(4):  # includes an automatic end_window
            booster.update()
    assert booster.windows_closed == 1


def test_host_accumulators_for_cpu_params_and_fp32_option() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    booster = Booster([param], device="cpu", dtype=torch.float32)
    booster.update()
    assert booster.state_dict()["sums"][0].dtype == torch.float32
    with pytest.raises(ValueError, match="floating-point"):
        Booster([torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="window"):
        Booster([param], window=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_host_accumulation_of_cuda_params_is_exact_and_sync_free() -> None:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    booster = Booster([param], device="cpu")
    iterates = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            with torch.no_grad():
                param.add_(torch.randn_like(param))
            booster.update()
            iterates.append(param.detach().to(F64).clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    booster.end_window()
    want = torch.stack(iterates).mean(0).float()
    torch.testing.assert_close(booster.mean()[0], want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulators_and_bool_window_are_refused(dtype: torch.dtype) -> None:
    """float16 sums of 3000 constant iterates gave a mean 0.14 off: refused, not used."""
    param = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        Booster([param], dtype=dtype)
    with pytest.raises(ValueError, match="window"):
        Booster([param], window=True)


def _nan_sums(state: dict) -> None:
    state["sums"][0] = torch.full_like(state["sums"][0], float("nan"))


def _bad_averaged_and_count(state: dict) -> None:
    state["averaged"] = [torch.zeros(1)]  # wrong shape: sums and count were already set
    state["count"] = 7


def _no_mean_but_a_closed_window(state: dict) -> None:
    state["averaged"] = None


def _nonzero_sums_of_an_empty_window(state: dict) -> None:
    state["count"] = 0


def _overflows_float32(state: dict) -> None:
    state["sums"][0] = torch.full_like(state["sums"][0], 1e300, dtype=F64)  # inf in float32


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_nan_sums, "inf or NaN"),
        (_bad_averaged_and_count, "averaged"),
        (_no_mean_but_a_closed_window, "disagree"),
        (_nonzero_sums_of_an_empty_window, "not zero"),
        (_overflows_float32, "inf or NaN"),
        (lambda state: state.update(count=-5), "count"),
        (lambda state: state.update(count=True), "count"),
        (lambda state: state.update(count="2"), "count"),
        (lambda state: state.update(windows_closed=-1), "windows_closed"),
        (lambda state: state.update(window=-3), "window"),
        (lambda state: state.update(sums=[t.tolist() for t in state["sums"]]), "sums"),
        (lambda state: state.pop("averaged_count"), "lacks"),
    ],
)
def test_load_state_dict_checks_the_whole_state_before_changing_anything(
    corrupt, message: str
) -> None:
    model = small_model()
    booster = Booster(model.parameters(), window=4, dtype=torch.float32)
    for _ in range(5):  # one closed window, one open iterate
        perturb(model)
        booster.update()
    earlier = booster.state_dict()
    for _ in range(2):  # a later point: three open iterates
        perturb(model)
        booster.update()
    current = booster.state_dict()
    corrupted = booster.state_dict()
    corrupt(corrupted)
    with pytest.raises(ValueError, match=message):
        booster.load_state_dict(corrupted)
    after = booster.state_dict()
    assert (after["count"], after["window"]) == (current["count"], current["window"]) == (3, 4)
    assert_bitwise(after["sums"], current["sums"])
    assert_bitwise(after["averaged"], current["averaged"])
    booster.load_state_dict(earlier)  # a good state still loads
    assert booster.count == 1
    assert_bitwise(booster.state_dict()["sums"], earlier["sums"])
