"""`mergesearch zoo DIR [--seed N]`: build the toy model zoo and print its skill x model matrix."""

from __future__ import annotations

import argparse

from objectives.zoo.build import build_zoo, format_matrix
from search.engine.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", metavar="DIR", help="folder to build the zoo in (reused if it already holds the same zoo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything: data, weights, training order (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while building (default 1: the models are too small to gain from more)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every training step count (default 1.0; small values build a fast, untrained zoo for tests)"
    )


def main(args: argparse.Namespace) -> int:
    if args.scale <= 0:
        raise UserError(f"--scale: expected a positive number, got {args.scale}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads: expected a positive number, got {args.threads}")
    try:
        manifest = build_zoo(args.dir, seed=args.seed, scale=args.scale, threads=args.threads)
    except OSError as e:  # the zoo is built in a folder beside DIR, so name DIR, not that folder
        raise UserError(f"DIR {args.dir}: cannot write the zoo there ({e.strerror or e}); choose a folder you may write to") from None
    print("accuracy on each skill's test split (teacher-forced greedy exact match):")
    print(format_matrix(manifest["matrix"]))
    return 0
