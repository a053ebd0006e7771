"""Bad inputs to `run`, `merge`, `export` and `zoo`, as a table: each gets exit status 2, exactly
one line on stderr naming the field or file, and leaves the file tree as it was (nothing
written, nothing deleted, no command run by the input).

Each case builds its inputs in its own folder (the current directory while it runs, so a stray
file shows up) and returns the command line and a pattern the error line must match. The CLI
runs in-process (`search.commands.cli.main`); cases about an unwritable folder run it in a subprocess
when we are root (see run_locked). Every case fails before Ray would start.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from search.study import records
from search.commands.cli import main as cli_main
from search.engine.errors import UserError
from search.study.samplers import build_sampler
from search.study.storage import mask

sys.path.insert(0, str(Path(__file__).parent))
from standins import make_finetune, make_standin  # noqa: E402

BIN = Path(sys.executable).parent
LINEAR = (
    "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
    "  - model: {b}\n    parameters: {{weight: 0.5}}\n"
)
# 10 levels of ten aliases each: 1 KB of text, 10^9 elements expanded (10^6 at level 7)
BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
)


class Exploit:
    """Unpickling this creates a file: a checkpoint that runs code when loaded without weights_only."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


# ---- shared inputs, built once --------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict[str, Path]:
    """Tiny real models (some broken on purpose) and a finished run folder, built from a real study."""
    root = tmp_path_factory.mktemp("bad_inputs")
    base = make_standin(root / "base", "llama", 2, seed=1, hidden=32)
    m = {"root": root, "base": base, "ft": make_finetune(root / "ft", base, seed=2)}
    m["deep"] = make_standin(root / "deep", "llama", 3, seed=3, hidden=32)
    weights = (base / "model.safetensors").read_bytes()
    for name, data in {"truncated": weights[: len(weights) // 2], "garbage": b"\xff" * 8 + b"{not json" * 50}.items():
        shutil.copytree(base, root / name)
        (root / name / "model.safetensors").write_bytes(data)
    shutil.copytree(base, root / "exploit")
    (root / "exploit" / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Exploit(root / "exploit" / "PWNED")}, root / "exploit" / "pytorch_model.bin")
    shutil.copytree(base, root / "badconfig")
    (root / "badconfig" / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    m.update({k: root / k for k in ("truncated", "garbage", "exploit", "badconfig")})
    m["run"] = _finished_run(root / "run", base, m["ft"])
    return m


def _finished_run(run_dir: Path, base: Path, ft: Path) -> Path:
    """run.json and trials.jsonl as `mergesearch run` writes them, from a real Optuna study:
    trials 0 and 1 complete, 2 pruned after the first stage, 3 failed."""
    study = optuna.create_study(direction="minimize")
    recipe = LINEAR.format(a="base", b="ft")
    for value, state, stages, reason in [
        (1.0, "COMPLETE", [{"step": 16, "scores": {"ppl": 1.1}}, {"step": 128, "scores": {"ppl": 1.0}}], None),
        (0.5, "COMPLETE", [{"step": 16, "scores": {"ppl": 0.6}}, {"step": 128, "scores": {"ppl": 0.5}}], None),
        (None, "PRUNED", [{"step": 16, "scores": {"ppl": 2.5}}], "pruned after stage 16"),
        (None, "FAIL", [], "objective ppl returned nan"),
    ]:
        trial = study.ask()
        trial.suggest_float("w", 0, 1)
        trial.set_user_attr(records.RECORD_ATTR, {"recipe": recipe, "stages": stages})
        if reason:
            trial.set_user_attr(records.REASON_ATTR, reason)
        if state == "COMPLETE":
            study.tell(trial, value)
        else:
            study.tell(trial, state=getattr(optuna.trial.TrialState, state))
    run_dir.mkdir()
    records.write_trials(run_dir / "trials.jsonl", [records.trial_record(t) for t in study.trials])
    meta = {
        "name": "demo", "storage": "sqlite:///study.db", "objectives": ["ppl"], "directions": ["minimize"],
        "seed": 0, "model_paths": {"base": str(base), "ft": str(ft)}, "stages": [16, 128],
    }  # fmt: skip
    records.write_atomic(run_dir / "run.json", json.dumps(meta))
    return run_dir


class Case:
    """One bad input's folder, with helpers to write what the case needs into it."""

    def __init__(self, folder: Path, lab: dict[str, Path]):
        self.folder, self.lab = folder, lab

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def spec(self, file: str = "demo.yaml", **changes) -> Path:
        """A run spec that is good but for `changes` (a value None removes the key)."""
        spec = {
            "models": {"base": str(self.lab["base"]), "ft": str(self.lab["ft"])},
            "space": {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["ft"]},
            "objectives": [{"kind": "custom", "function": "scores.py:score", "direction": "minimize"}],
            "trials": 2,
        }
        spec.update(changes)
        self.write(str(Path(file).parent / "scores.py"), "def score(model, tokenizer, fidelity):\n    return 1.0\n")
        return self.write(file, yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))

    def recipe(self, a: str = "base", b: str = "ft", name: str = "recipe.yml") -> Path:
        return self.write(name, LINEAR.format(a=self.lab.get(a, a), b=self.lab.get(b, b)))

    def run_copy(self) -> Path:
        return Path(shutil.copytree(self.lab["run"], self.folder / "run"))


# "command: what is wrong" -> (builder of (argv, pattern the error line must match), whether the
# case's folder "locked" is made unwritable while the command runs)
CASES: dict[str, tuple[Callable[[Case], tuple[list[str], str]], bool]] = {}
DENIED = r"(Permission denied|Read-only file system)"  # the first as a user, the second as root (a ro mount)


def case(name: str, locked: bool = False):
    def register(build):
        CASES[name] = (build, locked)
        return build

    return register


# ---- run: the spec ---------------------------------------------------------------------------


@case("run: spec not UTF-8")
def _(c):
    return ["run", str(c.write("demo.yaml", b"name: d\xe9mo\ntrials: 1\n"))], r"demo\.yaml: not UTF-8"


@case("run: spec path is a folder")
def _(c):
    (c.folder / "specs").mkdir()
    return ["run", str(c.folder / "specs")], r"specs: is a folder"


@case("run: spec missing")
def _(c):
    return ["run", "nope.yaml"], r"nope\.yaml: no such run spec"


@case("run: alias bomb, 10^9 elements")
def _(c):
    return ["run", str(c.write("demo.yaml", BOMB + "name: demo\n"))], r"demo\.yaml: .*expands to more than"


@case("run: alias bomb inside a field")
def _(c):
    return ["run", str(c.write("demo.yaml", BOMB + "name: *a9\n"))], r"expands to more than"


@case("run: recursive alias")
def _(c):
    return ["run", str(c.write("demo.yaml", "name: &n [*n]\n"))], r"alias refers to a node that contains it"


@case("run: python tag")
def _(c):
    text = "name: !!python/object/apply:os.system ['touch PWNED']\n"
    return ["run", str(c.write("demo.yaml", text))], r"demo\.yaml: malformed YAML.*constructor"


@case("run: several documents")
def _(c):
    c.spec()
    text = (c.folder / "demo.yaml").read_text()
    return ["run", str(c.write("demo.yaml", text + "---\n" + text))], r"2 YAML documents"


@case("run: sampler os.system")
def _(c):
    spec = c.spec(sampler={"name": "os.system", "command": "touch PWNED"})
    return ["run", str(spec)], r"sampler: 'os\.system' is not an optuna sampler"


@case("run: sampler builtins.open")
def _(c):
    spec = c.spec(sampler={"name": "builtins.open", "file": "PWNED", "mode": "w"})
    return ["run", str(spec)], r"sampler: 'builtins\.open' is not an optuna sampler"


@case("run: sampler subprocess.Popen")
def _(c):
    spec = c.spec(sampler={"name": "subprocess.Popen", "args": ["touch", "PWNED"]})
    return ["run", str(spec)], r"sampler: 'subprocess\.Popen' is not an optuna sampler"


@case("run: sampler not importable")
def _(c):
    return ["run", str(c.spec(sampler="nosuchpackage.Sampler"))], r"sampler: cannot import 'nosuchpackage\.Sampler'"


@case("run: pruner as a dotted path")
def _(c):
    return ["run", str(c.spec(pruner="os.system"))], r"pruner: "


@case("run: a megabyte name")
def _(c):
    return ["run", str(c.spec(name="x/" * 500_000))], r"name: 'x/x/.* \.\.\. .*/' is not a usable folder name"


@case("run: unknown key")
def _(c):
    return ["run", str(c.spec(trails=3))], r"trails: unknown key"


@case("run: no budget")
def _(c):
    return ["run", str(c.spec(trials=None))], r"budget"


@case("run: model folder missing")
def _(c):
    return ["run", str(c.spec(models={"base": "zoo/none", "ft": str(c.lab["ft"])}))], r"models\.base: no model folder"


@case("run: objective kind unknown")
def _(c):
    return ["run", str(c.spec(objectives=[{"kind": "vibes"}]))], r"objectives\[0\]"


@case("run: enqueued recipe is an alias bomb")
def _(c):
    c.write("known.yml", BOMB + "merge_method: linear\n")
    return ["run", str(c.spec(enqueue=["known.yml"]))], r"enqueue\[0\]: .*known\.yml: .*expands to more than"


@case("run: enqueued recipe not UTF-8")
def _(c):
    c.write("known.yml", b"merge_method: lin\xe9ar\n")
    return ["run", str(c.spec(enqueue=["known.yml"]))], r"enqueue\[0\]: .*known\.yml: not UTF-8"


@case("run: --trials 0")
def _(c):
    return ["run", str(c.spec()), "--trials", "0"], r"trials"


@case("run: sqlite uri=true storage makes no folders here")
def _(c):
    url = "sqlite:///file:sub/dir/study.db?mode=rwc&uri=true"
    return ["run", str(c.spec()), "--storage", url], r"storage: cannot open sqlite:///file:sub/dir/study\.db"


@case("run: storage password with a slash")
def _(c):
    url = "postgresql://bob:Cli/S3cret@127.0.0.1:1/db"
    return ["run", str(c.spec()), "--storage", url], r"storage: cannot open postgresql://bob:\*\*\*@127\.0\.0\.1:1/db(?!.*S3cret)"


@case("run: storage password with an @")
def _(c):
    url = "postgresql://bob:p@ssW0rd@127.0.0.1:1/db"
    return ["run", str(c.spec()), "--storage", url], r"storage: cannot open postgresql://bob:\*\*\*@127\.0\.0\.1:1/db(?!.*ssW0rd)"


@case("run: spec folder not writable", locked=True)
def _(c):
    return ["run", str(c.spec("locked/demo.yaml"))], r"cannot write the run folder .*locked/demo \(.*locked is not writable\)"


# ---- merge -----------------------------------------------------------------------------------


@case("merge: recipe not UTF-8")
def _(c):
    return ["merge", str(c.write("recipe.yml", b"merge_method: lin\xe9ar\n")), "out"], r"recipe\.yml: not UTF-8"


@case("merge: recipe path is a folder")
def _(c):
    (c.folder / "recipes").mkdir()
    return ["merge", str(c.folder / "recipes"), "out"], r"recipes: is a folder"


@case("merge: alias bomb")
def _(c):
    return ["merge", str(c.write("recipe.yml", BOMB + "merge_method: linear\n")), "out"], r"recipe\.yml: .*expands to more"


@case("merge: python tag")
def _(c):
    text = "merge_method: !!python/object/apply:os.system ['touch PWNED']\n"
    return ["merge", str(c.write("recipe.yml", text)), "out"], r"recipe\.yml: malformed YAML.*constructor"


@case("merge: models of different depth")
def _(c):
    return ["merge", str(c.recipe("base", "deep")), "out"], r"models: .*base has 2 layers and .*deep has 3"


@case("merge: truncated safetensors")
def _(c):
    return ["merge", str(c.recipe("base", "truncated")), "out"], r"model .*truncated/model\.safetensors is not a readable safetensors"


@case("merge: garbage safetensors header")
def _(c):
    return ["merge", str(c.recipe("base", "garbage")), "out"], r"model .*garbage/model\.safetensors is not a readable safetensors"


@case("merge: malicious pickle with --allow-pickle")
def _(c):
    return ["merge", str(c.recipe("base", "exploit")), "out", "--allow-pickle"], r"exploit/pytorch_model\.bin was refused as unsafe"


@case("merge: pickle without --allow-pickle")
def _(c):
    return ["merge", str(c.recipe("base", "exploit")), "out"], r"pytorch_model\.bin.*--allow-pickle"


@case("merge: config.json not UTF-8")
def _(c):
    return ["merge", str(c.recipe("base", "badconfig")), "out"], r"badconfig/config\.json is not UTF-8"


@case("merge: OUT_DIR is a file")
def _(c):
    c.write("out", "mine")
    return ["merge", str(c.recipe()), "out"], r"OUT_DIR out: exists and is not a folder"


@case("merge: OUT_DIR not empty")
def _(c):
    c.write("out/notes.txt", "mine")
    return ["merge", str(c.recipe()), "out"], r"OUT_DIR out: exists and is not empty.*--overwrite"


@case("merge: a megabyte --model-map")
def _(c):
    return ["merge", str(c.recipe()), "out", "--model-map", "x" * 1_000_000], r"--model-map 'xxx.* \.\.\. .*': expected NAME=PATH"


# ---- export ----------------------------------------------------------------------------------


@case("export: --top into a non-empty folder")
def _(c):
    run = c.run_copy()
    c.write("keep/notes.txt", "mine")
    c.write("keep/sub/more.txt", "mine too")
    return ["export", str(run), "--top", "2", "keep"], r"OUT keep: exists and is not empty.*--overwrite"


@case("export: --top into an existing file")
def _(c):
    run = c.run_copy()
    c.write("keep", "mine")
    return ["export", str(run), "--top", "2", "keep", "--overwrite"], r"OUT keep: exists and is not a folder"


@case("export: --top into the default folder, already there")
def _(c):
    run = c.run_copy()
    c.write("run/top/notes.txt", "mine")
    return ["export", str(run), "--top", "1"], r"OUT .*run/top: exists and is not empty"


@case("export: --trial onto an existing file")
def _(c):
    run = c.run_copy()
    c.write("best.yaml", "mine")
    return ["export", str(run), "--trial", "1", "best.yaml"], r"OUT best\.yaml: exists.*--overwrite"


@case("export: --trial into an existing folder")
def _(c):
    run = c.run_copy()
    c.write("keep/notes.txt", "mine")
    return ["export", str(run), "--trial", "1", "keep", "--overwrite"], r"OUT keep: is a folder"


@case("export: corrupt run.json")
def _(c):
    run = c.run_copy()
    c.write("run/run.json", '{"name": "demo", "directions": [')
    return ["export", str(run)], r"run\.json: not valid JSON"


@case("export: run.json not UTF-8")
def _(c):
    run = c.run_copy()
    c.write("run/run.json", b'{"name": "d\xe9mo"}')
    return ["export", str(run)], r"run\.json: not valid JSON"


@case("export: run.json without directions")
def _(c):
    run = c.run_copy()
    meta = json.loads((run / "run.json").read_text())
    del meta["directions"]
    c.write("run/run.json", json.dumps(meta))
    return ["export", str(run)], r"run\.json: no `directions`"


@case("export: a trials.jsonl line without state")
def _(c):
    run = c.run_copy()
    lines = (run / "trials.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    del first["state"]
    c.write("run/trials.jsonl", "\n".join([json.dumps(first), *lines[1:]]) + "\n")
    return ["export", str(run)], r"trials\.jsonl: trial 0 has no valid `state`"


@case("export: a trials.jsonl line that is not a record")
def _(c):
    run = c.run_copy()
    c.write("run/trials.jsonl", (run / "trials.jsonl").read_text() + "[1, 2]\n")
    return ["export", str(run)], r"trials\.jsonl: a line is not a trial record"


@case("export: --trial of a failed trial")
def _(c):
    return ["export", str(c.run_copy()), "--trial", "3", "t3.yaml"], r"--trial 3: that trial failed \('objective ppl returned nan'\)"


@case("export: --trial that does not exist")
def _(c):
    return ["export", str(c.run_copy()), "--trial", "99", "t.yaml"], r"--trial 99: no such trial"


@case("export: --top 0")
def _(c):
    return ["export", str(c.run_copy()), "--top", "0", "top"], r"--top: must be at least 1"


@case("export: not a run folder")
def _(c):
    (c.folder / "empty").mkdir()
    return ["export", str(c.folder / "empty")], r"empty: not a run folder"


@case("export: OUT not writable", locked=True)
def _(c):
    run = c.run_copy()
    (c.folder / "locked").mkdir()
    return ["export", str(run), "--top", "2", str(c.folder / "locked" / "top")], r"locked.*cannot write"


@case("export: single OUT not writable", locked=True)
def _(c):
    run = c.run_copy()
    (c.folder / "locked").mkdir()
    return ["export", str(run), "--trial", "1", str(c.folder / "locked" / "t1.yaml")], r"locked.*cannot write"


# ---- zoo -------------------------------------------------------------------------------------


@case("zoo: DIR is a file")
def _(c):
    c.write("zoo", "mine")
    return ["zoo", "zoo"], r"zoo is a file"


@case("zoo: DIR holds something else")
def _(c):
    c.write("zoo/notes.txt", "mine")
    return ["zoo", "zoo"], r"zoo exists and is not a zoo"


@case("zoo: --scale 0")
def _(c):
    return ["zoo", "zoo", "--scale", "0"], r"--scale: expected a positive number"


@case("zoo: DIR not writable", locked=True)
def _(c):
    (c.folder / "locked").mkdir()
    return ["zoo", str(c.folder / "locked" / "zoo")], rf"DIR .*locked/zoo: cannot write the zoo there \({DENIED}\)"


# ---- the check -------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under the roots with its kind and, for files, a hash of its bytes."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = f"link {os.readlink(p)}"
            elif p.is_dir():
                out[str(p)] = "dir"
            else:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_in_process(argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()  # only what the command prints
    code = cli_main(argv)
    return code, capfd.readouterr().err


def run_locked(argv: list[str], folder: Path, locked: Path, capfd) -> tuple[int, str]:
    """The command, unable to write into `locked`: made read-only by its mode, or, for root (who
    writes anywhere), by a read-only bind mount in a mount namespace of its own (a subprocess)."""
    if os.geteuid() != 0:
        locked.chmod(0o555)
        try:
            return run_in_process(argv, capfd)
        finally:
            locked.chmod(0o755)
    if not shutil.which("unshare"):
        pytest.skip("root without unshare(1): no way to make a folder unwritable")
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    proc = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, str(locked), str(BIN / "mergesearch"), *argv],
        cwd=folder, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if proc.returncode != 2 and "mount" in proc.stderr and "mergesearch" not in proc.stderr:
        pytest.skip(f"cannot make a read-only mount here: {proc.stderr.strip()}")
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(name, lab, tmp_path, capfd, monkeypatch):
    build, locked = CASES[name]
    folder = tmp_path
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a custom objective's module, imported
    argv, pattern = build(Case(folder, lab))
    before = snapshot(folder, lab["root"])
    code, err = run_locked(argv, folder, folder / "locked", capfd) if locked else run_in_process(argv, capfd)
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}, stderr:\n{err[-3000:]}"
    assert len(lines) == 1, f"stderr must be one line, got {len(lines)}:\n{err[-3000:]}"
    command = argv[0]
    assert lines[0].startswith(f"mergesearch {command}: error: "), lines[0][:300]
    assert re.search(pattern, lines[0]), f"{lines[0][:600]!r} does not match {pattern!r}"
    assert len(lines[0]) <= 600, f"error line of {len(lines[0])} characters"
    assert snapshot(folder, lab["root"]) == before, "the file tree changed"


def test_there_are_at_least_40_cases_across_the_four_commands():
    commands = [name.split(":")[0] for name in CASES]
    assert len(CASES) >= 40 and set(commands) == {"run", "merge", "export", "zoo"}


# ---- what the refusals protect: the cases that succeed ---------------------------------------


def test_export_overwrite_replaces_its_own_files_and_deletes_nothing(lab, tmp_path, capfd):
    run = Path(shutil.copytree(lab["run"], tmp_path / "run"))
    out = tmp_path / "keep"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "more.txt").write_text("mine too")
    (out / "trial-1.yaml").write_text("an older export")
    assert cli_main(["export", str(run), "--top", "2", str(out), "--overwrite"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "notes.txt", "sub", "sub/more.txt", "trial-0.yaml", "trial-1.yaml",
    ]  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "more.txt").read_text() == "mine too"
    assert (out / "trial-1.yaml").read_text().startswith("# mergesearch run demo, trial 1: ppl 0.5")
    # a new folder, and an existing file replaced only when asked
    assert cli_main(["export", str(run), "--top", "1", str(tmp_path / "new" / "top")]) == 0
    assert [p.name for p in (tmp_path / "new" / "top").iterdir()] == ["trial-1.yaml"]
    (tmp_path / "t.yaml").write_text("mine")
    assert cli_main(["export", str(run), "--trial", "0", str(tmp_path / "t.yaml"), "--overwrite"]) == 0
    assert "trial 0: ppl 1" in (tmp_path / "t.yaml").read_text()


def test_a_pruned_trial_is_exported_saying_where_its_score_was_taken(lab, tmp_path, capfd):
    run = Path(shutil.copytree(lab["run"], tmp_path / "run"))
    assert cli_main(["export", str(run), "--trial", "2", str(tmp_path / "t2.yaml")]) == 0
    header = (tmp_path / "t2.yaml").read_text().splitlines()[0]
    assert header == (
        "# mergesearch run demo, trial 2: pruned after stage 16 of [16, 128]; "
        "score at that stage, not a final one: ppl 2.5"
    )


def test_a_sampler_path_is_checked_before_anything_is_called(tmp_path):
    target = tmp_path / "created"
    for name, options in [("builtins.open", {"file": str(target), "mode": "w"}), ("os.system", {"command": f"touch {target}"})]:
        with pytest.raises(UserError, match="is not an optuna sampler"):
            build_sampler(name, 0, options=options)
    assert not target.exists()
    assert isinstance(build_sampler("optuna.samplers.RandomSampler", 0), optuna.samplers.RandomSampler)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://bob:Cli/S3cret@host/db", "postgresql://bob:***@host/db"),
        ("postgresql://bob:p@ssW0rd@host:5432/db", "postgresql://bob:***@host:5432/db"),
        ("postgresql://bob:two words@host/db", "postgresql://bob:***@host/db"),
        ("mysql+pymysql://u:p%40ss@h/db?password=x&ssl=1", "mysql+pymysql://u:***@h/db?password=***&ssl=1"),
        ("sqlite:///runs/demo/study.db", "sqlite:///runs/demo/study.db"),
        ("journal:runs/demo/study.log", "journal:runs/demo/study.log"),
        ("not a url://u:p@ss@host", "not a url://***@host"),
    ],
)
def test_storage_passwords_are_masked_whole(url, shown):
    assert mask(url) == shown
