"""The memory cap: the widest decoder that fits under ``--memory-cap``, per optimizer and
per ELRA memory mode, from measured per-parameter and per-token costs.

For each entry four training steps are measured (:func:`~.memory.measure_step_memory`:
peak live tensor bytes of a full step, after a warm-up step) at two widths (the job's
``--hidden`` and twice it) and two micro-batches (ELRA's initial batch and twice it:
small enough to stay fast for AdamW's large batch too), at the job's depth, heads and
sequence length. They determine the four coefficients of

    peak = per_param * params(hidden) + tokens * (per_token_per_hidden * hidden + per_token)
           + fixed

exactly: the slope in tokens at each width gives the per-token cost and its growth with
width (activations), the zero-token intercepts at the two widths the per-parameter cost
(parameters, gradients, optimizer state and the step's temporaries) and a fixed part.
Nothing is assumed about bytes per parameter. ELRA's offload mode keeps x_{t-1} in host
memory: its measured host bytes are taken off the peak (the device's share), reported
separately; its device staging buffers hold ``min(parameters, chunk)`` elements each
(the chunk read from the optimizer), so their measured bytes per staged element are
carried to other sizes with that cap rather than as a cost per parameter. A fifth
step at four times the width and the optimizer's own micro-batch checks the
extrapolation in both directions: the JSON and the table give the predicted and the
measured peak there.

The widest decoder is then searched over widths (multiples of 64 and of the head count)
at the job's depth, for the optimizer's own micro-batch. An estimate: attention kernels
and allocator behaviour change with size -- trust a measurement at the target size over
the extrapolation.

Which peak is fitted: on the CPU (``--device cpu``) the live-bytes tracker's
(:class:`~.memory.LiveBytes`; torch keeps no CPU allocator statistics). On CUDA
(``--device cuda``) the allocator's own measurement, ``torch.cuda.max_memory_allocated``
over the step (:attr:`~.memory.StepMemory.device_bytes`: the direct measurement of
device memory, host memory not in it); the live-bytes peaks are kept next to it in
``measured``. The JSON's ``memory_cap.measure`` names the one used.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .memory import ELRA_MEMORY_MODES, StepMemory, measure_step_memory
from .model import llama_params
from .protocol import batch_of

DEFAULT_MEMORY_CAP = "16GiB"
#: Widths searched: up to this many hidden units.
MAX_HIDDEN = 1 << 16


def parse_bytes(text: str) -> int:
    """'16GiB', '512MiB', '8GB', '1e9' -> bytes (a whole number, at least 1).

    ValueError, naming the accepted forms, for anything else: text that is not a number
    with an optional unit, a size below one byte, infinity or NaN (a cap must be a size).
    """
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    units |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    lowered = text.strip().lower()
    unit = next((u for u in sorted(units, key=len, reverse=True) if lowered.endswith(u)), "")
    try:
        number = float(lowered[: len(lowered) - len(unit)])
    except ValueError:
        number = math.nan
    size = number * units.get(unit, 1)
    if not (math.isfinite(size) and size >= 1):
        raise ValueError(
            f"not a memory size of at least one byte: {text!r}; use e.g. 16GiB, 512MiB, 8GB "
            "or 1e9 (bytes)"
        )
    return int(size)


def sequences_to_measure(name: str, args: argparse.Namespace) -> int:
    """Training sequences :func:`cap_entry` needs for optimizer ``name``: its own batch
    (the check at 4x the width) and twice ELRA's micro-batch (the fit's second point)."""
    return max(batch_of(name, args), 2 * args.elra_batch)


@dataclass(frozen=True)
class MemoryCosts:
    """Device bytes of a training step, fitted to measurements at a fixed depth:
    ``per_param * params(hidden) + tokens * (per_token_per_hidden * hidden + per_token)
    + fixed``; ``host_per_param`` is what offload keeps in host memory instead."""

    layers: int
    per_param: float
    per_token_per_hidden: float
    per_token: float
    fixed: float
    host_per_param: float = 0.0
    staging_per_element: float = 0.0
    staging_chunk: int = 0

    def device_bytes(self, hidden: int, tokens: int) -> float:
        """Predicted peak device bytes of a step at width ``hidden`` on ``tokens``."""
        params = llama_params(hidden, self.layers)
        activations = tokens * (self.per_token_per_hidden * hidden + self.per_token)
        staging = self.staging_per_element * min(params, self.staging_chunk)
        return self.per_param * params + activations + self.fixed + staging


def fit_memory_costs(points: Sequence[StepMemory], layers: int) -> MemoryCosts:
    """The four coefficients of :class:`MemoryCosts` from four steps: two widths, each at
    two token counts (the same two at both widths), fitted to each step's device peak
    (:attr:`StepMemory.device_bytes`: on CUDA the allocator's, else the live bytes less
    offload's host bytes); offload's staging buffers are carried per staged element."""
    widths = sorted({p.hidden for p in points})
    tokens = sorted({p.tokens for p in points})
    if len(widths) != 2 or len(tokens) != 2 or len(points) != 4:
        raise ValueError("fit_memory_costs: needs 2 widths x 2 token counts, 4 steps")
    at = {(p.hidden, p.tokens): p for p in points}
    device = {key: p.device_bytes - p.staging_bytes for key, p in at.items()}
    (h1, h2), (t1, t2) = widths, tokens
    slope = {h: (device[h, t2] - device[h, t1]) / (t2 - t1) for h in widths}
    per_token_per_hidden = (slope[h2] - slope[h1]) / (h2 - h1)
    per_token = slope[h1] - per_token_per_hidden * h1
    intercept = {h: device[h, t1] - slope[h] * t1 for h in widths}
    p1, p2 = at[h1, t1].params, at[h2, t1].params
    per_param = (intercept[h2] - intercept[h1]) / (p2 - p1)
    if per_param <= 0 or per_token_per_hidden < 0:
        # A model never gets cheaper as it widens: such a fit would put every width
        # under the cap (widest_hidden would run to MAX_HIDDEN) instead of failing.
        raise ValueError(
            f"fit_memory_costs: the measured steps give {per_param:.3g} bytes per parameter "
            f"and {per_token_per_hidden:.3g} per token and unit of width; the measurements "
            "do not grow with the model (try a larger --hidden)"
        )
    fixed = intercept[h1] - per_param * p1
    host = max(p.host_bytes / p.params for p in points)
    chunk = max(p.staging_chunk for p in points)
    staged = at[h2, t2]
    staging = staged.staging_bytes / min(staged.params, chunk) if chunk else 0.0
    return MemoryCosts(
        layers, per_param, per_token_per_hidden, per_token, fixed, host, staging, chunk
    )


def widest_hidden(costs: MemoryCosts, cap: int, tokens: int, multiple: int = 64) -> int:
    """Largest width (a multiple of ``multiple``) whose predicted step fits under ``cap``
    bytes at ``tokens`` per micro-batch; 0 when not even the smallest fits."""
    hidden = 0
    while hidden + multiple <= MAX_HIDDEN and costs.device_bytes(hidden + multiple, tokens) <= cap:
        hidden += multiple
    return hidden


def cap_entry(
    name: str,
    args: argparse.Namespace,
    sequences: torch.Tensor,
    cap: int,
    elra_mode: str | None = None,
) -> dict[str, Any]:
    """Measure, fit and search one optimizer (or ELRA memory mode); the JSON entry."""
    batch = batch_of(name, args)
    widths = (args.hidden, 2 * args.hidden)
    if len(sequences) < sequences_to_measure(name, args):
        raise ValueError(f"memory cap: {len(sequences)} sequences are too few to measure")
    points = [
        measure_step_memory(name, args, hidden, sequences[:seqs], elra_mode)
        for hidden in widths
        for seqs in (args.elra_batch, 2 * args.elra_batch)
    ]
    costs = fit_memory_costs(points, args.layers)
    check = measure_step_memory(name, args, 4 * args.hidden, sequences[:batch], elra_mode)
    predicted = costs.device_bytes(check.hidden, check.tokens)
    measured = check.device_bytes
    tokens = batch * args.seq_len
    hidden = widest_hidden(costs, cap, tokens, math.lcm(64, args.heads))
    first = points[0]
    return {
        "micro_batch_tokens": tokens,
        "bytes_per_param": round(costs.per_param, 3),
        "state_bytes_per_param": round((first.state_bytes - first.host_bytes) / first.params, 3),
        "host_bytes_per_param": round(costs.host_per_param, 3),
        "activation_bytes_per_token": round(
            costs.per_token_per_hidden * args.hidden + costs.per_token, 1
        ),
        "activation_bytes_per_token_per_hidden": round(costs.per_token_per_hidden, 3),
        "fixed_bytes": round(costs.fixed),
        "max_hidden": hidden,
        "max_params": llama_params(hidden, args.layers) if hidden else 0,
        "device_bytes_at_max": round(costs.device_bytes(hidden, tokens)) if hidden else 0,
        "check": {
            "hidden": check.hidden,
            "tokens": check.tokens,
            "predicted_bytes": round(predicted),
            "measured_bytes": measured,
            "relative_error": round(predicted / measured - 1, 4),
        },
        "measured": [vars(p) for p in points],
    }


def memory_cap_estimate(
    args: argparse.Namespace, sequences: torch.Tensor, optimizers: Sequence[str]
) -> dict[str, Any]:
    """The JSON's ``memory_cap``: per optimizer and per ELRA memory mode, the measured
    costs and the widest decoder of the job's depth under ``--memory-cap``."""
    cap = parse_bytes(args.memory_cap)
    cuda = sequences.device.type == "cuda"
    out: dict[str, Any] = {
        "cap": args.memory_cap,
        "cap_bytes": cap,
        "depth": args.layers,
        "heads": args.heads,
        "seq_len": args.seq_len,
        "method": "fit to measured step peaks at 2 widths x 2 micro-batches "
        "(elra_fused/lm/memory_cap.py), checked at 4x the width",
        "device": sequences.device.type,
        "measure": "torch.cuda.max_memory_allocated over the step (device memory)"
        if cuda
        else "live tensor bytes (LiveBytes dispatch-mode tracker)",
    }
    out["optimizers"] = {name: cap_entry(name, args, sequences, cap) for name in optimizers}
    if "elra" in optimizers:
        out["elra_modes"] = {
            mode: cap_entry("elra", args, sequences, cap, mode) for mode in ELRA_MEMORY_MODES
        }
    return out


def format_memory_cap(estimate: dict[str, Any]) -> str:
    """The memory-cap table: measured costs and the widest decoder under the cap."""
    lines = [
        f"largest decoder at depth {estimate['depth']} under {estimate['cap']} "
        "(fit to measured step peaks; check = predicted/measured - 1 at 4x the width)",
        f"{'optimizer / ELRA mode':<22}{'B/param':>9}{'state B/p':>10}{'host B/p':>9}"
        f"{'act B/tok':>10}{'tokens':>8}{'max hidden':>12}{'max params':>16}{'check':>8}",
    ]
    rows = [*estimate["optimizers"].items()]
    rows += [(f"elra {mode}", row) for mode, row in estimate.get("elra_modes", {}).items()]
    for name, row in rows:
        lines.append(
            f"{name:<22}{row['bytes_per_param']:>9.2f}{row['state_bytes_per_param']:>10.2f}"
            f"{row['host_bytes_per_param']:>9.2f}{row['activation_bytes_per_token']:>10.0f}"
            f"{row['micro_batch_tokens']:>8}{row['max_hidden']:>12}{row['max_params']:>16,}"
            f"{row['check']['relative_error']:>+8.1%}"
        )
    return "\n".join(lines)
