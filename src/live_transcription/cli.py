"""``live-transcription serve | demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="live-transcription", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the ExApp (the production entry point)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        from live_transcription.api.server import serve  # noqa: PLC0415 - keep --help fast

        return serve()
    return 2


if __name__ == "__main__":
    sys.exit(main())
