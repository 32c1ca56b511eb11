"""`personalize ui`: the local web UI (Gradio), on 127.0.0.1 unless --listen (which needs --auth)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from personalize.errors import UserError

INSTALL_HINT = "the web UI needs gradio: pip install 'personalize[ui]'"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ui",
        help="a local web page to train, batch, generate and browse results (needs personalize[ui])",
        description="Serve the web UI: Train, Batch, Generate and Results tabs over the same API as the CLI. "
        "Jobs run one at a time per device in the background; closing the browser does not stop them. "
        "Everything is read and written under --root.",
    )
    add = parser.add_argument
    add("--port", type=int, default=7860, help="port to serve on (default 7860)")
    add("--listen", action="store_true", help="serve on all interfaces instead of 127.0.0.1 (requires --auth)")
    add("--auth", metavar="USER:PASSWORD", help="require this login (required with --listen)")
    add(
        "--root",
        metavar="DIR",
        default="personalize-out",
        help="the only folder the UI reads and writes: runs, uploads, batches, images (default ./personalize-out)",
    )
    parser.set_defaults(run=run)


def parse_auth(auth: str | None, listen: bool) -> tuple[str, str] | None:
    """--auth user:password -> (user, password); --listen without it is refused."""
    if auth is None:
        if listen:
            raise UserError("--listen serves the UI to the whole network: give it a login with --auth USER:PASSWORD")
        return None
    user, colon, password = auth.partition(":")
    if not colon or not user or not password:
        raise UserError(f"--auth takes USER:PASSWORD (got {auth!r})")
    return user, password


def run(args: argparse.Namespace) -> int:
    credentials = parse_auth(args.auth, args.listen)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535 (got {args.port})")
    root = Path(args.root).expanduser()
    if root.exists() and not root.is_dir():
        raise UserError(f"--root {root} is a file; choose a folder")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    from personalize.ui.app import serve

    serve(root, port=args.port, host="0.0.0.0" if args.listen else "127.0.0.1", auth=credentials)
    return 0
