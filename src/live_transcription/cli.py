"""``live-transcription serve | demo``."""

from __future__ import annotations

import argparse
import os
import sys


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="live-transcription", description="Live captions for Nextcloud Talk calls."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,demo}")
    serve_parser = sub.add_parser("serve", help="run the ExApp (the production entry point)")
    serve_parser.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help="worker processes that own the calls (LT_WORKERS; default: the cores this process may use); "
        "1 runs everything in this one process",
    )
    # started by the supervisor of `serve --workers N`, not by hand
    worker = sub.add_parser("worker")
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--channel-fd", type=int, required=True)
    worker.add_argument("--max-rooms", type=_positive, required=True)
    worker.add_argument("--max-speakers", type=_positive, required=True)
    demo = sub.add_parser("demo", help="show live captions from real speech end to end, with no Nextcloud")
    demo.add_argument("--language", default="en", help="caption language (default en)")
    sfu = demo.add_mutually_exclusive_group()
    sfu.add_argument("--janus", dest="janus", action="store_true", default=None, help="require Janus")
    sfu.add_argument("--no-janus", dest="janus", action="store_false", help="direct WebRTC, no SFU")
    demo.add_argument("--log-level", default="ERROR", help="service log level (default ERROR)")
    demo.add_argument(
        "--translate-to",
        metavar="LANG",
        default=None,
        help="a second viewer reads the captions translated into LANG: through the Nextcloud at "
        "NEXTCLOUD_URL (with APP_SECRET) when set, else through a labelled stand-in provider",
    )
    args = parser.parse_args(argv)
    if args.command == "serve":
        from live_transcription.api.server import serve  # noqa: PLC0415 - keep --help fast

        return serve(workers=args.workers)
    if args.command == "worker":
        from live_transcription.workers.worker import worker_main  # noqa: PLC0415

        return worker_main(
            index=args.index,
            channel_fd=args.channel_fd,
            max_rooms=args.max_rooms,
            max_speakers=args.max_speakers,
        )
    if args.command == "demo":
        from live_transcription import loop as event_loop  # noqa: PLC0415
        from live_transcription.logs import setup_logging  # noqa: PLC0415
        from live_transcription.sim.demo import run_demo  # noqa: PLC0415

        setup_logging(args.log_level.upper(), "text")
        try:
            result = event_loop.run(
                run_demo(
                    use_janus=args.janus,
                    language=args.language,
                    log_level=args.log_level,
                    translate_to=args.translate_to,
                ),
                os.environ.get("LT_EVENT_LOOP", "uvloop"),
                int(os.environ.get("LT_UDP_TICK_MS", event_loop.DEFAULT_UDP_TICK_MS)),
            )
        except KeyboardInterrupt:
            return 130
        return 0 if result.finals() else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
