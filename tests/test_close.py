"""A handler's `close()`: once, after its last `predict`, on that thread; only after a load that returned."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import serving
from fake_handlers import AsyncClose, AsyncGeneratorClose, Closing, DecoratedAsyncLoad, Echo

from docker_vit import cli, closing
from docker_vit.config import Settings
from docker_vit.handler import HandlerError
from docker_vit.loader import check_methods
from docker_vit.service import Service

IMAGE = {"content-type": "image/x"}


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    """`Closing` records on its class: each test starts from no calls and the default steering."""
    Closing.calls = []
    yield
    Closing.close_fails = Closing.load_fails = Closing.predict_fails = Closing.close_interrupts = False
    Closing.gate = None


def names() -> list[str]:
    return [what for what, _ in Closing.calls]


def test_a_server_closes_its_handler_once_after_the_last_predict_on_its_thread() -> None:
    settings = Settings()
    with serving(settings, Closing(settings)) as client:
        assert client.post("/", content=b"hello", headers=IMAGE).text == "hello"
        assert "close" not in names()
    assert names() == ["load", "predict", "predicted", "predict", "predicted", "close"]  # warm-up, then ours
    threads = {thread for _, thread in Closing.calls}
    assert len(threads) == 1 and threads.pop().startswith("docker-vit-device")


def test_a_handler_whose_load_failed_is_not_closed() -> None:
    Closing.load_fails = True
    settings = Settings()
    with serving(settings, Closing(settings), wait=False) as client:
        while client.get("/readyz").json()["status"] == "loading":
            pass
        assert client.get("/readyz").status_code == 503
    assert names() == ["load"]


def test_a_close_that_fails_is_logged_and_the_server_still_stops(caplog: pytest.LogCaptureFixture) -> None:
    Closing.close_fails = True
    settings = Settings()
    with caplog.at_level(logging.ERROR, "docker_vit"), serving(settings, Closing(settings)):
        pass
    assert names()[-1] == "close"
    assert "the handler's close() failed" in caplog.text and "the socket is gone" in caplog.text


def run_and_stop(handler: Echo, release_after: float | None) -> list[str]:
    """Start a service, leave a request in `predict`, stop the service meanwhile; the calls made."""

    async def scenario() -> None:
        serving = Service(Settings(), handler)
        await serving.start()
        assert await serving.settled(10)
        Closing.gate = threading.Event()
        request = asyncio.ensure_future(serving.run([b"late"], serving.options({})))
        while names().count("predict") < 2:  # the warm-up's, then the request's
            await asyncio.sleep(0.01)
        if release_after is not None:
            asyncio.get_running_loop().call_later(release_after, Closing.gate.set)
        await serving.stop()
        request.cancel()

    asyncio.run(scenario())
    return names()


def test_stop_waits_for_the_running_predict_before_closing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "docker_vit"):
        calls = run_and_stop(Closing(Settings()), release_after=closing.SAY_WAITING + 0.3)
    assert calls[-3:] == ["predict", "predicted", "close"]
    assert "waiting for the handler's close() after the load or model call still running" in caplog.text


def test_a_predict_running_past_the_wait_means_no_close_and_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(closing, "CLOSE_WAIT", 0.2)
    with caplog.at_level(logging.WARNING, "docker_vit"):
        calls = run_and_stop(Closing(Settings()), release_after=None)
        Closing.gate.set()
        while names().count("predicted") < 2:  # its predict ends on the device thread: not in the next test
            time.sleep(0.01)
    assert (
        "close" not in calls
        and "close() was not called: the load or a model call still ran after 0.2 s" in caplog.text
    )


def test_a_caption_run_closes_its_handler_at_the_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "b.png").write_bytes(b"b")
    out = tmp_path / "out.jsonl"
    assert cli.main(["caption", str(tmp_path), "--handler", "fake_handlers:Closing", "-o", str(out)]) == 0
    assert names() == ["load", "predict", "predicted", "close"]
    assert len(out.read_text().splitlines()) == 2


def test_a_caption_run_that_fails_closes_its_handler_too(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    Closing.predict_fails = True
    for index in range(4):
        (tmp_path / f"{index}.png").write_bytes(b"x")
    command = ["caption", str(tmp_path), "--handler", "fake_handlers:Closing", "--max-batch-size", "1"]
    assert cli.main([*command, "-o", str(tmp_path / "out.jsonl")]) == 1
    assert "batches in a row" in capsys.readouterr().err
    assert names()[-1] == "close" and names().count("close") == 1


def test_ctrl_c_on_a_slow_close_leaves_a_finished_caption_run_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Every record is written when close() runs: a Ctrl-C there is no "interrupted, run it again"."""
    Closing.close_interrupts = True
    (tmp_path / "a.png").write_bytes(b"a")
    out = tmp_path / "out.jsonl"
    assert cli.main(["caption", str(tmp_path), "--handler", "fake_handlers:Closing", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "the handler's close() was interrupted" in err and "interrupted; run" not in err
    assert len(out.read_text().splitlines()) == 1


def test_a_caption_run_says_a_failed_close_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Closing.close_fails = True
    (tmp_path / "a.png").write_bytes(b"a")
    code = cli.main(["caption", str(tmp_path / "a.png"), "--handler", "fake_handlers:Closing"])
    err = capsys.readouterr().err
    assert code == 0 and "the handler's close() failed: RuntimeError: the socket is gone" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("handler", "method"),
    [(AsyncClose, "close"), (AsyncGeneratorClose, "close")],
)
def test_an_async_method_is_refused_at_load_behind_a_decorator_too(handler: type, method: str) -> None:
    """A coroutine (or async generator) from load or close would never run: nothing else would say so."""
    with pytest.raises(HandlerError, match=rf"{handler.__name__}.{method} is an async def"):
        check_methods(handler)


def test_a_runpod_worker_closes_its_handler_as_it_stops() -> None:
    from docker_vit.runpod import Worker

    worker = Worker(Settings(), Closing(Settings()))
    try:
        assert worker.wait_ready()
    finally:
        worker.close()
    assert names()[-1] == "close" and names().count("close") == 1


class TimesOutClosing(Closing):
    def close(self) -> None:
        super().close()
        raise TimeoutError("ending the session timed out")  # a socket's timeout: close()'s own failure


def test_a_close_that_raises_timeout_error_is_its_failure_not_the_wait(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings()
    with caplog.at_level(logging.WARNING, "docker_vit"), serving(settings, TimesOutClosing(settings)):
        pass
    assert names()[-1] == "close"
    assert "the handler's close() failed" in caplog.text and "was not called" not in caplog.text


class ClosesOnItsInstance(Echo):
    def load(self) -> None:  # no close() on the class: one set on the instance, as prepare may be
        self.close = lambda: Closing.calls.append(("instance close", ""))  # type: ignore[method-assign]


def test_a_close_set_on_the_instance_is_called_as_caption_calls_it() -> None:
    settings = Settings()
    with serving(settings, ClosesOnItsInstance(settings)):
        pass
    assert names() == ["instance close"]


def test_an_async_load_behind_a_decorator_is_refused_when_it_returns_a_coroutine(tmp_path: Path) -> None:
    """A wrapper that returns the coroutine unrun is told at load; one that runs it is a plain method."""
    import asyncio
    import functools

    from docker_vit.local import LocalRunner
    from docker_vit.runner import CaptionError

    check_methods(DecoratedAsyncLoad)  # judged by what load() returns, not by __wrapped__
    with pytest.raises(CaptionError, match=r"load\(\) returned coroutine that never ran"):
        LocalRunner(Settings(handler="fake_handlers:DecoratedAsyncLoad"), {})

    def run_sync(method):  # asyncio.run / asgiref's async_to_sync behind functools.wraps
        @functools.wraps(method)
        def wrapper(*args):
            return asyncio.run(method(*args))

        return wrapper

    class RunsItsCoroutine(Echo):
        @run_sync
        async def load(self) -> None:
            self.loaded = True

    check_methods(RunsItsCoroutine)
