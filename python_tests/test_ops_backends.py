"""Backend selection and the extension's status, KernelSet built by op name, and the
reproducibility contract: bit-identical reruns, C++ CPU results independent of the
thread count, no host sync on CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from _backends import DEVICES, FUSED_BACKENDS, IN_CI, kernels_or_skip, needs_cuda
from _ops_common import (
    ACCEPT,
    LIST_N,
    LIST_SHAPES,
    MIXED_SIZES,
    RETRACE,
    SIZES,
    STATE,
    bits,
    coeffs,
    gen_for,
)

from elra_fused import ops
from elra_fused import reference_ops as ref
from elra_fused.ops import backends
from elra_fused.ops.cases import DECAY, OP_CASES, clone_args, rand, update_coeffs

# =========================================================================================
# Backend selection and status
# =========================================================================================


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown elra_fused backend"):
        ops.get_kernels("cuda-graphs", torch.device("cpu"))


def test_available_backends_reference_last() -> None:
    got = ops.available_backends(torch.device("cpu"))
    assert got[-1] == "reference" and got.count("reference") == 1
    assert set(got) <= set(ops.BACKENDS)
    if backends._C is not None:
        assert got[0] == "cpp"


def test_reference_kernel_set_accepts_float64() -> None:
    k = ops.get_kernels("reference", "cpu")
    assert k.name == "reference"
    g = torch.randn(5, dtype=torch.float64)
    assert torch.equal(k.dots(g, g), ref.dots(g, g))


def test_kernel_sets_have_every_op_by_name() -> None:
    """KernelSet fields are the schema's op names; it is built from a complete mapping."""
    assert ops.KernelSet._fields == ("name", *ops.OP_NAMES)
    for backend in ops.available_backends("cpu"):
        k = ops.get_kernels(backend, "cpu")
        assert all(callable(getattr(k, name)) for name in ops.OP_NAMES)
    r = ops.get_kernels("reference", "cpu")
    partial = {name: getattr(r, name) for name in ops.OP_NAMES if name != "update_swap_"}
    with pytest.raises(ValueError, match="missing ops {'update_swap_'}"):
        ops.KernelSet.from_ops("partial", partial)


def test_cpp_missing_extension_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_C", None)
    monkeypatch.setattr(backends, "_C_ERROR", "ImportError: test")
    with pytest.raises(RuntimeError, match=r"setup\.py build_ext --inplace"):
        ops.get_kernels("cpp", torch.device("cpu"))
    assert "NOT BUILT" in ops.cpp_extension_status()
    assert "cpp" not in ops.available_backends("cpu")


def test_cpp_cuda_not_compiled_message(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(cuda_compiled=lambda: False, __file__="_C.so")
    monkeypatch.setattr(backends, "_C", fake)
    with pytest.raises(RuntimeError, match="CUDA kernels were not compiled"):
        ops.get_kernels("cpp", torch.device("cuda"))
    assert "CUDA kernels compiled: no" in ops.cpp_extension_status()


def test_triton_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.get_kernels("triton", torch.device("cpu"))


def test_extension_status_line() -> None:
    status = ops.cpp_extension_status()
    assert status.startswith("elra_fused._C:")
    print(status)  # visible with -s / in CI logs


@pytest.mark.skipif(not IN_CI, reason="CI-only: proves the CI build produced the extension")
def test_ci_built_extension() -> None:
    assert backends._C is not None, ops.cpp_extension_status()
    nvcc = shutil.which("nvcc") or (
        os.environ.get("CUDA_HOME")
        and os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    )
    if torch.version.cuda and nvcc and os.environ.get("ELRA_SKIP_CUDA_BUILD", "0") in ("", "0"):
        assert backends._C.cuda_compiled(), ops.cpp_extension_status()


# =========================================================================================
# Determinism
# =========================================================================================
def assert_bit_identical_runs(k: ops.KernelSet, op: str, args: tuple) -> None:
    """Two runs of ``op`` on copies of ``args`` give the same bits: the result of a
    reduction, every argument an update writes (on accept and on a retrace)."""
    case = OP_CASES[op]
    for accept in (ACCEPT,) if case.returns_tensor else (ACCEPT, RETRACE):
        if not case.returns_tensor:
            args = (*args[:-1], update_coeffs(accept, args[-1].device))
        runs = []
        for _ in range(2):
            copies = clone_args(args)
            out = getattr(k, op)(*copies)
            runs.append([out] if case.returns_tensor else [copies[i] for i in case.mutated_indices])
        for a, b in zip(*runs, strict=True):
            assert torch.equal(bits(a), bits(b)), (op, accept)


@pytest.mark.parametrize("group", ["reductions", "update_swap", "bf16_state"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bit_identical_runs(backend: str, device: str, group: str) -> None:
    """Reruns are bit-identical at the largest size: the reductions, swap mode, and the
    compact bf16 state (dots and update_)."""
    k = kernels_or_skip(backend, device)
    gen = gen_for("determinism", group, backend)
    f32 = torch.float32
    if group == "bf16_state":
        n = max(MIXED_SIZES[(backend, device)])
        x, g, gp, c = OP_CASES["update_"].make_inputs(n, f32, device, gen, state_dtype=STATE)
        runs = [("dots", (g, gp)), ("update_", (x, g, gp, c))]
    elif group == "reductions":
        xp, x, g = (rand(max(SIZES[(backend, device)]), f32, device, gen) for _ in range(3))
        runs = [("dots", (g, xp)), ("dots_recover", (xp, x, g, coeffs([DECAY, 100.0], device)))]
    else:
        n = max(SIZES[(backend, device)])
        runs = [("update_swap_", OP_CASES["update_swap_"].make_inputs(n, f32, device, gen))]
    for op, args in runs:
        assert_bit_identical_runs(k, op, args)


def _one_and_many_threads(run):
    """``run()`` with torch's thread count, then with one thread."""
    threads = torch.get_num_threads()
    try:
        many = run()
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    return many, one


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs >= 2 CPU threads")
def test_cpp_cpu_reductions_independent_of_thread_count() -> None:
    k = kernels_or_skip("cpp", "cpu")
    gen = gen_for("threads")
    n = 3_000_017
    xp, x, g, c = OP_CASES["dots_recover"].make_inputs(n, torch.float32, "cpu", gen)
    grads, prevs = OP_CASES["dots_list"].make_inputs(
        LIST_N, torch.float32, "cpu", gen, shapes=LIST_SHAPES
    )

    def reductions() -> tuple[torch.Tensor, ...]:
        return k.dots(g, xp), k.dots_recover(xp, x, g, c), k.dots_list(grads, prevs)

    many, one = _one_and_many_threads(reductions)
    assert all(torch.equal(a, b) for a, b in zip(many, one, strict=True))


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs >= 2 CPU threads")
def test_cpp_cpu_update_swap_independent_of_thread_count() -> None:
    k = kernels_or_skip("cpp", "cpu")
    gen = gen_for("swap_threads")
    x, g, gp, c = OP_CASES["update_swap_"].make_inputs(3_000_017, torch.float32, "cpu", gen)

    def run() -> torch.Tensor:
        out = x.clone()
        k.update_swap_(out, g, gp, c)
        return out

    many, one = _one_and_many_threads(run)
    assert torch.equal(many, one)


#: Every CPU op on fixed inputs, both branches, every storage dtype, the compact state, a
#: size past the streaming threshold (kernels.h kStreamMinElems): the results as raw bytes
#: (``torch.save``) at ``sys.argv[1]``, and which loops ran.
_ALL_CPU_RESULTS = textwrap.dedent(
    """
    import sys
    import torch
    from elra_fused import ops
    from elra_fused.ops import backends
    from elra_fused.ops.cases import OP_CASES
    k = ops.get_kernels("cpp", "cpu")
    out = {"isa": backends._C.cpu_vector_isa()}
    for name, case in OP_CASES.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            compact = case.state_arg and dtype != torch.bfloat16
            states = [None] + ([torch.bfloat16] if compact else [])
            for state in states:
                for n in (4097, 3_000_017 if dtype == torch.float32 else 70_001):
                    for accept in (True, False):
                        gen = torch.Generator().manual_seed(n + 7 * accept)
                        args = case.make_inputs(
                            n, dtype, "cpu", gen, state_dtype=state, accept=accept
                        )
                        result = getattr(k, name)(*args)
                        tensors = [result] if case.returns_tensor else list(args)
                        flat = [t for a in tensors for t in (a if isinstance(a, list) else [a])]
                        key = f"{name}/{dtype}/{state}/{n}/{accept}"
                        out[key] = [t.view(torch.uint8).clone() if t.dim() else t for t in flat]
    torch.save(out, sys.argv[1])
    """
)


def _cpu_results(tmp_path: Path, env: dict[str, str]) -> dict:
    path = tmp_path / f"results_{len(list(tmp_path.iterdir()))}.pt"
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-c", _ALL_CPU_RESULTS, str(path)],
        check=True,
        env={**os.environ, "PYTHONPATH": str(root), **env},
        timeout=600,
    )
    return torch.load(path)


def test_cpp_cpu_avx2_and_baseline_loops_give_the_same_bits(tmp_path: Path) -> None:
    """The AVX2 build of the CPU loops (chosen at run time) and the baseline (SSE2) build
    round every element and every partial sum alike: no FMA in either, lanes in the same
    order. ELRA_FUSED_CPU_BASELINE=1 forces the baseline on this CPU."""
    kernels_or_skip("cpp", "cpu")
    native = _cpu_results(tmp_path, {"ELRA_FUSED_CPU_BASELINE": "0"})
    if native["isa"] != "avx2":
        pytest.skip("this CPU has no AVX2: only the baseline loops exist here")
    baseline = _cpu_results(tmp_path, {"ELRA_FUSED_CPU_BASELINE": "1"})
    assert baseline.pop("isa") == "baseline" and native.pop("isa") == "avx2"
    assert native.keys() == baseline.keys() and len(native) > 40
    for key, tensors in native.items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, baseline[key], strict=True)), key


# =========================================================================================
# GPU only
# =========================================================================================
@needs_cuda
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_cuda_ops_never_sync(backend: str) -> None:
    k = kernels_or_skip(backend, "cuda")
    gen = gen_for("sync")
    n = 1 << 20
    x, g, gp, cu = OP_CASES["update_"].make_inputs(n, torch.float32, "cuda", gen)
    cr = coeffs([DECAY, 10.0], "cuda")
    # Built before sync-debug mode: a host-to-device copy of a Python list is a sync.
    retrace = update_coeffs(RETRACE, "cuda")
    # Lists of disjoint pieces (one empty) for the multi-tensor list kernels.
    pieces = [4097, 7, 0, n - 4104]
    xs, gs, gps = (list(t.split(pieces)) for t in (x, g, gp))
    k.dots(g, gp)  # warm-up: first launch may compile / load modules
    k.dots_recover(gp, x, g, cr)
    k.dots_list(gs, gps)
    k.update_list_(xs, gs, gps, cu)
    k.update_swap_list_(xs, gs, gps, retrace)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        k.dots(g, gp)
        k.dots_recover(gp, x, g, cr)
        k.update_(x, g, gp, cu)
        k.update_recover_(x, g, gp, cu)
        k.update_swap_(x, g, gp, cu)
        k.update_swap_(x, g, gp, retrace)
        k.dots_list(gs, gps)
        k.update_list_(xs, gs, gps, cu)
        k.update_swap_list_(xs, gs, gps, cu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
