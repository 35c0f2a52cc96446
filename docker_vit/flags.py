"""The command line's flags: one per setting, generated from `Settings`, each naming its variable; and
what a mistyped one is told. An unknown flag is named, never the value given after it: a mistyped
`--api-keys KEY` would print a key to the log of whoever runs it.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any

from docker_vit.config import any_case, env_name, flag_name, names_of, options
from docker_vit.environment import flag_type

TOP_LEVEL = ("-h", "--help", "--version")  # the flags `docker-vit` itself takes, before its command
_FLAG = re.compile(r"--[\w-]*")  # a long flag's name (`--max_batch_size` too): after it, `=KEY` is a value


def add_settings(
    parser: argparse.ArgumentParser, groups: set[str], run: Callable[..., int], extra: tuple[str, ...] = ()
) -> None:
    """A flag per setting of `groups`; the command reads only those settings' variables (and `extra`'s)."""
    names, fields = names_of(*groups), options()
    parser.set_defaults(run=run, parser=parser, names={*names, *extra})
    for name in names:
        spec = fields[name]
        flags = [flag_name(name), *spec.metadata.get("short", ())]
        kind = type(spec.default)
        shown = spec.default not in ("", ()) and spec.default is not False  # 0 == False: test identity
        value = f"{spec.default:g}" if isinstance(spec.default, float) else repr(spec.default)  # 5, not 5.0
        default = f"default: {value}; " if shown else ""
        help = f"{spec.metadata['help']} ({default}env {env_name(name)})"
        metavar = spec.metadata.get("metavar")
        if kind is tuple:
            parser.add_argument(
                *flags,
                dest=name,
                action="append",
                metavar=metavar,
                help=help + ", comma-separated there; repeatable",
            )
        elif kind is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, help=help)
        else:
            choices = spec.metadata.get("choices")
            if any_case(spec):
                kind = str.lower  # --log-level INFO means info
            elif kind in (int, float):
                kind = flag_type(kind)  # ASCII digits, as the variables and a request's options
            parser.add_argument(*flags, dest=name, type=kind, choices=choices, metavar=metavar, help=help)


class PrintVersion(argparse.Action):
    """`--version`, looked up only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        from docker_vit.process import version

        print(f"{parser.prog} {version()}")
        parser.exit()


def before_command(argv: Sequence[str], commands: Collection[str]) -> str | None:
    """What to say of flags given before the command (`docker-vit --api-keys KEY serve`), which argparse
    would answer by quoting the key as an unknown command; None when there are none."""
    head = []
    for token in argv:
        if token in commands:
            break
        head.append(token)
    if not head or not head[0].startswith("-") or head[0] in TOP_LEVEL:
        return None  # a mistyped command (`docker-vit serv`), or help and version: argparse says it
    return f"{unrecognized(head, ())}: give the command first, then its flags"


def unrecognized(tokens: Sequence[str], known: Collection[str]) -> str:
    """argparse's message for arguments it did not take, the values among them counted, not shown;
    with the flag of `known` that a mistyped one most likely meant."""
    flags: list[str] = []
    values, valued = 0, False
    for token in tokens:
        if valued or token == "-" or not token.startswith("-"):
            values += 1  # a path or a stray word, or the value of the unknown flag before it
            valued = False
        else:
            name = _FLAG.match(token).group(0) if token.startswith("--") else token[:2]  # -kVALUE: -k
            attached = token[len(name) :]
            flags.append(name + ("=..." if attached.startswith("=") else "..." if attached else ""))
            valued = not attached and token != "--"
    said = [" ".join(flags)] if flags else []
    if values:
        said.append(f"{values} value{'s' * (values != 1)}, not shown")
    return f"unrecognized arguments: {' and '.join(said)}{_meant(flags, known)}"


def _meant(flags: list[str], known: Collection[str]) -> str:
    bare = {flag.lstrip("-"): flag for flag in known}
    for flag in flags:
        close = difflib.get_close_matches(flag.partition("=")[0].lstrip("-"), bare, n=1, cutoff=0.75)
        if close:
            return f" (did you mean {bare[close[0]]}?)"
    return ""
