"""``python -m bench [--events N] [--repeats R] [--quick]`` — see :mod:`bench.harness`."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from bench.harness import README, Options, run
from bench.readme import write_readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--events", type=int, help="events per drain (default 30000; quick 3000)")
    parser.add_argument("--repeats", type=int, help="measured repeats (default 5; quick 2)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds thrown away (default 1)")
    parser.add_argument("--quick", action="store_true", help="a short run to see that it works")
    parser.add_argument("--output", type=Path, help="results file (default bench/results.json)")
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="do not rewrite the table in bench/README.md and README.md",
    )
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    options = (Options.quick() if args.quick else Options()).overridden(
        events=args.events,
        repeats=args.repeats,
        warmup=args.warmup,
        output=args.output,
        command=command,
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    document = run(options)
    if not args.no_readme:
        write_readme(README, document)
        write_readme(README.parent.parent / "README.md", document, append=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
