"""Inputs a run cannot use are one line before anything starts: no Ray, no study, no run folder.

Broken model files (read from their headers on the driver) and a --ray-address where
nothing listens. Ray is never started here; tests that need workers are in test_faults.py.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import textwrap
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from search.commands.cli import main as cli_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

WEIGHTS = "model.safetensors"
UP = "model.layers.0.mlp.up_proj.weight"


def write_spec(folder: Path, zoo: Path, fst: Path, **extra) -> Path:
    (folder / "fns.py").write_text(textwrap.dedent("""
        def score(model, tokenizer, fidelity):
            return 0.0
    """))
    data = {"name": "early", "models": {"base": str(zoo / "base"), "fst": str(fst), "nxt": str(zoo / "nxt")},
            "space": {"kind": "weights", "method": "task_arithmetic", "base": "base", "models": ["fst", "nxt"]},
            "objectives": [{"kind": "custom", "function": "fns.py:score"}], "trials": 1, "heldout_top_k": 0,
            "baselines": False, **extra}
    path = folder / "early.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- ways to break a copy of the fine-tune `fst` ------------------------------------------------


def pickle_only(folder: Path) -> None:
    torch.save(load_file(folder / WEIGHTS), folder / "pytorch_model.bin")  # as older checkpoints ship
    (folder / WEIGHTS).unlink()


def truncated(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def garbage_header(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    length = int.from_bytes(data[:8], "little")
    (folder / WEIGHTS).write_bytes(data[:8] + bytes((7 * i) % 256 for i in range(length)) + data[8 + length:])


def huge_header(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes((1 << 40).to_bytes(8, "little") + data[8:])


def other_shape(folder: Path) -> None:
    tensors = load_file(folder / WEIGHTS)
    tensors[UP] = tensors[UP][:-8].clone()  # config.json unchanged: only the weights disagree
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def missing_shard(folder: Path) -> None:
    (folder / WEIGHTS).rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in load_file(folder / "model-00001-of-00002.safetensors")}
    weight_map[UP] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


CASES = {
    "pickle_only": (pickle_only, ["pytorch_model.bin", "allow_pickle: true"]),
    "truncated": (truncated, [WEIGHTS, "truncated"]),
    "garbage_header": (garbage_header, [WEIGHTS, "header is not JSON"]),
    "huge_header": (huge_header, [WEIGHTS, f"header length field says {1 << 40} bytes"]),
    "other_shape": (other_shape, [WEIGHTS, UP, "[120, 64]", "[128, 64]"]),
    "missing_shard": (missing_shard, ["model-00002-of-00002.safetensors", "missing"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_model_is_one_line_before_ray_or_the_study(case, pair_zoo, tmp_path, capsys):
    import ray

    breaks, expected = CASES[case]
    fst = tmp_path / "fst"
    shutil.copytree(pair_zoo / "fst", fst)
    breaks(fst)
    spec = write_spec(tmp_path, pair_zoo, fst)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    threads = set(threading.enumerate())
    assert cli_main(["run", str(spec), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mergesearch run: error: models.fst: "), err
    for words in expected:
        assert words in err[0], err[0]
    if case == "pickle_only":
        assert "allow_pickle=True" not in err[0]  # the spec's key, not the engine's Python argument
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "__pycache__" not in p.parts) == before
    assert not ray.is_initialized()
    # nothing left running: a non-daemon thread (a Ray start, say) would hold the interpreter's exit
    assert [t.name for t in threading.enumerate() if t not in threads and not t.daemon] == []


def test_a_pickle_checkpoint_is_accepted_with_allow_pickle(pair_zoo, tmp_path):
    from search.run.run_setup import prepare_run
    from search.spec.runspec import load_spec

    fst = tmp_path / "fst"
    shutil.copytree(pair_zoo / "fst", fst)
    pickle_only(fst)
    setup = prepare_run(load_spec(write_spec(tmp_path, pair_zoo, fst, allow_pickle=True)), resume=False)
    assert setup.space.used_models == ["base", "fst", "nxt"] and not (tmp_path / "early").exists()


def test_a_ray_address_where_nothing_listens_is_one_line_and_no_study(pair_zoo, tmp_path, capsys):
    import ray

    with socket.socket() as s:  # a port nothing listens on: bound, then released
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = write_spec(tmp_path, pair_zoo, pair_zoo / "fst")
    assert cli_main(["run", str(spec), "--quiet", "--ray-address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--ray-address 127.0.0.1:{port}: nothing answers there" in err[0], err
    assert not (tmp_path / "early").exists() and not ray.is_initialized()


@pytest.mark.parametrize("task, field, hint", [
    ("fst_serch", "tasks[0]", "did you mean fst_search?"),  # a local task folder's name, mistyped
    ("hellaswg", "tasks[0]", "did you mean hellaswag"),  # one of lm-eval's own, mistyped
    ("no_such_task_anywhere", "tasks[0]", "check the name, or point include_path at its folder"),
    ({"task": "fst_search", "heldout": "fst_heldot"}, "tasks[0].heldout", "did you mean"),
])
def test_an_unknown_lm_eval_task_is_one_line_before_the_workers_or_the_study(task, field, hint, pair_zoo, tmp_path,
                                                                               capsys):
    import ray

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "fst_search.yaml").write_text("task: fst_search\ndataset_path: json\n")
    spec = write_spec(tmp_path, pair_zoo, pair_zoo / "fst",
                      objectives=[{"kind": "lmeval", "include_path": "tasks", "tasks": [task]}])
    assert cli_main(["run", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    name = task["heldout"] if isinstance(task, dict) else task
    assert err[0].startswith(f"mergesearch run: error: objectives[0].{field}: lm-eval has no task {name!r}; {hint}")
    assert not (tmp_path / "early").exists() and not ray.is_initialized()
