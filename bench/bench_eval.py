"""Per-trial cost of the lmeval objective, side by side with its floor and with lm-eval's usual entry point.

On the toy zoo's four `<skill>_search` tasks (N examples each), every trial writes
another zoo model's weights into one resident model (untimed, as the engine does)
and then scores it three ways, interleaved:

  bare forward      the same examples, tokenized once beforehand, one batched forward
                    pass per batch and an argmax check: the least any scorer can do
  lmeval objective  objectives.lmeval (tasks and requests built once; per trial the requests are
                    run, then lm-eval's filters, per-document metrics and aggregation), in
                    batches of 64 examples as the bare forward pass
  token batches     the same objective with batches of at most --batch-tokens padded tokens
                    (its default without batch_size; objectives/token_batches.py)
  incremental stages  the same objective in stages of 16, 64 and N examples on one candidate
                    (`new_candidate()` first): each stage scores only the examples it adds, so a
                    trial let through every stage should cost about one full evaluation
  plain evaluate    lm_eval.evaluator.evaluate per trial on tasks built once and a plain
                    HFLM: what the objective does without reusing requests and encodings
  simple_evaluate   lm_eval.simple_evaluate per trial, on the same wrapped model and a
                    prebuilt TaskManager: loads the tasks and collects the environment each call

All of them must report the same accuracies. Tokens/s counts the input tokens of the
bare forward pass (the same requests, unpadded) per second. Run from the repository root:

    .venv/bin/python bench/bench_eval.py [--zoo runs/zoo] [--examples 256] [--trials 10] [--threads 1] [--batch-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from objectives import build_objectives  # noqa: E402
from objectives.zoo.build import build_zoo  # noqa: E402

BATCH = 64


def bare_batches(zoo: Path, skills: list[str], n: int, tokenizer) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """skill -> batches of (input ids, answer mask), built once: `<s>prompt answer</s>`, longest first."""
    out = {}
    for skill in skills:
        rows = [json.loads(line) for line in (zoo / "tasks" / skill / "search.jsonl").read_text().splitlines()[:n]]
        seqs = []
        for row in rows:
            prompt_len = len(tokenizer(row["prompt"])["input_ids"])
            ids = tokenizer(row["prompt"] + row["answer"] + tokenizer.eos_token)["input_ids"]
            seqs.append((ids, prompt_len))
        seqs.sort(key=lambda s: -len(s[0]))
        batches = []
        for i in range(0, len(seqs), BATCH):
            chunk = seqs[i : i + BATCH]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            answer = torch.zeros((len(chunk), width), dtype=torch.bool)
            for j, (row_ids, prompt_len) in enumerate(chunk):
                ids[j, : len(row_ids)] = torch.tensor(row_ids)
                answer[j, prompt_len : len(row_ids)] = True
            batches.append((ids, answer))
        out[skill] = batches
    return out


@torch.no_grad()
def bare_forward(model, batches: dict) -> dict[str, float]:
    """Teacher-forced greedy exact match: every answer token (and EOS) is the argmax."""
    scores = {}
    for skill, skill_batches in batches.items():
        correct = total = 0
        for ids, answer in skill_batches:
            predicted = model(input_ids=ids[:, :-1]).logits.argmax(-1)  # the last token predicts nothing
            target, mask = ids[:, 1:], answer[:, 1:]
            correct += ((predicted == target) | ~mask).all(dim=1).sum().item()
            total += len(ids)
        scores[f"{skill}_search"] = correct / total
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="runs/zoo", help="zoo folder (built if missing; default runs/zoo)")
    parser.add_argument("--examples", type=int, default=256, help="examples per task (default 256, the demo's last stage)")
    parser.add_argument("--trials", type=int, default=10, help="timed trials per method (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: as each of the demo's 2 workers on 2 cores)")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="token budget of the 'token batches' objective (default 1024, its CPU default)")
    parser.add_argument("--out", default="bench/out/bench_eval.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    zoo = Path(args.zoo)
    manifest = build_zoo(zoo, seed=0)
    skills, models = manifest["skills"], manifest["models"]
    task_names = [f"{s}_search" for s in skills]
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo / "base")
    resident = transformers.AutoModelForCausalLM.from_pretrained(zoo / "base").eval()
    weights = {m: transformers.AutoModelForCausalLM.from_pretrained(zoo / m).state_dict() for m in models}

    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    t = time.perf_counter()
    objective = build_objectives(
        [{"kind": "lmeval", "include_path": str(zoo / "tasks"), "tasks": task_names, "limit": args.examples, "batch_size": BATCH}],
        Path("."),
    )[0]
    build_s = time.perf_counter() - t
    batches = bare_batches(zoo, skills, args.examples, tokenizer)
    tokens = sum(int(ids.shape[0]) * (int(ids.shape[1]) - 1) - int((ids[:, 1:] == tokenizer.pad_token_id).sum())
                 for skill_batches in batches.values() for ids, _ in skill_batches)
    by_tokens = build_objectives(
        [{"kind": "lmeval", "include_path": str(zoo / "tasks"), "tasks": task_names, "limit": args.examples,
          "batch_tokens": args.batch_tokens}],
        Path("."),
    )[0]
    manager = TaskManager(include_path=str(zoo / "tasks"), include_defaults=False)
    simple_lm = HFLM(pretrained=resident, tokenizer=tokenizer, batch_size=BATCH)

    def run_simple_evaluate() -> dict[str, float]:
        res = lm_eval.simple_evaluate(model=simple_lm, tasks=task_names, task_manager=manager, limit=args.examples, bootstrap_iters=0)
        return {name: res["results"][name]["acc,none"] for name in task_names}

    plain_tasks = manager.load(task_names)  # built once, but requests rebuilt and re-tokenized per call

    def run_plain_evaluate() -> dict[str, float]:
        res = lm_eval.evaluator.evaluate(simple_lm, plain_tasks, limit=args.examples, bootstrap_iters=0, log_samples=False)
        return {name: res["results"][name]["acc,none"] for name in task_names}

    def run_objective() -> dict[str, float]:
        return objective.task_scores(resident, tokenizer)

    staged = build_objectives(
        [{"kind": "lmeval", "include_path": str(zoo / "tasks"), "tasks": task_names, "limit": args.examples,
          "batch_size": BATCH, "fidelities": sorted({n for n in (16, 64, args.examples) if n <= args.examples})}],
        Path("."),
    )[0]

    def run_incremental() -> dict[str, float]:
        staged.new_candidate()  # as the worker does after building a candidate
        for n in staged.fidelities:
            scores = staged.task_scores(resident, tokenizer, n)
        return scores

    methods = {
        "bare forward": lambda: bare_forward(resident, batches),
        "lmeval objective": run_objective,
        "token batches": lambda: by_tokens.task_scores(resident, tokenizer),
        "incremental stages": run_incremental,
        "plain evaluate": run_plain_evaluate,
        "simple_evaluate": run_simple_evaluate,
    }
    stages = {f"  stage of {n}": (lambda n=n: objective.task_scores(resident, tokenizer, n)) for n in (16, 64) if n < args.examples}
    t = time.perf_counter()
    run_objective()  # first call: builds the requests once
    first_call_s = time.perf_counter() - t
    for run in [*methods.values(), *stages.values()]:
        run()  # warm-up

    # Wall time, and CPU time of this process: on a shared machine the second is the steadier
    # measure (with one torch thread, CPU time is what the trial costs when the machine is free).
    times: dict[str, list[float]] = {name: [] for name in [*methods, *stages]}
    cpu: dict[str, list[float]] = {name: [] for name in [*methods, *stages]}
    for trial in range(args.trials):
        resident.load_state_dict(weights[models[trial % len(models)]])  # another candidate, same object
        results = {}
        for name, run in [*methods.items(), *stages.items()]:  # stages: what a pruned trial pays
            t, c = time.perf_counter(), time.process_time()
            results[name] = run()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
        reference = results["bare forward"]
        for name, scores in results.items():
            if name in stages:
                continue
            assert scores == reference, f"{name} disagrees with the bare forward pass: {scores} != {reference}"

    bare, bare_cpu = statistics.median(times["bare forward"]), statistics.median(cpu["bare forward"])
    summary = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "vs_bare": statistics.median(ts) / bare,
            "median_cpu_s": statistics.median(cpu[name]),
            "cpu_vs_bare": statistics.median(cpu[name]) / bare_cpu,
            "tokens_per_s": tokens / statistics.median(ts),
        }
        for name, ts in times.items()
    }
    print(f"per-trial evaluation, 4 tasks x {args.examples} examples, {args.trials} trials, torch threads {torch.get_num_threads()}")
    print(f"{'method':<20}{'wall s':>8}{'min s':>8}{'x bare':>8}{'cpu s':>8}{'x bare':>8}{'tokens/s':>10}   (medians over trials)")
    for name, row in summary.items():
        print(
            f"{name:<20}{row['median_s']:8.3f}{row['min_s']:8.3f}{row['vs_bare']:8.2f}"
            f"{row['median_cpu_s']:8.3f}{row['cpu_vs_bare']:8.2f}{row['tokens_per_s']:10.0f}"
        )
    print(f"tokens per trial (inputs of the bare forward pass, unpadded): {tokens}")
    print(f"objective set-up once per worker: build {build_s:.2f} s, first call {first_call_s:.2f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "examples": args.examples,
                "trials": args.trials,
                "summary": summary,
                "build_s": build_s,
                "first_call_s": first_call_s,
                "tokens_per_trial": tokens,
                "batch_tokens": args.batch_tokens,
                "machine": platform.machine(),
                "threads": torch.get_num_threads(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
