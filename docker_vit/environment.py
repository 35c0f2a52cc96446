"""The one module that reads the process's environment: `DOCKER_VIT_*` variables parsed into settings
(what `Settings.load` and the commands' flags start from), and what a start warns of in it: a name
that sets nothing (misspelt, or a Kubernetes service link), a server left open by mistake.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Collection, Mapping
from typing import Any

from docker_vit.config import ENV_PREFIX, SERVING, WHOLE_NUMBER, Settings, any_case, env_name, options

# What Kubernetes sets in every pod for each Service of its namespace (unless `enableServiceLinks:
# false`): a Service named docker-vit gives DOCKER_VIT_SERVICE_HOST, DOCKER_VIT_PORT_8000_TCP_ADDR, ...
# and DOCKER_VIT_PORT=tcp://10.0.0.11:8000, which would stop `serve` as a port that is not a number.
_LINK_NAME = re.compile(
    r"\w*_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)"
)
_LINK_VALUE = re.compile(r"(tcp|udp|sctp)://", re.IGNORECASE)


def service_link(name: str, value: str) -> bool:
    """A variable of the form Kubernetes sets for a Service: it sets nothing here, whatever its name."""
    return bool(_LINK_NAME.fullmatch(name) or (name.endswith("_PORT") and _LINK_VALUE.match(value)))


def _links(env: Mapping[str, str]) -> set[str]:
    """The service links beside their Service's host and port, as Kubernetes always sets them: a lone
    `DOCKER_VIT_SERVICE_PORT=9000` is someone's guess at the port setting, and is said."""
    hosts = {n.removesuffix("_SERVICE_HOST") for n in env if n.endswith("_SERVICE_HOST")}
    services = tuple(f"{s}_" for s in hosts if f"{s}_SERVICE_PORT" in env)
    return {n for n in env if n.startswith(services) and service_link(n, env[n])}


def chosen(env: Mapping[str, str] | None, names: Collection[str] | None = None, **overrides: Any) -> dict:
    """The settings a variable (from `env`; None: this process's) or a flag sets, parsed: what differs
    from "left at its default"."""
    env = os.environ if env is None else env
    given = {k: v for k, v in overrides.items() if v is not None}  # a flag wins, a bad variable too
    values: dict[str, Any] = {}
    for name, spec in options().items():
        raw = env.get(env_name(name))
        if raw is not None and spec.metadata.get("trimmed"):  # blanks alone are no value, as ""
            raw = raw.strip()  # is none: `DOCKER_VIT_HOST=" "` must not listen everywhere
        if (
            raw
            and name not in given
            and not service_link(env_name(name), raw)
            and (names is None or name in names)
        ):
            values[name] = parse(spec, raw)
    return values | given


def open_by_mistake(settings: Settings, env: Mapping[str, str] | None = None) -> str | None:
    """A server with no keys whose environment (None: this process's) sets the client's key variable,
    or sets its own to nothing: someone meant to lock it. What to warn, or None."""
    env = os.environ if env is None else env
    if settings.api_keys:
        return None
    if env.get(env_name("api_keys")) == "":  # a template's secret that resolved to nothing, say
        return f"{env_name('api_keys')} is set but empty: the server is open to anyone"
    if not env.get(env_name("api_key")):
        return None
    return (
        f"{env_name('api_key')} is the client's key (caption --url); the server reads "
        f"{env_name('api_keys')}: it is open to anyone"
    )


def server_warnings(settings: Settings, env: Mapping[str, str] | None = None) -> list[str]:
    """What every server (`serve`, each Ray replica) says of its environment (None: this process's) at
    its start: left open by mistake, variables that set nothing."""
    mistake = open_by_mistake(settings, env)
    return ([mistake] if mistake else []) + ignored_variables(env, names=SERVING)


def platform_port(settings: Settings, env: Mapping[str, str] | None = None) -> list[str]:
    """A line for each port a platform told this container to listen on (Runpod's load-balancing
    endpoints probe `PORT` and `PORT_HEALTH`, Cloud Run sends to `PORT`) that is not the one served:
    its probes would never reach the server, which would never be counted healthy, without a word."""
    env = os.environ if env is None else env
    given = {name: env.get(name, "").strip() for name in ("PORT", "PORT_HEALTH")}
    return [
        f"{name}={port} is set (a platform's port) but the server listens on {settings.port}: "
        f"set {name}={settings.port}, or serve on {port} ({env_name('port')}={port})"
        for name, port in given.items()
        if port.isascii() and port.isdecimal() and int(port) != settings.port  # "" and "²" are no port
    ]


def ignored_variables(
    env: Mapping[str, str] | None = None, names: Collection[str] | None = None
) -> list[str]:
    """A line for each `DOCKER_VIT_*` variable, in any case (from `env`; None: this process's), that
    names no setting: a misspelt one (`DOCKER_VIT_APIKEYS`) would leave the default in force without a
    word. `names`: the command's settings (None: all), the only ones a hint names (a server's
    `DOCKER_VIT_APIKEY` means its own `API_KEYS`, not `caption`'s `API_KEY`, which would leave it open).
    Kubernetes' service links are passed over, but for the one that takes a setting's name."""
    env = os.environ if env is None else env
    known = {env_name(name) for name in options()}
    own = [name.upper() for name in (options() if names is None else names)]
    lines = [
        f"{name}={env[name]!r} is a Kubernetes service link (of a Service named docker-vit), not a "
        f"setting, and is ignored"
        for name in sorted(known & env.keys())
        if service_link(name, env[name]) and name[len(ENV_PREFIX) :] in own  # a setting it reads
    ]
    unknown = {n for n in env if n.upper().startswith(ENV_PREFIX)} - known - _links(env)
    for name in sorted(unknown):
        rest = name[len(ENV_PREFIX) :].upper()  # the prefix would match them all
        near = difflib.get_close_matches(rest, own, n=1)
        hint = f" (did you mean {ENV_PREFIX}{near[0]}?)" if near else ""
        lines.append(f"{name} is not a Docker-ViT setting and is ignored{hint}")
    return lines


def number(kind: type, raw: str) -> Any:
    """An int or float setting from text, in ASCII digits: Python's own `int("1_0")` is 10 and
    `int("٣")` is 3, which a request's options refuse, and no one means in a port or a limit."""
    if not raw.isascii() or "_" in raw or (kind is int and not WHOLE_NUMBER.fullmatch(raw)):
        raise ValueError(raw)
    return kind(raw)


def flag_type(kind: type) -> Any:
    """`number` for argparse, which names the type by its `__name__` ("invalid int value: '1_0'")."""

    def read(raw: str) -> Any:
        return number(kind, raw)

    read.__name__ = kind.__name__
    return read


_BOOLEANS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def parse(spec: dataclasses.Field, raw: str) -> Any:
    """Turn one environment string into the field's type, with a message naming the variable."""
    kind = type(spec.default)
    if kind is tuple:
        parts = tuple(part.strip() for part in raw.split(",") if part.strip())
        if not parts:  # say ",": read as "no API keys", it would switch the key check off unseen
            raise ValueError(f"{env_name(spec.name)}={raw!r} holds no value")
        return parts
    try:
        if kind is bool:
            return _BOOLEANS[raw.strip().lower()]
        if any_case(spec):
            return raw.strip().lower()  # LOG_LEVEL=INFO means info
        if spec.metadata.get("trimmed"):  # a blank pasted into a template's field, unseen in any log
            return raw.strip()
        return number(kind, raw) if kind in (int, float) else kind(raw)
    except (ValueError, KeyError):
        raise ValueError(f"{env_name(spec.name)}={raw!r} is not a valid {kind.__name__}") from None
