"""The language-model job (``python -m elra_fused lm``, issue 16): end to end at a tiny
size, plus the corpus split and the byte tokenizer it rests on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from elra_fused.lm import cli, corpus, memory, model, protocol

TINY = [
    "--corpus-bytes",
    "60000",
    "--tokens",
    "1024",
    "--hidden",
    "16",
    "--layers",
    "1",
    "--heads",
    "2",
    "--seq-len",
    "16",
    "--elra-batch",
    "2",
    "--adamw-batch",
    "8",
    "--cycle-tokens",
    "256",
    "--warmup-steps",
    "5",
    "--val-tokens",
    "256",
    "--evals",
    "4",
    "--no-progress",
]


def write_tree(root: Path) -> None:
    """A small fake standard library: packages, a test directory and site-packages."""
    for i in range(25):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i:02d}.py").write_text(f"# module {i}\n" + "x = 1\n" * (i + 1))
    for excluded in ("site-packages", "test", "dist-packages"):
        (root / excluded).mkdir()
        (root / excluded / "skip.py").write_text("skipped = True\n")
    (root / "notes.txt").write_text("not python\n")


#: CUDA runtime calls the job makes on ``--device cuda`` only.
CUDA_CALLS = (
    "synchronize",
    "reset_peak_memory_stats",
    "memory_allocated",
    "max_memory_allocated",
    "get_device_name",
)


def test_end_to_end_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cuda(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CPU job called a CUDA API")

    for call in CUDA_CALLS:  # the default --device cpu never touches the CUDA runtime
        monkeypatch.setattr(torch.cuda, call, no_cuda)
    out_json, out_png = tmp_path / "lm.json", tmp_path / "lm.png"
    payload = cli.main([*TINY, "--json", str(out_json), "--plot", str(out_png)])
    assert out_png.stat().st_size > 0
    written = json.loads(out_json.read_text())
    assert written["results"] == json.loads(json.dumps(payload["results"]))
    assert {"config", "corpus", "results", "memory_cap"} <= set(written)
    assert {"bytes", "sha256"} <= set(written["corpus"])
    assert written["corpus"]["bytes"] == 60000
    assert len(written["corpus"]["sha256"]) == 64
    assert written["config"]["device"] == "cpu" and written["config"]["gpu"] is None
    assert set(written["results"]) == {*protocol.available_optimizers(), "elra_boosted"}
    keys = {"tokens", "val_loss", "val_loss_at", "tokens_per_s", "state_bytes", "peak_bytes"}
    tokens = set()
    for name, row in written["results"].items():
        assert set(row) == keys, name
        assert set(row["val_loss_at"]) == {"25%", "50%", "100%"}
        assert all(math.isfinite(v) for v in [row["val_loss"], *row["val_loss_at"].values()])
        assert row["val_loss_at"]["100%"] == row["val_loss"]
        assert row["tokens_per_s"] > 0 and row["peak_bytes"] >= row["state_bytes"] > 0
        tokens.add(row["tokens"])
    assert tokens == {written["config"]["tokens"]}  # equal budgets
    # AdamW keeps two moments, ELRA one gradient: ELRA's state is about half of AdamW's.
    results = written["results"]
    assert results["elra"]["state_bytes"] < 0.6 * results["adamw"]["state_bytes"]
    trace = written["elra_trace"]
    assert sum(trace["batch_tokens"]) == written["config"]["tokens"]
    assert all(a > 0 for a in trace["alpha"])
    cap = written["memory_cap"]
    assert set(cap["optimizers"]) == set(protocol.available_optimizers())
    assert set(cap["elra_modes"]) == set(memory.ELRA_MEMORY_MODES)
    assert cap["optimizers"]["elra"]["max_hidden"] >= 64
    assert cap["device"] == "cpu" and cap["measure"].startswith("live tensor bytes")


def test_cuda_without_cuda_exits_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([*TINY, "--device", "cuda"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err and "--device cpu" in err
    assert cli.parse_args(TINY).device == "cpu"  # the default
    with pytest.raises(SystemExit):
        cli.parse_args([*TINY, "--device", "tpu"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_end_to_end_on_cuda(tmp_path: Path) -> None:
    """The same tiny job on the GPU: models, tokens and state on the device, the JSON
    records the device and both step peaks (live bytes and the allocator's)."""
    out_json, out_png = tmp_path / "lm.json", tmp_path / "lm.png"
    cli.main([*TINY, "--device", "cuda", "--json", str(out_json), "--plot", str(out_png)])
    written = json.loads(out_json.read_text())
    config = written["config"]
    assert config["device"] == "cuda"
    assert config["gpu"] == torch.cuda.get_device_name()
    assert set(written["results"]) == {*protocol.available_optimizers(), "elra_boosted"}
    tokens = set()
    for name, row in written["results"].items():
        assert all(math.isfinite(v) for v in [row["val_loss"], *row["val_loss_at"].values()])
        assert row["tokens_per_s"] > 0 and row["state_bytes"] > 0, name
        assert row["cuda_max_allocated_bytes"] >= row["cuda_peak_bytes"] > 0, name
        if name != "elra_boosted":  # its state adds the booster's evaluation-only sums
            assert row["peak_bytes"] >= row["state_bytes"], name
            assert row["cuda_peak_bytes"] >= row["state_bytes"], name
        tokens.add(row["tokens"])
    assert tokens == {config["tokens"]}
    assert all(math.isfinite(v) for curve in written["curves"].values() for v in curve["val_loss"])
    trace = written["elra_trace"]
    assert sum(trace["batch_tokens"]) == config["tokens"]
    assert all(a > 0 and math.isfinite(a) for a in trace["alpha"])
    cap = written["memory_cap"]
    assert cap["device"] == "cuda" and "max_memory_allocated" in cap["measure"]
    for row in [*cap["optimizers"].values(), *cap["elra_modes"].values()]:
        assert all(m["cuda_peak_bytes"] > 0 for m in row["measured"])
        assert math.isfinite(row["check"]["relative_error"])


def test_schedule_free_evaluates_at_its_average_and_trains_on() -> None:
    pytest.importorskip("schedulefree")
    args = cli.parse_args([*TINY, "--optimizers", "schedulefree"])
    torch.manual_seed(0)
    net = model.build_model(16, 1, 2, 16)
    opt = protocol.make_optimizer("schedulefree", net, args)
    batch = torch.randint(0, model.VOCAB, (4, 17))
    for _ in range(3):
        model.lm_loss(net, batch).backward()
        opt.step()
        opt.zero_grad()
    training = [p.detach().clone() for p in net.parameters()]
    with protocol.evaluation_weights("schedulefree", opt):
        averaged = [p.detach().clone() for p in net.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(averaged, training, strict=True))
    for before, after in zip(training, net.parameters(), strict=True):  # back at y
        torch.testing.assert_close(after.detach(), before, rtol=1e-5, atol=1e-6)
    model.lm_loss(net, batch).backward()
    opt.step()  # back in train mode: schedule-free refuses to step in eval mode


def test_missing_schedule_free_is_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "schedule_free_installed", lambda: False)
    monkeypatch.setattr(cli, "schedule_free_installed", lambda: False)
    assert "schedulefree" not in protocol.available_optimizers()
    assert "schedulefree" not in cli.parse_args(TINY).optimizers
    with pytest.raises(SystemExit):
        cli.parse_args([*TINY, "--optimizers", "elra,schedulefree"])


def test_budget_rounds_to_whole_batches() -> None:
    args = cli.parse_args(
        [
            "--tokens",
            "1000",
            "--seq-len",
            "16",
            "--elra-batch",
            "2",
            "--adamw-batch",
            "8",
            "--evals",
            "4",
        ]
    )
    assert args.tokens == 512  # 8 seqs x 16 tokens x 4 checkpoints
    with pytest.raises(SystemExit):
        cli.parse_args(["--evals", "6"])


def test_corpus_split_is_deterministic_and_by_file(tmp_path: Path) -> None:
    write_tree(tmp_path)
    first = corpus.load_corpus(tmp_path, max_bytes=10_000, val_every=5)
    second = corpus.load_corpus(tmp_path, max_bytes=10_000, val_every=5)
    assert first == second
    names = first.train_files + first.val_files
    assert len(names) == 25 and not any("skip" in n for n in names)
    ordered = sorted(names)
    assert first.val_files == [n for i, n in enumerate(ordered) if (i + 1) % 5 == 0]
    assert not set(first.train_files) & set(first.val_files)
    assert first.bytes == len(first.train) + len(first.val)
    # The cap cuts the corpus in file order and changes the hash.
    capped = corpus.load_corpus(tmp_path, max_bytes=100, val_every=5)
    assert capped.bytes == 100 and capped.sha256 != first.sha256
    assert capped.train_files == ordered[: len(capped.train_files)]


def test_stdlib_corpus_excludes_packages_and_tests() -> None:
    files = corpus.corpus_files(corpus.stdlib_root())
    parts = {part for path in files for part in path.relative_to(corpus.stdlib_root()).parts}
    assert files and not parts & corpus.EXCLUDED_DIRS
    rel = [p.relative_to(corpus.stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel)


def test_byte_tokens_round_trip_and_windows() -> None:
    text = "def f(x):\n    return 'é' * x\n".encode()
    tokens = corpus.encode(text)
    assert tokens.dtype == torch.int64 and int(tokens.max()) < model.VOCAB
    assert len(tokens) == len(text) and corpus.decode(tokens) == text
    seqs = corpus.windows(tokens, 8)
    assert seqs.shape == ((len(tokens) - 1) // 8, 9)
    # Consecutive windows overlap by one byte: every byte after the first is a target once.
    targets = torch.cat([s[1:] for s in seqs])
    assert torch.equal(targets, tokens[1 : 1 + len(targets)])
    with pytest.raises(ValueError):
        corpus.windows(tokens[:5], 8)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--corpus-root", "{tmp}/missing"], "does not exist"),
        (["--corpus-root", "{tmp}/a_file"], "is not a directory"),
        (["--corpus-bytes", "0"], "--corpus-bytes: must be an integer >= 1"),
        (["--val-every", "1"], "--val-every: must be an integer >= 2"),
        (["--cycle-tokens", "0"], "--cycle-tokens: must be an integer >= 1"),
        (["--cycle-tokens", "-8"], "--cycle-tokens: must be an integer >= 1"),
        (["--cycle-tokens", "8"], "--cycle-tokens 8 must be at least --seq-len (16)"),
        (["--val-tokens", "-100"], "--val-tokens: must be an integer >= 1"),
        (["--threads", "-3"], "--threads: must be an integer >= 0"),
        (["--warmup-steps", "-2"], "--warmup-steps: must be an integer >= -1"),
        (["--memory-cap", "banana"], "not a memory size"),
        (["--memory-cap", "0"], "not a memory size"),
        (["--optimizers", "elra,adamw,elra"], "elra listed more than once"),
        (["--hidden", "6", "--heads", "2"], "must be even"),  # rotary needs pairs
        (["--plot", "{tmp}/lm.txt"], "format is taken from its extension"),
        (["--json", "{tmp}/a_file/lm.json"], "is a file, not a directory"),
    ],
)
def test_bad_flags_are_argument_errors(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each gave a traceback, or was silently accepted, instead of a usage error."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([*TINY, *(flag.format(tmp=tmp_path) for flag in flags)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m elra_fused lm") and message in err


def test_a_corpus_too_small_for_the_job_names_the_smallest_cap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The validation split was empty and the job died in torch.frombuffer; now it stops
    before training and says which --corpus-bytes would do -- and that one does."""
    write_tree(tmp_path / "tree")
    (tmp_path / "empty").mkdir()
    base = [*TINY, "--corpus-root", str(tmp_path / "tree"), "--val-every", "5"]
    base += ["--json", str(tmp_path / "lm.json"), "--plot", str(tmp_path / "lm.png")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--corpus-bytes", "100"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("usage: python -m elra_fused lm")
    assert "0 validation bytes" in err and "use --corpus-bytes" in err
    smallest = int(err.split("use --corpus-bytes ")[1].split()[0])
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--corpus-root", str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "no .py file under" in capsys.readouterr().err
    assert not (tmp_path / "lm.json").exists()
    args = cli.parse_args([*base, "--corpus-bytes", str(smallest)])
    _, train_seqs, val_seqs = cli.job_sequences(args)
    assert len(val_seqs) == 1 and len(train_seqs) >= 2 * args.elra_batch
    with pytest.raises(corpus.CorpusError):
        cli.job_sequences(cli.parse_args([*base, "--corpus-bytes", str(smallest - 1)]))
    too_much = [*base, "--seq-len", "512", "--cycle-tokens", "512", "--val-tokens", "512"]
    with pytest.raises(corpus.CorpusError, match="more than all .py files there hold"):
        cli.job_sequences(cli.parse_args(too_much))


def test_minimum_corpus_bytes_is_the_smallest_cap_that_gives_both_splits(tmp_path: Path) -> None:
    write_tree(tmp_path)
    for train_bytes, val_bytes in ((1, 1), (300, 1), (1, 200), (1700, 400), (0, 0)):
        cap = corpus.minimum_corpus_bytes(tmp_path, 5, train_bytes, val_bytes)
        assert cap is not None
        enough = corpus.load_corpus(tmp_path, max(cap, 1), 5)
        assert len(enough.train) >= train_bytes and len(enough.val) >= val_bytes
        if cap > 1:
            short = corpus.load_corpus(tmp_path, cap - 1, 5)
            assert len(short.train) < train_bytes or len(short.val) < val_bytes
    assert corpus.minimum_corpus_bytes(tmp_path, 5, 10**9, 1) is None
    assert corpus.encode(b"").shape == (0,)  # an empty split encodes, and windows() says why
    with pytest.raises(ValueError, match="too few for seq_len"):
        corpus.windows(corpus.encode(b""), 8)


def test_the_tables_are_printed_before_the_files_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing_plot(*args: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(cli, "plot", failing_plot)
    out_json, out_png = tmp_path / "lm.json", tmp_path / "lm.png"
    with pytest.raises(OSError, match="No space"):
        cli.main(
            [*TINY, "--optimizers", "adamw_small", "--json", str(out_json), "--plot", str(out_png)]
        )
    assert "val@100%" in capsys.readouterr().out
