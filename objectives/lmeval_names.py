"""Whether lm-eval knows a task name, checked on the driver before the study exists, in a fraction of a second.

lm-eval finds tasks, groups and tags in YAML files: the run's `include_path` folders, and its
own tasks folder. Importing lm-eval and indexing its tasks takes seconds (and imports torch),
so the driver reads the YAML files as text instead: a name that appears in none of them as a
whole word is no task lm-eval could load, and the run stops before anything starts. A name
that does appear is left to the workers, which build the tasks and say what else is wrong.
The local folders are read first; lm-eval's own ~14,000 files (~0.3 s) only for a name
they lack.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path

from search.engine.errors import UserError

_DECLARED = re.compile(r"^\s*(?:task|group|tag)\s*:\s*[\"']?([\w.-]+)[\"']?\s*$", re.M)  # for suggestions


def check_task_names(names: list[tuple[str, str]], include_paths: list[Path] | None) -> None:
    """Each (field, name) names a task, group or tag lm-eval can find; else a UserError naming the field,
    with the closest names declared."""
    local = _text(tuple(sorted(str(p) for p in include_paths or [])))
    missing = [(field, name) for field, name in names if not _mentioned(name, local)]
    if not missing:
        return
    everywhere = local + "\n" + _lm_eval_text()
    for field, name in missing:
        if not _mentioned(name, everywhere):
            close = difflib.get_close_matches(name, sorted(set(_DECLARED.findall(everywhere))), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "check the name, or point include_path at its folder"
            raise UserError(f"{field}: lm-eval has no task {name!r}; {hint}")


def _mentioned(name: str, text: str) -> bool:
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text) is not None


@lru_cache(maxsize=8)
def _text(folders: tuple[str, ...]) -> str:
    """The text of every YAML file under the folders, one after the other (unreadable ones skipped: lm-eval
    would skip them too)."""
    out = []
    for folder in folders:
        for where, _, files in os.walk(folder):
            for name in files:
                if name.endswith((".yaml", ".yml")):
                    try:
                        with open(os.path.join(where, name), encoding="utf-8", errors="replace") as f:
                            out.append(f.read())
                    except OSError:
                        continue
    return "\n".join(out)


def _lm_eval_text() -> str:
    """lm-eval's own task files, found without importing lm-eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return _text((str(Path(list(spec.submodule_search_locations)[0]) / "tasks"),))
