"""benchmarks/gpu_check.sh fails loudly instead of reporting success without the CUDA
kernels tested: its checks (benchmarks/gpu_preflight.py) and the script's own exit code
with ELRA_SKIP_CUDA_BUILD=1, on any machine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from elra_fused import ops
from elra_fused.ops import backends

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_preflight  # noqa: E402


def fake_extension(cuda: bool) -> types.SimpleNamespace:
    return types.SimpleNamespace(cuda_compiled=lambda: cuda, __file__="fake/_C.so")


def test_extension_without_cuda_kernels_fails(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """_C built with ELRA_SKIP_CUDA_BUILD=1 (CPU kernels only), on a GPU machine where
    triton works: the check exits 1 and says why; with the CUDA kernels it passes."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_C", fake_extension(cuda=False))
    monkeypatch.setattr(ops, "available_backends", lambda device: ["triton", "reference"])
    assert gpu_preflight.main(["extension"]) == 1
    out = capsys.readouterr().out
    assert "FAILED elra_fused._C has no CUDA kernels" in out
    assert "FAILED the cpp backend cannot run on CUDA" in out
    monkeypatch.setattr(backends, "_C", fake_extension(cuda=True))
    monkeypatch.setattr(ops, "available_backends", lambda device: ["cpp", "triton", "reference"])
    assert gpu_preflight.main(["extension"]) == 0
    monkeypatch.setattr(backends, "_C", None)
    assert gpu_preflight.main(["extension"]) == 1
    assert "FAILED elra_fused._C did not load" in capsys.readouterr().out


def test_extension_check_fails_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    facts, problems = gpu_preflight.extension_problems()
    assert any("MISSING CUDA device" in line for line in problems)


def test_prerequisites_say_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def no_numpy(name: str, *args):
        return None if name == "numpy" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_numpy)
    monkeypatch.setattr(gpu_preflight.shutil, "which", lambda name: None)
    monkeypatch.setattr(gpu_preflight, "nvcc_path", lambda env: "/opt/cuda/bin/nvcc")
    monkeypatch.setattr(gpu_preflight, "nvcc_release", lambda nvcc: "12.4")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, problems = gpu_preflight.prerequisite_problems({"ELRA_SKIP_CUDA_BUILD": "1"})
    text = "\n".join(problems)
    assert "MISSING python module 'numpy'" in text
    assert "MISSING ninja" in text
    assert "ELRA_SKIP_CUDA_BUILD is set" in text
    assert "MISMATCH torch was built with CUDA 13.0, nvcc is 12.4" in text
    assert "MISSING CUDA device" in text
    monkeypatch.setattr(torch.version, "cuda", None)
    _, problems = gpu_preflight.prerequisite_problems({})
    assert any("this torch build has no CUDA" in line for line in problems)


def test_prerequisites_pass_on_a_complete_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_preflight.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(gpu_preflight, "nvcc_release", lambda nvcc: "13.0")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H200")
    facts, problems = gpu_preflight.prerequisite_problems({})
    missing_modules = [m for m in gpu_preflight.MODULES if importlib.util.find_spec(m) is None]
    assert len(problems) == len(missing_modules), problems
    assert "device NVIDIA H200" in facts


def write_report(path: Path, cases: str) -> Path:
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite>{cases}</testsuite></testsuites>')
    return path


PASSED = '<testcase classname="python_tests.test_cuda" name="test_a"/>'
SKIPPED = (
    '<testcase classname="python_tests.test_ops_numerics" name="test_dots[cpp-cuda]">'
    '<skipped message="CUDA kernels were not compiled into elra_fused._C"/></testcase>'
)
FAILED = (
    '<testcase classname="python_tests.test_cuda" name="test_b">'
    '<failure message="AssertionError: 2 &gt;= 3"/></testcase>'
)


def test_a_skipped_or_failed_cuda_test_fails_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ok = write_report(tmp_path / "ok.xml", PASSED * 3)
    assert gpu_preflight.main(["tests", str(ok)]) == 0
    skipped = write_report(tmp_path / "skipped.xml", PASSED + SKIPPED)
    assert gpu_preflight.main(["tests", str(skipped)]) == 1
    out = capsys.readouterr().out
    assert "FAILED SKIPPED python_tests.test_ops_numerics::test_dots[cpp-cuda]" in out
    assert "not compiled" in out
    failed = write_report(tmp_path / "failed.xml", PASSED + FAILED)
    assert gpu_preflight.main(["tests", str(failed)]) == 1
    assert (
        "FAILED FAILURE python_tests.test_cuda::test_b: AssertionError" in capsys.readouterr().out
    )
    assert gpu_preflight.main(["tests", str(write_report(tmp_path / "none.xml", ""))]) == 1
    assert gpu_preflight.main(["tests", str(tmp_path / "absent.xml")]) == 1
    assert gpu_preflight.main(["nonsense"]) == 2


def test_gpu_check_with_skip_cuda_build_exits_non_zero(tmp_path: Path) -> None:
    """The script itself, on this machine: ELRA_SKIP_CUDA_BUILD=1 would build _C without
    its CUDA kernels, so it stops before the build with a clear message and exit 2."""
    env = {**os.environ, "ELRA_SKIP_CUDA_BUILD": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ELRA_SKIP_CUDA_BUILD is set" in result.stdout
    assert "gpu_check: FAILED: prerequisites missing" in result.stdout
    assert not (tmp_path / "out" / "build.log").exists()  # nothing was built
