"""The `docker-vit` command: serve, caption, download.

Every flag is generated from `Settings`, so each one also reads its `DOCKER_VIT_*` variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from docker_vit.captions_file import FORMATS
from docker_vit.config import CLIENT, MODEL, SERVER, Settings, env_name, options


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(os.environ, **{name: getattr(args, name, None) for name in options()})
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    from docker_vit.handler import HandlerError

    try:
        return args.run(settings, args)
    except HandlerError as exc:
        parser.error(str(exc))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docker-vit", description="Send a picture, get a sentence.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model over HTTP")
    _add_settings(serve, groups={MODEL, SERVER})
    serve.set_defaults(run=_serve)

    caption = commands.add_parser("caption", help="caption images and folders, locally or through --url")
    caption.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files or folders (walked recursively)"
    )
    caption.add_argument(
        "--output", "-o", metavar="FILE", help="append to FILE, skipping images already in it"
    )
    caption.add_argument(
        "--format", choices=FORMATS, help="output format (default: from FILE's name, else jsonl)"
    )
    caption.add_argument(
        "--json", action="store_true", help="print one JSON object per line (--format jsonl)"
    )
    _add_settings(caption, groups={MODEL, CLIENT})
    caption.set_defaults(run=_caption)

    download = commands.add_parser("download", help="fetch a model's files so later runs need no network")
    download.add_argument("model", help="Hugging Face Hub id")
    download.add_argument("--dir", default=None, help="save into this folder instead of the Hub cache")
    download.set_defaults(run=_download)
    return parser


def _add_settings(parser: argparse.ArgumentParser, groups: set[str] | None) -> None:
    for name, spec in options().items():
        if groups is not None and spec.metadata["group"] not in groups:
            continue
        flag = spec.metadata.get("flag", "--" + name.replace("_", "-"))
        kind = type(spec.default)
        default = f"default: {spec.default!r}; " if spec.default not in ("", ()) else ""
        help = f"{spec.metadata['help']} ({default}env {env_name(name)})"
        if kind is tuple:
            parser.add_argument(flag, dest=name, action="append", help=help)
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=spec.metadata.get("choices"), help=help)


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from docker_vit import logs
    from docker_vit.middleware import header_deadline
    from docker_vit.server import create_app
    from docker_vit.service import FAILED

    logs.configure(settings.log_format, settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=header_deadline(settings.read_timeout),
        timeout_keep_alive=settings.idle_timeout,  # type: ignore[arg-type]  # int() turned 0.5 s into 0
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    service = app.state.service
    service.on_failed = lambda: setattr(server, "should_exit", True)
    # uvicorn re-raises SIGTERM once it has drained; a server that finished its requests exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    code = 1 if service.state == FAILED else 0
    if service.batcher.busy:
        # A model call outlived the shutdown timeout; exiting normally would join its thread and wait.
        logging.getLogger("docker_vit").warning("exiting with a model call unfinished")
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


def _caption(settings: Settings, args: argparse.Namespace) -> int:
    from docker_vit import folder, logs

    logs.configure("text", "warning")
    try:
        return folder.caption(
            settings, args.paths, args.output, args.format or ("jsonl" if args.json else None)
        )
    except KeyboardInterrupt:
        return 130


def _download(settings: Settings, args: argparse.Namespace) -> int:
    from docker_vit.engine import download

    try:
        print(download(args.model, args.dir))
    except Exception as exc:  # no network, no such repository, no room: one line, not a traceback
        print(f"docker-vit: cannot download {args.model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
