"""`mergesearch merge` end to end against mergekit 0.1.5 as the oracle.

Every seed recipe, a recipe per merge method and a multi-stage file are built twice:
by the real `mergesearch` console script (hub names mapped to stand-ins with
--model-map) and by mergekit's own scripts (`mergekit-yaml`, `mergekit-moe`,
`mergekit-multi`, on a copy of the recipe with the names replaced by the stand-in
paths). The folders must hold the same tensors: names, shapes, dtypes and bits.
Stand-ins have the architecture and depth of the models the seeds name, at tiny width.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import SEEDS, StandinZoo, recipe_model_names, with_paths

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

SEED_FILES = sorted(SEEDS.glob("*.yml"))


@pytest.fixture(scope="session")
def zoo(standin_zoo) -> StandinZoo:
    """The stand-ins of tests/conftest.py (hub names the seeds read, at tiny width)."""
    return standin_zoo


def model_map(zoo: StandinZoo, names) -> list[str]:
    """--model-map arguments that point each name at its stand-in."""
    return [arg for n in names for arg in ("--model-map", f"{n}={zoo.path(n)}")]


# ---- helpers ---------------------------------------------------------------


def start(cmd: list, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, what: str) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{err[-4000:]}"
    return out


def build_both(recipe_text: str, zoo: StandinZoo, tmp: Path, oracle: str, seed: int = 0) -> tuple[Path, Path]:
    """Build the recipe with `mergesearch merge` and with mergekit's `oracle` script, side by side."""
    names = recipe_model_names(recipe_text)
    paths = {n: zoo.path(n) for n in names}
    ours_recipe = tmp / "recipe.yml"
    ours_recipe.write_text(recipe_text)
    theirs_recipe = tmp / "recipe_paths.yml"
    theirs_recipe.write_text(with_paths(recipe_text, paths))
    ours, theirs = tmp / "ours", tmp / "theirs"

    ours_cmd = [BIN / "mergesearch", "merge", ours_recipe, ours, "--random-seed", seed, *model_map(zoo, names)]
    if oracle == "mergekit-multi":
        theirs_cmd = [BIN / oracle, theirs_recipe, "--out-path", theirs, "-I", tmp / "intermediates"]
    else:
        theirs_cmd = [BIN / oracle, theirs_recipe, theirs]
    theirs_cmd += ["--random-seed", seed]
    # Both run at once: the machine has two cores and each run is mostly start-up.
    p_ours, p_theirs = start(ours_cmd), start(theirs_cmd)
    out = finish(p_ours, "mergesearch merge")
    finish(p_theirs, oracle)
    assert out.strip() == str(ours), "mergesearch merge prints the folder it wrote on stdout"
    return ours, theirs


def read_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder; if sharded, the index must name exactly the shards and tensors present."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for f in files:
        part = load_file(f)
        assert not set(part) & set(tensors), f"tensor names repeated across shards in {folder}"
        tensors.update(part)
        where.update({k: f.name for k in part})
    index = folder / "model.safetensors.index.json"
    if len(files) > 1:
        assert json.loads(index.read_text())["weight_map"] == where
    else:
        assert files[0].name == "model.safetensors" and not index.exists()
    return tensors


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def assert_same_tensors(ours: Path, theirs: Path) -> int:
    a, b = read_folder_tensors(ours), read_folder_tensors(theirs)
    assert sorted(a) == sorted(b), f"tensor names differ: only ours {sorted(set(a) - set(b))[:5]}, only mergekit's {sorted(set(b) - set(a))[:5]}"
    differ = []
    for name in sorted(a):
        x, y = a[name], b[name]
        assert (x.shape, x.dtype) == (y.shape, y.dtype), f"{name}: ours {x.dtype}{list(x.shape)}, mergekit {y.dtype}{list(y.shape)}"
        if not torch.equal(bits(x), bits(y)):
            diff = (x.float() - y.float()).abs().max().item()
            differ.append(f"{name} (max |diff| {diff:.3g})")
    assert not differ, f"{len(differ)} of {len(a)} tensors differ from mergekit's, e.g. {differ[:5]}"
    return len(a)


def assert_same_config(ours: Path, theirs: Path) -> None:
    a = json.loads((ours / "config.json").read_text())
    b = json.loads((theirs / "config.json").read_text())
    for cfg in (a, b):
        cfg.pop("transformers_version", None)
    differ = {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert not differ, f"config.json differs from mergekit's (ours, mergekit's): {differ}"


def assert_same_tokenizer(ours: Path, theirs: Path) -> None:
    files = [f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json") if (theirs / f).exists()]
    assert files, "mergekit wrote no tokenizer; the stand-ins have one"
    for f in files:
        assert (ours / f).exists(), f"{f} missing from our output"
        assert json.loads((ours / f).read_text()) == json.loads((theirs / f).read_text()), f"{f} differs from mergekit's"


def assert_recipe_and_card(ours: Path, recipe_text: str, recipe_file: str, names: list[str]) -> None:
    assert (ours / recipe_file).read_text() == recipe_text, f"{recipe_file} is the recipe as given"
    card = (ours / "README.md").read_text()
    assert "mergesearch" in card and recipe_text.strip() in card
    for n in names:
        assert n in card, f"the model card does not name {n}"
    leftovers = [p.name for p in ours.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary folders left beside the output: {leftovers}"


# ---- (a) every seed ----------------------------------------------------------


def test_seeds_are_present():
    assert len(SEED_FILES) >= 7, f"expected the seed recipes in {SEEDS}"


@pytest.mark.parametrize("seed_file", SEED_FILES, ids=[f.stem for f in SEED_FILES])
def test_seed_matches_mergekit(seed_file: Path, zoo: StandinZoo, tmp_path: Path):
    text = seed_file.read_text()
    moe = "experts" in (yaml.safe_load(text) or {})
    ours, theirs = build_both(text, zoo, tmp_path, "mergekit-moe" if moe else "mergekit-yaml")
    assert_same_tensors(ours, theirs)  # MoE routers too: gates drawn at random are seeded alike
    assert_same_config(ours, theirs)
    assert_same_tokenizer(ours, theirs)
    recipe_file = "mergekit_moe_config.yml" if moe else "mergekit_config.yml"
    assert (theirs / recipe_file).exists(), f"mergekit names its recipe copy {recipe_file}"
    assert_recipe_and_card(ours, text, recipe_file, recipe_model_names(text))


# ---- every method ------------------------------------------------------------

METHOD_RECIPES = {
    "linear": """
merge_method: linear
models:
  - model: toy/math
    parameters: {weight: 0.7}
  - model: toy/code
    parameters: {weight: [0.1, 0.9]}
dtype: bfloat16
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: toy/base
models:
  - model: toy/math
    parameters: {weight: 0.6}
  - model: toy/code
    parameters:
      weight:
        - filter: mlp
          value: [0.2, 1.0]
        - value: 0.4
dtype: bfloat16
""",
    "ties": """
merge_method: ties
base_model: toy/base
models:
  - model: toy/math
    parameters: {weight: 0.5, density: 0.5}
  - model: toy/code
    parameters: {weight: 0.5, density: 0.7}
  - model: toy/chat
    parameters: {weight: 0.3, density: 0.9}
parameters: {normalize: true}
dtype: bfloat16
""",
    "dare_ties": """
merge_method: dare_ties
base_model: toy/base
models:
  - model: toy/math
    parameters: {weight: 0.5, density: 0.5}
  - model: toy/code
    parameters: {weight: 0.5, density: 0.6}
dtype: bfloat16
""",
    "dare_linear": """
merge_method: dare_linear
base_model: toy/base
models:
  - model: toy/math
    parameters: {weight: 0.6, density: 0.4}
  - model: toy/chat
    parameters: {weight: 0.4, density: 0.8}
dtype: float32
""",
}


@pytest.mark.parametrize("method", sorted(METHOD_RECIPES))
def test_method_matches_mergekit(method: str, zoo: StandinZoo, tmp_path: Path):
    text = METHOD_RECIPES[method].lstrip()
    ours, theirs = build_both(text, zoo, tmp_path, "mergekit-yaml", seed=7)
    assert_same_tensors(ours, theirs)
    assert_same_config(ours, theirs)
    assert_recipe_and_card(ours, text, "mergekit_config.yml", recipe_model_names(text))


# ---- (b) multi-stage ---------------------------------------------------------

MULTI_STAGE = """\
name: blend
merge_method: task_arithmetic
base_model: toy/base
models:
  - model: toy/math
    parameters: {weight: 0.7}
  - model: toy/code
    parameters: {weight: 0.5}
dtype: bfloat16
---
merge_method: slerp
base_model: blend
slices:
  - sources:
      - model: blend
        layer_range: [0, 4]
      - model: toy/chat
        layer_range: [0, 4]
parameters:
  t:
    - filter: self_attn
      value: [0.1, 0.9]
    - value: 0.4
dtype: bfloat16
"""


def test_multi_stage_matches_mergekit_multi(zoo: StandinZoo, tmp_path: Path):
    ours, theirs = build_both(MULTI_STAGE, zoo, tmp_path, "mergekit-multi")
    assert_same_tensors(ours, theirs)
    assert_same_config(ours, theirs)
    assert_same_tokenizer(ours, theirs)
    assert_recipe_and_card(ours, MULTI_STAGE, "mergekit_config.yml", ["toy/base", "toy/math", "toy/code", "toy/chat"])
    assert not (ours.parent / "blend").exists(), "intermediates stay in memory"


# ---- output folder behaviour -------------------------------------------------


def run_merge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mergesearch"), "merge", *map(str, args)], env=ENV, capture_output=True, text=True)


def test_sharded_output_is_complete_and_indexed(zoo: StandinZoo, tmp_path: Path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(METHOD_RECIPES["linear"])
    out = tmp_path / "nested" / "out"
    r = run_merge(recipe, out, "--out-shard-size", "100K", *model_map(zoo, ["toy/math", "toy/code"]))
    assert r.returncode == 0, r.stderr
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = read_folder_tensors(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_existing_output_is_kept_unless_overwrite(zoo: StandinZoo, tmp_path: Path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(METHOD_RECIPES["linear"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    maps = model_map(zoo, ["toy/math", "toy/code"])

    r = run_merge(recipe, out, *maps)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "--overwrite" in r.stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"]

    r = run_merge(recipe, out, "--overwrite", *maps)
    assert r.returncode == 0, r.stderr
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]


def test_existing_empty_output_folder_is_used(zoo: StandinZoo, tmp_path: Path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(METHOD_RECIPES["linear"])
    (tmp_path / "out").mkdir()
    r = run_merge(recipe, tmp_path / "out", "-q", *model_map(zoo, ["toy/math", "toy/code"]))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert (tmp_path / "out" / "config.json").exists()


def test_verbose_reports_progress_on_stderr(zoo: StandinZoo, tmp_path: Path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(METHOD_RECIPES["linear"])
    r = run_merge(recipe, tmp_path / "out", "-v", *model_map(zoo, ["toy/math", "toy/code"]))
    assert r.returncode == 0, r.stderr
    assert "loading 2 model(s)" in r.stderr and "into model.safetensors" in r.stderr and "done: 39 tensors" in r.stderr


def test_mapped_shards_hold_what_write_tensors_writes(tmp_path: Path):
    """The two ways search/engine/output.py writes tensors give the same files' contents, sharded alike."""
    from search.engine.output import MappedShards, write_tensors

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(10, 7, generator=gen).to(torch.bfloat16),
        "ids": torch.arange(5),
        "f32": torch.randn(3, generator=gen),
        "empty": torch.zeros(0, 4),
        "mask": torch.tensor([True, False, True]),
        "f16": torch.randn(2, 3, generator=gen).half(),
    }
    for shard_size in (10**9, 40, 1):
        mapped, written = tmp_path / f"mapped{shard_size}", tmp_path / f"written{shard_size}"
        mapped.mkdir()
        written.mkdir()
        with MappedShards(mapped, {n: (t.shape, t.dtype) for n, t in tensors.items()}, shard_size) as shards:
            for n, t in tensors.items():
                shards.tensors[n].copy_(t)
        write_tensors(written, tensors, shard_size)
        assert sorted(p.name for p in mapped.iterdir()) == sorted(p.name for p in written.iterdir())
        a, b = read_folder_tensors(mapped), read_folder_tensors(written)
        assert sorted(a) == sorted(tensors)
        for n, t in tensors.items():
            assert a[n].dtype == b[n].dtype == t.dtype and torch.equal(bits(a[n]), bits(t)) and torch.equal(bits(b[n]), bits(t))
