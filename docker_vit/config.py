"""Every setting in one typed place.

Settings come from three layers, strongest first: command-line flags, `DOCKER_VIT_*` environment
variables (what containers and Runpod templates set), then the defaults below. environment.py is the
one module that reads the environment: the entry points (cli, ray, runpod) call `Settings.load`, and
every other module receives a `Settings`. (images.py sets a libtiff limit in it, a decoder's knob, not
a setting.)
"""

from __future__ import annotations

import dataclasses
import math
import re
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from docker_vit.captions_file import FORMATS

ENV_PREFIX = "DOCKER_VIT_"
DEFAULT_MODEL = "nlpconnect/vit-gpt2-image-captioning"
TOKEN = re.compile(r"[!-~]([ -~]*[!-~])?")
DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
# A whole number as text, the way a form field, a query, a flag or a variable writes one: "4", " 04",
# "+4"; not "1_0" nor other digits than 0-9, which Python's int() would take.
WHOLE_NUMBER = re.compile(r"\s*[+-]?[0-9]+\s*")

# Groups decide which subcommand shows a flag: "model" options apply wherever a model runs; "client"
# ones only where `docker-vit caption --url` talks to a server; "output" ones to `caption`'s results;
# "download" ones to `docker-vit download`.
MODEL, SERVER, CLIENT, OUTPUT, DOWNLOAD = "model", "server", "client", "output", "download"
# The captioner's generation options: what a request may choose, and what these settings default
GENERATION = ("num_beams", "max_new_tokens")


def _opt(default: Any, help: str, group: str = SERVER, *, secret: bool = False, **extra: Any) -> Any:
    """A setting; a secret one is left out of the settings' repr (a crash report may print it)."""
    return field(default=default, repr=not secret, metadata={"help": help, "group": group, **extra})


@dataclass(frozen=True)
class Settings:
    """The configuration of one Docker-ViT process."""

    model: str = _opt(DEFAULT_MODEL, "Hub id or local folder of an image-to-text model", MODEL, trimmed=True)
    handler: str = _opt("", "run a custom handler, as module:Class (default: the captioner)", MODEL)
    device: str = _opt(
        "auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps, xpu or xpu:N", MODEL, any_case=True
    )
    dtype: str = _opt(
        "auto",
        "auto (bfloat16 on CUDA from Ampere on, float16 before, float32 elsewhere), "
        "float32, float16 or bfloat16",
        MODEL,
        choices=("auto", "float32", "float16", "bfloat16"),
    )
    num_beams: int = _opt(4, "default beam width", MODEL)
    max_new_tokens: int = _opt(15, "default caption length in tokens (the original's max_length 16)", MODEL)
    max_num_beams: int = _opt(8, "largest num_beams a request may ask for", MODEL)
    max_new_tokens_limit: int = _opt(64, "largest max_new_tokens a request may ask for", MODEL)
    max_batch_size: int = _opt(16, "most images in one model call", MODEL)
    threads: int = _opt(0, "torch CPU threads (0: torch's default)", MODEL)
    max_bytes: int = _opt(20_000_000, "largest accepted image, in bytes", MODEL)
    max_pixels: int = _opt(40_000_000, "largest accepted image, in pixels (decompression bombs)", MODEL)
    jpeg_draft: bool = _opt(
        False,
        "decode big JPEGs (2048 px or more on both sides for a model input of up to 512) at a reduced scale "
        "that divides both sides, keeping twice the larger of 512 and the input, before the model's "
        "resize: faster, but a caption near a tie can change, so off by default (every image decoded "
        "whole, as the model's own processor and the original do)",
        MODEL,
    )

    host: str = _opt("127.0.0.1", "address to listen on", trimmed=True)
    port: int = _opt(8000, "port to listen on")
    max_wait_ms: float = _opt(
        5.0,
        "how long a batch may wait to fill up, in milliseconds (up to 100 ms more for images of the "
        "same options still being decoded, unless 0)",
    )
    max_queue: int = _opt(256, "most images waiting for the model; beyond it requests get 503")
    max_images: int = _opt(16, "most images in one request")
    request_timeout: float = _opt(60.0, "seconds a request may wait for its captions (then 504)")
    read_timeout: float = _opt(
        30.0, "seconds to receive a request's headers and body (then 408; headers still arriving: closed)"
    )
    idle_timeout: float = _opt(5.0, "seconds an idle keep-alive connection stays open")
    shutdown_timeout: float = _opt(30.0, "seconds to finish requests in flight after SIGTERM")
    api_keys: tuple[str, ...] = _opt(
        (),
        "API key clients must send as 'Authorization: Bearer KEY'",
        secret=True,
        flag="--api-key",
        metavar="KEY",
    )
    log_format: str = _opt(
        "text", "log format, the request log's included: text or json", choices=("text", "json")
    )
    log_level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))

    url: str = _opt(
        "", "caption through a Docker-ViT server at this URL, not a local model", CLIENT, trimmed=True
    )
    api_key: str = _opt("", "API key sent to --url as 'Authorization: Bearer KEY'", CLIENT, secret=True)
    concurrency: int = _opt(16, "requests in flight at once with --url (a server batch's worth)", CLIENT)

    output: str = _opt(
        "", "append to FILE, skipping images already in it", OUTPUT, short=("-o",), metavar="FILE"
    )
    format: str = _opt(
        "",
        "output format (default: from FILE's name, else jsonl; on stdout, plain text)",
        OUTPUT,
        choices=FORMATS,
    )
    json: bool = _opt(False, "print one JSON object per line (--format jsonl)", OUTPUT)
    dir: str = _opt("", "save into this folder instead of the Hub cache", DOWNLOAD)

    def __post_init__(self) -> None:
        """Every setting checked where it is made, so a bad flag or variable stops a command at once."""
        self._check_numbers()
        self._check_limits()
        self._check_secrets()
        self._check_choices()

    def _check_numbers(self) -> None:
        for name, spec in options().items():
            if isinstance(spec.default, float) and not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        positive = ("num_beams", "max_new_tokens", "max_num_beams", "max_new_tokens_limit", "max_batch_size")
        positive += ("max_bytes", "max_pixels", "max_queue", "max_images", "request_timeout", "read_timeout")
        positive += ("concurrency",)
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")

    def _check_limits(self) -> None:
        if not self.url and self.num_beams > self.max_num_beams:  # with --url, the server's limits hold
            raise ValueError(f"num_beams {self.num_beams} exceeds max_num_beams {self.max_num_beams}")
        if not self.url and self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"max_new_tokens {self.max_new_tokens} exceeds max_new_tokens_limit {self.max_new_tokens_limit}"
            )
        for name in ("max_wait_ms", "threads", "idle_timeout", "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} cannot be negative, got {getattr(self, name)}")
        if self.max_wait_ms >= 1000 * self.request_timeout:  # a lone request would time out waiting
            raise ValueError(
                f"max_wait_ms {self.max_wait_ms:g} ms must be shorter than request_timeout {self.request_timeout:g} s"
            )

    def _check_secrets(self) -> None:
        """API keys and the server's URL, as HTTP can carry them."""
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("an API key cannot be empty: it would let any 'Bearer' header in")
        # HTTP carries other characters only as Latin-1 (no match), and blanks at either end are not sent
        if any(not TOKEN.fullmatch(key) for key in self.api_keys):
            raise ValueError("api_keys holds a key that is not printable ASCII or has blanks at either end")
        if self.url and _user_info(self.url):  # never echoed: it may hold a password
            raise ValueError(
                "url cannot hold a user or password (user:pw@): send a key with --api-key instead"
            )
        if self.url and not _http_url(self.url):
            shown = repr(self.url)
            if "@" in self.url:
                shown = "a URL holding an @ (not shown: a password may be in it)"
            elif "?" in self.url or "#" in self.url:  # a gateway's `?token=` must not reach a CI log
                shown = f"{re.split(r'[?#]', self.url, maxsplit=1)[0]!r} and a query (not shown: a key may be in it)"
            raise ValueError(
                f"url must be http:// or https://, a host and an optional path (no query), got {shown}"
            )
        if self.url and self.api_key and not TOKEN.fullmatch(self.api_key):
            raise ValueError("api_key is not printable ASCII or has blanks at either end")

    def _check_choices(self) -> None:
        # A blank variable is no value (environment.chosen), but a flag's is given as it is: `--host
        # "$HOST"` with HOST unset would listen on every address (uvicorn binds "" so), IPv6 too.
        if not self.host.strip():
            raise ValueError("host cannot be blank: give 0.0.0.0 to listen on every address")
        if not self.model.strip():
            raise ValueError("model cannot be blank: give a Hub id or a local folder")
        if not DEVICE.fullmatch(self.device):
            raise ValueError(
                f"device must be auto, cpu, cuda, cuda:N, mps, xpu or xpu:N, got {self.device!r}"
            )
        for name, spec in options().items():
            choices, value = spec.metadata.get("choices"), getattr(self, name)
            if choices and value not in choices and value != spec.default:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")

    def generation(self) -> dict[str, int]:
        """The captioner's default generation options (its `/v1/model` "generation"); what `caption`
        offers a handler, which takes those it names in `option_names`."""
        return {name: getattr(self, name) for name in GENERATION}

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, names: Collection[str] | None = None, **overrides: Any
    ) -> Settings:
        """Defaults, then `DOCKER_VIT_*` variables from `env` (None: this process's), then `overrides`
        (flags; None is unset).

        `names`: the settings a command uses; other variables are not read (so one meant for `serve`
        cannot stop `caption`). None reads them all."""
        from docker_vit.environment import chosen  # which reads this module's options

        return cls(**chosen(env, names, **overrides))


def options() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Settings)}


def names_of(*groups: str) -> list[str]:
    """The settings of `groups`, in declaration order: what one command or adapter reads."""
    return [name for name, spec in options().items() if spec.metadata["group"] in groups]


SERVING = names_of(MODEL, SERVER)  # what a server reads: `serve`, Runpod, Ray


def _http_url(url: str) -> bool:
    """An http(s) URL with a host (and a numeric port, if any), no query or fragment, nothing blank or
    unprintable in it."""
    if not url.isprintable() or any(c.isspace() for c in url):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a port that is not a number in range)
    except ValueError:
        return False
    # the routes are joined to its path: a query or fragment would end up before them
    plain = not (parts.query or parts.fragment or "?" in url or "#" in url)
    return parts.scheme.lower() in ("http", "https") and bool(parts.hostname) and plain


# an `@` before the host part ends, a scheme or its slashes missing or not: `user:pw@host` too
_USER_INFO = re.compile(r"(?:[A-Za-z][\w+.-]*:)?/*[^/?#@]+@")


def _user_info(url: str) -> bool:
    """The URL holds a user (and a password) before its host: urllib takes them for the host's name."""
    return bool(_USER_INFO.match(url))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return options()[name].metadata.get("flag", "--" + name.replace("_", "-"))


def any_case(spec: dataclasses.Field) -> bool:
    """A setting read in any case: a choice (`--log-level INFO`), or a device (`CPU`, `CUDA:0`)."""
    return bool(spec.metadata.get("choices") or spec.metadata.get("any_case"))
