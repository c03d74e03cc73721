"""The language-model job: ``python -m elra_fused lm`` (issue 16).

Why: the main job (MNIST) proves the algorithm, not the use. Users train language models;
the paper (section 4.4) reports ELRA on BabyLlama against AdamW at equal tokens. This job
reproduces that protocol scaled down to a few CPU minutes, on data every machine has, so
anyone can see where ELRA stands and rerun it bigger with flags.

Model: a Llama-style decoder built from ``transformers.LlamaConfig`` (random init, nothing
downloaded; the Hugging Face offline switches are set before transformers is imported).

Data: byte-level tokens (vocabulary 256) of the running interpreter's standard library
``.py`` sources (``sysconfig.get_paths()["stdlib"]``), without site-packages,
dist-packages and test directories. Files are sorted by relative path (deterministic),
taken in that order up to ``--corpus-bytes`` (the last file cut to fit), and every
``--val-every``-th file goes to validation. The corpus root, file count, byte count and
the sha256 of the selected bytes (in file order) are printed and written to the JSON: two
runs are comparable when the hashes agree (they differ across Python versions).

Sequences are non-overlapping windows of ``seq_len + 1`` bytes; a sequence trains
``seq_len`` next-byte predictions, which is what "tokens" counts everywhere below.

Protocol (paper 4.4, scaled down; stated in the output):

* ``elra``: ELRA with the paper's defaults, a small initial batch (micro-batches of
  ``--elra-batch`` sequences, ``m_0 = 1``) grown by the dynamic batch size
  (:class:`~elra_fused.batching.DynamicBatchSize`, :class:`GroupedBatches`), control
  cycles of ``--cycle-tokens`` tokens, the warm-up floor ``alpha_t ||G_t|| >= 0.1`` for
  the first ``--warmup-steps`` steps (default: the whole run -- measured: the floor ending
  after 200 or 1000 steps lets alpha collapse ~10x and costs 0.33 / 0.11 nats at the end
  of the default budget; README ablation), no weight decay.
* ``adamw``: AdamW with the paper's hyper-parameters (lr 5e-4, weight decay 0.1, betas
  0.9/0.95) at a larger fixed batch (``--adamw-batch``; the paper: 512 sequences).
* ``adamw_small``: the same AdamW at ELRA's initial batch.
* ``prodigy``: Prodigy (prodigyopt) with its defaults at ELRA's initial batch: the
  learning-rate-free peer a user would pick instead.
* ``schedulefree``: schedule-free AdamW (the ``schedulefree`` package) with its defaults
  at ELRA's initial batch, evaluated at its averaged weights (``optimizer.eval()`` around
  every evaluation, ``optimizer.train()`` after). Skipped with a note, not an error, when
  the package is missing (``make env`` installs the pinned version).

Every optimizer trains on exactly ``--tokens`` tokens (rounded to a whole number of the
large batch; ELRA's last group is cut to the remaining micro-batches), from the same
initialisation and the same data order per seed. Validation loss (mean next-byte
cross-entropy in nats over the first ``--val-tokens`` validation tokens) is evaluated at
``--evals`` evenly spaced token checkpoints (at the first step boundary at or after each)
and plotted against tokens and against training wall time (evaluation excluded).

Memory: ``state_bytes`` are the optimizer's state tensors, each storage once;
``peak_bytes`` is the peak of live tensor bytes during one training step (parameters,
gradients, optimizer state and the step's activations), measured by a dispatch-mode
tracker of tensor storages -- on CPU torch has no allocator statistics, and the process's
resident set size only ever grows. On ``--device cuda`` the same step is also measured
directly: ``torch.cuda.max_memory_allocated`` over it (peak statistics reset first),
``cuda_peak_bytes`` (less the device bytes held outside the step, chiefly the token
tensors) and ``cuda_max_allocated_bytes`` (raw). ``memory_cap`` measures step peaks of
fresh models at two widths and two micro-batches per optimizer and ELRA memory mode (the
allocator's peaks on CUDA, the live bytes on the CPU), fits per-parameter and per-token
costs to them, and gives the widest decoder of the same depth under ``--memory-cap`` (an
extrapolation, checked against a measurement at 4x the width; see
:mod:`elra_fused.lm.memory_cap`).

Device (``--device cpu|cuda``, default cpu; :mod:`.device`): models are initialised on
the CPU (the same weights per seed on either device) and moved to the device, the token
tensors are moved once, and the training loops create their tensors there with no host
sync per step (values are read at checkpoints and, by the dynamic batch size, at the end
of a control cycle; ELRA's alpha once, at the end). On CUDA the clock is read after a
``torch.cuda.synchronize`` at every checkpoint and at the end, and a few untimed steps of
each optimizer on a throwaway model come first (CUDA set-up, ELRA's ``torch.compile`` of
its control law). Without CUDA, ``--device cuda`` stops with a message; on the CPU no
CUDA API is called.

Modules, one concept each: :mod:`.corpus` (files, split, byte tokens, batches),
:mod:`.model` (the decoder, its loss and validation), :mod:`.protocol` (the optimizers
and their settings), :mod:`.training` (one run on the token budget), :mod:`.memory`
(state bytes, live-bytes and CUDA allocator peaks of a step), :mod:`.memory_cap` (the
cost fit and the widest model under a cap), :mod:`.report` (table, equal-time losses,
figure), :mod:`.device` (the device, its name, a clock correct on CUDA) and :mod:`.cli`
(flags, the job, the JSON).

JSON: ``{"config": {...}, "corpus": {"bytes", "sha256", ...}, "results": {name:
{"tokens", "val_loss", "val_loss_at": {"25%", "50%", "100%"}, "tokens_per_s",
"state_bytes", "peak_bytes"[, "cuda_peak_bytes", "cuda_max_allocated_bytes"]}},
"memory_cap": {...}, "curves": {name: {"tokens",
"seconds", "val_loss"}}, "elra_trace": {"tokens", "alpha", "batch_tokens"}}``.
"""

from __future__ import annotations

from .cli import main, parse_args

__all__ = ["main", "parse_args"]
