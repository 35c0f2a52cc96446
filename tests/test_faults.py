"""Faults inside the model or from clients: they cost only the request they belong to."""

from __future__ import annotations

import asyncio
import base64
import gc
import itertools
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import serving
from fake_handlers import (
    LOST_DEVICE,
    BadDescribe,
    DescribesItsModel,
    DescribesOptions,
    Echo,
    Exiting,
    Gated,
    Holding,
    Misbehaving,
    NeedsAField,
    OnlyPredicts,
    OutOfMemoryError,
    PreparesInInit,
    SlowBig,
    StopInLoad,
    TextOnly,
)

from docker_vit.batching import Batcher
from docker_vit.calls import contained, predict_all
from docker_vit.config import Settings
from docker_vit.handler import HandlerBug, HandlerError
from docker_vit.loader import check_attributes, check_methods, load_handler


def batch_behind_a_busy_model(handler: Gated, client, query: str, texts: list[str]) -> dict[str, object]:
    """Queue `texts` while the model is busy, so they form one batch once it frees up; their answers."""
    answers: dict[str, object] = {}

    def post(text: str, params: str) -> None:
        answers[text] = client.post(f"/?{params}", content=text.encode(), headers={"content-type": "image/x"})

    blocker = threading.Thread(target=post, args=("blocker", ""))
    blocker.start()
    assert handler.entered.wait(10)
    threads = [threading.Thread(target=post, args=(text, query)) for text in texts]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while client.app.state.service.batcher.depth < len(texts):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    handler.gate.set()
    for thread in [blocker, *threads]:
        thread.join(10)
    return answers


def test_a_poison_input_fails_only_its_own_request() -> None:
    settings = Settings(max_batch_size=8)
    handler = Gated(settings)
    with serving(settings, handler) as client:
        answers = batch_behind_a_busy_model(handler, client, "poison=bad", ["a", "b", "bad", "c"])
        assert [answers[t].text for t in ("a", "b", "c")] == ["a", "b", "c"]
        failed = answers["bad"]
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "model_error"
        assert "ValueError" in failed.json()["error"]["message"]
        assert sorted(handler.seen[2]) == ["a", "b", "bad", "c"]  # they really shared one batch
        assert client.get("/readyz").status_code == 200
        assert client.post("/?poison=bad", content=b"d", headers={"content-type": "image/x"}).text == "d"


@pytest.mark.parametrize("error", [OutOfMemoryError, torch.OutOfMemoryError])
def test_out_of_memory_splits_the_batch_and_everyone_succeeds(error: type[Exception]) -> None:
    settings = Settings(max_batch_size=8)
    handler = Gated(settings)
    handler.oom_error = error
    with serving(settings, handler) as client:
        texts = ["a", "b", "c", "d"]
        answers = batch_behind_a_busy_model(handler, client, "oom=2", texts)
        assert [answers[t].status_code for t in texts] == [200] * 4
        assert [answers[t].text for t in texts] == texts
        assert [len(batch) for batch in handler.seen[2:]] == [4, 2, 2]
        assert client.get("/readyz").status_code == 200


def test_a_model_that_always_fails_answers_500_and_stays_ready() -> None:
    settings = Settings()
    handler = Gated(settings)
    handler.gate.set()
    with serving(settings, handler) as client:
        for _ in range(3):
            response = client.post("/?poison=x", content=b"x", headers={"content-type": "image/x"})
            assert response.status_code == 500 and response.json()["error"]["type"] == "model_error"
        assert client.get("/readyz").status_code == 200
        assert client.post("/", content=b"fine", headers={"content-type": "image/x"}).text == "fine"
        assert client.post("/v1/captions", files=[("file", b"x")], params={"poison": "x"}).status_code == 500


def test_batcher_drops_items_whose_caller_left_before_the_model_runs() -> None:
    gate, seen = threading.Event(), []

    def predict(items, options):
        seen.append(list(items))
        assert gate.wait(10)
        return items

    async def scenario() -> None:
        batcher = Batcher(predict, max_batch_size=8, max_wait=0, max_queue=10)
        batcher.start()
        try:
            (busy,) = batcher.submit(["busy"], ())
            while not seen:
                await asyncio.sleep(0.001)
            timed_out, disconnected, kept = (batcher.submit([name], ())[0] for name in ("t", "d", "k"))
            timed_out.cancel()
            disconnected.cancel()
            assert batcher.depth == 3
            gate.set()
            assert await asyncio.wait_for(asyncio.gather(busy, kept), 10) == ["busy", "k"]
            assert batcher.depth == 0
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    assert seen == [["busy"], ["k"]]


def test_full_queue_sheds_before_decoding() -> None:
    """A request refused for a full queue is refused before its images are prepared."""
    settings = Settings(max_batch_size=1, max_queue=1, max_wait_ms=0)
    handler = Gated(settings)
    prepared: list[bytes] = []
    original = handler.prepare
    handler.prepare = lambda data, options: prepared.append(data) or original(data, options)
    with serving(settings, handler) as client:
        answers = []
        threads = [
            threading.Thread(
                target=lambda t=t: answers.append(
                    client.post("/", content=t, headers={"content-type": "image/x"})
                )
            )
            for t in (b"1", b"2")
        ]
        threads[0].start()
        assert handler.entered.wait(10)
        threads[1].start()
        deadline = time.monotonic() + 10
        while client.app.state.service.batcher.depth < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        refused = client.post("/", content=b"3", headers={"content-type": "image/x"})
        assert refused.status_code == 503
        handler.gate.set()
        for thread in threads:
            thread.join(10)
    assert b"3" not in prepared and sorted(r.text for r in answers) == ["1", "2"]


def test_a_request_of_many_slow_images_leaves_decoding_room_for_others() -> None:
    """One request's images never take every decoding thread: another request's image is prepared
    at once, not after all of them."""
    handler = SlowBig(Settings())
    with serving(Settings(max_images=64), handler) as client:
        threads = os.cpu_count() or 2
        bigs = [base64.b64encode(f"big{i}".encode()).decode() for i in range(2 * threads)]
        heavy = threading.Thread(
            target=client.post, args=("/v1/captions",), kwargs={"json": {"images": bigs}}
        )
        heavy.start()
        deadline = time.monotonic() + 10
        while (
            client.app.state.service.batcher.waiting._incoming.total() == 0
        ):  # the heavy request is decoding
            assert time.monotonic() < deadline
            time.sleep(0.002)
        small = client.post("/", content=b"small", headers={"content-type": "image/x"})
        heavy.join(30)
    assert small.status_code == 200 and small.text == "small"
    assert handler.prepared.index("small") < len(bigs) - threads, handler.prepared


def test_a_handler_raising_systemexit_or_keyboardinterrupt_fails_only_its_request() -> None:
    """Neither may travel from a worker thread to the event loop and stop the server."""
    settings = Settings(max_wait_ms=0)
    with serving(settings, Exiting(settings)) as client:
        for text in ("exit", "interrupt"):
            response = client.post("/", content=text.encode(), headers={"content-type": "image/x"})
            assert response.status_code == 500, response.text
            assert "the handler raised" in response.json()["error"]["message"]
        still = client.post("/", content=b"fine", headers={"content-type": "image/x"})
        assert still.status_code == 200 and still.text == "fine"


def test_a_device_that_fails_for_good_stops_serving() -> None:
    """A fault that poisons a GPU's context fails every later call: the first such failure makes the
    server not ready (503 naming it, on the probes and the routes) and tells its entry point to stop
    (`serve` exits 1, Runpod and Ray replace it); an ordinary model error leaves it ready."""
    settings = Settings(max_wait_ms=0)
    handler = type("Lost", (Misbehaving,), {})(settings)
    with serving(settings, handler) as client:
        stopped: list[bool] = []
        client.app.state.service.on_failed = lambda: stopped.append(True)
        image = {"content-type": "image/x"}
        assert client.post("/?mode=timeout", content=b"a", headers=image).status_code == 500
        assert client.get("/readyz").status_code == 200 and not stopped
        lost = client.post("/?mode=lost", content=b"a", headers=image)
        assert lost.status_code == 500 and "CUDA error" in lost.json()["error"]["message"]
        ready = client.get("/readyz")
        said = "the device failed: RuntimeError: CUDA error: an illegal memory access was encountered"
        assert ready.status_code == 503 and ready.json()["status"] == "failed", ready.text
        assert ready.json()["error"]["message"].startswith(said)
        after = client.post("/", content=b"fine", headers=image)
        assert after.status_code == 503 and after.json()["error"]["message"].startswith(said)
        assert client.get("/ping").status_code == 503 and stopped == [True]


class SlowlyLost(Misbehaving):
    """Mode `lost` fails as a poisoned GPU after half a second on the device; `calls` records each
    model call's mode."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.calls: list[Any] = []

    def predict(self, items: Any, options: Any) -> Any:
        self.calls.append(options)
        if options == "lost":
            time.sleep(0.5)
        return super().predict(items, options)


def test_requests_queued_behind_a_lost_device_are_told_to_try_elsewhere() -> None:
    """What waited behind the failing call gets a 503 (with Retry-After) naming the failure, not the
    device's error, and no model call runs on the dead device."""
    settings = Settings(max_wait_ms=0)
    handler = SlowlyLost(settings)
    image = {"content-type": "image/x"}
    with serving(settings, handler) as client:
        client.app.state.service.on_failed = lambda: None
        with ThreadPoolExecutor(4) as pool:
            lost = pool.submit(client.post, "/?mode=lost", content=b"a", headers=image)
            time.sleep(0.25)  # its call is on the device: these queue behind it
            queued = [pool.submit(client.post, f"/?mode=m{i}", content=b"q", headers=image) for i in range(3)]
            assert lost.result().status_code == 500
            answers = [future.result() for future in queued]
    assert [answer.status_code for answer in answers] == [503] * 3, [a.text for a in answers]
    assert all(
        a.json()["error"]["message"].startswith("the device failed: RuntimeError: CUDA error")
        for a in answers
    )
    assert all(answer.headers["retry-after"] == "5" for answer in answers)
    assert handler.calls[1:] == ["lost"]  # after the warm-up, only the call that failed


class LostInHalves(Echo):
    """Runs out of memory on more than two items; an item `die` fails as a poisoned GPU, and so does
    every call after it."""

    lost = False

    def predict(self, items: Any, options: Any) -> Any:
        self.seen.append(list(items))
        if len(items) > 2 and not self.lost:
            raise self.oom_error(f"CUDA out of memory (batch of {len(items)})")
        if self.lost or "die" in items:
            self.lost = True
            raise RuntimeError(LOST_DEVICE)
        return list(items)


def test_the_other_half_of_a_split_batch_does_not_run_on_a_lost_device() -> None:
    """A batch retried in halves after an out-of-memory error: once its first half loses the device,
    the second half is answered 503 (try elsewhere) without a call on the dead device."""
    settings = Settings(max_wait_ms=400)
    handler = LostInHalves(settings)
    image = {"content-type": "image/x"}
    with serving(settings, handler) as client:
        client.app.state.service.on_failed = lambda: None
        handler.seen.clear()
        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(client.post, "/", content=b"die", headers=image)]
            time.sleep(0.05)  # first in the batch, so in its first half
            answers += [
                pool.submit(client.post, "/", content=text, headers=image) for text in (b"a", b"c", b"d")
            ]
            statuses = sorted(future.result().status_code for future in answers)
    assert len(handler.seen) == 2 and len(handler.seen[0]) == 4, handler.seen  # the batch, its first half
    assert "die" in handler.seen[1] and statuses == [500, 500, 503, 503], statuses


def test_a_client_error_that_quotes_a_cuda_error_leaves_the_server_serving() -> None:
    """A handler's InputError quoting what the client sent is the client's 400, however it reads."""
    settings = Settings(max_wait_ms=0)
    with serving(settings, Misbehaving(settings)) as client:
        image = {"content-type": "image/x"}
        said = client.post("/?mode=quote", content=b"CUDA error: an illegal memory access", headers=image)
        assert said.status_code == 400 and "CUDA error" in said.json()["error"]["message"]
        assert client.get("/readyz").status_code == 200
        assert client.post("/", content=b"fine", headers=image).text == "fine"


def test_an_out_of_memory_error_is_no_lost_device() -> None:
    from docker_vit.calls import device_lost, splittable

    assert device_lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert device_lost(RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"))
    assert not device_lost(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not device_lost(RuntimeError("CUDA error: out of memory"))
    assert not device_lost(RuntimeError("CUDA error: invalid configuration argument"))  # a batch size's
    assert device_lost(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"))
    assert not device_lost(ValueError("this input breaks the model"))
    # a client's words quoted in a handler's error, or the words in another kind of error, are no fault
    assert not device_lost(RuntimeError("cannot read 'CUDA error: an illegal memory access' as an image"))
    assert not device_lost(ValueError("CUDA error: an illegal memory access was encountered"))
    assert not splittable(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert splittable(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))


RESPOND_MISTAKES = ["plain-string", "number-text", "nan-data", "object-data", "text-key", "surrogate"]


def test_a_handler_breaking_the_interface_gets_one_answer_on_every_route() -> None:
    """Its mistakes are a 500 model_error naming them (both routes alike), a missing option field is
    the client's 422, and the server keeps serving."""
    settings = Settings(max_wait_ms=0)
    with serving(settings, Misbehaving(settings)) as client:
        for text in RESPOND_MISTAKES:
            plain = client.post("/", content=text.encode(), headers={"content-type": "image/x"})
            listed = client.post("/v1/captions", files=[("file", text.encode())])
            for response in (plain, listed):
                assert response.status_code == 500, (text, response.text)
                assert response.json()["error"]["type"] == "model_error"
                assert "respond returned" in response.json()["error"]["message"]
        for mode, status, words in [
            ("missing", 422, "KeyError"),
            ("unhashable", 500, "unhashable"),
            ("crash", 500, "options are broken"),
            ("short", 500, "0 outputs for 1 items"),
            ("nothing", 500, "predict returned None, which is not iterable"),
            ("stop", 500, "the handler raised StopIteration"),
            ("timeout", 500, "TimeoutError: the disk was slow"),
            ("unprintable", 500, "the handler raised Unprintable (its message cannot be shown)"),
            ("surrogate", 500, "ValueError: bad byte \\udcff here"),
        ]:
            response = client.post(f"/?mode={mode}", content=b"a", headers={"content-type": "image/x"})
            assert response.status_code == status, (mode, response.text)
            assert words in response.json()["error"]["message"]
        stop = client.post("/", content=b"respond-stop", headers={"content-type": "image/x"})
        assert stop.status_code == 500 and "StopIteration" in stop.json()["error"]["message"]
        mine = client.post("/", content=b"not-yours", headers={"content-type": "image/x"})
        assert mine.status_code == 400 and mine.json()["error"]["type"] == "invalid_request"
        made = client.post("/?mode=generator", content=b"ab", headers={"content-type": "image/x"})
        assert made.status_code == 200 and made.text == "AB"
        assert client.post("/", content=b"fine", headers={"content-type": "image/x"}).text == "fine"


def test_a_client_error_from_respond_or_predict_is_a_4xx_and_no_failure_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From `respond`; from `predict` on a batch of two, which is halved to find the image (said at INFO)."""
    settings = Settings()
    with serving(settings, Misbehaving(settings)) as client, caplog.at_level(logging.INFO):
        refused = client.post("/", content=b"respond-refuses", headers={"content-type": "image/x"})
        two = [("file", ("a", b"a", "image/x")), ("file", ("b", b"b", "image/x"))]
        quoted = client.post("/v1/captions?mode=quote", files=two)
    assert refused.status_code == 400 and "client's mistake" in refused.json()["error"]["message"]
    assert quoted.status_code == 400 and "cannot read" in quoted.json()["error"]["message"]
    assert any("retrying in halves" in record.getMessage() for record in caplog.records)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def _failed_warm_up(handler_class: type) -> str:
    """Why a server of `handler_class` failed to start, as /readyz says once its load has ended."""
    settings = Settings()
    with serving(settings, handler_class(settings), wait=False) as client:
        deadline = time.monotonic() + 10
        while client.app.state.service.state == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return client.get("/readyz").json()["error"]["message"]


def test_a_text_handler_left_with_the_default_example_says_why_it_failed() -> None:
    message = _failed_warm_up(TextOnly)
    assert "UnicodeDecodeError" in message and "overrides it" in message


def test_a_warm_up_failing_elsewhere_than_prepare_gets_no_hint_about_example() -> None:
    message = _failed_warm_up(NeedsAField)
    assert "KeyError" in message and "example() is a PNG" not in message


def test_a_describe_that_fails_is_a_model_error_on_v1_model() -> None:
    settings = Settings()
    with serving(settings, BadDescribe(settings)) as client:
        response = client.get("/v1/model")
        assert response.status_code == 500 and response.json()["error"]["type"] == "model_error"
        assert "describe exits" in response.json()["error"]["message"]
        assert client.get("/readyz").status_code == 200


def test_stopiteration_from_load_fails_the_load_instead_of_hanging_it() -> None:
    settings = Settings()
    with serving(settings, StopInLoad(settings), wait=False) as client:
        deadline = time.monotonic() + 10
        while client.app.state.service.state == "loading":
            assert time.monotonic() < deadline, "the load never ended"
            time.sleep(0.01)
        assert "StopIteration" in client.get("/readyz").json()["error"]["message"]


def test_keyboardinterrupt_is_ctrl_c_only_where_python_raises_it_for_sigint() -> None:
    """On a server's main thread (its own SIGINT handler) a KeyboardInterrupt can only be the handler's."""

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        contained(interrupt)
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        with pytest.raises(RuntimeError, match="^the handler raised KeyboardInterrupt$"):
            contained(interrupt)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_behind_a_proxy_a_cancelled_request_is_a_client_gone_and_its_image_never_runs() -> None:
    """Ray's proxy cancels a replica's request when its client leaves: no 503 "shutting down" is
    logged for it, and its queued image leaves the queue instead of reaching the model."""
    from docker_vit.server import create_app

    settings = Settings(handler="fake_handlers:Echo", max_batch_size=1, max_wait_ms=0)
    app = create_app(settings, proxied=True)
    service = app.state.service

    async def post(text: str, sent: list) -> None:
        scope = {
            "type": "http", "method": "POST", "path": "/", "raw_path": b"/", "query_string": b"delay=1",
            "headers": [(b"content-type", b"image/x"), (b"content-length", str(len(text)).encode())],
            "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("c", 1), "root_path": "",
        }  # fmt: skip
        messages = [{"type": "http.request", "body": text.encode(), "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client stays connected
            return {}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(scope, receive, send)

    async def scenario() -> tuple[list, list]:
        async with app.router.lifespan_context(app):
            assert await service.settled(30)
            slow_sent, gone_sent = [], []
            slow = asyncio.ensure_future(post("slow", slow_sent))
            while ["slow"] not in service.handler.seen:  # the model is busy with it
                await asyncio.sleep(0.01)
            gone = asyncio.ensure_future(post("gone", gone_sent))
            while service.batcher.depth < 1:
                await asyncio.sleep(0.01)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            await slow
            await asyncio.sleep(0.2)  # time for a leaked image to reach the model
            return slow_sent, gone_sent

    slow_sent, gone_sent = asyncio.run(scenario())
    assert slow_sent[0]["status"] == 200 and gone_sent == []
    assert service.handler.items() == ["slow"] and service.batcher.depth == 0
    metrics = service.metrics.render().decode()
    assert (
        'docker_vit_requests_total{route="/",status="499"} 1.0' in metrics and 'status="503"' not in metrics
    )


def test_v1_model_answers_while_a_handler_that_describes_its_model_loads() -> None:
    settings = Settings()
    DescribesItsModel.loaded.clear()
    with serving(settings, DescribesItsModel(settings), wait=False) as client:
        loading = client.get("/v1/model")
        assert loading.status_code == 200 and loading.json()["status"] == "loading"
        assert loading.json()["model"] == "echo" and "weights" not in loading.json()
        DescribesItsModel.loaded.set()
        deadline = time.monotonic() + 30
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ready = client.get("/v1/model").json()
        assert ready["weights"] == "w1" and ready["model"] == "echo"  # added to the base fields


def test_a_handler_object_handed_in_directly_is_checked_too() -> None:
    from fake_handlers import Echo

    from docker_vit.handler import HandlerError
    from docker_vit.server import create_app

    class Numbered(Echo):
        name = 5  # type: ignore[assignment]

    class Lettered(Echo):
        option_names = "top_k"  # type: ignore[assignment]

    for handler in (Numbered, Lettered):
        with pytest.raises(HandlerError, match="must be a"):
            create_app(Settings(), handler(Settings()))


def test_a_load_error_with_a_lone_surrogate_is_still_a_json_answer() -> None:
    from fake_handlers import Echo

    class BadPath(Echo):
        def load(self) -> None:
            raise FileNotFoundError("no weights at /models/caf\udce9")

    settings = Settings()
    with serving(settings, BadPath(settings), wait=False) as client:
        deadline = time.monotonic() + 30
        while (ready := client.get("/readyz")).json().get("status") != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert ready.status_code == 503 and "caf\\udce9" in ready.json()["error"]["message"]


@pytest.mark.parametrize("body", ["json", "raw", "model"])
def test_a_failed_request_lets_go_of_what_it_held_at_once(body: str) -> None:
    """Reference cycles through a failed request's exception kept its frames (uploads, decoded
    pixels) until Python's cycle collector ran, which can be never: the server grew by GBs."""
    settings = Settings(max_images=4)
    handler = Holding(settings)
    with serving(settings, handler) as client:
        gc.collect()
        gc.disable()  # what is still held now is held by references, not by waiting for gc
        logging.disable(logging.ERROR)  # pytest keeps log records, and a record keeps its traceback
        try:
            if body == "json":
                images = [base64.b64encode(data).decode() for data in (b"good", b"bad", b"good", b"x")]
                answer = client.post("/v1/captions", json={"images": images})
            elif body == "raw":
                answer = client.post("/", content=b"bad", headers={"content-type": "image/x"})
            else:
                answer = client.post("/?poison=boom", content=b"boom", headers={"content-type": "image/x"})
            assert answer.status_code == (500 if body == "model" else 400), answer.text
            deadline = time.monotonic() + 5  # the batcher lets go once its loop comes round
            while handler.held and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(handler.held) == 0
        finally:
            gc.enable()
            logging.disable(logging.NOTSET)


def test_a_handler_module_that_exits_on_import_is_a_load_error(tmp_path, monkeypatch) -> None:
    """`raise SystemExit` while importing (or building) a handler ended the command with status 0."""
    (tmp_path / "exits_on_import.py").write_text("raise SystemExit\n")
    (tmp_path / "exits_on_build.py").write_text(
        "from fake_handlers import Echo\nclass A(Echo):\n    def __init__(self, settings):\n        raise SystemExit(0)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(HandlerError, match="cannot import exits_on_import .*SystemExit"):
        load_handler(Settings(handler="exits_on_import:A"))
    with pytest.raises(HandlerError, match="exits_on_build:A: SystemExit"):
        load_handler(Settings(handler="exits_on_build:A"))


def test_a_handler_missing_a_method_is_refused_at_load_naming_it() -> None:
    with pytest.raises(HandlerError, match=r"OnlyPredicts does not implement prepare\(\)"):
        check_attributes(OnlyPredicts(Settings()))
    check_attributes(PreparesInInit(Settings()))


def test_a_handler_class_is_checked_as_far_as_a_class_can_be() -> None:
    """Ray's builder has only the class: a method its own `__init__` may set is not called missing."""
    with pytest.raises(HandlerError, match=r"OnlyPredicts does not implement prepare\(\)"):
        check_methods(OnlyPredicts)
    check_methods(PreparesInInit)


@pytest.mark.parametrize("status", [200, 302, 500, 999, "413", None])
def test_an_input_error_with_a_status_outside_4xx_is_still_the_clients_400(status: object) -> None:
    """A handler's own InputError subclass says the client erred: never a 200, a 5xx or a 999."""
    from docker_vit import errors
    from docker_vit.images import TooLarge

    class Odd(TooLarge):
        pass

    Odd.status = status  # type: ignore[assignment]
    answer = errors.from_service(Odd("no cats please"))
    assert (answer.status, answer.type, answer.message) == (400, "invalid_request", "no cats please")
    Odd.status, Odd.type = 429, ""  # type: ignore[assignment]
    assert errors.from_service(Odd("slow down")).status == 429  # a 4xx of its choice stands


def test_a_bare_client_error_raised_by_a_handler_keeps_its_status() -> None:
    """`raise TooLarge` with no message, as a handler may write it (InputError and OptionsError
    take none either), is the client's 413, not a TypeError's 500."""
    from docker_vit.handler import Handler, TooLarge

    class Refuses(Handler):
        def example(self) -> bytes:
            return b"ok"

        def prepare(self, data: bytes, options: object) -> bytes:
            if data == b"big":
                raise TooLarge
            return data

        def predict(self, items: list, options: object) -> list:
            return [item.decode() for item in items]

    with serving(Settings(), Refuses(Settings())) as client:
        answer = client.post("/v1/captions", files={"file": ("big.txt", b"big")})
    assert answer.status_code == 413
    assert answer.json()["error"] == {"type": "payload_too_large", "message": "the input is too large"}


def test_an_input_error_of_its_own_status_gets_that_status_type() -> None:
    """A subclass that sets only `status = 404` is a "not_found", not its base's "invalid_request";
    a `type` set beside its status, or on the instance, stands."""
    from docker_vit import errors
    from docker_vit.handler import InputError

    class Missing(InputError):
        status = 404

    class Refused(InputError):
        status, type = 403, "no_cats"

    class Stricter(Refused):
        pass

    assert (errors.from_service(Missing("no such album")).status, errors.from_service(Missing("x")).type) == (
        404,
        "not_found",
    )
    assert errors.from_service(Refused("x")).type == errors.from_service(Stricter("x")).type == "no_cats"

    class Conflict(InputError):
        status = 409

    class Unnamed(InputError):
        status = 460

    assert (errors.from_service(Conflict("x")).type, errors.from_service(Unnamed("x")).type) == (
        "conflict",
        "invalid_request",
    )
    odd = InputError("x")
    odd.status = 422  # type: ignore[misc]
    assert errors.from_service(odd).type == "invalid_parameters"
    odd.type = "mine"  # type: ignore[misc]
    assert errors.from_service(odd).type == "mine"


@pytest.mark.parametrize(
    ("outputs", "words"),
    [
        (lambda items: itertools.repeat("x"), "predict returned more than 2 outputs for 2 items"),
        (lambda items: iter(["x"]), "predict returned 1 outputs for 2 items"),
        (lambda items: ["x"] * 5, "predict returned 5 outputs for 2 items"),
        (lambda items: _LengthExits(["x"]), "predict returned 1 outputs for 2 items"),
        (lambda items: _IterExits(), "the handler raised SystemExit: 3"),
        (lambda items: np.zeros(5), "predict returned 5 outputs for 2 items"),
    ],
)
def test_a_predict_of_endless_outputs_fails_its_call(outputs: Any, words: str) -> None:
    """An endless iterator would fill the device thread's memory and never end: one output past the
    count is enough to say what is wrong."""
    handler = SimpleNamespace(predict=lambda items, options: outputs(items))
    with pytest.raises(Exception, match=words) as raised:
        predict_all(handler, ["a", "b"], ())
    assert isinstance(raised.value, HandlerBug | RuntimeError)  # an error of the call, not an exit


class _LengthExits:
    """A handler's sequence whose `__len__` is broken: the count is taken by iterating it."""

    def __init__(self, values: list) -> None:
        self.values = values

    def __iter__(self) -> Any:
        return iter(self.values)

    def __len__(self) -> int:
        raise SystemExit(3)


class _IterExits:
    """A handler's sequence whose `__iter__` is broken: an error of the call, never the process's exit."""

    def __iter__(self) -> Any:
        raise SystemExit(3)


def test_v1_model_options_are_the_handlers_option_names_whatever_describe_says() -> None:
    """`caption --url` sends only the fields `/v1/model` lists: a describe() must not change them."""
    settings = Settings()
    with serving(settings, DescribesOptions(settings)) as client:
        info = client.get("/v1/model").json()
    assert info["options"] == ["delay"] and info["handler"] == "mine"


def test_v1_model_options_stay_while_a_describe_that_needs_the_model_fails() -> None:
    """While loading, a failing describe() gives way to the base: the option_names are still listed."""
    from docker_vit import frontend

    class Loading(DescribesOptions):
        def describe(self) -> dict[str, Any]:
            raise AttributeError("set by load")

    settings = Settings()
    service = type("S", (), {"handler": Loading(settings), "state": "loading", "settings": settings})()
    service.batch_size, service.status = 1, "loading"
    info = asyncio.run(frontend.model_info(service))
    assert info["options"] == ["delay"]
