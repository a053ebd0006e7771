"""Architectures beyond the first five through the whole pipeline: run spec -> spaces -> workers ->
export -> a mergekit rebuild, and `mergesearch merge`.

A Qwen3 stand-in (tied embeddings, `layer_types` in its config) is searched with a weights
space on local worker processes; the winner's exported recipe, rebuilt by mergekit-yaml, must be
the model the worker scored (its weight fingerprint) and the engine's tensors bit for bit. A
GPT-2 stand-in (layers counted by `n_layer`, width by `n_embd`) is read by the spaces at its
depth; stacking a Qwen3 is refused in one line, as mergekit cannot write that config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers
import yaml
from conftest import TESTS, assert_same_tensors, read_tensors
from search_fns import state_fingerprint
from standins import make_finetune, make_standin

from search.commands.cli import main as cli_main
from search.engine.errors import UserError
from search.engine.materialize import Materializer
from search.engine.recipe import loads
from search.results import winner
from search.study import records
from spaces import build_space, read_model_infos

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REBUILD = """
import sys
from mergekit.scripts.run_yaml import main
main([sys.argv[1], sys.argv[2], "--random-seed", "0"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("other_arch_zoo")
    make_standin(root / "base", "qwen3", 2, seed=0)
    for seed, name in enumerate(("fst", "nxt"), start=1):
        make_finetune(root / name, root / "base", seed=seed, scale=0.05)
    make_standin(root / "gpt2", "gpt2", 3, seed=4)
    return root


def test_a_qwen3_search_exports_what_mergekit_rebuilds(zoo, tmp_path):
    (tmp_path / "fns.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom search_fns import fingerprint\n"
    )
    spec = {
        "name": "qwen3",
        "models": {m: str(zoo / m) for m in ("base", "fst", "nxt")},
        "space": {"kind": "weights", "method": ["ties", "task_arithmetic"], "base": "base", "models": ["fst", "nxt"],
                  "weight": [0.2, 1.0]},
        "objectives": [{"kind": "custom", "function": "fns.py:fingerprint"}],
        "trials": 4, "workers": 1, "seed": 0, "baselines": False, "heldout_top_k": 0,
    }  # fmt: skip
    spec_path = tmp_path / "qwen3.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert cli_main(["run", str(spec_path), "--quiet"]) == 0
    run_dir = next(tmp_path.rglob("run.json")).parent
    best_yaml = run_dir / "best.local.yaml"
    assert cli_main(["export", str(run_dir), "--local-paths", str(best_yaml)]) == 0
    rebuilt = run_dir / "rebuilt"
    proc = subprocess.run([sys.executable, "-c", REBUILD, str(best_yaml), str(rebuilt)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    recs = records.read_trials(run_dir / "trials.jsonl")
    best = winner.rank(recs, records.read_json(run_dir / "run.json")["directions"])[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(rebuilt, dtype="auto")
    assert state_fingerprint(theirs.state_dict()) == pytest.approx(best["values"][0], rel=1e-12, abs=1e-9)
    _, ours = Materializer({m: zoo / m for m in ("base", "fst", "nxt")}).state_dict(loads(best["recipe"]), seed=0)
    assert_same_tensors(ours, read_tensors(rebuilt), f"qwen3 trial {best['trial']}")


def test_spaces_read_depth_and_width_from_the_definitions_keys(zoo):
    infos = read_model_infos({"g": zoo / "gpt2", "q": zoo / "base"})
    assert (infos["g"].num_layers, infos["g"].hidden_size) == (3, 32)
    space = build_space({"kind": "layout", "mode": "dus", "models": ["g"]}, infos)
    assert space.depth == {"g": 3}


def test_stacking_a_config_with_layer_types_is_refused_in_one_line(zoo):
    infos = read_model_infos({"q": zoo / "base"})
    with pytest.raises(UserError, match=r"^space\.models\[0\]: 'q' is a qwen3 model whose config\.json lists layer_types") as e:
        build_space({"kind": "layout", "mode": "dus", "models": ["q"]}, infos)
    assert "\n" not in str(e.value)


def test_an_architecture_without_a_definition_is_one_line(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchForCausalLM"], "model_type": "nosuch",
                                                    "num_hidden_layers": 2, "hidden_size": 8}))
    with pytest.raises(UserError, match=r"models\.odd: architecture NoSuchForCausalLM is not supported "
                                        r"\(mergekit 0\.1\.5 has no definition of it\); use a model of one of: ") as e:
        read_model_infos({"odd": folder})
    assert "\n" not in str(e.value)


def test_merge_command_writes_what_mergekit_writes(zoo, tmp_path):
    """`mergesearch merge` on a GPT-2 stack (3 -> 4 layers, ${n_layer} in its config) against mergekit-yaml."""
    recipe = textwrap.dedent(f"""
        slices:
          - sources: [{{model: {zoo / 'gpt2'}, layer_range: [0, 3]}}]
          - sources: [{{model: {zoo / 'gpt2'}, layer_range: [2, 3]}}]
        merge_method: passthrough
    """)
    (tmp_path / "r.yml").write_text(recipe)
    assert cli_main(["merge", str(tmp_path / "r.yml"), str(tmp_path / "ours")]) == 0
    proc = subprocess.run([sys.executable, "-c", REBUILD, str(tmp_path / "r.yml"), str(tmp_path / "theirs")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "theirs"), "gpt2 stack")
    ours, theirs = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "theirs"))
    assert ours["n_layer"] == theirs["n_layer"] == 4
