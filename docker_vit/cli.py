"""The `docker-vit` command: serve, caption, download.

Every flag is generated from `Settings`, so each one also reads its `DOCKER_VIT_*` variable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from docker_vit.config import MODEL, Settings, env_name, options

if TYPE_CHECKING:
    from docker_vit.handler import Result


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(os.environ, **{name: getattr(args, name, None) for name in options()})
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    return args.run(settings, args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docker-vit", description="Send a picture, get a sentence.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model over HTTP")
    _add_settings(serve, groups=None)
    serve.set_defaults(run=_serve)

    caption = commands.add_parser("caption", help="caption image files without a server")
    caption.add_argument("paths", nargs="+", metavar="IMAGE", help="image files")
    caption.add_argument("--json", action="store_true", help="print one JSON object per line")
    _add_settings(caption, groups={MODEL})
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
        help = f"{spec.metadata['help']} (default: {spec.default!r}; env {env_name(name)})"
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
    return 1 if service.state == FAILED else 0


def _caption(settings: Settings, args: argparse.Namespace) -> int:
    from docker_vit import logs
    from docker_vit.handler import load_handler
    from docker_vit.images import ImageError

    logs.configure("text", "warning")
    handler = load_handler(settings)
    handler.load()
    options = handler.options({})
    failures = 0
    batch_size = handler.max_batch_size or settings.max_batch_size
    for start in range(0, len(args.paths), batch_size):
        paths, items = [], []
        for path in args.paths[start : start + batch_size]:
            try:
                with open(path, "rb") as file:
                    items.append(handler.prepare(file.read(), options))
                paths.append(path)
            except (OSError, ImageError) as exc:
                failures += 1
                print(f"docker-vit: skipping {path}: {exc}", file=sys.stderr)
        outputs = handler.predict(items, options) if items else []
        for path, output in zip(paths, outputs, strict=True):
            _print_result(path, handler.respond(output), args.json, len(args.paths) > 1)
    return 1 if failures else 0


def _print_result(path: str, result: Result, as_json: bool, with_path: bool) -> None:
    if as_json:
        print(json.dumps({"path": path, "caption": result.text, **result.data}), flush=True)
    elif with_path:
        print(f"{path}: {result.text}", flush=True)
    else:
        print(result.text, flush=True)


def _download(settings: Settings, args: argparse.Namespace) -> int:
    from docker_vit.engine import download

    print(download(args.model, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
