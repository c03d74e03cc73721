"""benchmarks/bench_step.py at a tiny size: the MLP and the transformer-like ~200-tensor
workload (``--models mlp,blocks``) each get rows of every contender on their own
parameter list, with the model and its tensor count, and ratios against Adam fused on
that same list."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _harness  # noqa: E402  (benchmarks/ is not a package)
import bench_step  # noqa: E402


def test_make_blocks_is_a_transformer_like_list_of_about_200_tensors() -> None:
    """196 tensors of mixed rank near the requested count, the same weights on every
    build, and a forward over (batch, seq, width) that gives every tensor a gradient."""
    model = _harness.make_blocks(50_000, torch.device("cpu"))
    params = list(model.parameters())
    assert len(params) == _harness.TENSORS_PER_BLOCK * _harness.BLOCKS + 4 == 196
    assert {p.dim() for p in params} == {1, 2}
    assert abs(sum(p.numel() for p in params) / 50_000 - 1) < 0.1
    again = _harness.make_blocks(50_000, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(params, again.parameters(), strict=True))
    out = model(torch.randn(2, 3, model.width))
    assert out.shape == (2, 3, model.width)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    # The width tracks the requested size.
    assert _harness.blocks_width(1 << 24) == 296


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread while the tiny benchmark runs: its ~2000 small ops each pay
    the thread pool's hand-off, which on a loaded shared machine costs milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_bench_step_rows_for_mlp_and_blocks(
    capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    argv = ["--sizes", "0.05M", "--repeats", "1", "--warmup", "0", "--no-install"]
    rows = bench_step.main([*argv, "--models", "mlp,blocks"])
    assert "tensors" in capsys.readouterr().out
    assert not [r for r in rows if r.get("failed")]
    assert {r["model"] for r in rows} == {"mlp", "blocks"}
    tensors = {r["model"]: r["n_tensors"] for r in rows}
    assert tensors["mlp"] == 2 * bench_step.DEPTH
    assert 190 <= tensors["blocks"] <= 210
    for model in ("mlp", "blocks"):
        mine = [r for r in rows if r["model"] == model]
        assert {r["n_tensors"] for r in mine} == {tensors[model]}
        assert len({r["n_params"] for r in mine}) == 1
        for name in ("elra_fused", "adam_fused"):
            row = next(r for r in mine if r["optimizer"] == name)
            assert row["step_median_s"] > 0 and row["iter_median_s"] > 0
        adam = next(r for r in mine if r["optimizer"] == "adam_fused")
        assert adam["step_ratio_vs_adam_fused"] == 1.0  # against Adam on the same list
        floor = next(r for r in mine if r["optimizer"] == "floor")
        assert floor["step_ratio_vs_floor"] == 1.0
        assert adam["step_ratio_vs_floor"] == adam["step_median_s"] / floor["step_median_s"]


def test_pass_floor_steps_like_sgd_and_returns_the_dot_with_the_previous_gradient() -> None:
    """The floor row does the work of ELRA's two passes: <G_t, G_{t-1}> summed over every
    tensor (G_{t-1} = G_t on the first step), then x -= lr G_t."""
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))]
    start = [p.detach().clone() for p in params]
    floor = bench_step.PassFloor(params, lr=0.5)
    first = [torch.randn_like(p) for p in params]
    for p, g in zip(params, first, strict=True):
        p.grad = g
    dots = floor.step()
    torch.testing.assert_close(dots, sum((g * g).sum() for g in first))
    for p, x, g in zip(params, start, first, strict=True):
        torch.testing.assert_close(p.detach(), x - 0.5 * g)
    second = [torch.randn_like(p) for p in params]
    for p, g in zip(params, second, strict=True):
        p.grad = g
    torch.testing.assert_close(
        floor.step(), sum((a * b).sum() for a, b in zip(first, second, strict=True))
    )


def test_bench_step_rejects_unknown_models() -> None:
    with pytest.raises(SystemExit, match="pick from mlp, blocks"):
        bench_step.parse_models("mlp,transformer")
