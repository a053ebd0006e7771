"""Router weights for a Mixtral assembled from dense experts, as mergekit-moe 0.1.5 computes them.

Every gate mode yields one vector per (layer, expert), a tensor [num_layers, num_experts, hidden];
row e of layer i's router scores how much a token's hidden state points towards expert e.

- random:          N(0, 1) — meant to be trained afterwards.
- uniform_random:  U(-1/sqrt(hidden), 1/sqrt(hidden)), torch.nn.Linear's default init.
- cheap_embed:     the token embeddings of an expert's positive prompts, summed, minus those of
                   its negative prompts, at unit norm; the same vector for every layer.
- hidden:          the base model's hidden state at the input of each layer, at the last token
                   of each prompt, averaged over the prompts; positive minus negative, unit norm.
                   (mergekit also runs `hidden_last`, the same, and `hidden_avg`, the mean over
                   all tokens instead of the last; its config schema does not list them.)

Exactness with mergekit depends on doing the same float operations in the same order and
dtype: random draws in float32 on the CPU; cheap_embed in float32; hidden in bfloat16,
because mergekit loads the base model in bfloat16 for its forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import transformers

from search.engine.errors import UserError
from search.engine.hf_config import hf_config

if TYPE_CHECKING:
    from search.engine.recipe import Expert
    from search.engine.sources import SourceModel

def random_gates(num_layers: int, num_experts: int, hidden: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn((num_layers, num_experts, hidden), generator=generator)


def uniform_random_gates(
    num_layers: int, num_experts: int, hidden: int, generator: torch.Generator | None
) -> torch.Tensor:
    bound = math.sqrt(1.0 / hidden)
    return torch.rand((num_layers, num_experts, hidden), generator=generator) * 2 * bound - bound


def unit_norm(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def prompt_gates(experts: Sequence[Expert], prompt_vector: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
    """Each expert's gate vectors from its prompts: unit_norm(v(positive) - v(negative)).

    `prompt_vector` maps a list of prompts to one vector per layer, [num_layers, hidden].
    """
    per_expert = []
    for expert in experts:
        v = prompt_vector(expert.positive_prompts)
        if expert.negative_prompts:
            v = v - prompt_vector(expert.negative_prompts)
        per_expert.append(unit_norm(v))
    return torch.stack(per_expert, dim=1)  # [num_layers, num_experts, hidden]


# ---- prompts in, vectors out -------------------------------------------------------


def prompt_tokenizer(base: SourceModel, mode: str) -> transformers.PreTrainedTokenizerBase:
    """The base model's tokenizer, read from its folder, padding as mergekit pads prompts."""
    if not Path(base.path).is_dir():  # e.g. an intermediate stage of a multi-stage recipe
        raise UserError(
            f"base_model: {base.name} has no folder to read a tokenizer from, which gate_mode {mode} needs; "
            "use a model folder as base_model, or gate_mode random"
        )
    return _prompt_tokenizer(str(base.path))


@lru_cache(maxsize=8)
def _prompt_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(
            f"base_model: cannot load a tokenizer from {path} ({type(e).__name__}); "
            "prompt-based gate modes need the base model's tokenizer in its folder"
        ) from None
    # Left padding puts every prompt's last token in the last column, where `hidden` reads it.
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_prompts(tokenizer: transformers.PreTrainedTokenizerBase, prompts: list[str]) -> transformers.BatchEncoding:
    # As mergekit: BOS written into the text, no special tokens added (a tokenizer that would
    # also append EOS must not, or the "last token" would be EOS for every prompt).
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def summed_embedding(embed: torch.Tensor, batch: transformers.BatchEncoding) -> torch.Tensor:
    """The embeddings of all non-padding tokens of a batch, summed, at unit norm: [1, hidden] float32."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # mergekit computes one_hot(ids) @ embed; a row lookup gives the same floats (each entry is
    # one embedding value plus exact zeros) without a [tokens, vocab] matrix. `+ 0.0` turns a
    # -0.0 into the +0.0 that the matmul's zero products produce.
    rows = embed.float()[ids] + 0.0  # [batch, seq, hidden]
    summed = (rows * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return unit_norm(summed)


def layer_input_states(
    model: transformers.PreTrainedModel, batch: transformers.BatchEncoding, average: bool
) -> torch.Tensor:
    """The hidden state entering each decoder layer, per prompt at its last token (or averaged
    over the sequence), averaged over the prompts: [num_layers, hidden] in the model's dtype."""
    with torch.no_grad():
        out = model(**batch.to(model.device), output_hidden_states=True, return_dict=True)
    # hidden_states[i] is the input of layer i; the last entry is the final norm's output.
    states = torch.stack(out.hidden_states[:-1])  # [num_layers, batch, seq, hidden]
    if average:
        states = states.sum(dim=2) / states.shape[2]
    else:
        states = states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def base_model_for_forward(base: SourceModel, device: str) -> transformers.PreTrainedModel:
    """The base model as a transformers model in bfloat16, built over its resident tensors.

    Parameters alias the resident tensors when those are bfloat16 already (no copy);
    rotary buffers are computed as from_pretrained computes them.
    """
    config = hf_config(base.config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    state = {k: v.to(device=device, dtype=torch.bfloat16) for k, v in base.tensors.items()}
    missing, _unexpected = model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and "lm_head.weight" in missing:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise UserError(f"base_model: {base.name} lacks tensor {missing[0]}; point base_model at a complete checkpoint")
    with torch.device(device):
        # Non-persistent buffers are not in the checkpoint; build them on the real device.
        model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model.eval()


def gate_vectors(
    mode: str,
    experts: Sequence[Expert],
    base: SourceModel,
    generator: torch.Generator | None,
    device: str,
) -> torch.Tensor:
    """[num_layers, num_experts, hidden] router vectors for `experts` on `base` (CPU or `device`)."""
    num_layers, hidden = base.config["num_hidden_layers"], base.config["hidden_size"]
    if mode == "random":
        return random_gates(num_layers, len(experts), hidden, generator)
    if mode == "uniform_random":
        return uniform_random_gates(num_layers, len(experts), hidden, generator)

    tokenizer = prompt_tokenizer(base, mode)
    if mode == "cheap_embed":
        # Tiny arithmetic; done on the CPU so that the sums match mergekit's order on any device.
        embed = base.tensors["model.embed_tokens.weight"].cpu()
        vocab = base.config["vocab_size"]

        def prompt_vector(prompts: list[str]) -> torch.Tensor:
            batch = tokenize_prompts(tokenizer, prompts)
            if int(batch["input_ids"].max()) >= vocab:
                raise UserError(
                    f"base_model: its tokenizer yields ids beyond vocab_size {vocab}; fix the base's tokenizer"
                )
            return summed_embedding(embed, batch).repeat(num_layers, 1)

    elif mode in ("hidden", "hidden_last", "hidden_avg"):
        model = base_model_for_forward(base, device)

        def prompt_vector(prompts: list[str]) -> torch.Tensor:
            return layer_input_states(model, tokenize_prompts(tokenizer, prompts), average=mode == "hidden_avg")

    else:
        raise UserError(f"gate_mode: unknown mode {mode!r}; use one of random, uniform_random, cheap_embed, hidden")
    return prompt_gates(experts, prompt_vector)
