"""``loopformer serve``: an OpenAI-compatible HTTP server for a checkpoint (needs the ``serve`` extra).

Binds 127.0.0.1 by default. The API key comes from ``--api-key`` or the ``LOOPFORMER_API_KEY`` environment
variable (which keeps it out of the process list). See docs/serving.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from loopformer.cli.arguments import path_text
from loopformer.cli.generation_args import add_checkpoint_arguments
from loopformer.errors import InputError

API_KEY_VARIABLE = "LOOPFORMER_API_KEY"


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from loopformer.serve.app import create_app
    except ImportError as exc:
        raise InputError(
            f"loopformer serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'loopformer[serve]'."
        ) from None
    from loopformer.cli.generation_args import load_engine
    from loopformer.serve.settings import ServerSettings, default_effort, parse_effort

    if not 0 <= args.port < 65536:
        raise InputError(f"--port must be in 0..65535, got {args.port}.")
    check_bindable(args.host, args.port)
    if args.memory_dir is not None and not Path(args.memory_dir).is_dir():
        raise InputError(f"--memory-dir {args.memory_dir} is not a directory.")
    if args.max_loops is not None and args.max_loops < 1:
        raise InputError(f"--max-loops must be an integer >= 1, got {args.max_loops}.")
    effort = parse_effort(args.effort) if args.effort else None
    engine, path = load_engine(args)
    mean = engine.model.config.recurrence.mean_loops
    effort = effort or default_effort(mean)
    settings = ServerSettings(
        model_name=args.model_name or Path(args.ckpt).resolve().name,
        max_loops=args.max_loops if args.max_loops is not None else max(2 * mean, *effort.values()),
        effort=effort,
        api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
        continuous_batching=not args.no_continuous_batching,
        max_body_bytes=args.max_body_bytes,
        memory_dir=None if args.memory_dir is None else Path(args.memory_dir),
    )
    app = create_app(engine, settings)
    print(
        f"serving {path} as {settings.model_name!r} on http://{args.host}:{args.port}/v1 "
        f"(max batch {settings.max_batch}, continuous batching {'on' if settings.continuous_batching else 'off'}, "
        f"API key {'required' if settings.api_key else 'off'}, {engine.dtype_choice.name}: "
        f"{engine.dtype_choice.reason})",
        file=sys.stderr,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


def check_bindable(host: str, port: int) -> None:
    """One sentence, before anything is loaded, when ``host``:``port`` cannot be bound (a malformed or foreign
    address, a port in use), instead of uvicorn's log lines and exit status."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputError(f"cannot serve on {host}:{port}: {reason[0].lower() + reason[1:]}.") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with per-request depth")
    add_checkpoint_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--model-name", help="the model id clients send (default: the --ckpt directory's name)")
    parser.add_argument("--api-key", help=f"require Authorization: Bearer KEY (or set {API_KEY_VARIABLE})")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch", type=int, default=16, help="rows decoded together (default: 16)")
    limits.add_argument("--max-queue", type=int, default=64, help="rows waiting before a 503 (default: 64)")
    limits.add_argument("--max-tokens", type=int, default=256, help="default and ceiling of max_tokens (default: 256)")
    limits.add_argument("--max-loops", type=int, help="deepest per-request loop count (default: 2 x the mean, or high)")
    limits.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    limits.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (default: 1 MB)")
    parser.add_argument(
        "--effort",
        metavar="NAME=LOOPS,...",
        help="reasoning_effort levels, e.g. low=4,medium=16,high=32 "
        "(default: half, once and twice the model's mean loops)",
    )
    parser.add_argument(
        "--no-continuous-batching",
        action="store_true",
        help="static batches: admit new requests only when the batch is empty",
    )
    parser.add_argument(
        "--memory-dir", type=path_text, help="directory of memory files that requests may name (memory pathway)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="uvicorn's logs"
    )
    parser.set_defaults(run=run)
