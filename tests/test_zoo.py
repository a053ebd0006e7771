"""The toy zoo, built at a small fraction of its training steps (the full build is `mergesearch zoo`)."""

from __future__ import annotations

import math
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import transformers
import yaml

from objectives.zoo import skills
from objectives.zoo.build import MANIFEST, SKILLS, SPLIT_SIZES, build_zoo
from objectives.zoo.tokenizer import BOS, EOS, encode
from search.commands.cli import main as cli_main
from search.engine.errors import UserError

SCALE = 0.01  # 20 base steps, 1 step per specialist: complete and deterministic, not trained


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoos") / "zoo"
    return folder, build_zoo(folder, seed=0, scale=SCALE, log=lambda line: None)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_models_load(zoo):
    folder, manifest = zoo
    assert manifest["models"] == ["base"] + SKILLS and len(SKILLS) >= 3
    for name in manifest["models"]:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder / name)
        config = model.config
        assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == ("llama", 128, 4, 4)
        assert (config.intermediate_size, config.tie_word_embeddings) == (512, True)
        assert 1.0e6 < sum(p.numel() for p in model.parameters()) < 1.1e6
        assert (folder / name / "model.safetensors").is_file()
    for skill in SKILLS:
        for split, n in SPLIT_SIZES.items():
            assert len((folder / "tasks" / skill / f"{split}.jsonl").read_text().splitlines()) == n
            config = yaml.safe_load((folder / "tasks" / skill / f"{skill}_{split}.yaml").read_text())
            assert config["task"] == f"{skill}_{split}" and Path(config["dataset_kwargs"]["data_files"][split]).is_file()
    matrix = manifest["matrix"]
    assert set(matrix) == set(manifest["models"]) and all(0.0 <= v <= 1.0 for row in matrix.values() for v in row.values())


def test_tokenizer_adds_bos_and_matches_the_training_encoder(zoo):
    folder, _ = zoo
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "fst")
    for text in ["fst:qwxk>q", "cnt:abba>2", "max:3817>8"]:
        ids = tokenizer(text)["input_ids"]
        assert ids == encode(text) and ids[0] == BOS
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(text + "</s>")["input_ids"][-1] == EOS  # lm-eval's targets end in the EOS text


def test_rebuild_is_bit_identical_and_cached(zoo, tmp_path):
    folder, _ = zoo
    again = tmp_path / "zoo"
    build_zoo(again, seed=0, scale=SCALE, log=lambda line: None)
    first, second = files_of(folder), files_of(again)
    assert set(first) == set(second)
    for name in first:
        if name.endswith(".yaml") or name == MANIFEST:  # these name their own folder
            continue
        assert first[name] == second[name], name
    # Same seed: reused, not rebuilt.
    messages = []
    mtime = (again / "base" / "model.safetensors").stat().st_mtime_ns
    build_zoo(again, seed=0, scale=SCALE, log=messages.append)
    assert "reusing" in messages[0] and (again / "base" / "model.safetensors").stat().st_mtime_ns == mtime
    # Moved elsewhere: reused, its tasks now name their new folder.
    moved = tmp_path / "moved"
    again.rename(moved)
    build_zoo(moved, seed=0, scale=SCALE, log=lambda line: None)
    config = yaml.safe_load((moved / "tasks" / "fst" / "fst_test.yaml").read_text())
    assert config["dataset_kwargs"]["data_files"]["test"] == str(moved.resolve() / "tasks" / "fst" / "test.jsonl")
    moved.rename(again)
    # Another seed: rebuilt in place, with other weights.
    build_zoo(again, seed=1, scale=SCALE, log=lambda line: None)
    assert (again / "base" / "model.safetensors").read_bytes() != first["base/model.safetensors"]
    assert not list(tmp_path.glob(".zoo.*"))  # no temporary folders left behind


def test_refuses_a_folder_that_is_not_a_zoo(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a zoo"):
        build_zoo(tmp_path, seed=0, scale=SCALE)


def test_cli_prints_the_matrix(zoo, capsys):
    folder, manifest = zoo
    assert cli_main(["zoo", str(folder), "--seed", "0", "--scale", str(SCALE)]) == 0  # cached: fast
    out = capsys.readouterr().out
    assert "reusing" in out
    for name in manifest["models"]:
        assert any(line.startswith(name) for line in out.splitlines())
    assert cli_main(["zoo", str(folder), "--scale", "0"]) == 2


def test_skill_data_rules_and_disjoint_splits():
    rng = random.Random(0)
    reserved: set[str] = set()
    for name in SKILLS:
        skill = skills.SKILLS[name]
        rows = skills.eval_split(skill, rng, 50, reserved)
        for row in rows:
            text = row["prompt"][len(name) + 1 : -1]
            assert row["prompt"] == f"{name}:{text}>" and row["answer"] == skill.rule(text)
    assert len(reserved) == 50 * len(SKILLS)  # distinct prompts
    assert skills.SKILLS["nxt"].rule("azy") == "baz" and skills.SKILLS["cnt"].rule("abca") == "2"
    assert skills.SKILLS["max"].rule("3817") == "8" and skills.SKILLS["fst"].conflicting_rule("qwxk") == "k"
    all_skills = list(skills.SKILLS.values())
    correct = 0
    for _ in range(2000):
        prompt, answer = skills.pretraining_example(rng, all_skills, reserved)
        assert prompt not in reserved
        skill = skills.SKILLS[prompt[:3]]
        correct += answer == skill.rule(prompt[4:-1])
    assert 0.3 < correct / 2000 < 0.5  # 35% correct rule (plus coincidences where both rules agree)


def test_mergekit_reads_the_zoo(zoo, tmp_path):
    folder, _ = zoo
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": str(folder / "fst"), "parameters": {"weight": 0.5}}, {"model": str(folder / "nxt"), "parameters": {"weight": 0.5}}],
                "dtype": "float32",
            }
        )
    )
    cli = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(cli), str(recipe), str(tmp_path / "out")], check=True, capture_output=True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    fst = transformers.AutoModelForCausalLM.from_pretrained(folder / "fst").state_dict()
    nxt = transformers.AutoModelForCausalLM.from_pretrained(folder / "nxt").state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, (fst[name] + nxt[name]) / 2)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("fst:ab>")["input_ids"] == encode("fst:ab>")


def test_a_worker_sends_the_examples_the_paired_pruner_compares(zoo):
    """With `send_examples`, each stage's result carries the per-example values behind its score
    (search/study/paired_pruner.py compares trials with them); the stages' examples are nested."""
    from search.workers.worker import Worker

    folder, _ = zoo
    objective = {"kind": "lmeval", "include_path": str(folder / "tasks"), "tasks": ["fst_search", "cnt_search"],
                 "metric": "perplexity", "direction": "minimize", "fidelities": [8, 32]}
    models = {m: str(folder / m) for m in ("base", "fst")}
    recipe = ("merge_method: linear\nmodels:\n  - {model: base, parameters: {weight: 0.5}}\n"
              "  - {model: fst, parameters: {weight: 0.5}}\n")
    worker = Worker("w0", models, [objective], str(folder), seed=0, send_examples=True)
    first = worker.begin(0, recipe, [(0, 8)])
    last = worker.advance(0, [(0, 32)], last=True)
    assert first["ok"] and last["ok"], (first.get("error"), last.get("error"))
    for result, n in [(first, 8), (last, 32)]:
        examples = result["examples"]
        assert sorted(examples) == ["cnt_search", "fst_search"]
        assert all(len(e["values"]) == n and e["aggregation"] == "perplexity" for e in examples.values())
        rebuilt = sum(e["weight"] * math.exp(-statistics.fmean(e["values"].values())) for e in examples.values())
        assert rebuilt == pytest.approx(result["scores"][0])
    assert set(first["examples"]["fst_search"]["values"]) < set(last["examples"]["fst_search"]["values"])
    quiet = Worker("w1", models, [objective], str(folder), seed=0)
    assert quiet.begin(0, recipe, [(0, 8)])["examples"] is None  # only when the pruner needs them
