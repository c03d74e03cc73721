"""The model, its loss and its validation: a Llama-style byte-level decoder."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # byte-level tokens
EVAL_BATCH = 64


def build_model(
    hidden: int,
    layers: int,
    heads: int,
    seq_len: int,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A Llama-style decoder (RMSNorm, rotary positions, SwiGLU) from ``LlamaConfig``,
    randomly initialised: no download, any size from flags. Initialised on the CPU (from
    torch's CPU generator: the same weights for a seed on every device) and then moved to
    ``device``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    return model if device is None else model.to(device)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of a batch of ``(n, seq_len + 1)`` windows."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def train_step(
    name: str, model: nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor
) -> torch.Tensor:
    """One whole training step on ``batch``: forward, backward, the optimizer's step (the
    protocol optimizer ``name``: "elra" takes the loss), ``zero_grad(set_to_none=True)``;
    returns the loss, detached."""
    loss = lm_loss(model, batch)
    loss.backward()
    if name == "elra":
        opt.step(loss.detach())
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, sequences: torch.Tensor) -> float:
    """Mean validation cross-entropy over all tokens of ``sequences`` (equal lengths, on
    the model's device); one host sync, at the end."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=sequences.device)
    for start in range(0, len(sequences), EVAL_BATCH):
        chunk = sequences[start : start + EVAL_BATCH]
        total += lm_loss(model, chunk).double() * len(chunk)
    model.train(was_training)
    return float(total / len(sequences))


def llama_params(hidden: int, layers: int) -> int:
    """Parameters of :func:`build_model`'s decoder (tied embedding, MLP 4x, RMSNorms)."""
    per_layer = 4 * hidden * hidden + 3 * hidden * 4 * hidden + 2 * hidden
    return VOCAB * hidden + layers * per_layer + hidden
