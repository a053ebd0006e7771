"""A real pretrained model: SmolLM2-135M-Instruct (tests/real_model.py; a 30-layer Llama with GQA, 9 query and
3 KV heads, tied embeddings, a 49k BPE vocabulary with a chat template), merged by the engine and by mergekit
0.1.5 and compared bit for bit; its tied head written as mergekit writes it; and a short `mergesearch run` on it,
scored by a local lm-eval task, whose exported winner mergekit rebuilds into the model the worker scored.

The second and third models are SmolLM2 plus seeded noise (`real_models` in conftest.py). What it costs, and
why the recipes are as they are: mergekit takes seconds per dense merge of this model on 2 cores, but its
magnitude pruning (TIES) sorts every tensor and DARE draws a mask per element, about a minute per full-depth
merge; so the sparsifying methods run on a slice of the first layers (embeddings, norms and the tied head are
the real ones), and the dense methods, the stack and the MoE on all 30. Every mergekit run of the module,
the run's rebuild included, is one subprocess (one import of mergekit).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import assert_same_tensors, read_tensors
from test_merge_cli import assert_same_config, assert_same_tokenizer

from objectives import build_objectives
from objectives.zoo.tasks import write_task_folder
from search.commands.cli import main as cli_main
from search.engine.materialize import Materializer
from search.engine.merge_command import build
from search.engine.recipe import loads
from search.results import winner
from search.study import records

# (id, recipe, random seed); model names are conftest's `real_models`
RECIPES = {
    "linear": ("""
        models:
          - model: smollm2-a
            parameters: {weight: [0.2, 0.8]}
          - model: smollm2-b
            parameters: {weight: 0.5}
        merge_method: linear
        dtype: bfloat16
        """, None),
    "slerp": ("""
        models:
          - model: smollm2
          - model: smollm2-a
        merge_method: slerp
        base_model: smollm2
        parameters:
          t:
            - filter: self_attn
              value: [0, 0.5, 0.3, 0.7, 1]
            - filter: mlp
              value: [1, 0.5, 0.7, 0.3, 0]
            - value: 0.4
        dtype: bfloat16
        """, None),
    "task_arithmetic": ("""
        models:
          - model: smollm2-a
            parameters: {weight: 0.7}
          - model: smollm2-b
            parameters: {weight: [0.3, 1.1]}
        merge_method: task_arithmetic
        base_model: smollm2
        parameters: {lambda: 0.9}
        dtype: bfloat16
        """, None),
    "ties": ("""
        slices:
          - sources:
              - model: smollm2
                layer_range: [0, 2]
              - model: smollm2-a
                layer_range: [0, 2]
                parameters: {weight: 0.7, density: 0.5}
              - model: smollm2-b
                layer_range: [0, 2]
                parameters: {weight: 0.5, density: [0.3, 0.8]}
        merge_method: ties
        base_model: smollm2
        dtype: bfloat16
        """, None),
    "dare_ties": ("""
        slices:
          - sources:
              - model: smollm2
                layer_range: [0, 2]
              - model: smollm2-a
                layer_range: [0, 2]
                parameters: {weight: 0.6, density: 0.5}
              - model: smollm2-b
                layer_range: [0, 2]
                parameters: {weight: 0.6, density: 0.7}
        merge_method: dare_ties
        base_model: smollm2
        dtype: bfloat16
        """, 7),
    "dare_linear": ("""
        slices:
          - sources:
              - model: smollm2
                layer_range: [0, 2]
              - model: smollm2-a
                layer_range: [0, 2]
                parameters: {weight: 0.8, density: 0.4}
        merge_method: dare_linear
        base_model: smollm2
        dtype: bfloat16
        """, 3),
    "passthrough_40_layers": ("""
        slices:
          - sources:
              - model: smollm2
                layer_range: [0, 20]
          - sources:
              - model: smollm2-a
                layer_range: [10, 30]
        merge_method: passthrough
        dtype: bfloat16
        """, None),
    "moe_2_experts": ("""
        base_model: smollm2
        gate_mode: hidden
        dtype: bfloat16
        experts:
          - source_model: smollm2-a
            positive_prompts: ["Write a poem about the sea", "Tell me a story"]
          - source_model: smollm2-b
            positive_prompts: ["What is 12 + 7?", "Solve for x: 2x = 10"]
            negative_prompts: ["Tell me a story"]
        """, 0),
}
RECIPES = {k: (textwrap.dedent(text), seed) for k, (text, seed) in RECIPES.items()}


@pytest.fixture(scope="module", autouse=True)
def _prefetch(real_oracle, search_run):
    """Every mergekit run of the module at once: the recipes above and the run's winner."""
    real_oracle.prefetch([*RECIPES.values(), (search_run["best"], 0)])


@pytest.fixture(scope="module")
def materializer(real_models):
    return Materializer(real_models)


@pytest.mark.parametrize("case", list(RECIPES))
def test_engine_equals_mergekit(case, materializer, real_oracle):
    text, seed = RECIPES[case]
    config, ours = materializer.state_dict(loads(text), seed=seed)
    their_config, theirs = real_oracle.build(text, seed)
    assert_same_tensors(ours, theirs, case)
    for c in (config, their_config):
        c.pop("transformers_version", None)  # the writer's version, not the model's
    assert config == their_config  # the whole config.json: rope_parameters, tie_word_embeddings, GQA, ...


def test_shapes_are_the_real_models(real_oracle):
    """The outputs have what a stand-in would hide: 30 layers (40 stacked), GQA, the 49k tied vocabulary."""
    config, tensors = real_oracle.build(*RECIPES["slerp"])
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    config, _ = real_oracle.build(*RECIPES["passthrough_40_layers"])
    assert config["num_hidden_layers"] == 40
    config, tensors = real_oracle.build(*RECIPES["moe_2_experts"])
    assert (config["architectures"], config["num_local_experts"]) == (["MixtralForCausalLM"], 2)
    assert tensors["model.layers.29.mlp.experts.gate_up_proj"].shape == (2, 2 * 1536, 576)


def test_moe_folder_written_as_mergekit_writes_it(real_models, real_oracle, tmp_path):
    """`mergesearch merge` (its build, in this process) of the MoE: the files mergekit-moe writes, the tied head
    (no lm_head.weight, tie_word_embeddings kept) and the tokenizer as mergekit-moe saves it."""
    text, seed = RECIPES["moe_2_experts"]
    build(loads(text), text, tmp_path / "ours", {k: str(v) for k, v in real_models.items()}, seed=seed)
    assert_same_folders(tmp_path / "ours", real_oracle.folder(text, seed), "moe")


def assert_same_folders(ours: Path, theirs: Path, what: str) -> None:
    """Tensors bit for bit with no lm_head.weight (tied), config.json with tie_word_embeddings, and the tokenizer
    with its chat template, as mergekit wrote them."""
    tensors = read_tensors(ours)
    assert "lm_head.weight" not in tensors
    assert_same_tensors(tensors, read_tensors(theirs), what)
    assert json.loads((ours / "config.json").read_text())["tie_word_embeddings"] is True
    assert_same_config(ours, theirs)
    assert_same_tokenizer(ours, theirs)
    assert (ours / "chat_template.jinja").read_text() == (theirs / "chat_template.jinja").read_text()


# ---- a search on the real model, end to end ---------------------------------------------------------------

TASK = "sums"


def sums(count: int, seed: int) -> list[dict]:
    """Two-digit sums, which SmolLM2 mostly gets wrong but not equally wrong: the perplexity of the answers is
    a continuous score that tells candidates apart (and so shows which one was scored)."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(10, 90, (count, 2), generator=g).tolist()
    return [{"prompt": f"{a} + {b} =", "answer": f" {a + b}"} for a, b in pairs]


@pytest.fixture(scope="module")
def search_run(real_models, tmp_path_factory) -> dict:
    """A short `mergesearch run` over task-arithmetic weights of the two perturbed models, scored by lm-eval's
    perplexity of a local task's answers in two stages, 1 worker, the best re-scored on held-out; then its
    winner exported as a recipe (public names: the aliases, which the oracle maps) and built by `export
    --materialize`, as one publishes it."""
    root = tmp_path_factory.mktemp("real-run")
    tasks = root / "tasks"
    write_task_folder(tasks, TASK, {"search": sums(24, 0), "heldout": sums(24, 1)}, tasks, answer_end="")
    spec = {
        "name": "real",
        "models": {name: str(path) for name, path in real_models.items()},
        "space": {"kind": "weights", "method": "task_arithmetic", "base": "smollm2",
                  "models": ["smollm2-a", "smollm2-b"], "weight": [0.2, 1.0]},
        "objectives": [{"kind": "lmeval", "include_path": "tasks", "tasks": [f"{TASK}_search"],
                        "metric": "perplexity", "direction": "minimize", "fidelities": [8, 24]}],
        "pruner": "none",
        "trials": 3,
        "workers": 1,
        "seed": 0,
        "heldout_top_k": 1,
        "baselines": False,  # tests/test_baselines.py scores them
    }
    (root / "real.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert cli_main(["run", str(root / "real.yaml"), "--quiet"]) == 0
    run_dir = root / "real"
    assert cli_main(["export", str(run_dir), str(run_dir / "exported.yaml")]) == 0
    assert cli_main(["export", str(run_dir), "--materialize", str(run_dir / "materialized")]) == 0
    return {"dir": run_dir, "spec": spec, "best": (run_dir / "exported.yaml").read_text()}


def test_a_search_on_the_real_model_scores_distinct_candidates(search_run):
    recs = records.read_trials(search_run["dir"] / "trials.jsonl")
    assert [r["state"] for r in recs] == ["COMPLETE"] * 3, recs
    assert len({r["values"][0] for r in recs}) == 3, "the candidates scored alike: the score tells nothing apart"
    assert [r["heldout"] is not None for r in winner.rank(recs, ["minimize"])] == [True, False, False]


def test_the_exported_winner_rebuilt_by_mergekit_is_what_the_worker_scored(search_run, real_oracle):
    run_dir = search_run["dir"]
    recs = records.read_trials(run_dir / "trials.jsonl")
    best = winner.winner(recs, ["minimize"])
    assert records.read_json(run_dir / "run.json")["winner"] == best["trial"]
    rebuilt = real_oracle.folder(search_run["best"], 0)
    # the published build (export --materialize) is mergekit's, files and bits
    assert_same_folders(run_dir / "materialized", rebuilt, f"trial {best['trial']}")
    # scored here by the run's own objective, mergekit's model gets the score the worker recorded for the trial
    model = transformers.AutoModelForCausalLM.from_pretrained(rebuilt, dtype="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(rebuilt)
    (objective,) = build_objectives(search_run["spec"]["objectives"], run_dir.parent)
    with torch.inference_mode():
        score = objective.score(model, tokenizer, 24)
    assert score == pytest.approx(best["values"][0], rel=1e-9)
