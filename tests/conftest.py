"""Shared test fixtures: stand-in models and mergekit 0.1.5 as the oracle.

- `standin_zoo`: tiny HF model folders named like the hub models the seed recipes
  read (same architecture and depth, hidden 64), built on first use, once per session.
- `mergekit_oracle`: runs mergekit's own console scripts (`mergekit-yaml`,
  `mergekit-multi` for multi-document recipes, `mergekit-moe` for MoE configs) on a
  recipe whose model names are replaced by stand-in folders, and returns what they
  wrote. Results are cached per recipe and seed for the session; `prefetch` runs
  several at once.
- `smollm2`, `real_models`, `real_oracle`: the real pretrained model (SmolLM2-135M-Instruct,
  tests/real_model.py), seeded perturbations of it as second and third models, and
  the same oracle on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from arch_standins import ARCH_CONFIGS  # noqa: E402
from real_model import perturbed_folder, smollm2_folder  # noqa: E402
from standins import make_finetune, make_standin  # noqa: E402

REPO = TESTS.parent
SEEDS = REPO.parent / "shared" / "seeds"
BIN = Path(sys.executable).parent

# Hub name -> (architecture, depth, init seed, fine-tune of). The models the seeds
# name (seeds/README.md) at tiny width; fine-tunes of one base where the real ones are.
STANDINS = {
    "liminerity/phive": ("phi", 32, 11, None),
    "mobiuslabsgmbh/aanaphi2-v0.1": ("phi", 32, 12, None),
    "openchat/openchat-3.5-0106": ("mistral", 32, 21, None),
    "AetherResearch/Cerebrum-1.0-7b": ("mistral", 32, 22, None),
    "mistralai/Mistral-7B-v0.1": ("mistral", 32, 23, None),
    "meta-llama/Llama-2-7b-hf": ("llama", 32, 31, None),
    "tokyotech-llm/Swallow-7b-hf": ("llama", 32, 32, None),
    "tokyotech-llm/Swallow-7b-instruct-hf": ("llama", 32, 33, "tokyotech-llm/Swallow-7b-hf"),
    "nitky/Superswallow-7b-v0.1": ("llama", 32, 34, "tokyotech-llm/Swallow-7b-hf"),
    "nitky/Superswallow-7b-v0.2": ("llama", 32, 35, "tokyotech-llm/Swallow-7b-hf"),
    "nitky/Superswallow-7b-v0.3": ("llama", 32, 36, "tokyotech-llm/Swallow-7b-hf"),
    "HuggingFaceH4/zephyr-7b-gemma-v0.1": ("gemma", 28, 41, None),
    "SakanaAI/DiscoPOP-zephyr-7b-gemma": ("gemma", 28, 42, "HuggingFaceH4/zephyr-7b-gemma-v0.1"),
    # small models for per-method recipes
    "toy/base": ("llama", 4, 51, None),
    "toy/math": ("llama", 4, 52, "toy/base"),
    "toy/code": ("llama", 4, 53, "toy/base"),
    "toy/chat": ("llama", 4, 54, "toy/base"),
    "toy/qwen-base": ("qwen2", 3, 61, None),
    "toy/qwen-ft": ("qwen2", 3, 62, "toy/qwen-base"),
    "toy/phi-a": ("phi", 3, 71, None),
    "toy/phi-b": ("phi", 3, 72, None),
    "toy/mistral": ("mistral", 4, 81, None),
    "toy/gemma-base": ("gemma", 3, 91, None),
    "toy/gemma-ft": ("gemma", 3, 92, "toy/gemma-base"),
}

# Every architecture mergesearch builds (tests/test_architectures.py): arch/<model_type>/base, 2 layers,
# and two fine-tunes of it, ft1 and ft2.
ARCH_TYPES = ["llama", "mistral", "phi", "gemma", "qwen2", *ARCH_CONFIGS]
for _i, _type in enumerate(ARCH_TYPES):
    STANDINS[f"arch/{_type}/base"] = (_type, 2, 1000 + 10 * _i, None)
    for _k in (1, 2):
        STANDINS[f"arch/{_type}/ft{_k}"] = (_type, 2, 1000 + 10 * _i + _k, f"arch/{_type}/base")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and lose much when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class StandinZoo:
    """Stand-in folders, built on first use and shared by every test of the session."""

    def __init__(self, root: Path):
        self.root = root
        self._paths: dict[str, Path] = {}

    def path(self, name: str) -> Path:
        if name not in self._paths:
            if name not in STANDINS:
                raise KeyError(f"no stand-in for {name!r}: add it to STANDINS in tests/conftest.py")
            arch, depth, seed, parent = STANDINS[name]
            folder = self.root / name.replace("/", "--")
            if parent:
                make_finetune(folder, self.path(parent), seed=seed, scale=0.01)
            else:
                make_standin(folder, arch, depth, seed=seed)
            self._paths[name] = folder
        return self._paths[name]

    def paths(self, names) -> dict[str, Path]:
        return {n: self.path(n) for n in names}


def recipe_model_names(text: str) -> list[str]:
    """Every model a recipe reads (values of model / base_model / source_model /
    tokenizer_source keys), minus the names of its own stages."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("model", "base_model", "source_model", "tokenizer_source") and isinstance(v, str):
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    docs = [d for d in yaml.safe_load_all(text) if d]
    for d in docs:
        walk(d)
    stages = {d.get("name") for d in docs}
    return [n for n in dict.fromkeys(found) if n not in stages and n not in ("base", "union")]


def with_paths(text: str, paths: dict[str, Path]) -> str:
    """The recipe with every model name replaced by its folder, for mergekit."""

    def sub(node):
        if isinstance(node, dict):
            return {k: sub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [sub(v) for v in node]
        if isinstance(node, str) and node in paths:
            return str(paths[node])
        return node

    docs = [sub(d) for d in yaml.safe_load_all(text) if d]
    return yaml.safe_dump_all(docs, sort_keys=False)


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# Runs each [key, module, args] with that console script's click entry point, as the
# command line would, and prints {key: exit code}.
_ORACLE_DRIVER = """
import importlib, json, sys
codes = {}
for key, module, args in json.loads(sys.argv[1]):
    try:
        importlib.import_module(module).main(args + ["--quiet"], standalone_mode=False)
        codes[key] = 0
    except SystemExit as e:
        codes[key] = e.code
    except Exception as e:
        print(f"{key}: {type(e).__name__}: {e}", file=sys.stderr)
        codes[key] = repr(e)
print(json.dumps(codes))
"""


class MergekitOracle:
    """mergekit 0.1.5's console scripts run on stand-ins (or any `zoo` with `paths(names)`); outputs (or
    failures) cached per (recipe, seed)."""

    def __init__(self, root: Path, zoo: StandinZoo | ModelFolders):
        self.root = root
        self.zoo = zoo
        self._done: dict[str, Path] = {}
        self._failed: dict[str, str] = {}  # key -> what mergekit raised (or its exit code) and its stderr

    def _job(self, text: str, seed: int | None):
        paths = self.zoo.paths(recipe_model_names(text))
        rendered = with_paths(text, paths)
        key = hashlib.sha256(f"{rendered}\n{seed}".encode()).hexdigest()[:16]
        folder = self.root / key
        recipe = self.root / f"{key}.yml"
        docs = [d for d in yaml.safe_load_all(text) if d]
        if len(docs) > 1:
            script = "mergekit.scripts.multimerge"
            args = [recipe, "--out-path", folder, "-I", self.root / f"{key}-stages"]
        elif "experts" in docs[0]:
            script = "mergekit.scripts.moe"
            args = [recipe, folder]
        else:
            script = "mergekit.scripts.run_yaml"
            args = [recipe, folder]
        if seed is not None:
            args += ["--random-seed", str(seed)]
        return key, folder, recipe, rendered, script, [str(a) for a in args]

    def prefetch(self, jobs: list[tuple[str, int | None]]) -> None:
        """Run several recipes through mergekit's console-script entry points (`mergekit-yaml`,
        `mergekit-multi`) in one process, so interpreter and import start-up is paid once."""
        pending = {}
        for text, seed in jobs:
            key, folder, recipe, rendered, script, args = self._job(text, seed)
            if key not in self._done and key not in self._failed:
                recipe.write_text(rendered)
                pending[key] = (folder, script, args)
        if not pending:
            return
        runs = [[key, script, args] for key, (_, script, args) in pending.items()]
        proc = subprocess.run(
            [sys.executable, "-c", _ORACLE_DRIVER, json.dumps(runs)], capture_output=True, text=True, timeout=1800
        )
        codes = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        for key, (folder, script, args) in pending.items():
            if codes.get(key) != 0:
                self._failed[key] = f"{script} {' '.join(args)} failed ({codes.get(key)}):\n{proc.stderr[-3000:]}"
            else:
                self._done[key] = folder

    def failure(self, text: str, seed: int | None = None) -> str | None:
        """What mergekit raised for this recipe, or None when it wrote a model."""
        key, *_ = self._job(text, seed)
        if key not in self._done and key not in self._failed:
            self.prefetch([(text, seed)])
        return self._failed.get(key)

    def folder(self, text: str, seed: int | None = None) -> Path:
        """The folder mergekit writes for this recipe (RuntimeError with its output if it failed)."""
        key, folder, *_ = self._job(text, seed)
        problem = self.failure(text, seed)
        if problem is not None:
            raise RuntimeError(problem)
        return folder

    def build(self, text: str, seed: int | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
        """(config.json, tensors) that mergekit writes for this recipe."""
        folder = self.folder(text, seed)
        return json.loads((folder / "config.json").read_text()), read_tensors(folder)


@pytest.fixture(scope="module")
def pair_zoo(tmp_path_factory) -> Path:
    """A 2-layer llama base and two fine-tunes of it (fst, nxt): the smallest run a worker pool can search."""
    root = tmp_path_factory.mktemp("zoo")
    make_standin(root / "base", "llama", 2, seed=0)
    make_finetune(root / "fst", root / "base", seed=1, scale=0.05)
    make_finetune(root / "nxt", root / "base", seed=2, scale=0.05)
    return root


@pytest.fixture(scope="session")
def standin_zoo(tmp_path_factory) -> StandinZoo:
    return StandinZoo(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="session")
def mergekit_oracle(tmp_path_factory, standin_zoo) -> MergekitOracle:
    return MergekitOracle(tmp_path_factory.mktemp("mergekit"), standin_zoo)


class ModelFolders(dict):
    """Model name as written in recipes -> its folder, as MergekitOracle asks for them (paths(names))."""

    def paths(self, names) -> dict[str, Path]:
        return {n: self[n] for n in names}


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as an HF folder (converted once per machine). setup.sh installs it: a missing
    package fails here, loudly, rather than skipping what it tests."""
    return smollm2_folder()


@pytest.fixture(scope="session")
def real_models(smollm2) -> ModelFolders:
    """SmolLM2 and two seeded perturbations of it, by the names the real-model recipes use."""
    return ModelFolders({"smollm2": smollm2, "smollm2-a": perturbed_folder(1), "smollm2-b": perturbed_folder(2)})


@pytest.fixture(scope="session")
def real_oracle(tmp_path_factory, real_models) -> MergekitOracle:
    return MergekitOracle(tmp_path_factory.mktemp("mergekit-real"), real_models)


def tensor_bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, to compare for exact (not merely numeric) equality."""
    return t.contiguous().view(-1).view(torch.uint8)


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str = "") -> None:
    """Same names, shapes, dtypes and bytes."""
    assert sorted(ours) == sorted(theirs), (
        f"{what}: tensor names differ: only ours {sorted(set(ours) - set(theirs))[:5]}, "
        f"only mergekit's {sorted(set(theirs) - set(ours))[:5]}"
    )
    differ = []
    for name in sorted(ours):
        x, y = ours[name], theirs[name]
        assert (x.dtype, tuple(x.shape)) == (y.dtype, tuple(y.shape)), (
            f"{what}: {name}: ours {x.dtype}{list(x.shape)}, mergekit's {y.dtype}{list(y.shape)}"
        )
        if not torch.equal(tensor_bits(x), tensor_bits(y)):
            differ.append(f"{name} (max abs diff {(x.double() - y.double()).abs().max().item():.3g})")
    assert not differ, f"{what}: {len(differ)} tensors differ from mergekit's: {differ[:5]}"
