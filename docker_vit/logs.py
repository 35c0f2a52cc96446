"""Log setup: readable lines for people, one JSON object per line for machines (`--log-format json`)."""

from __future__ import annotations

import json
import logging
import time


class JsonFormatter(logging.Formatter):
    """Each record as a JSON object; the access log's fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            # milliseconds, as the text format has: request lines within one second keep their order
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(log_format: str = "text", level: str = "info", logger: str = "") -> None:
    """Our format and level on the root logger; or only on `logger`, in a process whose logging is
    someone else's (a Ray replica), where it then keeps its records to itself."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger(logger)
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = not logger
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "PIL"):  # PIL: a line per PNG chunk
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # it warns of every malformed multipart body a client sends; the client gets its 400 anyway
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    _leave_out("uvicorn.error", _CLIENTS_DOING)


# uvicorn's warnings about what a client sent (a malformed request, an upgrade no route takes: its
# access line says so already), which any client could repeat into a flood; and its advice to install
# a WebSocket library, which would be wrong here (no route takes WebSockets, by choice).
_CLIENTS_DOING = (
    "Invalid HTTP request received.",
    "Unsupported upgrade request.",
    "No supported WebSocket library",
)
# `generate`'s warning that a batch without an attention mask may hold padding it cannot tell apart
# (the pad token is the end token, as in vit-gpt2): the engine stacks items of one shape, so its
# batches never hold padding, and the warning ("you may observe unexpected behavior") is wrong.
_NO_PADDING = (
    "The attention mask is not set with a batched input",
    "The attention mask and the pad token id",
)


class _LeftOut(logging.Filter):
    """Drops a library's records that begin with one of `said`."""

    def __init__(self, said: tuple[str, ...]) -> None:
        super().__init__()
        self.said = said

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.said)


def _leave_out(logger: str, said: tuple[str, ...]) -> None:
    """Once per logger and set of messages, however often the logs are configured."""
    target = logging.getLogger(logger)
    if not any(isinstance(f, _LeftOut) and f.said == said for f in target.filters):
        target.addFilter(_LeftOut(said))


def adopt_library_loggers() -> None:
    """transformers and huggingface_hub print through handlers of their own: beside the root's (each
    Hub retry warning appeared twice) and past `--log-format json`. Send their records to the root's.
    Called once they are imported, since importing them installs those handlers."""
    for name in ("transformers", "huggingface_hub"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    _leave_out("transformers.generation.utils", _NO_PADDING)
