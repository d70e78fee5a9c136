"""`pipelines` command line: the ML engineer's entry point (demo, train)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipelines", description="Train and package the part-inspection model.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate demo data, train, export a bundle, score the test split")
    demo.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where data, checkpoints and the bundle go")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--fast", action="store_true", help="2 training epochs instead of 6 (a quick smoke test)")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from pipelines.demo import run_demo

        run_demo(args.workdir, seed=args.seed, fast=args.fast)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
