"""The checks of ``benchmarks/gpu_check.sh`` that make it fail loudly rather than report
success without having tested the CUDA kernels.

    python benchmarks/gpu_preflight.py prereqs          # before the build
    python benchmarks/gpu_preflight.py extension        # after the build
    python benchmarks/gpu_preflight.py tests RESULT.xml # after pytest --junitxml=RESULT.xml

* ``prereqs``: what the build, the tests and the benchmarks need on the machine's own
  python -- numpy, ninja, pytest, triton, a torch with CUDA, a visible GPU, nvcc whose
  major CUDA version is torch's -- and that ``ELRA_SKIP_CUDA_BUILD`` is not set.
* ``extension``: ``elra_fused._C`` loaded *with* its CUDA kernels compiled, and both
  fused backends usable on CUDA.
* ``tests``: the CUDA test run (JUnit XML) ran tests, and none failed or was skipped (a
  skipped CUDA test is a kernel that was not tested).

Each prints what it found and every problem on a line starting with ``MISSING`` or
``FAILED``, and exits 1 when there is any (0 otherwise). Only the standard library is
imported before a check needs more, so ``prereqs`` reports a missing module instead of
crashing on it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Python modules the run needs, with what needs them.
MODULES = {
    "torch": "everything",
    "numpy": "the host control law and the benchmarks",
    "pytest": "the GPU tests",
    "triton": "the triton backend",
}


def _skip_cuda_build(env: Mapping[str, str]) -> bool:
    return env.get("ELRA_SKIP_CUDA_BUILD", "0") not in ("", "0")


def nvcc_path(env: Mapping[str, str]) -> str | None:
    """nvcc as setup.py finds it: ``$CUDA_HOME/bin/nvcc``, else the one on PATH."""
    home = env.get("CUDA_HOME")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    return shutil.which("nvcc")


def nvcc_release(nvcc: str) -> str | None:
    """ "13.0" from ``nvcc --version`` (None if it does not run)."""
    try:
        text = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def prerequisite_problems(env: Mapping[str, str] = os.environ) -> tuple[list[str], list[str]]:
    """(facts, problems) about the machine, before anything is built."""
    facts: list[str] = [f"python {sys.version.split()[0]} at {sys.executable}"]
    problems: list[str] = []
    for module, why in MODULES.items():
        if importlib.util.find_spec(module) is None:
            problems.append(
                f"MISSING python module {module!r} (needed for {why}): "
                f"{sys.executable} -m pip install {module}"
            )
    if shutil.which("ninja") is None:  # what torch's is_ninja_available() runs
        problems.append(
            "MISSING ninja on PATH (the parallel build of elra_fused._C; without it the build "
            f"is serial and slow): {sys.executable} -m pip install ninja"
        )
    if _skip_cuda_build(env):
        problems.append(
            "MISSING CUDA build: ELRA_SKIP_CUDA_BUILD is set, so elra_fused._C would be built "
            "without its CUDA kernels; unset it"
        )
    nvcc = nvcc_path(env)
    release = nvcc_release(nvcc) if nvcc else None
    if nvcc is None:
        problems.append("MISSING nvcc: set CUDA_HOME to a CUDA toolkit (e.g. /usr/local/cuda)")
    elif release is None:
        problems.append(f"MISSING nvcc release: {nvcc} --version did not run or say it")
    else:
        facts.append(f"nvcc {release} at {nvcc}")
    if importlib.util.find_spec("torch") is None:
        return facts, problems
    import torch

    facts.append(f"torch {torch.__version__}, built with CUDA {torch.version.cuda}")
    if torch.version.cuda is None:
        problems.append("MISSING CUDA in torch: this torch build has no CUDA (a CPU wheel)")
    elif release is not None:
        torch_major, nvcc_major = torch.version.cuda.split(".")[0], release.split(".")[0]
        if torch_major != nvcc_major:
            problems.append(
                f"MISMATCH torch was built with CUDA {torch.version.cuda}, nvcc is {release}: "
                "torch refuses to build an extension across major versions; point CUDA_HOME "
                f"at a CUDA {torch_major}.x toolkit"
            )
        elif torch.version.cuda != release:
            facts.append(f"note: torch CUDA {torch.version.cuda} vs nvcc {release} (minor only)")
    if not torch.cuda.is_available():
        problems.append("MISSING CUDA device: torch.cuda.is_available() is False")
    else:
        facts.append(f"device {torch.cuda.get_device_name()}")
    return facts, problems


def extension_problems() -> tuple[list[str], list[str]]:
    """(facts, problems) about the built extension and the CUDA backends."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import torch

    from elra_fused import ops
    from elra_fused.ops import backends

    facts = [ops.cpp_extension_status()]
    problems: list[str] = []
    if backends._C is None:
        problems.append(f"FAILED elra_fused._C did not load ({backends._C_ERROR}): build.log")
    elif not backends._C.cuda_compiled():
        problems.append(
            "FAILED elra_fused._C has no CUDA kernels (built with ELRA_SKIP_CUDA_BUILD set or "
            "without nvcc): the cpp backend's CUDA tests would not run; see build.log"
        )
    if not torch.cuda.is_available():
        problems.append("MISSING CUDA device: torch.cuda.is_available() is False")
    else:
        usable = ops.available_backends("cuda")
        facts.append(f"backends on cuda: {usable}")
        for backend in ("cpp", "triton"):
            if backend not in usable:
                problems.append(f"FAILED the {backend} backend cannot run on CUDA")
    return facts, problems


def report_problems(path: str | Path) -> tuple[list[str], list[str]]:
    """(facts, problems) from a pytest JUnit XML report of the CUDA tests."""
    path = Path(path)
    if not path.exists():
        return [], [f"FAILED no test report at {path}: pytest did not run to the end"]
    cases = ET.parse(path).getroot().iter("testcase")
    ran = skipped = failed = 0
    problems: list[str] = []
    for case in cases:
        ran += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error", "skipped"):
            for element in case.findall(tag):
                skipped += tag == "skipped"
                failed += tag != "skipped"
                reason = (element.get("message") or "").splitlines()[:1]
                word = "SKIPPED" if tag == "skipped" else tag.upper()
                problems.append(f"FAILED {word} {name}: {' '.join(reason)}".rstrip(": "))
    if ran == 0:
        problems.append("FAILED no CUDA test ran (none collected, or pytest crashed)")
    facts = [f"{ran} CUDA tests: {failed} failed or errored, {skipped} skipped"]
    return facts, problems


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = args[0] if args else ""
    if check == "prereqs" and len(args) == 1:
        facts, problems = prerequisite_problems()
    elif check == "extension" and len(args) == 1:
        facts, problems = extension_problems()
    elif check == "tests" and len(args) == 2:
        facts, problems = report_problems(args[1])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    for line in facts:
        print(line)
    for line in problems:
        print(line)
    if problems:
        print(f"gpu_preflight {check}: {len(problems)} problem(s), see above", file=sys.stderr)
        return 1
    print(f"gpu_preflight {check}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
