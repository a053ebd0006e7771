"""Bad input to `mergesearch merge`: one line on stderr naming the field and the fix, a
non-zero exit, and no output folder (nor a temporary one) left behind.

Every case runs the real console script on small stand-ins built once for the module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from standins import make_finetune, make_standin  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input_models")
    base = make_standin(root / "base", "llama", 4, seed=1)
    pickled = make_finetune(root / "pickled", base, seed=3)
    state = load_file(pickled / "model.safetensors")
    torch.save(state, pickled / "pytorch_model.bin")  # the same weights as a pickle checkpoint only
    (pickled / "model.safetensors").unlink()
    return {
        "base": base,
        "ft": make_finetune(root / "ft", base, seed=2),
        "narrow": make_standin(root / "narrow", "llama", 4, seed=4, hidden=32),
        "phi": make_standin(root / "phi", "phi", 4, seed=5),
        "pickled": pickled,
    }


LINEAR = "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n  - model: {ft}\n    parameters: {{weight: 0.5}}\n"

# case -> (recipe, the pattern the one error line must contain: the field, and what names the fix)
CASES = {
    "malformed_yaml": (
        "merge_method: linear\nmodels:\n  - model: {base}\n   parameters: {{weight: 1}}\n",
        r"malformed YAML.*line \d+",
    ),
    "unknown_method": (
        "merge_method: frankenmerge\nmodels:\n  - model: {base}\n  - model: {ft}\ndtype: bfloat16\n",
        r"merge_method",
    ),
    "unknown_parameter": (
        "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weigth: 0.5}}\n"
        "  - model: {ft}\n    parameters: {{weight: 0.5}}\n",
        r"weigth",
    ),
    "unknown_key": (
        "merge_method: linear\nmodels:\n  - model: {base}\n  - model: {ft}\ndtyp: bfloat16\n",
        r"dtyp",
    ),
    "base_model_missing": (
        "merge_method: task_arithmetic\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1.0}}\n",
        r"base_model",
    ),
    "layer_range_outside_model": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 9]\n",
        r"layer_range",
    ),
    "t_outside_0_1": (
        "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {ft}\nparameters: {{t: 1.5}}\n",
        r"\bt\b",
    ),
    "shapes_do_not_fit": (
        "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
        "  - model: {narrow}\n    parameters: {{weight: 0.5}}\n",
        r"shape|hidden_size|narrow",
    ),
    "architectures_do_not_fit": (
        "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {phi}\nparameters: {{t: 0.5}}\n",
        r"architecture|Phi|phi",
    ),
    "path_does_not_exist": (
        "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n  - model: /no/such/model/folder\n    parameters: {{weight: 0.5}}\n",
        r"/no/such/model/folder.*(no such|does not exist|check)",
    ),
    "pickle_checkpoint": (
        "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n  - model: {pickled}\n    parameters: {{weight: 0.5}}\n",
        r"--allow-pickle",
    ),
    "unmapped_hub_name": (
        "merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n  - model: someorg/never-mapped-7b\n    parameters: {{weight: 0.5}}\n",
        r"someorg/never-mapped-7b.*--model-map|--model-map.*someorg/never-mapped-7b",
    ),
    "moe_without_prompts_for_hidden_gates": (
        "base_model: {base}\ngate_mode: hidden\nexperts:\n  - source_model: {ft}\n  - source_model: {base}\n",
        r"positive_prompts",
    ),
}


def merge(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mergesearch"), "merge", *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> str:
    assert result.returncode != 0, f"expected failure, got success:\n{result.stdout}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr must be one line, got {len(lines)}:\n{result.stderr[-3000:]}"
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"
    assert "Traceback" not in lines[0]
    return lines[0]


def assert_nothing_written(parent: Path, expected: set[str]) -> None:
    left = {p.name for p in parent.iterdir()} - expected
    assert not left, f"left behind after a failed merge: {sorted(left)}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe_gives_one_line(case: str, models: dict[str, Path], tmp_path: Path):
    text, pattern = CASES[case]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(text.format(**models))
    out = tmp_path / "out" / "merged"  # its parent does not exist yet either
    line = assert_one_line_error(merge(recipe, out), pattern)
    assert line.startswith("mergesearch merge: error:"), line
    assert_nothing_written(tmp_path, {"recipe.yml"})


def test_pickle_checkpoint_loads_when_allowed(models: dict[str, Path], tmp_path: Path):
    """The pickle case fails for the reason given: with the flag the same recipe builds."""
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(CASES["pickle_checkpoint"][0].format(**models))
    r = merge(recipe, tmp_path / "out", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


class Exploit:
    """Unpickling this creates a file: an object no weights-only load may rebuild."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def test_library_warnings_do_not_reach_stderr(models: dict[str, Path], tmp_path: Path):
    """torch warns about a checkpoint pickled with protocol 4 as it starts to load it: the refusal that
    follows is the one line on stderr, without the library's warning before it."""
    exploit = tmp_path / "protocol4"
    exploit.mkdir()
    (exploit / "config.json").write_bytes((models["pickled"] / "config.json").read_bytes())
    torch.save({"model.embed_tokens.weight": Exploit(tmp_path / "PWNED")}, exploit / "pytorch_model.bin",
               pickle_protocol=4)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(LINEAR.format(base=models["base"], ft=exploit))
    line = assert_one_line_error(merge(recipe, tmp_path / "out", "--allow-pickle"), r"refused as unsafe")
    assert "Warning" not in line and not (tmp_path / "PWNED").exists()
    assert_nothing_written(tmp_path, {"recipe.yml", "protocol4"})


def test_missing_recipe_file(tmp_path: Path):
    assert_one_line_error(merge(tmp_path / "nope.yml", tmp_path / "out"), r"nope\.yml.*(no such|not found|check)")
    assert_nothing_written(tmp_path, set())


def test_malformed_model_map(models: dict[str, Path], tmp_path: Path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(CASES["unmapped_hub_name"][0].format(**models))
    assert_one_line_error(merge(recipe, tmp_path / "out", "--model-map", "someorg/never-mapped-7b"), r"--model-map.*NAME=PATH")
    assert_nothing_written(tmp_path, {"recipe.yml"})


def test_mapped_to_missing_folder(models: dict[str, Path], tmp_path: Path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(CASES["unmapped_hub_name"][0].format(**models))
    r = merge(recipe, tmp_path / "out", "--model-map", f"someorg/never-mapped-7b={tmp_path / 'gone'}")
    assert_one_line_error(r, re.escape(str(tmp_path / "gone")))
    assert_nothing_written(tmp_path, {"recipe.yml"})


def test_output_path_is_a_file(models: dict[str, Path], tmp_path: Path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(LINEAR.format(**models))
    (tmp_path / "out").write_text("not a folder")
    assert_one_line_error(merge(recipe, tmp_path / "out"), r"OUT_DIR.*not a folder")
    assert (tmp_path / "out").read_text() == "not a folder"
    assert_nothing_written(tmp_path, {"recipe.yml", "out"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_cuda_without_gpu(models: dict[str, Path], tmp_path: Path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(LINEAR.format(**models))
    assert_one_line_error(merge(recipe, tmp_path / "out", "--device", "cuda"), r"--device cuda.*--device cpu")
    assert_nothing_written(tmp_path, {"recipe.yml"})


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_while_writing_leaves_nothing(tmp_path: Path, interruption: BaseException):
    """A failure after the temporary folder exists (mid-merge, Ctrl-C) removes it and the parents it made,
    and leaves an existing OUT_DIR as it was."""
    from search.engine.output import atomic_folder

    with pytest.raises(type(interruption)):
        with atomic_folder(tmp_path / "new" / "deeper" / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise interruption
    assert_nothing_written(tmp_path, set())

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    with pytest.raises(type(interruption)):
        with atomic_folder(existing, overwrite=True) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            raise interruption
    assert_nothing_written(tmp_path, {"existing"})
    assert [p.name for p in existing.iterdir()] == ["config.json"] and (existing / "config.json").read_text() == "{}"
