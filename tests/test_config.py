"""Settings: defaults, DOCKER_VIT_* variables, flags on top, and clear errors."""

from __future__ import annotations

import pytest

from docker_vit.cli import _parser
from docker_vit.config import DEFAULT_MODEL, Settings, env_name, options


def test_defaults_are_the_seeds() -> None:
    settings = Settings()
    assert settings.model == DEFAULT_MODEL == "nlpconnect/vit-gpt2-image-captioning"
    assert (settings.num_beams, settings.max_new_tokens) == (4, 15)
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.max_bytes == 20_000_000 and settings.max_pixels == 40_000_000


def test_environment_then_flags() -> None:
    env = {"DOCKER_VIT_PORT": "9001", "DOCKER_VIT_MODEL": "/model", "DOCKER_VIT_NUM_BEAMS": "2"}
    settings = Settings.load(env, num_beams=3, host=None)
    assert (settings.port, settings.model, settings.num_beams, settings.host) == (
        9001,
        "/model",
        3,
        "127.0.0.1",
    )


def test_every_option_has_a_variable_and_a_flag() -> None:
    commands = _parser()._subparsers._group_actions[0].choices
    flags = {
        flag
        for name in ("serve", "caption")
        for action in commands[name]._actions
        for flag in action.option_strings
    }
    for name, spec in options().items():
        assert env_name(name) == "DOCKER_VIT_" + name.upper()
        assert spec.metadata.get("flag", "--" + name.replace("_", "-")) in flags


def test_api_keys_from_a_comma_list() -> None:
    assert Settings.load({"DOCKER_VIT_API_KEYS": "k1, k2,,"}).api_keys == ("k1", "k2")


@pytest.mark.parametrize("value", [",", " ", " , ,"])
def test_api_keys_that_hold_no_key_are_refused(value: str) -> None:
    """Read as "no keys", such a value would quietly switch the key check off."""
    with pytest.raises(ValueError, match="DOCKER_VIT_API_KEYS"):
        Settings.load({"DOCKER_VIT_API_KEYS": value})


@pytest.mark.parametrize(
    "env",
    [
        {"DOCKER_VIT_PORT": "eighty"},
        {"DOCKER_VIT_PORT": "0"},
        {"DOCKER_VIT_NUM_BEAMS": "20"},
        {"DOCKER_VIT_LOG_FORMAT": "xml"},
        {"DOCKER_VIT_MAX_BYTES": "-1"},
        {"DOCKER_VIT_DTYPE": "int8"},
        {"DOCKER_VIT_DEVICE": "banana"},
        {"DOCKER_VIT_DEVICE": "cuda:x"},
        {"DOCKER_VIT_MAX_WAIT_MS": "nan"},
        {"DOCKER_VIT_REQUEST_TIMEOUT": "inf"},
    ],
)
def test_bad_values_are_refused_with_the_variable_named(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Settings.load(env)
