"""Which parameters mattered: fANOVA on the study when it opens, else rank correlation from the records.

fANOVA (optuna.importance.FanovaImportanceEvaluator, seeded) needs the study
(its distributions) and scikit-learn. A run folder copied without its study, a
storage behind a password (masked in run.json), or a missing scikit-learn falls
back to a simple measure over the complete trials of trials.jsonl: for a number,
|Spearman's rank correlation| with the score; for a choice, the correlation ratio
of the score's ranks across its values. Either way the values are normalized to
sum to 1 per objective, and the method used is said with them.

Every searched parameter is either measured or named in `left_out` with the reason: fANOVA
compares only the parameters every complete trial has, so one that some trials lack (a
density, which only TIES and DARE trials have) is measured apart, by its rank correlation
over the trials that have it; the rank measure needs 3 trials with a parameter.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Importances:
    values: dict[str, dict[str, float]]  # objective -> parameter -> importance (sum 1)
    method: str  # what computed them, in words
    left_out: dict[str, str] = field(default_factory=dict)  # searched parameter -> why it has no value above


def compute(run_dir: Path, meta: dict, trials: list[dict]) -> Importances:
    try:
        study, where = _open_study(Path(run_dir), meta)
    except Exception as e:  # no storage file, a masked password, a locked database ...
        found = _from_records(meta, trials, f"the study did not open: {_first_line(e)}")
    else:
        try:
            found = _fanova(study, meta, where)
        except Exception as e:  # scikit-learn missing, too few trials, conditional params only ...
            found = _from_records(meta, trials, f"fANOVA failed: {_first_line(e)}")
    found.left_out = left_out(found, meta, trials)
    return found


def left_out(found: Importances, meta: dict, trials: list[dict]) -> dict[str, str]:
    """Each parameter the search asked for that `found` has no value of, with the reason (and, where 3 or more
    complete trials have it, its |rank correlation| with the first objective over them)."""
    done = _complete(trials)
    measured = {p for per in found.values.values() for p in per}
    out = {}
    for key in dict.fromkeys(k for r in trials for k in r.get("params") or {}):
        if key in measured:
            continue
        have = [r for r in done if key in r["params"]]
        if len(have) < 3:
            out[key] = f"only {len(have)} complete trial(s) have it; 3 are needed to compare"
            continue
        rank = _rank_measure([r["params"][key] for r in have], np.array([r["values"][0] for r in have], dtype=float))
        out[key] = (f"only {len(have)} of {len(done)} complete trials have it (fANOVA compares parameters every "
                    f"trial has); over those {len(have)}, |rank correlation| with {meta['objectives'][0]} {rank:.2f}")
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _open_study(run_dir: Path, meta: dict):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    local = run_dir / "study.db"
    if local.is_file():
        storage, where = f"sqlite:///{local.resolve()}", "study.db"
    else:
        url = meta.get("storage") or ""
        path = Path(url.removeprefix("journal:"))
        if not url.startswith("journal:") or not path.is_file():
            raise FileNotFoundError(f"no study.db in the run folder and no journal file at {url or 'its storage'}")
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        where = str(path)
    return optuna.load_study(study_name=meta["name"], storage=storage), where


def _fanova(study, meta: dict, where: str) -> Importances:
    import optuna

    values = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for multi-objective targets
        for i, name in enumerate(meta["objectives"]):
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            target = (lambda t, i=i: t.values[i]) if len(meta["objectives"]) > 1 else None
            values[name] = dict(optuna.importance.get_param_importances(study, evaluator=evaluator, target=target))
    return Importances(values, f"fANOVA (optuna.importance, seed 0) on the study in {where}, complete trials")


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    return ranks


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return abs(float(np.corrcoef(rx, ry)[0, 1]))


def _correlation_ratio(labels: list, y: np.ndarray) -> float:
    ry = _ranks(y)
    total = ((ry - ry.mean()) ** 2).sum()
    if total == 0:
        return 0.0
    between = sum(
        len(g) * (g.mean() - ry.mean()) ** 2 for g in (ry[[lab == v for lab in labels]] for v in set(labels))
    )
    return float(np.sqrt(between / total))


def _complete(trials: list[dict]) -> list[dict]:
    return [r for r in trials if r["state"] == "COMPLETE" and r.get("values") and r["values"][0] is not None]


def _rank_measure(xs: list, y: np.ndarray) -> float:
    """|Spearman| for a number, the correlation ratio of the score's ranks for a choice."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
    return _spearman(np.array(xs, dtype=float), y) if numeric else _correlation_ratio(xs, y)


def _from_records(meta: dict, trials: list[dict], why: str) -> Importances:
    done = [r for r in trials if r["state"] == "COMPLETE" and r.get("values")]
    values = {}
    for i, name in enumerate(meta["objectives"]):
        scores = {}
        for key in dict.fromkeys(k for r in done for k in r["params"]):
            have = [r for r in done if key in r["params"] and r["values"][i] is not None]
            if len(have) < 3:
                continue
            y = np.array([r["values"][i] for r in have], dtype=float)
            scores[key] = _rank_measure([r["params"][key] for r in have], y)
        total = sum(scores.values())
        values[name] = {k: (v / total if total else 0.0) for k, v in sorted(scores.items(), key=lambda kv: -kv[1])}
    if not any(values.values()):
        raise ValueError(f"fewer than 3 complete trials to compare parameters over ({why})")
    return Importances(values, f"rank correlation with the score over the complete trials in trials.jsonl ({why})")
