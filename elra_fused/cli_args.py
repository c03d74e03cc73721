"""Command-line values both jobs (``python -m elra_fused`` and ``... lm``) share: counts
(:func:`int_at_least`), optimizer lists (:func:`name_list`) and the output files
(:func:`job_outputs_problem`). They are checked while the arguments are parsed, so a bad
value stops the job with argparse's ``usage: ... error: ...`` (exit code 2) before any
training, instead of a traceback, a fake result or a lost run at the end.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["int_at_least", "job_outputs_problem", "name_list", "output_file_problem"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type=`` for an integer flag that must be >= ``minimum``.

    A value out of range (``--threads -4``, ``--epochs 0``) is refused while parsing:
    ``usage: ... error: argument --threads: must be an integer >= 0, got -4``, exit 2.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type=`` for a comma-separated list of distinct names from ``choices``
    (``--optimizers elra,adam``). Unknown names, an empty list and a name given twice
    (which would train that optimizer twice and mix both into one result) are refused."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or 'empty list'}; choose from {','.join(choices)}"
            )
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{', '.join(repeated)} listed more than once")
        return names

    return parse


def figure_formats() -> list[str]:
    """File extensions (without the dot) matplotlib can write a figure to: it takes the
    format from the extension."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def output_file_problem(path: Path, flag: str) -> str | None:
    """Why the job could not write ``path`` when it ends, or None when it can.

    Checked before any training, without writing anything: ``path`` must not be a
    directory (nor a file that is not writable), and its nearest existing ancestor must be
    a writable directory (the missing ones below it are created when the file is written).
    """
    if path.is_dir():
        return f"{flag} {path}: is a directory, not a file"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{flag} {path}: the file exists and is not writable"
    ancestor = path.parent
    while not os.path.exists(ancestor):  # False also below a file (ENOTDIR)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{flag} {path}: {ancestor} is a file, not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{flag} {path}: cannot create files under {ancestor} (no write permission)"
    return None


def job_outputs_problem(json_path: Path, plot_path: Path) -> str | None:
    """Why the job's ``--json`` / ``--plot`` files could not be written at its end, or
    None: each must be writable (:func:`output_file_problem`), the figure's extension a
    format matplotlib writes, and the two must be different files."""
    formats = figure_formats()
    if plot_path.suffix[1:].lower() not in formats:
        return (
            f"--plot {plot_path}: the figure's format is taken from its extension "
            f"({plot_path.suffix or 'none'}); use one of {', '.join('.' + f for f in formats)}"
        )
    if json_path.resolve() == plot_path.resolve():
        return f"--json and --plot name the same file ({json_path})"
    return output_file_problem(json_path, "--json") or output_file_problem(plot_path, "--plot")
