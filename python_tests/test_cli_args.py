"""Command-line values both jobs share (elra_fused.cli_args): counts, optimizer lists,
and the output files, checked before anything runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from elra_fused.cli_args import int_at_least, job_outputs_problem, name_list


def test_count_and_name_list_flags() -> None:
    at_least_zero = int_at_least(0)
    assert at_least_zero("0") == 0 and at_least_zero("3") == 3
    for bad in ("-4", "1.5", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            at_least_zero(bad)
    names = name_list(("elra", "adam", "sgd"))
    assert names(" sgd, elra ,") == ["sgd", "elra"]
    for bad, message in (("elra,elra", "more than once"), ("lion", "unknown"), (",", "empty")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            names(bad)


def test_output_files_are_checked_before_the_job_runs(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    good_json, good_png = tmp_path / "new" / "dirs" / "r.json", tmp_path / "r.png"
    assert job_outputs_problem(good_json, good_png) is None
    assert not (tmp_path / "new").exists()  # checking writes nothing
    assert job_outputs_problem(good_json, tmp_path / "r.PDF") is None
    problems = {
        "is a file, not a directory": (a_file / "sub" / "r.json", good_png),
        "is a directory": (tmp_path, good_png),
        "extension": (good_json, tmp_path / "r.xyz"),
        "(none)": (good_json, tmp_path / "r"),
        "same file": (tmp_path / "r.png", good_png),
    }
    for message, (json_path, plot_path) in problems.items():
        problem = job_outputs_problem(json_path, plot_path)
        assert problem is not None and message in problem, (message, problem)
