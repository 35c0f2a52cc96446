"""Settings: defaults, DOCKER_VIT_* variables, flags on top, and clear errors."""

from __future__ import annotations

import pytest

from docker_vit.cli import _parser
from docker_vit.config import DEFAULT_MODEL, Settings, env_name, options
from docker_vit.naming import named


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


def test_a_host_model_or_url_variable_is_read_without_blanks_at_either_end() -> None:
    """A blank pasted after a value in a template's field breaks a listen or a load, and no log shows it;
    ports and numbers were already read so."""
    env = {
        "DOCKER_VIT_HOST": "0.0.0.0 ",
        "DOCKER_VIT_MODEL": " nlpconnect/vit-gpt2-image-captioning\n",
        "DOCKER_VIT_URL": "http://127.0.0.1:9 ",
        "DOCKER_VIT_OUTPUT": "captions.jsonl ",  # a file name may end in a blank
    }
    settings = Settings.load(env)
    assert (settings.host, settings.model, settings.url) == ("0.0.0.0", DEFAULT_MODEL, "http://127.0.0.1:9")
    assert settings.output == "captions.jsonl "
    blank = Settings.load({"DOCKER_VIT_HOST": " ", "DOCKER_VIT_MODEL": "\t", "DOCKER_VIT_URL": "  "})
    assert (blank.host, blank.model, blank.url) == ("127.0.0.1", DEFAULT_MODEL, "")  # unset, not ""


def test_a_flag_wins_over_a_variable_that_would_not_parse() -> None:
    env = {"DOCKER_VIT_PORT": "abc", "DOCKER_VIT_MAX_WAIT_MS": "soon", "DOCKER_VIT_NUM_BEAMS": "2"}
    settings = Settings.load(env, port=9001, max_wait_ms=3.0)
    assert (settings.port, settings.max_wait_ms, settings.num_beams) == (9001, 3.0, 2)
    with pytest.raises(ValueError, match="DOCKER_VIT_PORT='abc' is not a valid int"):
        Settings.load(env, max_wait_ms=3.0)  # without the flag, the variable is read, and refused


def test_every_option_has_a_variable_and_a_flag() -> None:
    commands = _parser()._subparsers._group_actions[0].choices
    flags = {
        flag
        for name in ("serve", "caption", "download")
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
        {"DOCKER_VIT_MAX_WAIT_MS": "1e300"},  # finite, but every lone request would time out waiting
        {"DOCKER_VIT_MAX_WAIT_MS": "5000", "DOCKER_VIT_REQUEST_TIMEOUT": "5"},
        {"DOCKER_VIT_REQUEST_TIMEOUT": "inf"},
        {"DOCKER_VIT_JSON": "maybe"},
        {"DOCKER_VIT_THREADS": "-1"},
    ],
)
def test_bad_values_are_refused_with_the_variable_named(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Settings.load(env)


@pytest.mark.parametrize("value", ["1_0", "\u0663", "\uff12"])  # 10, Arabic-Indic 3, fullwidth 2
def test_numbers_are_read_in_ascii_digits_as_a_requests_options_are(
    value: str, capsys: pytest.CaptureFixture
) -> None:
    """Python's int() and float() read these; HTTP's `num_beams` refuses them (config.WHOLE_NUMBER)."""
    from docker_vit import cli

    for name in ("num_beams", "max_wait_ms"):
        with pytest.raises(ValueError, match=f"{env_name(name)}='{value}' is not a valid"):
            Settings.load({env_name(name): value})
        with pytest.raises(SystemExit) as exit:
            cli.main(["serve", "--" + name.replace("_", "-"), value])
        assert exit.value.code == 2 and "invalid" in capsys.readouterr().err
    assert Settings.load({"DOCKER_VIT_NUM_BEAMS": " +2 ", "DOCKER_VIT_MAX_WAIT_MS": "2.5e0"}).num_beams == 2


def test_a_command_reads_only_the_variables_of_its_own_settings(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A serve-only variable with a bad value does not stop `caption`; caption's own variables work."""
    from docker_vit import cli, folder

    seen = {}
    monkeypatch.setattr(folder, "caption", lambda settings, paths, chosen: seen.update(s=settings) or 0)
    monkeypatch.setenv("DOCKER_VIT_PORT", "eighty")
    monkeypatch.setenv("DOCKER_VIT_OUTPUT", str(tmp_path / "o.csv"))
    monkeypatch.setenv("DOCKER_VIT_FORMAT", "CSV")
    monkeypatch.setenv("DOCKER_VIT_JSON", "1")
    assert cli.main(["caption", "x.jpg"]) == 0
    assert (seen["s"].output, seen["s"].format, seen["s"].json) == (str(tmp_path / "o.csv"), "csv", True)
    with pytest.raises(SystemExit):
        cli.main(["serve"])
    assert (
        capsys.readouterr().err.strip()
        == "docker-vit serve: error: DOCKER_VIT_PORT='eighty' is not a valid int"
    )


@pytest.mark.parametrize(
    ("argv", "env", "said"),
    [
        (
            ["serve"],
            {"DOCKER_VIT_PORT": "99999"},
            "--port (DOCKER_VIT_PORT) must be between 1 and 65535, got 99999",
        ),
        (  # `--host "$HOST"` with HOST unset: uvicorn would bind "" (every address), IPv6 too
            ["serve", "--host", ""],
            {},
            "--host (DOCKER_VIT_HOST) cannot be blank: give 0.0.0.0 to listen on every address",
        ),
        (
            ["caption", "x.jpg", "--model", " "],
            {},
            "--model (DOCKER_VIT_MODEL) cannot be blank: give a Hub id or a local folder",
        ),
        (
            ["caption", "x.jpg", "--num-beams", "0"],
            {},
            "--num-beams (DOCKER_VIT_NUM_BEAMS) must be positive, got 0",
        ),
        (
            ["serve", "--api-key", " k"],
            {},
            "--api-key (DOCKER_VIT_API_KEYS) holds a key that is not printable ASCII or has blanks at either end",
        ),
        (
            ["serve", "--max-num-beams", "2"],
            {},
            "--num-beams (DOCKER_VIT_NUM_BEAMS) 4 exceeds --max-num-beams (DOCKER_VIT_MAX_NUM_BEAMS) 2",
        ),
    ],
)
def test_out_of_range_values_name_the_flag_and_variable(
    argv: list[str], env: dict, said: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from docker_vit import cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        cli.main(argv)
    assert capsys.readouterr().err.strip() == f"docker-vit {argv[0]}: error: {said}"


def test_download_takes_its_model_and_folder_from_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from docker_vit import cli, hub

    calls = []
    monkeypatch.setattr(hub, "download", lambda model, folder, warn: calls.append((model, folder)) or "done")
    monkeypatch.setenv("DOCKER_VIT_MODEL", "someone/model")
    monkeypatch.setenv("DOCKER_VIT_DIR", "/tmp/here")
    assert cli.main(["download"]) == 0
    assert cli.main(["download", "other/model", "--dir", "/tmp/there"]) == 0
    assert calls == [("someone/model", "/tmp/here"), ("other/model", "/tmp/there")]


def test_choices_are_read_in_any_case() -> None:
    assert Settings.load({"DOCKER_VIT_LOG_LEVEL": "INFO"}).log_level == "info"
    assert _parser().parse_args(["serve", "--log-level", "WARNING"]).log_level == "warning"
    assert Settings.load({"DOCKER_VIT_DEVICE": " CPU "}).device == "cpu"  # a device is no choice, but alike
    assert _parser().parse_args(["serve", "--device", "Cuda:1"]).device == "cuda:1"


def test_servers_read_no_variable_of_the_caption_command() -> None:
    """A caption-only variable (DOCKER_VIT_URL would even lift the generation limits) is not a server's."""
    from docker_vit.config import SERVING

    env = {"DOCKER_VIT_JSON": "maybe", "DOCKER_VIT_URL": "http://x", "DOCKER_VIT_NUM_BEAMS": "4"}
    settings = Settings.load(env, SERVING)
    assert settings.url == "" and "url" not in SERVING and "json" not in SERVING
    with pytest.raises(ValueError, match="exceeds max_num_beams"):
        Settings.load({**env, "DOCKER_VIT_NUM_BEAMS": "20"}, SERVING)


def test_a_handler_attribute_in_a_settings_error_is_not_renamed() -> None:
    error = ValueError("BadBatch.max_batch_size must be a positive int, got True")
    assert named(error, flags=False) == "BadBatch.max_batch_size must be a positive int, got True"
    assert named(ValueError("max_batch_size must be positive, got 0"), flags=False) == (
        "DOCKER_VIT_MAX_BATCH_SIZE must be positive, got 0"
    )


def test_a_platforms_port_other_than_the_one_served_is_said() -> None:
    """Runpod's load balancer probes PORT and PORT_HEALTH: a server on another port is never healthy."""
    from docker_vit.environment import platform_port

    said = platform_port(Settings(port=8000), {"PORT": "5000", "PORT_HEALTH": "8000", "DOCKER_VIT_X": "1"})
    assert said == [
        "PORT=5000 is set (a platform's port) but the server listens on 8000: set PORT=8000, or serve on 5000 (DOCKER_VIT_PORT=5000)"
    ]
    assert platform_port(Settings(port=5000), {"PORT": "5000", "PORT_HEALTH": "5000"}) == []
    assert platform_port(Settings(), {"PORT": "http", "PORT_HEALTH": "\u00b2"}) == []  # not a port: not ours
    assert platform_port(Settings(), {}) == []  # neither set: the usual case


def test_a_default_captioner_that_cannot_be_built_names_no_handler_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a handler the user named is `--handler X` (or DOCKER_VIT_HANDLER X) in the message."""
    from docker_vit import captioner
    from docker_vit.handler import HandlerError
    from docker_vit.loader import load_handler

    def no_engine(*args: object) -> None:
        raise RuntimeError("no such device")

    monkeypatch.setattr(captioner, "CaptionEngine", no_engine)
    with pytest.raises(HandlerError) as failed:
        load_handler(Settings())
    assert failed.value.said_as("DOCKER_VIT_HANDLER") == "Captioner: RuntimeError: no such device"
