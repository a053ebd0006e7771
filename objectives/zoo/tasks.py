"""lm-eval task folders for the zoo's skills: data (jsonl) plus one YAML per split.

Task names follow the held-out convention the lmeval objective relies on:
`<skill>_search` (what a search scores), `<skill>_heldout` (re-scoring of the top
trials, never seen by the search) and `<skill>_test` (the final report).

Scoring is teacher-forced: lm-eval's `loglikelihood` request returns `is_greedy`,
whether greedy decoding would produce the whole target; with the target
`answer</s>` that is exact match of a greedy generation that stops at EOS, for
one batched forward pass instead of a token-by-token generation. lm-eval reports
it as the metric `acc`. The same request gives the answer's log-likelihood, which
lm-eval reports as `perplexity` (exp of minus the mean log-likelihood; lower is
better): a score that still ranks candidates which all get a small subset right,
where `acc` ties them (the demo searches on it, runs/demo.yaml; BENCHMARKS.md,
"Search: pruning", compares the two for pruning).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

SPLITS = ("search", "heldout", "test")
METRICS = [
    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
]


def task_name(skill: str, split: str) -> str:
    return f"{skill}_{split}"


def write_task_folder(folder: Path, skill: str, splits: dict[str, list[dict]], final_folder: Path,
                      answer_end: str = "</s>") -> None:
    """Write `folder/<split>.jsonl` and `folder/<skill>_<split>.yaml` for every split.

    The YAML names its data file by absolute path under `final_folder` (where the
    folder will live once the zoo is complete): `datasets` resolves a relative
    `data_files` against the current directory, not against the YAML. `answer_end`
    follows every answer in the target: the tokenizer's end of sequence (the zoo's
    `</s>`; another model's, e.g. SmolLM2's `<|im_end|>`, or nothing).
    """
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(folder / f"{split}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        config = {
            "task": task_name(skill, split),
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {split: str(final_folder.resolve() / f"{split}.jsonl")}},
            "test_split": split,
            "output_type": "loglikelihood",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{answer}}" + answer_end,
            "target_delimiter": "",
            "metric_list": METRICS,
            "metadata": {"version": 1.0},
        }
        (folder / f"{task_name(skill, split)}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def refresh_task_folder(folder: Path) -> None:
    """Make every YAML in `folder` name the jsonl beside it (after the zoo was moved or copied)
    and list the metrics this version scores (a zoo built by an earlier one lacks `perplexity`)."""
    for path in sorted(folder.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        files = config["dataset_kwargs"]["data_files"]
        wanted = {split: str(folder.resolve() / f"{split}.jsonl") for split in files}
        if files != wanted or config.get("metric_list") != METRICS:
            config["dataset_kwargs"]["data_files"] = wanted
            config["metric_list"] = METRICS
            path.write_text(yaml.safe_dump(config, sort_keys=False))
