"""What a run hands back, to the letter: one real run of the command line, read back by every command.

The run (a slerp space over two fine-tunes, in stages, with held-out scores that all tie, and its
baselines) is `mergesearch run SPEC > out 2> err` in a subprocess, on stand-ins whose config.json
carries what hub configs carry: a `_name_or_path` naming a folder of the machine that saved them,
id2label, label2id, return_dict, torch_dtype. One model has a public hub id, the other none.

- the slerp space's t = 0.5 baseline is a COMPLETE trial of the study, with the space's own recipe;
- every baseline is scored before the first search trial, announced in one line, and recorded with
  its worker and timings, as trials are;
- the workers' utilization is at most 1 with baselines and held-out re-scores in the run;
- stdout holds the summary and nothing else; `show | cat` gives the winner's YAML as best.yaml has it;
- the held-out tie is shown with the rule that broke it;
- config.json of `export --materialize` and of `merge` equals what mergekit-yaml writes, key for key;
- the model card lists only hub ids in `base_model`, names the other model in its text, and export
  says so in one line, with the run's verdict.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
import yaml

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from search.commands.cli import main as cli_main  # noqa: E402
from search.engine import recipe as recipes  # noqa: E402
from search.study import records  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SPACE = {"kind": "slerp", "models": ["fst", "nxt"]}
BASELINES = ["fst alone", "nxt alone", "slerp t=0.5"]
HUB_ID = "someorg/fst-7b"


def dirty_config(folder: Path) -> None:
    """config.json as many hub models ship it: saved with every default written out, on another machine."""
    config = json.loads((folder / "config.json").read_text())
    config.update({"_name_or_path": "/home/someone/checkpoints/private-run", "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
                   "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "return_dict": True,
                   "torch_dtype": config.pop("dtype", "bfloat16")})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def handed_back(pair_zoo, tmp_path_factory) -> dict:
    for name in ("base", "fst", "nxt"):
        dirty_config(pair_zoo / name)
    folder = tmp_path_factory.mktemp("handed_back")
    (folder / "fns.py").write_text(f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nfrom search_fns import *\n"
                                   + textwrap.dedent("""
        score = staged()

        def flat_heldout(model, tokenizer, fidelity):  # every re-score ties: the tie rule decides
            return 1.0
    """))
    spec = {"name": "handed", "models": {"fst": {"path": str(pair_zoo / "fst"), "name": HUB_ID},
                                         "nxt": str(pair_zoo / "nxt")},
            "space": SPACE,
            "objectives": [{"kind": "custom", "function": "fns.py:score", "heldout_function": "fns.py:flat_heldout",
                            "fidelities": [1, 2]}],
            "trials": 3, "workers": 2, "seed": 0, "sampler": "random", "heldout_top_k": 2, "baselines": True}
    (folder / "handed.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with open(folder / "out", "w") as out, open(folder / "err", "w") as err:
        code = subprocess.run([str(BIN / "mergesearch"), "run", "handed.yaml"], cwd=folder, env=ENV, stdout=out,
                              stderr=err, timeout=900).returncode
    assert code == 0, (folder / "err").read_text()[-3000:]
    run_dir = folder / "handed"
    return {"zoo": pair_zoo, "folder": folder, "run_dir": run_dir, "out": (folder / "out").read_text(),
            "err": (folder / "err").read_text(), "meta": records.read_json(run_dir / "run.json"),
            "recs": records.read_trials(run_dir / "trials.jsonl")}


def yaml_after(text: str, header: str) -> str:
    """What the summary prints after the line naming a YAML file: that file's text."""
    return text.split(f"{header}:\n", 1)[1]


# ---- baselines -------------------------------------------------------------------------------------


def test_the_slerp_baseline_at_t_half_is_a_complete_trial_of_the_study(handed_back):
    run_dir = handed_back["run_dir"]
    study = optuna.load_study(study_name="handed", storage=f"sqlite:///{run_dir / 'study.db'}")
    marked = {t.user_attrs[records.BASELINE_ATTR]: t for t in study.trials if records.is_baseline(t)}
    assert sorted(marked) == ["slerp t=0.5"]  # the models alone are passthroughs: no point of a slerp space
    t = marked["slerp t=0.5"]
    assert t.state == optuna.trial.TrialState.COMPLETE
    assert t.params == {f"t.{curve}.{j}": 0.5 for curve in ("self_attn", "mlp", "rest") for j in range(2)}
    # the trial holds the space's recipe for that point, which builds what the baseline's `t: 0.5` builds
    trial_recipe = recipes.loads(t.user_attrs[records.RECORD_ATTR]["recipe"])[0]
    assert [c.value for c in trial_recipe.parameters["t"]] == [[0.5, 0.5]] * 3
    baseline = handed_back["meta"]["baselines"]["slerp t=0.5"]
    assert baseline["trial"] == t.number and baseline["values"] == t.values
    assert recipes.loads(next(r for r in handed_back["recs"] if r["baseline"] == "slerp t=0.5")["recipe"])


def test_every_baseline_is_scored_before_the_first_search_trial_and_announced_in_one_line(handed_back):
    recs = handed_back["recs"]
    baselines = {r["baseline"]: r for r in recs if r["baseline"]}
    searched = [r for r in recs if not r["baseline"]]
    assert sorted(baselines) == BASELINES and len(searched) == 3
    first_dispatch = min(r["timings"]["dispatched"] for r in searched)
    for r in baselines.values():
        assert r["timings"]["finished"] <= first_dispatch, r["baseline"]
    assert max(r["trial"] for r in baselines.values() if r["trial"] is not None) < min(r["trial"] for r in searched)
    announced = [line for line in handed_back["err"].splitlines() if line.startswith("scoring ")]
    assert announced == ["scoring 3 baselines before the search: fst alone, nxt alone, slerp t=0.5"]


def test_baseline_records_carry_their_worker_and_timings_as_trials_do(handed_back):
    trial = next(r for r in handed_back["recs"] if not r["baseline"])
    for r in (r for r in handed_back["recs"] if r["baseline"]):
        t = r["timings"]
        assert list(r) == list(trial), r["baseline"]  # the same fields, in the same order
        assert r["worker"] in ("w0", "w1") and r["workers"] == [r["worker"]] and r["attempts"] == 1, r
        assert (r["sources"], r["node"]) == (trial["sources"], trial["node"])
        # built once, scored on both stages, then re-scored on held-out (busy counts that too)
        assert len(t["materialize_s"]) == 1 and len(t["score_s"]) == 2
        assert t["busy_s"] >= t["materialize_s"][0] + sum(t["score_s"]) > 0
        assert r["started"] < r["finished"]
        assert r["started"] == records._iso(t["dispatched"]) or r["trial"] is not None


def test_utilization_is_measured_over_one_span_and_is_at_most_one(handed_back):
    util = handed_back["meta"]["utilization"]
    assert 0 < util["utilization"] <= 1
    for name, worker in util["workers"].items():
        assert 0 < worker["utilization"] <= 1, name
        assert worker["busy_s"] <= util["wall_s"]
    # the span holds the baselines' work, not only the trials'
    baseline_busy = sum(r["timings"]["busy_s"] for r in handed_back["recs"] if r["baseline"])
    assert sum(w["busy_s"] for w in util["workers"].values()) >= baseline_busy


# ---- what is printed ---------------------------------------------------------------------------------


def test_run_writes_the_summary_to_stdout_and_its_progress_to_stderr(handed_back):
    out, err, run_dir = handed_back["out"], handed_back["err"], handed_back["run_dir"]
    assert out.startswith("handed: 3 complete, 0 pruned, 0 failed")
    assert "winner: trial" in out and "baselines (hand-written merges" in out
    best = (run_dir / "best.yaml").read_text()
    assert yaml_after(out, f"{run_dir / 'best.yaml'}").rstrip("\n") == best.rstrip("\n")
    for progress in ("scoring 3 baselines", "starting 2 worker(s)", "re-scoring the top 2"):
        assert progress in err and progress not in out


def test_show_off_a_terminal_prints_the_winners_yaml_unwrapped(handed_back):
    run_dir = handed_back["run_dir"]
    shown = subprocess.run([str(BIN / "mergesearch"), "show", str(run_dir)], env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    best = (run_dir / "best.yaml").read_text()
    printed = yaml_after(shown.stdout, f"{run_dir / 'best.yaml'}")
    assert yaml.safe_load(printed) == yaml.safe_load(best)
    assert printed.rstrip("\n") == best.rstrip("\n")  # the header's commands whole, each comment on its line
    rebuild = next(line for line in printed.splitlines() if line.startswith("# rebuild here: "))
    assert f"--model-map {HUB_ID}={handed_back['zoo'] / 'fst'}" in rebuild


def test_the_held_out_tie_is_shown_with_the_rule_that_broke_it(handed_back):
    from search.results import winner

    recs, meta = handed_back["recs"], handed_back["meta"]
    tied = winner.heldout_ties(recs, meta["directions"])
    assert len(tied) == 2 and all(r["heldout"] == [1.0] for r in tied)
    assert tied[0]["values"][0] > tied[1]["values"][0]  # the better search score won
    line = next(line for line in handed_back["out"].splitlines() if line.startswith("winner: "))
    assert line == (f"winner: trial {tied[0]['trial']} (marked *), picked by held-out score: trials "
                    f"{tied[0]['trial']}, {tied[1]['trial']} tie there at 1, and {winner.TIE_RULE}")
    assert meta["winner"] == tied[0]["trial"]


# ---- what is published ---------------------------------------------------------------------------------


def test_export_materialize_writes_mergekits_config_and_a_card_with_hub_ids_only(handed_back, tmp_path, capsys):
    run_dir, zoo = handed_back["run_dir"], handed_back["zoo"]
    out = tmp_path / "published"
    assert cli_main(["export", str(run_dir), "--materialize", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert cli_main(["export", str(run_dir), "--local-paths", str(tmp_path / "local.yaml")]) == 0
    mergekit = subprocess.run([str(BIN / "mergekit-yaml"), str(tmp_path / "local.yaml"), str(tmp_path / "mk")],
                              env=ENV, capture_output=True, text=True, timeout=600)
    assert mergekit.returncode == 0, mergekit.stderr[-3000:]
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "mk" / "config.json").read_text())

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == [HUB_ID]
    assert "Not on the Hugging Face Hub under these names, so not in the card's `base_model`: `nxt`." in card
    assert [line for line in err if "base_model" in line] == [
        "the model card names nxt in its text but not in `base_model`, which takes hub ids only; give each its "
        "hub id as `name:` under the run spec's models"]
    assert [line for line in err if line.startswith("verdict of the run: ")] == [
        "verdict of the run: the search did not beat the best baseline (fst alone): 1 vs 1 on held-out, +0"]
    for f in out.iterdir():  # nothing names a folder of this machine
        if f.suffix in (".json", ".yml", ".md", ".txt", ".jinja"):
            text = f.read_text()
            assert str(zoo) not in text and str(run_dir) not in text and "/home/someone" not in text, f.name


def test_merge_writes_mergekits_config_and_a_card_without_hub_ids(handed_back, tmp_path):
    zoo = handed_back["zoo"]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {zoo / 'fst'}\nmodels:\n  - model: {zoo / 'fst'}\n"
                      f"  - model: {zoo / 'nxt'}\nparameters:\n  t: 0.3\n")
    ours = subprocess.Popen([str(BIN / "mergesearch"), "merge", str(recipe), str(tmp_path / "ours")], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    theirs = subprocess.run([str(BIN / "mergekit-yaml"), str(recipe), str(tmp_path / "mk")], env=ENV,
                            capture_output=True, text=True, timeout=600)
    _, ours_err = ours.communicate(timeout=600)
    assert ours.returncode == 0 and theirs.returncode == 0, (ours_err, theirs.stderr[-3000:])
    assert (tmp_path / "ours" / "config.json").read_text() == (tmp_path / "mk" / "config.json").read_text()
    card = (tmp_path / "ours" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert "base_model" not in front  # local folders: no hub id to list
    assert f"`{zoo / 'nxt'}`" in re.sub(r"\s+", " ", card)
