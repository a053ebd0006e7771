"""Portable names: what a run hands out names its models publicly (a hub id, the spec's `name:`, or the
alias), never by a folder of this machine; the published recipe, with the `--model-map` arguments export
prints, rebuilds the exported weights bit for bit under mergekit; a hub id resolves through a Hugging
Face cache built here, offline."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import assert_same_tensors  # noqa: E402
from test_driver import rebuilt_tensors, trials_of, write_run, zoo  # noqa: E402,F401  (zoo: a module fixture)

from search.study import records  # noqa: E402
from search.commands.cli import main as cli_main  # noqa: E402
from search.run.driver import run  # noqa: E402
from search.engine import recipe as recipes  # noqa: E402
from search.engine.errors import UserError  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402

FNS = """
def reversed_heldout(model, tokenizer, fidelity):
    return -fingerprint(model, tokenizer, fidelity)
"""
OBJECTIVES = [{"kind": "custom", "function": "fns.py:fingerprint", "heldout_function": "fns.py:reversed_heldout"}]
FINGERPRINT = [{"kind": "custom", "function": "fns.py:fingerprint"}]
# two stages, so the rebuild goes through mergekit-multi: a slerp of two named models, then task arithmetic
COMPOSE = {"kind": "compose", "stages": [
    {"name": "blend", "kind": "slerp", "models": ["fst", "nxt"], "anchors": 2},
    {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["blend", "cnt"]},
]}
PUBLIC = {"fst": "someone/fst-7b", "nxt": "someone/nxt-7b", "base": "base", "cnt": "cnt"}


def with_models(spec_path: Path, models: dict) -> Path:
    data = yaml.safe_load(spec_path.read_text())
    data["models"] = models
    spec_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec_path


@pytest.fixture(scope="module")
def named_run(zoo, tmp_path_factory):
    """fst and nxt under given public names, base and cnt under their aliases; baselines and held-out on."""
    folder = tmp_path_factory.mktemp("named")
    path = write_run(folder, "named", zoo, COMPOSE, FNS, OBJECTIVES, trials=3, heldout_top_k=2, baselines=True)
    models = {"fst": {"path": str(zoo / "fst"), "name": "someone/fst-7b"},
              "nxt": {"path": str(zoo / "nxt"), "name": "someone/nxt-7b"},
              "base": str(zoo / "base"), "cnt": str(zoo / "cnt")}
    spec = load_spec(with_models(path, models))
    run(spec, quiet=True)
    return spec.run_dir


def recipe_models(text: str) -> set[str]:
    stages = recipes.loads(text)
    built = {s.name for s in stages if s.name}
    return {n for s in stages for n in s.referenced_models() if n not in built}


def body(text: str) -> str:
    """A YAML file without its header comment."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def test_run_json_and_best_yaml_name_every_model_publicly(named_run, zoo):
    meta = records.read_json(named_run / "run.json")
    assert meta["model_names"] == {"fst": "someone/fst-7b", "nxt": "someone/nxt-7b", "base": "base", "cnt": "cnt"}
    assert meta["model_paths"]["fst"] == str(zoo / "fst")
    best = (named_run / "best.yaml").read_text()
    assert recipe_models(best) == set(PUBLIC.values())
    assert str(zoo) not in body(best)
    # the header names this machine's folders once, as the arguments that rebuild it here
    here = next(line for line in best.splitlines() if line.startswith("# rebuild here: mergesearch merge best.yaml OUT"))
    assert f"--model-map someone/fst-7b={zoo / 'fst'}" in here and f"--model-map base={zoo / 'base'}" in here
    # the verdict of the run, when it had baselines: did the winner beat them
    assert meta["verdict"] is not None
    assert best.splitlines()[1].startswith(("# the winner (trial", "# the search did not beat"))


def test_export_writes_public_names_and_local_paths_only_when_asked(named_run, zoo, tmp_path, capsys):
    assert cli_main(["export", str(named_run), str(tmp_path / "public.yaml")]) == 0
    err = capsys.readouterr().err
    assert recipe_models((tmp_path / "public.yaml").read_text()) == set(PUBLIC.values())
    assert "rebuild here: mergesearch merge" in err and f"--model-map someone/nxt-7b={zoo / 'nxt'}" in err
    assert cli_main(["export", str(named_run), "--local-paths", str(tmp_path / "local.yaml")]) == 0
    local = (tmp_path / "local.yaml").read_text()
    assert recipe_models(local) == {str(zoo / m) for m in PUBLIC}
    assert all(Path(m).is_dir() for m in recipe_models(local))
    assert "--model-map" not in local


def test_the_card_recipe_with_the_printed_model_map_rebuilds_the_weights_under_mergekit(named_run, tmp_path, capsys):
    out = tmp_path / "published"
    assert cli_main(["export", str(named_run), "--materialize", str(out)]) == 0
    err = capsys.readouterr().err
    rebuild = next(line for line in err.splitlines() if line.startswith("rebuild here: "))
    words = shlex.split(rebuild.removeprefix("rebuild here: "))
    mapping = dict(words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "--model-map")
    assert set(mapping) == set(PUBLIC.values())
    card = (out / "README.md").read_text()
    card_yaml = re.search(r"```yaml\n(.*?)```", card, re.S).group(1)
    assert card_yaml.strip() == (out / "mergekit_config.yml").read_text().strip()
    assert recipe_models(card_yaml) == set(PUBLIC.values())

    # mergekit reads a name as a folder when one of that name is where it runs: the --model-map, as folders
    names = tmp_path / "names"
    for name, path in mapping.items():
        (names / name).parent.mkdir(parents=True, exist_ok=True)
        (names / name).symlink_to(path, target_is_directory=True)
    (names / "card.yaml").write_text(card_yaml)
    assert cli_main(["export", str(named_run), "--local-paths", str(tmp_path / "local.yaml")]) == 0
    assert cli_main(["export", str(named_run), "--materialize", str(tmp_path / "by-mergekit"), "--with-mergekit"]) == 0
    capsys.readouterr()
    seed = str(records.read_json(named_run / "run.json")["seed"])
    # mergekit's own card asks the hub whether each org/name exists, which offline is an error: no card then
    jobs = [(str(names), "card.yaml", str(tmp_path / "mk-card"), ["--no-write-model-card"]),
            (str(tmp_path), "local.yaml", str(tmp_path / "mk-local"), [])]
    script = """
import json, os, sys
from mergekit.scripts.multimerge import main as mergekit_multi
for cwd, recipe, out, extra in json.loads(sys.argv[1]):
    os.chdir(cwd)
    mergekit_multi([recipe, "--out-path", out, "--intermediate-dir", out + "-parts", "--random-seed", sys.argv[2],
                    *extra], standalone_mode=False)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(jobs), seed], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    exported = rebuilt_tensors(out)
    assert exported
    for folder in ("mk-card", "mk-local", "by-mergekit"):
        assert_same_tensors(exported, rebuilt_tensors(tmp_path / folder), folder)
    # and mergesearch merge, with exactly the printed arguments
    assert cli_main(["merge", str(out / "mergekit_config.yml"), str(tmp_path / "merged"), *words[4:]]) == 0
    assert_same_tensors(exported, rebuilt_tensors(tmp_path / "merged"), "mergesearch merge")
    # the folder mergekit built carries the same public recipe and card as the engine's
    for f in ("mergekit_config.yml", "README.md"):
        assert (tmp_path / "by-mergekit" / f).read_text() == (out / f).read_text().replace(out.name, "by-mergekit")


def test_the_model_card_says_what_was_merged_how_it_was_found_and_how_well_it_did(named_run, tmp_path, zoo):
    out = tmp_path / "card-model"
    assert cli_main(["export", str(named_run), "--materialize", str(out)]) == 0
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["tags"] == ["merge", "mergekit", "mergesearch"]
    assert sorted(front["base_model"]) == ["someone/fst-7b", "someone/nxt-7b"]  # hub ids only
    assert "so not in the card's `base_model`: `base`, `cnt`." in card  # the others, by the names they have
    assert "# license: fill in" in card
    assert "found by mergesearch" in card and "Stage 1: blend" in card
    assert "[SLERP]" in card and "[Task Arithmetic]" in card
    meta = records.read_json(named_run / "run.json")
    winner = meta["winner"]
    assert f"| this model (trial {winner}) |" in card
    for name in meta["baselines"]:
        assert f"| baseline: {name} |" in card
    assert "fingerprint, search (higher is better)" in card and "fingerprint, held-out" in card
    assert "sampler: tpe" in card and "compose (slerp, then weights)" in card
    assert "trials: 3 (" in card and "over the models fst = someone/fst-7b, nxt = someone/nxt-7b" in card
    assert str(zoo) not in card and str(named_run) not in card  # nothing of this machine


def test_materialize_refuses_an_existing_folder_and_leaves_nothing_on_error(named_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli_main(["export", str(named_run), "--materialize", str(out)]) == 2
    assert "--materialize" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert cli_main(["export", str(named_run), "--with-mergekit"]) == 2
    assert "--with-mergekit: it builds the model of --materialize" in capsys.readouterr().err
    assert cli_main(["export", str(named_run), "--materialize", str(tmp_path / "x"), "--local-paths"]) == 2
    assert "drop --local-paths" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ---- hub ids through a Hugging Face cache ------------------------------------------------------------


def cache_model(cache: Path, repo_id: str, folder: Path, files: str = "*") -> Path:
    """`folder`'s files as the cached snapshot of `repo_id`, laid out as huggingface_hub lays its cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.glob(files):
        shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture()
def hf_cache(tmp_path):
    """A Hugging Face cache of our own for the test, as HF_HUB_CACHE names it; the hub is never contacted."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import: follow the variable here
        yield cache


def test_a_spec_names_a_model_by_hub_id_from_the_local_cache(zoo, tmp_path, hf_cache, capsys):
    snapshot = cache_model(hf_cache, "toyorg/fst-hub", zoo / "fst")
    path = write_run(tmp_path, "hub", zoo, {"kind": "weights", "method": "task_arithmetic", "base": "base",
                                            "models": ["fst", "nxt"]}, "", FINGERPRINT, trials=2, heldout_top_k=0)
    spec = load_spec(with_models(path, {"base": str(zoo / "base"), "fst": "toyorg/fst-hub", "nxt": str(zoo / "nxt")}))
    assert spec.models["fst"] == str(snapshot)  # the whole snapshot folder the workers load
    assert spec.model_names == {"base": "base", "fst": "toyorg/fst-hub", "nxt": "nxt"}
    result = run(spec, quiet=True)
    assert result.counts["complete"] == 2
    meta = records.read_json(spec.run_dir / "run.json")
    assert meta["model_names"]["fst"] == "toyorg/fst-hub" and meta["model_paths"]["fst"] == str(snapshot)
    assert "toyorg/fst-hub" in recipe_models((spec.run_dir / "best.yaml").read_text())
    assert cli_main(["export", str(spec.run_dir)]) == 0
    assert recipe_models(capsys.readouterr().out) == {"base", "toyorg/fst-hub", "nxt"}
    # the workers scored the cached model: its trials score what the cached files build
    assert all(r["state"] == "COMPLETE" for r in trials_of(spec.run_dir))


def test_a_hub_id_not_in_the_cache_or_cached_without_weights_is_one_line(zoo, tmp_path, hf_cache):
    cache_model(hf_cache, "toyorg/config-only", zoo / "fst", files="config.json")
    path = write_run(tmp_path, "hub", zoo, {"kind": "weights", "method": "linear", "models": ["fst", "nxt"]}, "",
                     FINGERPRINT, trials=1)
    for value, message in (("toyorg/missing", r"models\.fst: no model folder at 'toyorg/missing' .* and no hub model "
                                              r"of that name in the Hugging Face cache \(.*hf-cache\)"),
                           ("toyorg/config-only", r"models\.fst: the Hugging Face cache holds toyorg/config-only "
                                                  r"without its config.json or weights .*hf download")):
        with pytest.raises(UserError, match=message) as e:
            load_spec(with_models(path, {"fst": value, "nxt": str(zoo / "nxt")}))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("models, message", [
    ({"fst": {"path": "{zoo}/fst"}, "nxt": {"path": "{zoo}/nxt", "name": "a b"}}, r"models\.nxt\.name: 'a b' is not a model name"),
    ({"fst": {"name": "org/fst"}}, r"models\.fst: expected a folder or hub id, or \{path: \.\.\., name: org/model\}"),
    ({"fst": {"path": "{zoo}/fst", "name": "org/m"}, "nxt": {"path": "{zoo}/nxt", "name": "org/m"}},
     r"models\.nxt: its public name 'org/m' is also that of models\.fst; give each model its own `name:`"),
])
def test_a_bad_public_name_is_one_line(zoo, tmp_path, models, message):
    models = json.loads(json.dumps(models).replace("{zoo}", str(zoo)))
    path = write_run(tmp_path, "names", zoo, {"kind": "weights", "method": "linear", "models": ["fst", "nxt"]}, "",
                     FINGERPRINT, trials=1)
    with pytest.raises(UserError, match=message):
        load_spec(with_models(path, models))
