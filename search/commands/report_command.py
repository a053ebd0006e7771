"""`mergesearch report RUN_DIR`: plots and a self-contained report.html in RUN_DIR/report/.

`mergesearch run` writes the report at its end; this command writes it again,
e.g. for a run folder copied from another machine, or while a run is going on.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="the folder `mergesearch run` wrote (runs/<name>/)")


def main(args: argparse.Namespace) -> int:
    from search.results.report import write_report  # matplotlib only once the command is known

    page = write_report(Path(args.run_dir))
    print(f"wrote {page} (open it in a browser; the plots are beside it as PNG files)")
    return 0
