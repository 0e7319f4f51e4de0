"""The ``remat`` command line. Planning saved graphs (``remat plan``) comes next."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from remat import __version__

    parser = argparse.ArgumentParser(
        prog="remat",
        description=(
            "remat: a torch.compile backend that fits training into less memory by "
            "choosing, for each saved activation, whether to keep or recompute it. "
            "Use it from Python: torch.compile(model, backend='remat')."
        ),
    )
    parser.add_argument("--version", action="version", version=f"remat {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
