"""The README and docs/ name commands, flags, variables and files that a user copies as written: each one
must exist and parse, so that a renamed flag or setting cannot leave the docs pointing at nothing."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from docker_vit import cli
from docker_vit.config import ENV_PREFIX, env_name, flag_name, options

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {path.name: path.read_text() for path in DOCS}
# Named in the docs as what sets nothing: a misspelt setting, a Kubernetes service link.
NOT_SETTINGS = {"DOCKER_VIT_APIKEYS", "DOCKER_VIT_SERVICE_HOST"}


def _commands() -> list[str]:
    """Every `docker-vit ...` line of the docs' code blocks, and every one quoted whole in their prose
    with an argument (not a synopsis: `docker-vit download [MODEL] [--dir DIR]`, `docker-vit COMMAND`)."""
    found = []
    for text in TEXT.values():
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.DOTALL)
        lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
        quoted = re.findall(r"`((?:[A-Z_]+=\S+ )*docker-vit (?!COMMAND)[^`\[]+ [^`\[]+)`", text)
        found += [line for line in lines + quoted if re.match(r"([A-Z_]+=\S+ )*docker-vit ", line)]
    return sorted(set(found))


def test_every_variable_the_docs_name_is_a_setting_and_every_setting_is_named() -> None:
    named = {name for text in TEXT.values() for name in re.findall(r"\bDOCKER_VIT_[A-Z_]*[A-Z]\b", text)}
    settings = {env_name(name) for name in options()}
    assert named - NOT_SETTINGS <= settings, named - NOT_SETTINGS - settings
    assert settings <= named, settings - named  # every variable a command reads is documented
    assert all(name.startswith(ENV_PREFIX) for name in NOT_SETTINGS)


def test_the_readme_configuration_table_matches_the_settings() -> None:
    rows = [line for line in TEXT["README.md"].splitlines() if line.startswith("| `--")]
    assert len(rows) >= 20
    for row in rows:
        flags, variable, default = (cell.strip() for cell in row.strip("|").split("|")[:3])
        name = re.search(r"`DOCKER_VIT_(\w+)`", variable).group(1).lower()
        assert re.match(r"`(--[a-z-]+)`", flags).group(1) == flag_name(name), row
        value = options()[name].default
        if value not in ("", (), False):  # "(the captioner)", "(none)", "off"
            assert default.strip("`") in (str(value), f"{value:g}" if isinstance(value, float) else ""), row


@pytest.mark.parametrize("line", _commands())
def test_each_documented_command_line_parses(line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the user types it: the flags exist, the values pass the settings' checks (no model loads)."""
    for name in [n for n in os.environ if n.upper().startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    words = shlex.split(line)
    while "=" in words[0]:  # `DOCKER_VIT_HANDLER=... docker-vit serve`
        monkeypatch.setenv(*words.pop(0).split("=", 1))
    ran = []
    for command in cli.COMMANDS:
        monkeypatch.setattr(cli, f"_{command}", lambda settings, args: ran.append(settings) or 0)
    try:
        assert cli.main(words[1:]) == 0
        assert len(ran) == 1
    except SystemExit as exc:  # --help and --version print and leave; a bad line exits 2
        assert exc.code in (0, None) and not ran, line


def test_every_file_the_docs_name_exists() -> None:
    paths = {
        match.rstrip(".,)")
        for text in TEXT.values()
        for match in re.findall(r"\b(?:tests|benchmarks|examples|scripts|deploy|docs|\.ci)/[\w./-]+", text)
    }
    modules = {m for text in TEXT.values() for m in re.findall(r"`(\w+\.py)`", text)}
    missing = [p for p in paths if p != "docs/oauth2-redirect" and not (ROOT / p).exists()]  # a route
    places = ("docker_vit", "tests", "benchmarks", "examples")
    missing += [m for m in modules if not any((ROOT / place / m).exists() for place in places)]
    assert not missing, missing
