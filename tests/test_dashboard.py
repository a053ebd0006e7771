"""optuna-dashboard opens a real run's study through its own WSGI app and storage loader (what
`optuna-dashboard sqlite:///runs/<name>/study.db` serves) and finds the objectives' names and the
run's winner, held-out scores and baselines on the study."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import pytest

optuna_dashboard = pytest.importorskip(
    "optuna_dashboard", reason="optuna-dashboard is not installed (pip install -e '.[test]' or '.[dashboard]')"
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_driver import write_run, zoo  # noqa: E402,F401  (zoo: a module fixture)

from search.study import records  # noqa: E402
from search.run.driver import run  # noqa: E402
from search.spec.runspec import load_spec  # noqa: E402

FNS = """
def reversed_heldout(model, tokenizer, fidelity):
    return -fingerprint(model, tokenizer, fidelity)
"""


def get(app, path: str) -> dict:
    """One GET of the dashboard's JSON API, straight through its WSGI app (no server, no port)."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:500])
    return json.loads(body)


def test_the_dashboard_shows_the_metric_names_winner_heldout_and_baselines(zoo, tmp_path):
    space = {"kind": "weights", "method": ["linear", "ties"], "base": "base", "models": ["fst", "nxt"]}
    objectives = [{"kind": "custom", "name": "fingerprint", "function": "fns.py:fingerprint",
                   "heldout_function": "fns.py:reversed_heldout"}]
    spec = load_spec(write_run(tmp_path, "dash", zoo, space, FNS, objectives, trials=3, heldout_top_k=2,
                               baselines=True))
    run(spec, quiet=True)

    app = optuna_dashboard.wsgi(f"sqlite:///{spec.run_dir / 'study.db'}")
    studies = get(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == ["dash"]
    detail = get(app, f"/api/studies/{studies[0]['study_id']}")
    assert detail["objective_names"] == ["fingerprint"]  # not "Objective 0"
    attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
    meta = records.read_json(spec.run_dir / "run.json")
    assert json.loads(attrs["winner"]) == meta["winner"]
    assert set(json.loads(attrs["heldout"])) >= {str(meta["winner"])}  # trial number -> held-out scores
    # the dashboard cuts a value at 1024 characters: the baselines (with their recipes) are longer
    assert attrs["baselines"].startswith("{") and next(iter(meta["baselines"])) in attrs["baselines"]
    # baselines that are points of the space are trials too, marked as such
    marked = {a["value"] for t in detail["trials"] for a in t["user_attrs"] if a["key"] == records.BASELINE_ATTR}
    assert marked and marked <= set(meta["baselines"])
