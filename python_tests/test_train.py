"""The training loop and the ``python -m elra_fused`` command line (sklearn digits, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elra_fused import ELRA, control
from elra_fused import train as train_module
from elra_fused.train import (
    OPTIMIZERS,
    ShuffledBatches,
    build_model,
    cosine_tail,
    load_dataset,
    main,
    parse_args,
    state_bytes,
    train_run,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_split_is_fixed_and_normalised(digits) -> None:
    assert digits.x_train.shape == (1347, 1, 8, 8) and digits.x_test.shape == (450, 1, 8, 8)
    assert abs(digits.x_train.mean().item()) < 1e-5
    assert digits.x_train.std().item() == pytest.approx(1.0, rel=1e-4)
    again = load_dataset("digits")
    assert torch.equal(again.y_test, digits.y_test)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("side", [8, 28])
def test_models_give_ten_logits(model: str, side: int) -> None:
    net = build_model(model, side)
    assert net(torch.randn(3, 1, side, side)).shape == (3, 10)


def test_shuffled_batches_reshuffle_and_keep_the_short_last_batch() -> None:
    x, y = torch.arange(10.0), torch.arange(10)
    batches = ShuffledBatches(x, y, 4, seed=0)
    first, second = list(batches), list(batches)
    assert [len(b[0]) for b in first] == [4, 4, 2] and len(batches) == 3
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True))
    assert sorted(torch.cat([b[0] for b in first]).tolist()) == x.tolist()


def test_state_bytes_counts_optimizer_state_tensors() -> None:
    model = torch.nn.Linear(10, 3)  # 33 parameters
    opt = ELRA(model.parameters())
    model(torch.randn(4, 10)).sum().backward()
    opt.step(torch.tensor(1.0))
    # G_{t-1} in float32 plus the float64 control vector
    assert state_bytes(opt) == 33 * 4 + control.STATE_SIZE * 8
    adam = torch.optim.Adam(model.parameters())
    adam.step()
    assert state_bytes(adam) >= 2 * 33 * 4


def test_elra_learns_digits_end_to_end(digits) -> None:
    result = train_run("elra", digits, "mlp", epochs=4, seed=0, boost=True, progress=False)
    assert result.best_test_acc > 0.8  # chance is 0.1
    assert result.train_loss[-1] < result.train_loss[0]
    assert len(result.test_acc) == len(result.boosted_test_acc) == 4
    assert len(result.alpha_trace) == len(result.batch_trace) == result.steps > 0
    assert all(bs % 32 == 0 and bs >= 64 for bs in result.batch_trace)  # bs_t = m_t x 32


def test_cosine_tail_schedule() -> None:
    assert cosine_tail(0.5, 0.2) == 1.0
    assert cosine_tail(0.8, 0.2) == 1.0
    assert cosine_tail(0.9, 0.2) == pytest.approx(0.5)
    assert cosine_tail(1.0, 0.2) == pytest.approx(0.0, abs=1e-15)


def test_lr_tail_anneals_the_last_steps(digits) -> None:
    """--lr-tail 0.5 over 3 epochs: the first epoch runs at lr 1 as without it, the
    later ones at the decaying lr, and the run still learns."""
    plain = train_run("elra", digits, "mlp", epochs=3, seed=0, progress=False)
    tail = train_run("elra", digits, "mlp", epochs=3, seed=0, lr_tail=0.5, progress=False)
    assert tail.train_loss[0] == plain.train_loss[0]  # the first epoch is before the tail
    assert tail.train_loss != plain.train_loss
    assert tail.best_test_acc > 0.8


def test_cli_writes_json_and_png(tmp_path: Path) -> None:
    json_path, png_path = tmp_path / "out.json", tmp_path / "out.png"
    args = ["--dataset", "digits", "--epochs", "1", "--seeds", "1", "--boost", "--no-progress"]
    args += ["--threads", "0"]  # keep torch's thread setting for the other tests
    main([*args, "--json", str(json_path), "--plot", str(png_path)])
    payload = json.loads(json_path.read_text())
    assert payload["dataset"] == "digits" and payload["model"] == "mlp"
    assert payload["epochs"] == 1
    assert set(payload["results"]) == set(OPTIMIZERS)
    for entry in payload["results"].values():
        for key in ("best_test_acc", "final_train_loss", "sec_per_epoch"):
            assert len(entry[key]) == 1 and isinstance(entry[key][0], float)
        assert 0.0 <= entry["best_test_acc"][0] <= 1.0
    assert len(payload["results"]["elra"]["boosted_best_test_acc"]) == 1
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point_rejects_unknown_optimizer() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "elra_fused", "--optimizers", "elra,adamw"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "adamw" in completed.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--baseline-batch-size", "0"], "--baseline-batch-size: must be an integer >= 1"),
        (["--baseline-batch-size", "-3"], "--baseline-batch-size: must be an integer >= 1"),
        (["--threads", "-4"], "--threads: must be an integer >= 0"),
        (["--epochs", "0"], "--epochs: must be an integer >= 1"),
        (["--optimizers", "elra,adam,elra"], "elra listed more than once"),
        (["--batch-size", "100000"], "exceeds the 1347 training images"),
        (["--m0", "1000"], "exceeds the 1347 training images"),
        (["--optimizers", "sgd", "--baseline-batch-size", "2000"], "sgd would take no step"),
        (["--device", "banana"], "expected cpu, cuda or cuda:<index>"),
        (["--plot", "{tmp}/curves.xyz"], "format is taken from its extension"),
        (["--json", "{tmp}/a_file/results.json"], "is a file, not a directory"),
    ],
)
def test_bad_arguments_stop_the_job_before_it_runs(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these trained first and then failed, or reported a run without steps."""
    (tmp_path / "a_file").write_text("")
    argv = ["--dataset", "digits", *(a.format(tmp=tmp_path) for a in argv)]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m elra_fused") and message in err


def test_cuda_without_a_gpu_is_an_argument_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert parse_args(["--device", "cpu"]).device == torch.device("cpu")


def test_the_table_is_printed_before_the_files_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A write that fails at the end (disk full, say) must not lose the results table."""

    def failing_plot(*args: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(train_module, "plot", failing_plot)
    argv = ["--dataset", "digits", "--optimizers", "sgd", "--epochs", "1", "--seeds", "1"]
    argv += ["--no-progress", "--threads", "0", "--json", str(tmp_path / "r.json")]
    with pytest.raises(OSError, match="No space"):
        main([*argv, "--plot", str(tmp_path / "r.png")])
    assert "best test acc" in capsys.readouterr().out
