"""Reproduce the paper's 2-D experiments (Tables 1, 2 and the saddle of Fig. 3).

Question: does ELRA reach the thresholds in as few steps as the paper's ELRA column, and
how do torch's Adam and RMSprop (the paper's settings) compare in the same run?

Counts are the smallest t with f(x_t) < eps, x_0 the start (so t optimizer steps were
taken); ``None``/"-" means not reached within the budget of 10^4 steps. All problems run
in float64.

ELRA settings, the same for all five problems: the paper's defaults except
``kappa_gain=0`` (kappa corrects gradient *noise*, section 3.1; these gradients are
exact) and ``gamma_max=1e6`` (section 3.1, "e.g. gamma_max ~ 10^6"; footnote 4's 10 is
for neural networks).

Usage: ``python benchmarks/paper_2d.py [--json PATH] [--budget N]``
"""

from __future__ import annotations

import math
from collections.abc import Callable

import _harness as harness  # also puts the repo root on sys.path
import torch

from elra_fused import ELRA

BUDGET = 10_000
#: ELRA settings for deterministic (noise-free) problems; see the module docstring.
ELRA_DETERMINISTIC = {"kappa_gain": 0.0, "gamma_max": 1e6}
#: Paper section 4.1.2: Adam alpha=0.05, betas (0.8, 0.9); RMSprop alpha=0.05.
ADAM_BOWL = {"lr": 0.05, "betas": (0.8, 0.9)}
RMSPROP = {"lr": 0.05}
#: Paper section 4.1.1: Adam alpha=0.01, default betas for the saddle.
ADAM_SADDLE = {"lr": 0.01}

#: The optimizers compared, in column order.
OPTIMIZERS = ("ELRA", "Adam", "RMSprop")
#: The paper's ELRA / Adam / RMSprop columns ("inf" = never, None = not reported).
PAPER = {
    "bowl_1e-1": {"ELRA": 9, "Adam": 128, "RMSprop": 142},
    "bowl_1e-6": {"ELRA": 12, "Adam": 184, "RMSprop": math.inf},
    "rosenbrock_-3_-2": {"ELRA": 10, "Adam": 208, "RMSprop": 176},
    "rosenbrock_-11_121": {"ELRA": 300, "Adam": math.inf, "RMSprop": math.inf},
    "saddle_0deg": {"ELRA": 8, "Adam": None, "RMSprop": None},
    "saddle_45deg": {"ELRA": 8, "Adam": None, "RMSprop": None},
}

Objective = Callable[[torch.Tensor], torch.Tensor]


def bowl(x: torch.Tensor) -> torch.Tensor:
    return 3 * x[0] ** 2 + 24 * x[1] ** 2


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def saddle(x: torch.Tensor) -> torch.Tensor:
    return x[0] ** 2 - x[1] ** 2


def rotation(degrees: float) -> torch.Tensor:
    angle = math.radians(degrees)
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def steps_to_reach(
    objective: Objective,
    start: tuple[float, float],
    eps: float,
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    rotate_degrees: float = 0.0,
    budget: int = BUDGET,
) -> int | None:
    """Smallest t with objective(x_t) < eps, or None within ``budget`` steps.

    With a rotation Q the problem is f(Q y) started at y_0 = Q^T x_0: the same landscape
    in rotated coordinates, so a rotation-invariant method takes identical steps.
    """
    q = rotation(rotate_degrees)
    x0 = q.T @ torch.tensor(start, dtype=torch.float64)
    param = torch.nn.Parameter(x0)
    optimizer = make_optimizer([param])
    is_elra = isinstance(optimizer, ELRA)
    for t in range(budget + 1):
        optimizer.zero_grad()
        loss = objective(q @ param)
        if loss.item() < eps:
            return t
        if t == budget:
            break
        loss.backward()
        if is_elra:
            optimizer.step(loss)
        else:
            optimizer.step()
    return None


def problems() -> dict[str, tuple[Objective, tuple[float, float], float, float]]:
    """name -> (objective, start, eps, rotation in degrees)."""
    return {
        "bowl_1e-1": (bowl, (-5.75, 1.75), 1e-1, 0.0),
        "bowl_1e-6": (bowl, (-5.75, 1.75), 1e-6, 0.0),
        "rosenbrock_-3_-2": (rosenbrock, (-3.0, -2.0), 1.0, 0.0),
        "rosenbrock_-11_121": (rosenbrock, (-11.0, 121.0), 1.0, 0.0),
        "saddle_0deg": (saddle, (1.0, 1e-9), -1.0, 0.0),
        "saddle_45deg": (saddle, (1.0, 1e-9), -1.0, 45.0),
    }


def run(budget: int = BUDGET) -> dict[str, dict[str, int | None]]:
    results: dict[str, dict[str, int | None]] = {}
    for name, (objective, start, eps, degrees) in problems().items():
        adam = ADAM_SADDLE if name.startswith("saddle") else ADAM_BOWL
        makers = {
            "ELRA": lambda p: ELRA(p, **ELRA_DETERMINISTIC),
            "Adam": lambda p, a=adam: torch.optim.Adam(p, **a),
            "RMSprop": lambda p: torch.optim.RMSprop(p, **RMSPROP),
        }
        results[name] = {
            opt_name: steps_to_reach(objective, start, eps, make, degrees, budget)
            for opt_name, make in makers.items()
        }
    return results


def _fmt(value: float | int | None, budget: int) -> str:
    if value is None:
        return f">{budget}"
    if value == math.inf:
        return "inf"
    return str(value)


def print_results(results: dict[str, dict[str, int | None]], budget: int) -> None:
    print(f"ELRA settings (all problems): {ELRA_DETERMINISTIC}, other arguments default")
    print(f"Adam {ADAM_BOWL} (saddle: {ADAM_SADDLE}), RMSprop {RMSPROP}; budget {budget} steps")
    columns = ["problem"]
    for opt in OPTIMIZERS:
        columns += [opt, "paper"]
    rows = []
    for name, row in results.items():
        cells = [name]
        for opt in OPTIMIZERS:
            paper = PAPER[name][opt]
            cells += [_fmt(row[opt], budget), "n/a" if paper is None else _fmt(paper, budget)]
        rows.append(cells)
    harness.print_table(columns, rows)


def main(argv: list[str] | None = None) -> None:
    parser = harness.base_parser(__doc__.splitlines()[0], device=False)  # float64 on the CPU only
    parser.add_argument("--budget", type=int, default=BUDGET, help="step budget per run")
    args = parser.parse_args(argv)
    results = run(args.budget)
    print_results(results, args.budget)
    harness.write_json(args.json, results)


if __name__ == "__main__":
    main()
