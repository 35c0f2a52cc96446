"""The `docker-vit` command: serve, caption, download.

Every flag is generated from `Settings`, so each one also reads its `DOCKER_VIT_*` variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from docker_vit.config import (
    CLIENT,
    DEFAULT_MODEL,
    DOWNLOAD,
    GENERATION,
    MODEL,
    OUTPUT,
    SERVER,
    Settings,
    env_name,
    flag_name,
    names_of,
    options,
)
from docker_vit.environment import chosen, ignored_variables, platform_port, server_warnings
from docker_vit.flags import PrintVersion, add_settings, before_command, unrecognized
from docker_vit.naming import named

if TYPE_CHECKING:  # imported where used: `caption` and `download` start without the web stack
    import uvicorn

    from docker_vit.service import Service

# Model settings a `caption --url` run leaves to the server (it sends only the generation options;
# the server's byte limit holds, or a lower --max-bytes given to the run, or the default where it says none)
LOCAL_ONLY = set(names_of(MODEL)) - {*GENERATION, "max_bytes"}
REMOTE_ONLY = set(names_of(CLIENT)) - {"url"}  # --api-key, --concurrency: a forgotten --url loads a model
COMMANDS = ("serve", "caption", "download")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _open_closed_streams()
    parser = _parser()
    if said := before_command(argv, COMMANDS):
        parser.error(said)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by argparse, it would quote a value given to a mistyped flag: a key, maybe
        parser.error(unrecognized(unknown, [flag_name(name) for name in args.names if name in options()]))
    flags = {name: getattr(args, name, None) for name in options()}
    try:  # only the variables of this command's settings are read
        values = chosen(None, args.names, **flags)
        settings, args.chosen = Settings(**values), set(values)
        args.flagged = {name for name, value in flags.items() if value is not None}
    except (ValueError, TypeError) as exc:
        _fail(args.parser, named(exc))
    from docker_vit.handler import HandlerError

    try:
        return args.run(settings, args)
    except HandlerError as exc:  # the setting named as it was set: the flag, or the variable
        _fail(args.parser, exc.said_as("--handler" if "handler" in args.flagged else env_name("handler")))


def _open_closed_streams() -> None:
    """`>&-` and `2>&-` leave Python no stdout or stderr (None): what would go there goes nowhere, as the
    shell was told, and the work is still done, where a `None` would end it in a traceback."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None:  # the descriptor itself, too: a file opened later would take
            null = os.open(os.devnull, os.O_WRONLY)  # it, and a library's own writes to 2 with it
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, "w", closefd=False))  # noqa: SIM115  # the process's, to its end


def _fail(parser: argparse.ArgumentParser, exc: Exception | str) -> NoReturn:
    """A bad setting in one line (argparse's own errors, a bad flag, still show the usage)."""
    parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docker-vit", description="Send a picture, get a sentence.")
    parser.add_argument("--version", action=PrintVersion, help="print the installed version and exit")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve the model over HTTP")
    add_settings(serve, groups={MODEL, SERVER}, run=_serve)

    caption = commands.add_parser("caption", help="caption images and folders, locally or through --url")
    caption.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files or folders (walked recursively)"
    )
    add_settings(caption, groups={MODEL, CLIENT, OUTPUT}, run=_caption)

    download = commands.add_parser("download", help="fetch a model's files so later runs need no network")
    download.add_argument(
        "model", nargs="?", help=f"Hugging Face Hub id (default: {DEFAULT_MODEL}; env {env_name('model')})"
    )
    add_settings(download, groups={DOWNLOAD}, run=_download, extra=("model",))
    return parser


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    # Until the server runs, a stop has nothing to drain. As PID 1 in a container a process without a
    # handler never sees SIGTERM, and a stop during start-up would wait for the runtime's SIGKILL.
    from docker_vit.process import Terminated, exit_now, raise_if_terminated, terminate

    signal.signal(signal.SIGTERM, terminate)
    try:
        server, service = _server(settings)
        raise_if_terminated()  # a SIGTERM whose raise went astray (a weakref callback dropped it)
    except Terminated:
        return 0
    from docker_vit.service import FAILED  # imported by now, with the app

    interrupted, refused = False, None
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C, which uvicorn re-raises once it has drained: no traceback
        interrupted = True
    except SystemExit:  # uvicorn could not listen (say, the port is taken); it logged why
        refused = 1  # uvicorn's own code (3) is documented nowhere of ours: a failed start is 1
    code = refused or (1 if service.state == FAILED else 130 if interrupted else 0)
    if service.busy:
        # A handler call (the model's load, when the port was taken) outlived the shutdown timeout;
        # exiting normally would join its thread and wait.
        if not refused:
            logging.getLogger("docker_vit").warning("exiting with a handler call unfinished")
        exit_now(code)
    return code


def _server(settings: Settings) -> tuple[uvicorn.Server, Service]:
    """uvicorn's server around the app, and the app's service."""
    import uvicorn

    from docker_vit import logs
    from docker_vit.protocol import MAX_HEADER_BYTES, header_deadline
    from docker_vit.server import create_app

    logs.configure(settings.log_format, settings.log_level)
    for line in [*server_warnings(settings), *platform_port(settings)]:
        logging.getLogger("docker_vit").warning(line)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=header_deadline(settings.read_timeout, app.state.service.metrics),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,  # h11's 16 KiB default: a 400 for headers in pieces
        ws="none",  # no WebSocket routes: an upgrade request is answered as plain HTTP (JSON, request id)
        timeout_keep_alive=settings.idle_timeout,  # type: ignore[arg-type]  # int() turned 0.5 s into 0
        timeout_graceful_shutdown=settings.shutdown_timeout,  # type: ignore[arg-type]  # int() dropped 0.9 s
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    service = app.state.service
    service.on_failed = lambda: setattr(server, "should_exit", True)
    # uvicorn takes SIGTERM over once it runs, and re-raises it once it has drained: a server that
    # finished its requests exits 0; one that comes in just before uvicorn listens stops it as well.
    signal.signal(signal.SIGTERM, lambda signum, frame: setattr(server, "should_exit", True))
    return server, service


def _caption(settings: Settings, args: argparse.Namespace) -> int:
    from docker_vit import folder, logs
    from docker_vit.process import Stopped

    logs.configure("text", "warning")
    terminated = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        if not terminated.is_set():  # a second SIGTERM must not break into the first one's clean-up
            terminated.set()
            raise Stopped  # the run ends as at Ctrl-C: rows flushed, a line saying so

    _say_ignored_variables(args)
    ignored = sorted(flag_name(name) for name in args.flagged & LOCAL_ONLY)
    if settings.url and ignored:  # said, not refused: a script may pass the same flags either way
        print(
            f"docker-vit: {', '.join(ignored)} ignored with --url: the server's own settings apply",
            file=sys.stderr,
        )
    remote = sorted(flag_name(name) for name in args.flagged & REMOTE_ONLY)
    if not settings.url and remote:
        print(f"docker-vit: {', '.join(remote)} ignored without --url: the model runs here", file=sys.stderr)
    if "json" in args.flagged and "format" not in args.flagged:  # the flag wins over DOCKER_VIT_FORMAT
        settings = dataclasses.replace(settings, format="jsonl" if settings.json else "")
    previous = _set_sigterm(stop)
    try:
        code = folder.caption(settings, args.paths, args.chosen)
    except KeyboardInterrupt:
        code = 130
    finally:
        _set_sigterm(previous)
    code = 143 if code == 130 and terminated.is_set() else code  # a stop as the shell reports it
    if code in (130, 143) and _joined_at_exit():
        # A handler call may still run on a pool thread (a prepare that hangs), which a normal exit
        # would join: forever. What was captioned is already written and flushed.
        from docker_vit.process import exit_now

        exit_now(code)
    return code


def _joined_at_exit() -> bool:
    """Threads that a normal exit waits for are alive: the pools' workers, a handler's own threads."""
    ours = (threading.main_thread(), threading.current_thread())  # cli.main may run on a test's thread
    return any(t not in ours and not t.daemon and t.is_alive() for t in threading.enumerate())


def _set_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler; the one it replaces. Only the main thread may (cli.main called from
    a test's thread leaves the signal alone)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


def _download(settings: Settings, args: argparse.Namespace) -> int:
    from docker_vit.hub import download

    _say_ignored_variables(args)  # DOCKER_VIT_MODLE would fetch the default model, 1 GB, unsaid
    if os.path.isdir(settings.model):  # its path, as a download prints the folder it filled
        ignored = f"; nothing is copied to {settings.dir}" if settings.dir else ""
        print(
            f"docker-vit: {settings.model} is a local folder: nothing to download{ignored}", file=sys.stderr
        )
        print(os.path.abspath(settings.model))
        return 0
    try:
        print(
            download(
                settings.model,
                settings.dir or None,
                lambda line: print(f"docker-vit: {line}", file=sys.stderr),
            )
        )
    except Exception as exc:  # no network, no such repository, no room: one line, not a traceback
        reason = " ".join(str(exc).split())  # one line, though the Hub's messages span several
        print(
            f"docker-vit: cannot download {settings.model}: {type(exc).__name__}: {reason}", file=sys.stderr
        )
        return 1
    return 0


def _say_ignored_variables(args: argparse.Namespace) -> None:
    """On stderr; a server logs them, in its log format, whichever entry point made it."""
    for line in ignored_variables(names=args.names):
        print(f"docker-vit: {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
