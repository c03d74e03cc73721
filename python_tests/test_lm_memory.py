"""The LM job's memory side (issue 16): the live-bytes tracker, the cost fit from
measured step peaks, and the widest decoder under a memory cap."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from elra_fused.lm import cli, memory, memory_cap
from elra_fused.lm import model as model_module
from elra_fused.lm.corpus import encode, load_corpus, windows
from elra_fused.lm.model import llama_params

SMALL = ["--hidden", "16", "--layers", "1", "--heads", "2", "--seq-len", "16"]
SMALL += ["--elra-batch", "2", "--adamw-batch", "8", "--tokens", "512", "--no-progress"]


def test_live_bytes_counts_a_step_peak() -> None:
    a = torch.zeros(1000)
    with memory.LiveBytes([a]) as tracker:
        b = torch.ones(2000)
        del b
        c = torch.ones(500)
    assert tracker.peak == 4 * (1000 + 2000)
    assert tracker.current == 4 * (1000 + 500)
    del c


class _Squares(torch.nn.Module):
    """Four bias-free square layers: a model whose only tensors are its parameters."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            *(torch.nn.Linear(width, width, bias=False) for _ in range(4))
        )

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.layers(batch)


def test_step_peak_counts_flat_gradient_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """memory="recover" keeps x, x_{t-1} and a flat gradient buffer whose ``.grad`` views
    outlive zero_grad: all three are live during the step, at least 12 bytes per fp32
    parameter (why recover measures above standard's ~9-12 bytes on the CPU: standard
    keeps G_{t-1} by reference, the last step's gradient tensor itself)."""
    from elra_fused import ELRA

    monkeypatch.setattr(model_module, "lm_loss", lambda model, batch: model(batch).square().mean())
    model = _Squares(64)
    n = sum(p.numel() for p in model.parameters())
    opt = ELRA(model.parameters(), memory="recover")
    batch = torch.randn(2, 64)
    loss = model(batch).square().mean()
    loss.backward()
    opt.step(loss.detach())  # the flat buffers and x_{t-1} exist now
    assert memory.measure_step_peak("elra", model, opt, batch).live_bytes >= 12 * n
    peak = memory.measure_step_peak("elra", model, opt, batch)  # on the CPU: live bytes only
    assert peak.live_bytes >= 12 * n and peak.cuda_bytes is peak.cuda_max_allocated is None


def synthetic_points(costs: memory_cap.MemoryCosts) -> list[memory.StepMemory]:
    """Step measurements that follow ``costs`` exactly (two widths x two token counts)."""
    points = []
    for hidden in (48, 96):
        for tokens in (64, 128):
            params = llama_params(hidden, costs.layers)
            host = round(costs.host_per_param * params)
            staging = round(costs.staging_per_element * min(params, costs.staging_chunk))
            peak = round(costs.device_bytes(hidden, tokens)) + host
            points.append(
                memory.StepMemory(
                    hidden, params, tokens, peak, 0, host, staging, costs.staging_chunk
                )
            )
    return points


def test_fit_recovers_known_costs() -> None:
    truth = memory_cap.MemoryCosts(
        layers=3, per_param=13.0, per_token_per_hidden=220.0, per_token=3100.0, fixed=-5000.0
    )
    fitted = memory_cap.fit_memory_costs(synthetic_points(truth), truth.layers)
    for field in ("per_param", "per_token_per_hidden", "per_token", "fixed"):
        assert getattr(fitted, field) == pytest.approx(getattr(truth, field), abs=1e-3)
    # Offload: host bytes come off the device peak; staging buffers hold min(P, chunk).
    offload = memory_cap.MemoryCosts(3, 9.0, 220.0, 3100.0, 800.0, 4.0, 8.0, 100_000)
    fitted = memory_cap.fit_memory_costs(synthetic_points(offload), 3)
    assert fitted.per_param == pytest.approx(9.0, abs=1e-3)
    assert fitted.fixed == pytest.approx(800.0, abs=1)
    assert fitted.host_per_param == pytest.approx(4.0, rel=1e-3)
    assert fitted.staging_per_element == pytest.approx(8.0, rel=1e-3)
    big = 4096  # far past the chunk: staging stays 8 B x chunk
    assert fitted.device_bytes(big, 64) == pytest.approx(offload.device_bytes(big, 64), rel=1e-6)
    with pytest.raises(ValueError):
        memory_cap.fit_memory_costs(synthetic_points(truth)[:3], 3)
    # CUDA: the allocator's peak (device memory only) is what is fitted; the live-bytes
    # peak next to it, which counts offload's host bytes, is not used.
    on_cuda = [
        dataclasses.replace(p, peak_bytes=7 * p.peak_bytes, cuda_peak_bytes=p.device_bytes)
        for p in synthetic_points(offload)
    ]
    assert all(p.device_bytes == p.cuda_peak_bytes for p in on_cuda)
    fitted = memory_cap.fit_memory_costs(on_cuda, 3)
    assert fitted.per_param == pytest.approx(9.0, abs=1e-3)
    assert fitted.per_token_per_hidden == pytest.approx(220.0, abs=1e-3)


def test_widest_hidden_is_the_largest_that_fits() -> None:
    costs = memory_cap.MemoryCosts(2, 12.0, 200.0, 3000.0, 0.0)
    cap = memory_cap.parse_bytes("1GiB")
    hidden = memory_cap.widest_hidden(costs, cap, tokens=4096)
    assert hidden % 64 == 0 and hidden > 0
    assert costs.device_bytes(hidden, 4096) <= cap < costs.device_bytes(hidden + 64, 4096)
    # Fewer bytes per parameter -> a wider model under the same cap.
    lean = memory_cap.MemoryCosts(2, 6.0, 200.0, 3000.0, 0.0)
    assert memory_cap.widest_hidden(lean, cap, tokens=4096) > hidden
    assert memory_cap.widest_hidden(costs, 10, tokens=4096) == 0
    assert memory_cap.parse_bytes("16GiB") == 16 * 2**30
    assert memory_cap.parse_bytes("8GB") == 8 * 10**9


def test_memory_cap_is_measured_per_optimizer_and_mode() -> None:
    args = cli.parse_args([*SMALL, "--optimizers", "elra,adamw_small"])
    corpus = load_corpus(max_bytes=20_000)
    sequences = windows(encode(corpus.train), args.seq_len)
    estimate = memory_cap.memory_cap_estimate(args, sequences, args.optimizers)
    assert set(estimate["optimizers"]) == {"elra", "adamw_small"}
    modes = estimate["elra_modes"]
    assert set(modes) == set(memory.ELRA_MEMORY_MODES)
    elra, adamw = estimate["optimizers"]["elra"], estimate["optimizers"]["adamw_small"]
    # Measured, not assumed: ELRA keeps one fp32 vector, AdamW two, bf16 state half of one.
    assert elra["state_bytes_per_param"] == pytest.approx(4.0, abs=0.3)
    assert adamw["state_bytes_per_param"] == pytest.approx(8.0, abs=0.3)
    assert modes["bf16_state"]["state_bytes_per_param"] == pytest.approx(2.0, abs=0.3)
    assert modes["offload"]["host_bytes_per_param"] == pytest.approx(4.0, abs=0.1)
    assert elra["bytes_per_param"] < adamw["bytes_per_param"]
    assert elra["max_hidden"] >= adamw["max_hidden"] > 0
    assert modes["bf16_state"]["max_hidden"] >= modes["standard"]["max_hidden"]
    for row in [*estimate["optimizers"].values(), *modes.values()]:
        assert len(row["measured"]) == 4 and math.isfinite(row["check"]["relative_error"])
        assert abs(row["check"]["relative_error"]) < 0.25  # the fit extrapolates 4x in width
    table = memory_cap.format_memory_cap(estimate)
    assert "elra bf16_state" in table and "adamw_small" in table


def test_a_fit_that_does_not_grow_with_the_model_raises() -> None:
    """Measurements where the wider model costs less would put every width under the cap."""
    costs = memory_cap.MemoryCosts(1, 8.0, 2.0, 16.0, 1e6, 0.0, 0.0, 0)
    points = synthetic_points(costs)
    shrunk = [dataclasses.replace(p, peak_bytes=p.peak_bytes - 40 * p.params) for p in points]
    with pytest.raises(ValueError, match="bytes per parameter"):
        memory_cap.fit_memory_costs(shrunk, costs.layers)


@pytest.mark.parametrize("text", ["banana", "0", "-5GB", "0.5b", "nan", "inf", "1e400GiB", "GB"])
def test_parse_bytes_refuses_what_is_not_a_size(text: str) -> None:
    """'banana' raised a bare float() error; 0 and negative caps were accepted."""
    with pytest.raises(ValueError, match="not a memory size"):
        memory_cap.parse_bytes(text)
    assert memory_cap.parse_bytes(" 512 MiB ") == 512 * 2**20
    assert memory_cap.parse_bytes("1e9") == 10**9
