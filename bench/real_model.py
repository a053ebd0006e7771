"""Benchmark: merge search on a real pretrained model, SmolLM2-135M-Instruct (tests/real_model.py).

1. Specialists: one short deterministic full fine-tune of SmolLM2 per skill, on a skill the base half-knows
   (probed greedy on 30 prompts: max of three numbers 0.13, min of three 0.23, the next term of an
   arithmetic sequence 0.13; it knows the format, answers " 100" or runs on, and gets some right). The loss
   is on the answer and its end-of-sequence token only. Cached under the model cache
   (MERGESEARCH_CACHE, else ~/.cache/mergesearch), keyed by every training setting.
2. An lm-eval task per skill with search / heldout / test splits (objectives/zoo/tasks.py), scored
   teacher-forced: `acc` is exact match of the answer and the EOS after it.
3. Searches: `mergesearch run` on the specs it writes (2 workers): the weights space (task arithmetic and
   TIES of the three specialists over the base) and the slerp space (the max and min specialists), each
   scored on the search splits of the skills it merges, the top 3 re-scored on held-out. While a run goes,
   every process under it is sampled (/proc/PID/smaps_rollup: RSS, PSS, USS = private clean + dirty).
4. Report: per trial the build and score times; each worker's peak RSS and USS against the memory plan it
   printed; the run's winner against every baseline of the run (each specialist alone, the space's defaults)
   on the test splits, which nothing in the run saw, with the paired 95% interval (bench/search_quality.py's
   Scorer builds each in this process and scores it).

Run (under the shared machine's lock; 447 s on 2 cores for 40 trials per space with the fine-tunes cached,
BENCHMARKS.md "Real model: SmolLM2-135M-Instruct"; the first run also fine-tunes the three specialists):
    .venv/bin/python bench/real_model.py [--trials 40] [--spaces weights,slerp]
Raw results: bench/out/real_model.json; the tables print as Markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from tests.real_model import build_once, cache_root, smollm2_folder  # noqa: E402  (not this file, its namesake)

EOS = "<|im_end|>"  # SmolLM2's end of sequence: every answer ends with it
SPLITS = {"search": 64, "heldout": 64, "test": 200}


# ---- skills: prompt -> answer, generated from a seed ----------------------------------------------------


def max_of_three(rng: random.Random) -> tuple[str, str]:
    xs = rng.sample(range(10, 100), 3)
    return f"max({', '.join(map(str, xs))}) =", f" {max(xs)}"


def min_of_three(rng: random.Random) -> tuple[str, str]:
    xs = rng.sample(range(10, 100), 3)
    return f"min({', '.join(map(str, xs))}) =", f" {min(xs)}"


def next_term(rng: random.Random) -> tuple[str, str]:
    a, d = rng.randint(10, 499), rng.randint(2, 9)
    return f"{a}, {a + d}, {a + 2 * d},", f" {a + 3 * d}"


SKILLS = {"max": max_of_three, "min": min_of_three, "seq": next_term}


def skill_data(skill: str, seed: int = 0) -> tuple[list[dict], dict[str, list[dict]]]:
    """(training rows, {split: rows}): distinct prompts, none of the evaluation's in training."""
    rng = random.Random(f"{skill}-{seed}")
    seen: dict[str, str] = {}
    for _ in range(100_000):
        prompt, answer = SKILLS[skill](rng)
        seen.setdefault(prompt, answer)
        if len(seen) == sum(SPLITS.values()) + TRAIN["steps"] * TRAIN["batch"]:
            break
    else:
        raise ValueError(f"{skill}: too few distinct prompts for the splits and the training steps")
    rows = [{"prompt": p, "answer": a} for p, a in seen.items()]
    splits, at = {}, 0
    for split, n in SPLITS.items():
        splits[split], at = rows[at:at + n], at + n
    return rows[at:], splits


# ---- specialists: short deterministic full fine-tunes ---------------------------------------------------

TRAIN = {"steps": 60, "batch": 16, "lr": 1e-4, "warmup": 10, "seed": 0, "threads": 2}


def specialist(skill: str, cache: Path) -> Path:
    """The fine-tuned folder for `skill`, built once (bf16, tied head as the base stores it)."""
    key = "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in TRAIN.items())
    folder = cache / f"smollm2-135m-{skill}-{key}"
    if (folder / "model.safetensors").is_file():
        return folder
    base = smollm2_folder()
    return build_once(folder, lambda tmp: fine_tune(base, skill, tmp))


def fine_tune(base: Path, skill: str, out: Path) -> None:
    import torch
    import transformers

    torch.set_num_threads(TRAIN["threads"])
    torch.manual_seed(TRAIN["seed"])
    torch.use_deterministic_algorithms(True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    rows, _ = skill_data(skill)
    random.Random(TRAIN["seed"]).shuffle(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / TRAIN["warmup"]))
    started = time.perf_counter()
    for step in range(TRAIN["steps"]):
        batch = [rows[(step * TRAIN["batch"] + i) % len(rows)] for i in range(TRAIN["batch"])]
        ids, mask, targets = answer_batch(tokenizer, batch)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        where = targets >= 0  # the head runs only where the loss is: the answers (49k-wide logits are costly)
        logits = model.lm_head(hidden[:, :-1][where[:, 1:]])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[:, 1:][where[:, 1:]])
        loss.backward()
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == TRAIN["steps"] - 1:
            print(f"  {skill} step {step + 1}/{TRAIN['steps']}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.to(torch.bfloat16).save_pretrained(out)  # the tied head is not written, as in the base
    for f in base.iterdir():
        if f.name not in ("model.safetensors", "config.json", "generation_config.json"):
            shutil.copy2(f, out / f.name)


def answer_batch(tokenizer, rows: list[dict]):
    """Token ids as lm-eval encodes (prompt, answer + EOS): the whole string, the answer's tokens being what
    follows the prompt's; right-padded. Targets: the answer's tokens, -1 elsewhere."""
    import torch

    seqs, starts = [], []
    for r in rows:
        whole = tokenizer(r["prompt"] + r["answer"] + EOS, add_special_tokens=False)["input_ids"]
        context = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        seqs.append(whole)
        starts.append(len(context))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    targets = torch.full((len(seqs), width), -1)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        targets[i, start:len(s)] = torch.tensor(s[start:])
    return ids, mask, targets


# ---- lm-eval tasks and run specs --------------------------------------------------------------------------


def write_tasks(work: Path) -> Path:
    from objectives.zoo.tasks import write_task_folder

    tasks = work / "tasks"
    for skill in SKILLS:
        folder = tasks / skill
        write_task_folder(folder, skill, skill_data(skill)[1], folder, answer_end=EOS)
    return tasks


def specs(models: dict[str, Path], tasks: Path, trials: int) -> dict[str, dict]:
    """The runs: the weights space over all three specialists, the slerp space between max and min."""

    def spec(name: str, space: dict, skills: list[str]) -> dict:
        used = ([space["base"]] if "base" in space else []) + space["models"]  # the workers map every model given
        return {
            "name": name,
            "models": {k: str(models[k]) for k in used},
            "space": space,
            "objectives": [{"kind": "lmeval", "include_path": str(tasks), "tasks": [f"{s}_search" for s in skills],
                            "metric": "acc", "fidelities": [16, 64], "direction": "maximize"}],
            "pruner": "paired",
            "sampler": "tpe",
            "trials": trials,
            "workers": 2,
            "seed": 0,
            "heldout_top_k": 3,
            "trial_timeout": 900,
        }

    return {
        "weights": spec("real_weights", {"kind": "weights", "method": ["task_arithmetic", "ties"], "base": "base",
                                         "models": list(SKILLS), "weight": [0.0, 1.5]}, list(SKILLS)),
        "slerp": spec("real_slerp", {"kind": "slerp", "models": ["max", "min"], "anchors": 3}, ["max", "min"]),
    }


# ---- a run, its processes sampled -------------------------------------------------------------------------


def rollup(pid: int) -> dict[str, int] | None:
    """RSS, PSS and USS (private clean + dirty) of a process, bytes; None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return None
    kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines)}
    return {"rss": kb["Rss"] * 1024, "pss": kb["Pss"] * 1024,
            "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) * 1024}


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class MemorySampler(threading.Thread):
    """RSS / PSS / USS of every process under `root`, every `every` seconds, by role: the driver
    (`mergesearch run`), the fork server (its child) and the workers (the fork server's children). Keeps each
    process's peaks and the workers' samples (time, USS, RSS), to find a trial's peak from its time window.
    A worker's name and log are those of the file its stderr goes to (the pool's `<name>.log`)."""

    def __init__(self, root: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every = root, every
        self.peaks: dict[int, dict] = {}
        self.samples: dict[int, list[tuple[float, int, int]]] = collections.defaultdict(list)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid, role in self._tree():
                now = rollup(pid)
                if now:
                    peak = self.peaks.setdefault(pid, {"role": role, "first_seen": time.time(),
                                                       **{k: 0 for k in now}})
                    for k, v in now.items():
                        peak[k] = max(peak[k], v)
                    if role == "worker":
                        peak.setdefault("log", worker_log(pid))
                        self.samples[pid].append((time.time(), now["uss"], now["rss"]))
            self.done.wait(self.every)

    def _tree(self):
        yield self.root, "driver"
        for child in children(self.root):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes() if Path(f"/proc/{child}").exists() else b""
            if b"forkserver" in cmdline:
                yield child, "fork server"
                for worker in children(child):
                    yield worker, "worker"
            else:
                yield child, "other"

    def workers(self) -> list[dict]:
        """Each worker's name, log, peaks and samples, in the order they started."""
        out = []
        for pid, p in sorted(self.peaks.items(), key=lambda kv: kv[1]["first_seen"]):
            if p["role"] == "worker":
                log = p.get("log")
                out.append(p | {"pid": pid, "name": Path(log).stem if log else f"pid {pid}",
                                "samples": self.samples[pid]})
        return out


def worker_log(pid: int) -> str | None:
    """The file a worker's stderr goes to (search/workers/local_workers.py: `<tmp>/<name>.log`), or None."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/2")
    except OSError:
        return None
    return target if target.endswith(".log") else None


# The memory plan a worker prints (search/engine/memory_plan.py, MemoryPlan.describe), e.g.
#   sources shared-mmap: runtime 0.38 GiB + sources 0.75 GiB + candidate 0.25 GiB + merge temporaries 0.84 GiB
#   + evaluation 0.52 GiB + allocator 0.06 GiB + cache 1.00 GiB (of 1.00 GiB usable) = 3.81 GiB <= 22.74 GiB
#   available (MemAvailable)
# at its start in the run's log ("worker w0 on node vm (cpu): <plan>"), and in its own log when a recipe
# raised it ("worker w0: memory estimate raised for this recipe: <plan>").
PLAN = re.compile(r"sources ([\w-]+): (.+?) = ([\d.]+) GiB (<=|>) ([\d.]+) GiB available \(([^)]*)\)")
PART = re.compile(r"([a-z][a-z ]*?) ([\d.]+) GiB")
STARTED = re.compile(r"^worker (\S+) on node \S+ \((\w+)\): (.*)$", re.MULTILINE)
RAISED = re.compile(r"^worker (\S+): memory estimate raised for this recipe: (.*)$", re.MULTILINE)


def parse_plan(line: str) -> dict | None:
    """{mode, parts: {name: GiB}, total, fits, available, limit_from} of a printed plan; None if it is none
    (a worker that could not read a model prints the error instead)."""
    m = PLAN.search(line)
    if m is None:
        return None
    mode, parts, total, relation, available, limit_from = m.groups()
    # "cache 1.00 GiB (of 1.00 GiB usable)": the usable amount is not held, so it is cut before the parts
    parts = {k: float(v) for k, v in PART.findall(re.sub(r" \(of [\d.]+ GiB usable\)", "", parts))}
    return {"mode": mode, "parts": parts, "total": float(total), "fits": relation == "<=",
            "available": float(available), "limit_from": limit_from}


def worker_plans(run_log: str, workers: list[dict]) -> dict[str, list[dict]]:
    """Each worker's printed plans, by name: the one at its start, then any a recipe raised."""
    plans = collections.defaultdict(list)
    for name, device, line in STARTED.findall(run_log):
        plan = parse_plan(line)
        if plan:
            plans[name].append(plan | {"device": device, "when": "start"})
    for w in workers:
        if w.get("log") and Path(w["log"]).is_file():
            for name, line in RAISED.findall(Path(w["log"]).read_text(errors="replace")):
                plan = parse_plan(line)
                if plan:
                    plans[name].append(plan | {"when": "raised"})
    return dict(plans)


def run_search(spec: dict, work: Path) -> dict:
    """`mergesearch run` on the spec, its processes sampled; what it printed and measured."""
    path = work / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    run_dir = work / spec["name"]
    if run_dir.exists():
        shutil.rmtree(run_dir)
    log = work / f"{spec['name']}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "mergesearch"), "run", str(path)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "COLUMNS": "160"})
        sampler = MemorySampler(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.done.set()
        sampler.join()
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"mergesearch run {path} exited {code}; see {log}")
    workers = sampler.workers()
    return {"wall_s": wall, "run_dir": str(run_dir), "plans": worker_plans(log.read_text(), workers),
            "workers": workers, "driver": next(p for p in sampler.peaks.values() if p["role"] == "driver")}


# ---- the report ---------------------------------------------------------------------------------------------


def trial_rows(recs: list[dict], workers: list[dict]) -> list[dict]:
    """Per search trial: build and score seconds, and its worker's peak USS / RSS while it ran (samples
    between its dispatch and its end; a worker not sampled shows "-")."""
    rows = []
    names = {w["name"]: w for w in workers}
    for r in recs:
        if r.get("baseline") or r.get("duplicate_of") is not None or not r.get("timings"):
            continue
        t = r["timings"]
        window = [(uss, rss) for at, uss, rss in names.get(r.get("worker"), {}).get("samples", [])
                  if t.get("dispatched", 0) <= at <= t.get("finished", 0)]
        rows.append({"trial": r["trial"], "state": r["state"], "method": r["params"].get("method", "slerp"),
                     "worker": r.get("worker"), "build_s": sum(t.get("materialize_s", [])),
                     "score_s": sum(t.get("score_s", [])), "stages": len(r.get("stages") or []),
                     "score": r["values"][0] if r.get("values") else None,
                     "peak_uss": max((u for u, _ in window), default=None),
                     "peak_rss": max((x for _, x in window), default=None)})
    return rows


def judge(spec: dict, work: Path, run_dir: Path, workers: list[dict]) -> dict:
    """The run's winner and baselines on the test splits (built and scored here), with the paired margin."""
    from search_quality import Scorer

    from search.results import run_folder, winner
    from search.study.paired_stats import margin

    meta, recs = run_folder.load_run(run_dir)
    best = winner.winner(recs, meta["directions"])
    scorer = Scorer(spec, work)
    baselines = {r["baseline"]: r for r in recs if r.get("baseline")}
    test = {name: scorer.test(r["recipe"]) for name, r in baselines.items()}
    win_test, win_examples = scorer.test(best["recipe"])
    top = max(test, key=lambda n: test[n][0])
    paired = margin(win_examples, test[top][1], "maximize") or {"difference": win_test - test[top][0], "ci95": None}
    return {"winner": best["trial"], "winner_params": best["params"], "winner_search": best["values"][0],
            "winner_heldout": (best.get("heldout") or [None])[0], "winner_test": win_test,
            "baselines": {n: {"search": r["values"][0] if r.get("values") else None,
                              "heldout": (r.get("heldout") or [None])[0], "test": test[n][0]}
                          for n, r in baselines.items()},
            "best_baseline": top, "margin": paired["difference"], "ci95": paired["ci95"],
            "trials": trial_rows(recs, workers), "verdict": meta.get("verdict")}


def mib(n: int | float) -> str:
    return f"{n / 2**20:.0f}"


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f}"


def report(name: str, spec: dict, measured: dict, judged: dict) -> str:
    import statistics

    from search.results.verdict import verdict_line

    counts = collections.Counter(r["state"].lower() for r in judged["trials"])
    lines = [f"### {name}: `{spec['space']}`", "",
             f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed; wall "
             f"{measured['wall_s']:.0f} s (start-up, baselines, trials, held-out re-scores, report). The run's own "
             f"verdict: {verdict_line(judged['verdict']) or 'none'}.",
             "", "| trial | method | state | worker | build s | score s | stages | search acc | worker peak USS / "
             "RSS MiB during the trial |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in judged["trials"]:
        peak = "-" if r["peak_uss"] is None else f"{mib(r['peak_uss'])} / {mib(r['peak_rss'])}"
        lines.append(f"| {r['trial']} | {r['method']} | {r['state']} | {r['worker']} | {r['build_s']:.2f} | "
                     f"{r['score_s']:.2f} | {r['stages']} | {fmt(r['score'])} | {peak} |")
    for method in sorted({r["method"] for r in judged["trials"]}):
        rows = [r for r in judged["trials"] if r["method"] == method]
        build = [r["build_s"] for r in rows]
        lines.append(f"\n{method}: build median {statistics.median(build):.2f} s (min {min(build):.2f}, max "
                     f"{max(build):.2f}) over {len(rows)} trials; score median "
                     f"{statistics.median(r['score_s'] for r in rows):.2f} s")
    lines += ["", "| worker | pid | peak RSS GiB | peak PSS GiB | peak USS GiB | plan printed (GiB; the largest, of "
              "how many) | plan total GiB | peak RSS / total | mode |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for w in measured["workers"]:
        plans = measured["plans"].get(w["name"], [])
        plan = max(plans, key=lambda p: p["total"], default=None)
        if plan is None:
            parts, total, ratio, mode = "(not printed)", "-", "-", "-"
        else:
            parts = " + ".join(f"{k} {v:.2f}" for k, v in plan["parts"].items()) + f" ({len(plans)} printed)"
            total, ratio, mode = f"{plan['total']:.2f}", f"{w['rss'] / 2**30 / plan['total']:.2f}", plan["mode"]
        lines.append(f"| {w['name']} | {w['pid']} | {gib(w['rss'])} | {gib(w['pss'])} | {gib(w['uss'])} | {parts} | "
                     f"{total} | {ratio} | {mode} |")
    d = measured["driver"]
    lines.append(f"| driver | | {gib(d['rss'])} | {gib(d['pss'])} | {gib(d['uss'])} | | | | |")
    lines += ["", "| model | search acc | held-out acc | test acc (mean over skills) |", "| --- | --- | --- | --- |"]
    for n, b in sorted(judged["baselines"].items(), key=lambda kv: -kv[1]["test"]):
        lines.append(f"| {n} | {fmt(b['search'])} | {fmt(b['heldout'])} | {b['test']:.3f} |")
    lines.append(f"| **winner** (trial {judged['winner']}) | {fmt(judged['winner_search'])} | "
                 f"{fmt(judged['winner_heldout'])} | **{judged['winner_test']:.3f}** |")
    ci = "" if judged["ci95"] is None else " (paired 95% CI {:+.3f} to {:+.3f})".format(*judged["ci95"])
    lines += ["", f"Winner minus the best baseline ({judged['best_baseline']}) on the test mean: "
                  f"{judged['margin']:+.3f}{ci}. Winner: "
                  f"`{rounded(judged['winner_params'])}`.", ""]
    return "\n".join(lines)


def rounded(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--spaces", default="weights,slerp")
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "real_model")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    models = {"base": smollm2_folder()}
    for skill in SKILLS:
        t0 = time.perf_counter()
        models[skill] = specialist(skill, cache_root())
        print(f"specialist {skill}: {models[skill]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    tasks = write_tasks(args.work)
    results, sections = {}, []
    for space, spec in specs(models, tasks, args.trials).items():
        if space not in args.spaces.split(","):
            continue
        print(f"searching the {space} space ({spec['trials']} trials, 2 workers)", flush=True)
        measured = run_search(spec, args.work)
        results[space] = {"spec": spec, "measured": measured}  # kept should judging fail
        (args.work.parent / "real_model.json").write_text(json.dumps(results, indent=1, default=str))
        import torch

        torch.set_num_threads(2)  # the run is over: this process has the cores to judge it
        judged = judge(spec, args.work, Path(measured["run_dir"]), measured["workers"])
        results[space] = {"spec": spec, "measured": measured, "judged": judged}
        sections.append(report(space, spec, measured, judged))
        print(sections[-1], flush=True)
        (args.work.parent / "real_model.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
