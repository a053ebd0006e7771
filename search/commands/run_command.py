"""`mergesearch run SPEC.yaml`: search merge recipes as a run spec describes.

Exit status: 0 when the run ends with trials that completed or were pruned, 1 when
every trial failed (with the most common reason), 2 for an input error (one line,
nothing written), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="run spec YAML (see runs/demo.yaml)")
    p.add_argument("--trials", type=int, help="trial budget (overrides the spec's `trials:`)")
    p.add_argument("--timeout", type=float, help="time budget in seconds (overrides `timeout:`)")
    p.add_argument("--trial-timeout", type=float,
                   help="seconds one trial may run on its worker before it fails and the worker is replaced "
                        "(overrides `trial_timeout:`)")
    p.add_argument("--workers", type=int, help="number of workers (overrides `workers:`)")
    p.add_argument("--seed", type=int, help="sampler and merge seed (overrides `seed:`)")
    p.add_argument("--sampler", help="tpe, cmaes, gp, nsga2, random, qmc or a dotted class path (overrides `sampler:`)")
    p.add_argument("--pruner", help="paired, successive_halving, hyperband, median or none (overrides `pruner:`)")
    p.add_argument("--name", help="run name, and so its folder <spec folder>/<name>/ (overrides `name:`), "
                                  "e.g. to compare seeds or samplers from one spec")
    p.add_argument("--ray-address", help="run the workers as Ray actors on this Ray cluster (`local`: a Ray started "
                                         "on this machine); without it they are processes on this machine")
    p.add_argument("--storage", help="Optuna storage URL, or journal:PATH (default: sqlite in the run folder)")
    p.add_argument("--resume", action="store_true", help="continue the study of an earlier run of this spec")
    p.add_argument("--quiet", action="store_true", help="no progress display or summary")


def spec_overrides(args: argparse.Namespace) -> dict:
    """The spec keys the command line replaces (None: keep the spec's)."""
    keys = ("trials", "timeout", "trial_timeout", "workers", "storage", "seed", "sampler", "pruner", "name")
    return {key: getattr(args, key) for key in keys}


def main(args: argparse.Namespace) -> int:
    from search.workers.local_workers import runs_locally, start_fork_server

    if runs_locally(args.ray_address):
        start_fork_server()  # the workers' imports (seconds) go on while the driver reads and checks the spec
    from search.spec.runspec import load_spec

    spec = load_spec(args.spec, spec_overrides(args))
    from search.run.driver import run  # Ray and Optuna only once the spec is known to be good

    result = run(spec, resume=args.resume, ray_address=args.ray_address, quiet=args.quiet)
    if result.failure:
        print(f"mergesearch run: error: {result.failure}", file=sys.stderr)
        return 1
    return 0
