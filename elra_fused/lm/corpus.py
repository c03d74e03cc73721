"""The corpus and its tokens: the interpreter's stdlib sources, split train/validation
by file, byte-level tokens, windows and seeded batches.

A corpus that cannot serve the job -- a root that is missing or holds no ``.py`` file, or
a ``--corpus-bytes`` cap too small for a validation sequence or the largest batch -- is a
:class:`CorpusError` that says what is missing and, where the files allow it, the smallest
cap that would do (:func:`minimum_corpus_bytes`); the job reports it as an argument error.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CORPUS_BYTES = 4_000_000
DEFAULT_VAL_EVERY = 10
#: Directory names left out of the corpus: installed packages and the test suites.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


class CorpusError(ValueError):
    """The corpus root or the byte cap cannot give the job its data (see the module
    docstring); the message names the flag to change."""


@dataclass
class Corpus:
    """The selected files, their bytes split train/validation, and the identifying hash."""

    root: str
    train_files: list[str]
    val_files: list[str]
    train: bytes
    val: bytes
    sha256: str

    @property
    def bytes(self) -> int:
        return len(self.train) + len(self.val)


def stdlib_root() -> Path:
    """The running interpreter's standard library: a corpus every machine has."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_root_problem(root: Path) -> str | None:
    """Why ``root`` cannot be a corpus root (missing, or not a directory), or None."""
    if not root.exists():
        return f"corpus root {root} does not exist"
    if not root.is_dir():
        return f"corpus root {root} is not a directory"
    return None


def is_validation_file(index: int, val_every: int) -> bool:
    """Whether the ``index``-th file (0-based, sorted order) is validation: every
    ``val_every``-th file, i.e. the 10th, 20th, ... for ``val_every=10``."""
    return (index + 1) % val_every == 0


def corpus_files(root: Path) -> list[Path]:
    """``.py`` files under ``root``, sorted by relative path (deterministic on any
    machine), without installed packages and test directories."""
    found: list[Path] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS]
        found.extend(Path(directory) / f for f in files if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_corpus(
    root: Path | None = None,
    max_bytes: int = DEFAULT_CORPUS_BYTES,
    val_every: int = DEFAULT_VAL_EVERY,
) -> Corpus:
    """Read files in sorted order up to ``max_bytes`` and split them by file: every
    ``val_every``-th file (the 10th, 20th, ...) is validation, so no file contributes to
    both sides. The hash covers the selected bytes in file order."""
    if max_bytes < 1 or val_every < 2:
        raise ValueError("load_corpus: max_bytes must be >= 1 and val_every >= 2")
    root = stdlib_root() if root is None else Path(root)
    if problem := corpus_root_problem(root):
        raise CorpusError(problem)
    files = corpus_files(root)
    if not files:
        raise CorpusError(
            f"no .py file under {root} (left out: {', '.join(sorted(EXCLUDED_DIRS))} directories)"
        )
    digest = hashlib.sha256()
    train: list[bytes] = []
    val: list[bytes] = []
    train_files: list[str] = []
    val_files: list[str] = []
    total = 0
    for index, path in enumerate(files):
        if total >= max_bytes:
            break
        data = path.read_bytes()[: max_bytes - total]
        total += len(data)
        digest.update(data)
        name = path.relative_to(root).as_posix()
        if is_validation_file(index, val_every):
            val.append(data)
            val_files.append(name)
        else:
            train.append(data)
            train_files.append(name)
    return Corpus(
        str(root), train_files, val_files, b"".join(train), b"".join(val), digest.hexdigest()
    )


def minimum_corpus_bytes(
    root: Path | None, val_every: int, train_bytes: int, val_bytes: int
) -> int | None:
    """The smallest ``max_bytes`` for which :func:`load_corpus` (same ``root`` and
    ``val_every``) gives at least ``train_bytes`` training and ``val_bytes`` validation
    bytes; None when all files together hold fewer. Read from file sizes, nothing loaded.

    Each side grows monotonically with the cap (files are taken in order, the last one
    cut), so the answer is the larger of the caps at which each side is reached."""
    root = stdlib_root() if root is None else Path(root)
    needed = {False: train_bytes, True: val_bytes}  # keyed by "is validation"
    held = {False: 0, True: 0}
    reached_at: dict[bool, int | None] = {side: 0 if needed[side] <= 0 else None for side in needed}
    total = 0
    for index, path in enumerate(corpus_files(root)):
        if all(cap is not None for cap in reached_at.values()):
            break
        side = is_validation_file(index, val_every)
        size = path.stat().st_size
        if reached_at[side] is None and held[side] + size >= needed[side]:
            reached_at[side] = total + needed[side] - held[side]
        held[side] += size
        total += size
    if any(cap is None for cap in reached_at.values()):
        return None
    return max(cap for cap in reached_at.values() if cap is not None)


def encode(data: bytes) -> torch.Tensor:
    """Bytes -> int64 token ids in [0, 256): the byte-level tokenizer (no vocabulary file).
    Empty bytes give an empty tensor (``torch.frombuffer`` refuses an empty buffer)."""
    if not data:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def decode(tokens: torch.Tensor) -> bytes:
    """Token ids -> bytes (inverse of :func:`encode`)."""
    return bytes(tokens.to(torch.uint8).tolist())


def windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``(n, seq_len + 1)`` windows: inputs ``[:, :-1]``, targets
    ``[:, 1:]``; consecutive windows share one byte so every byte is a target once."""
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"windows: {len(tokens)} tokens are too few for seq_len {seq_len}")
    return tokens[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len).contiguous()


class SequenceBatches:
    """Re-iterable batches of sequences, reshuffled every pass with a seeded generator
    (the same order for every optimizer with the same seed and batch size, on every
    device: the permutation is drawn on the CPU). With the sequences on a GPU the pass's
    order is copied there once per pass, so taking a batch is a device-side gather with
    no host sync."""

    def __init__(self, sequences: torch.Tensor, batch_size: int, seed: int) -> None:
        if batch_size > len(sequences):
            raise ValueError(
                f"batch size {batch_size} exceeds the {len(sequences)} training sequences"
            )
        self.sequences, self.batch_size = sequences, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.sequences) / self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(len(self.sequences), generator=self.generator)
        if order.device != self.sequences.device:
            order = order.to(self.sequences.device, non_blocking=True)  # no stream sync
        for start in range(0, len(order), self.batch_size):
            yield self.sequences[order[start : start + self.batch_size]]


def endless_full_batches(batches: SequenceBatches) -> Iterator[torch.Tensor]:
    """Full batches pass after pass (the short last batch skipped, paper 3.5)."""
    while True:
        for batch in batches:
            if len(batch) == batches.batch_size:
                yield batch
