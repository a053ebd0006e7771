"""`mergesearch run SPEC.yaml`: search merge recipes as a run spec describes."""

from __future__ import annotations

import argparse

from search.runspec import load_spec


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="run spec YAML (see runs/demo.yaml)")
    p.add_argument("--trials", type=int, help="trial budget (overrides the spec's `trials:`)")
    p.add_argument("--timeout", type=float, help="time budget in seconds (overrides `timeout:`)")
    p.add_argument("--workers", type=int, help="number of Ray workers (overrides `workers:`)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--storage", help="Optuna storage URL, or journal:PATH (default: sqlite in the run folder)")
    p.add_argument("--resume", action="store_true", help="continue the study of an earlier run of this spec")
    p.add_argument("--quiet", action="store_true", help="no progress display or summary")


def main(args: argparse.Namespace) -> int:
    overrides = {"trials": args.trials, "timeout": args.timeout, "workers": args.workers, "storage": args.storage}
    spec = load_spec(args.spec, overrides)
    from search.driver import run  # Ray and Optuna only once the spec is known to be good

    run(spec, resume=args.resume, ray_address=args.ray_address, quiet=args.quiet)
    return 0
