"""Draws docs/report-history.png, the README's picture, from the demo's own run.

    .venv/bin/mergesearch demo                        # the run: runs/demo/
    .venv/bin/python docs/make_report_picture.py      # its optimization history, as the report draws it

The picture is the report's history plot (search/results/report_plots.py) of that run, so it shows
what `mergesearch report runs/demo` shows today, never an older demo.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=DOCS.parent / "runs" / "demo", type=Path)
    parser.add_argument("--out", default=DOCS / "report-history.png", type=Path)
    args = parser.parse_args()

    from search.results import report_plots
    from search.results.report import load_view

    fig = report_plots.history(load_view(args.run_dir))
    fig.savefig(args.out, format="png", dpi=100)
    print(f"wrote {args.out} from {args.run_dir}")


if __name__ == "__main__":
    main()
