"""Train the zoo's models: a small Llama base on mixed-rule data, specialists from it.

Everything is deterministic given the seed: data come from `random.Random`,
weights from `torch.manual_seed`, and torch runs in deterministic mode, so a
rebuild writes the same bytes.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch
import transformers

from objectives.zoo.tokenizer import EOS, PAD, VOCAB, encode

IGNORE = -100  # label of positions that carry no loss


def base_config() -> transformers.LlamaConfig:
    """Llama, hidden 128, 4 layers, 4 heads, intermediate 512, tied embeddings: ~1.06 M parameters."""
    return transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


def init_model(seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(base_config())
    return model.float()


def batch_tensors(pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, labels) of `<s>prompt answer</s>` rows, right-padded; loss on answer + EOS only.

    Right padding needs no attention mask in a causal model: pads come after every
    real token, so no real position attends to them.
    """
    rows, labels = [], []
    for prompt, answer in pairs:
        ids = encode(prompt + answer) + [EOS]
        n_prompt = len(encode(prompt))
        rows.append(ids)
        labels.append([IGNORE] * n_prompt + ids[n_prompt:])
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([l + [IGNORE] * (width - len(l)) for l in labels])
    return input_ids, label_ids


def train(
    model: transformers.PreTrainedModel,
    draw: Callable[[random.Random], tuple[str, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    on_step: Callable[[], None] = lambda: None,
) -> list[float]:
    """AdamW with linear warm-up then cosine decay; returns the loss of every step. `on_step` is
    called after each step (the progress display: objectives/zoo/progress.py)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    for _ in range(steps):
        input_ids, labels = batch_tensors([draw(rng) for _ in range(batch_size)])
        loss = model(input_ids=input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        on_step()
    model.eval()
    return losses
