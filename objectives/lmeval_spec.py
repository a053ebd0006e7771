"""Reading an `lmeval` objective's spec without importing lm-eval.

The driver checks every field here (one-line UserErrors that name it) and learns
what the run needs of the objective (name, direction, stages) in milliseconds; the
workers build the tasks, once each (objectives/lmeval.py), and report what only
the built tasks can say: whether the tasks load, whether they have held-out
twins, how their metrics aggregate. Task names it checks as text (objectives/lmeval_names.py), so
a typo stops the run before anything starts. Importing lm-eval (and with it `datasets`,
torch and transformers) on the driver too would cost seconds of a 2-core machine
while Ray and the workers start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from objectives.fidelity import check_fidelities
from objectives.lmeval_names import check_task_names
from objectives.spec import SpecReader


@dataclass
class TaskEntry:
    task: str  # a task or group name
    metric: str
    weight: float
    heldout: str | None


def parse_tasks(r: SpecReader) -> list[TaskEntry]:
    default_metric = r.str("metric", "acc")
    tasks = r.raw("tasks")
    if isinstance(tasks, str):
        tasks = [tasks]
    if not isinstance(tasks, list) or not tasks:
        raise r.fail("tasks", "expected a list of task names, e.g. [fst_search, nxt_search]")
    entries = []
    for i, item in enumerate(tasks):
        where = f"tasks[{i}]"
        if isinstance(item, str):
            item = {"task": item}
        if not isinstance(item, dict) or not isinstance(item.get("task"), str):
            raise r.fail(where, f"expected a task name or {{task: NAME, metric: acc, weight: 1}}, got {item!r}")
        unknown = set(item) - {"task", "metric", "weight", "heldout"}
        if unknown:
            raise r.fail(where, f"unknown field {sorted(unknown)[0]!r}; a task entry has task, metric, weight, heldout")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise r.fail(f"{where}.weight", f"expected a positive number, got {weight!r}")
        metric = item.get("metric", default_metric)
        heldout = item.get("heldout")
        if not isinstance(metric, str) or (heldout is not None and not isinstance(heldout, str)):
            raise r.fail(where, "metric and heldout must be strings")
        entries.append(TaskEntry(item["task"], metric, float(weight), heldout))
    return entries


def read_lmeval_spec(spec: dict, where: str, base_dir: Path) -> dict:
    """The LmEvalObjective constructor's arguments from its spec, every field checked."""
    r = SpecReader(spec, where, base_dir)
    r.raw("kind")
    include = r.raw("include_path")
    include = [include] if isinstance(include, str) else include
    if include is not None and not (isinstance(include, list) and all(isinstance(p, str) for p in include)):
        raise r.fail("include_path", f"expected a folder or a list of folders, got {include!r}")
    paths = []
    for p in include or []:
        path = Path(p).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_dir():
            raise r.fail("include_path", f"{path} is not a folder; give task folders relative to the run spec's folder")
        paths.append(path)
    chat = r.raw("apply_chat_template", False)
    if not isinstance(chat, (bool, str)):
        raise r.fail("apply_chat_template", f"expected true, false or a template name, got {chat!r}")
    fidelities = check_fidelities(r.raw("fidelities"), where)
    limit = r.int("limit")
    if fidelities and limit and fidelities[-1] > limit:
        raise r.fail("fidelities", f"the last stage ({fidelities[-1]}) exceeds `limit` ({limit})")
    subset_seed = r.raw("subset_seed")
    if subset_seed is not None and (isinstance(subset_seed, bool) or not isinstance(subset_seed, int)):
        raise r.fail("subset_seed", f"expected an integer or null, got {subset_seed!r}")
    args = dict(
        tasks=parse_tasks(r),
        name=r.str("name", "lmeval"),
        include_path=paths or None,
        limit=limit,
        fidelities=fidelities,
        subset_seed=subset_seed,
        num_fewshot=r.int("num_fewshot", None, minimum=0),
        batch_size=r.int("batch_size"),  # alone: fixed batches; beside batch_tokens: a cap
        batch_tokens=r.int("batch_tokens"),  # neither: the device's token budget (objectives/token_batches.py)
        apply_chat_template=chat,
        system_instruction=r.str("system_instruction"),
        direction=r.direction("maximize"),
    )
    r.done()
    return args


def describe_lmeval(spec: dict, where: str, base_dir: Path):
    """What the driver needs of the objective, from its spec alone: held-out split and aggregations unknown
    until a worker has built the tasks."""
    from objectives import ObjectiveInfo

    args = read_lmeval_spec(spec, where, base_dir)
    names = [(f"{where}.tasks[{i}]", e.task) for i, e in enumerate(args["tasks"])]
    names += [(f"{where}.tasks[{i}].heldout", e.heldout) for i, e in enumerate(args["tasks"]) if e.heldout]
    check_task_names(names, args["include_path"])  # before the study exists; the workers check the rest
    return ObjectiveInfo(kind="lmeval", name=args["name"], direction=args["direction"],
                         fidelities=args["fidelities"], has_heldout=None, reports_examples=True)
