"""Every limit answers its own status; API keys guard the captioning routes and never reach the logs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import threading
import time

import pytest
from conftest import serving
from fake_handlers import Echo, Gated, Pictures
from PIL import Image

from docker_vit.config import Settings
from docker_vit.logs import JsonFormatter
from docker_vit.server import create_app

KEY, OTHER = "s3cret-key-one", "another-key-2"
JSON = {"content-type": "application/json"}


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_error(response, status: int, type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (type is None or error["type"] == type), error
    return error


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


def test_bytes_pixels_and_images_limits_are_413() -> None:
    settings = Settings(max_bytes=2_000, max_pixels=40 * 40, max_images=2)
    with serving(settings, Pictures(settings)) as client:
        assert client.post("/", files={"file": png((40, 40))}).text == "40x40"
        assert_error(client.post("/", files={"file": png((41, 40))}), 413, "payload_too_large")
        noise = Image.frombytes("RGB", (30, 30), bytes(range(256)) * 11)
        buffer = io.BytesIO()
        noise.save(buffer, format="BMP")
        assert_error(client.post("/", files={"file": buffer.getvalue()}), 413, "payload_too_large")
        assert_error(client.post("/v1/captions", files=[("file", png())] * 3), 413, "payload_too_large")
        assert client.post("/v1/captions", files=[("file", png())] * 2).status_code == 200


def test_a_file_part_past_max_bytes_is_refused_unread(monkeypatch) -> None:
    """Starlette spools a part past 1 MiB to disk and counts its size: one past the limit is a 413
    without its bytes ever read into memory (the limit is per image, the body's is 21 times that)."""
    from starlette.datastructures import UploadFile

    read = []
    real = UploadFile.read

    async def counted(self, size: int = -1) -> bytes:
        read.append(self.size)
        return await real(self, size)

    monkeypatch.setattr(UploadFile, "read", counted)
    settings = Settings(max_bytes=2_000_000, max_images=4)
    with serving(settings, Pictures(settings)) as client:
        big = png() + bytes(3_000_000)
        for route in ("/", "/v1/captions"):
            error = assert_error(client.post(route, files={"file": big}), 413, "payload_too_large")
            assert error["message"] == f"an image is {len(big)} bytes; the limit is 2000000"
            answer = client.post(route, files=[("file", png()), ("file", big)])
            assert answer.status_code == (200 if route == "/" else 413)  # the original reads the first
        assert max(read) < 2_000_000


def test_a_part_header_past_the_multipart_parsers_bound_is_413() -> None:
    """A well-formed request over a bound: its own status, not "malformed" (a 4,000-character file
    name passes; python-multipart stops a part's header near 4 KiB, and at 8 headers)."""
    settings = Settings()
    with serving(settings, Pictures(settings)) as client:
        assert client.post("/", files={"file": ("a" * 4000 + ".png", png())}).text == "16x16"
        error = assert_error(
            client.post("/", files={"file": ("a" * 8000 + ".png", png())}), 413, "payload_too_large"
        )
        assert error["message"].startswith("a multipart part's headers are over the parser's bound: Maximum")
        extra = "".join(f"X-{n}: {n}\r\n" for n in range(9)).encode()
        body = b"--b\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n" + extra
        body += b"\r\n" + png() + b"\r\n--b--\r\n"
        many = client.post("/", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
        assert assert_error(many, 413)["message"].endswith("Maximum header count exceeded")


@pytest.mark.parametrize(
    ("raised", "status", "said"),
    [
        ("Maximum header size exceeded", 413, "headers are over the parser's bound: Maximum header size"),
        ("Did not find boundary character", 400, "malformed multipart body: Invalid multipart data."),
    ],
)
def test_the_multipart_parsers_own_error_is_a_4xx(monkeypatch, raised: str, status: int, said: str) -> None:
    """Starlette before 1.7 lets python-multipart's error through, unwrapped: a 4xx all the same."""
    from python_multipart.exceptions import MultipartParseError
    from starlette.requests import Request

    async def form(self, **limits) -> None:
        raise MultipartParseError(raised)

    monkeypatch.setattr(Request, "form", form)
    settings = Settings()
    with serving(settings, Pictures(settings)) as client:
        assert said in assert_error(client.post("/", files={"file": png()}), status)["message"]


def test_form_fields_past_starlettes_bounds_are_413() -> None:
    """Options are small: a non-file field past 1 MiB, or more than 64 of them, is too much, not malformed."""
    settings = Settings()
    with serving(settings, Pictures(settings)) as client:
        big_field = {"num_beams": "1" * (1024 * 1024 + 1)}  # a form field past Starlette's 1 MiB
        assert (
            "over 1 MiB"
            in assert_error(client.post("/", files={"file": png()}, data=big_field), 413)["message"]
        )
        many = {f"field{i}": "1" for i in range(65)}
        assert (
            "64 form fields"
            in assert_error(client.post("/", files={"file": png()}, data=many), 413)["message"]
        )
        assert (
            client.post("/", files={"file": png((40, 40))}, data=dict(list(many.items())[:64])).status_code
            == 200
        )


def test_a_full_disk_under_a_multipart_upload_is_503_to_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starlette keeps a file part past 1 MiB in a temporary file: a disk with no room is no 500."""
    from starlette.datastructures import UploadFile

    async def full(self, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    settings = Settings()
    with serving(settings, Pictures(settings)) as client:
        assert client.post("/", files={"file": png()}).text == "16x16"
        monkeypatch.setattr(UploadFile, "write", full)
        for route in ("/", "/v1/captions"):
            answer = client.post(route, files={"file": png()})
            error = assert_error(answer, 503, "overloaded")
            assert "No space left on device" in error["message"] and answer.headers["retry-after"] == "5"
        monkeypatch.undo()
        assert client.post("/", files={"file": png()}).text == "16x16"  # the server goes on


def test_declared_and_streamed_bodies_over_the_limit_are_413_and_close() -> None:
    settings = Settings(max_bytes=1_000, max_images=1)  # body limit: 1_000 * 4 // 3 + 1_000_000
    with serving(settings, Echo(settings)) as client:
        response = client.post("/", content=b"x" * 1_400_000, headers={"content-type": "image/png"})
        assert_error(response, 413)
        assert response.headers["connection"] == "close"


def test_post_root_reads_one_images_worth_of_body_not_a_whole_requests() -> None:
    """`POST /` captions one image: more files than that were parsed and spooled for nothing, up to the
    body limit of 16 images (427 MB by default). Its body holds one image's room, as a 413."""
    settings = Settings(max_bytes=600_000, max_images=4)  # `/`: 1_800_000 bytes; `/v1/captions`: 4_200_000
    with serving(settings, Echo(settings)) as client:
        files = [("file", ("a", b"a" * 500_000, "image/x")), ("file", ("b", b"b" * 500_000, "image/x"))]
        assert client.post("/", files=files).text == "a" * 500_000  # two files: the first, as before
        four = files + [
            ("file", ("c", b"c" * 500_000, "image/x")),
            ("file", ("d", b"d" * 500_000, "image/x")),
        ]
        assert "exceeds 1800000 bytes" in assert_error(client.post("/", files=four), 413)["message"]
        assert len(client.post("/v1/captions", files=four).json()["captions"]) == 4


def test_a_body_declared_too_large_meets_the_key_check_first_and_counts_for_its_route() -> None:
    settings = Settings(max_bytes=1_000, max_images=1, api_keys=("k" * 20,))
    with serving(settings, Echo(settings)) as client:
        big = b'{"images": ["' + b"A" * 1_400_000 + b'"]}'
        assert_error(client.post("/v1/captions", content=big, headers=JSON), 401)
        keyed = {**JSON, "authorization": "Bearer " + "k" * 20}
        refused = client.post("/v1/captions", content=big, headers=keyed)
        assert_error(refused, 413) and refused.headers["connection"] == "close"
        metrics = client.get("/metrics").text
        assert 'docker_vit_requests_total{route="/v1/captions",status="413"} 1.0' in metrics
        unread = client.request("GET", "/healthz", content=big)  # a route that reads no body
        assert unread.status_code == 200 and unread.headers["connection"] == "close"
        assert refused.headers.get_list("connection") == ["close"]


def test_a_raw_image_body_is_refused_once_past_the_image_limit_not_the_body_limit() -> None:
    settings = Settings(max_bytes=1_000, max_images=4)
    with serving(settings, Echo(settings)) as client:
        declared = client.post("/", content=b"x" * 1_001, headers={"content-type": "image/png"})
        assert "1001 bytes; the limit is 1000" in assert_error(declared, 413, "payload_too_large")["message"]
        streamed = client.post(
            "/", content=iter([b"x" * 600, b"x" * 600]), headers={"content-type": "image/png"}
        )
        assert "over 1000 bytes" in assert_error(streamed, 413, "payload_too_large")["message"]
        fits = client.post(
            "/v1/captions", content=iter([b"x" * 500, b"y" * 500]), headers={"content-type": "image/x"}
        )
        assert fits.json()["captions"] == [{"text": "x" * 500 + "y" * 500}]


def test_json_bodies_are_counted_before_they_are_parsed_or_decoded() -> None:
    settings = Settings(max_images=2)
    with serving(settings, Echo(settings)) as client:
        tiny_values = b'{"images": [' + b"[]," * 200_000 + b"[]]}"
        error = assert_error(client.post("/v1/captions", content=tiny_values, headers=JSON), 413)
        assert "more than 10000 values" in error["message"]
        one = base64.b64encode(b"hi").decode()
        prompt = {"images": [one], "prompt": ", ".join(["thing"] * 500), "labels": list(range(500))}
        assert client.post("/v1/captions", json=prompt).json()["captions"] == [{"text": "hi"}]
        digits = b'{"images": ["' + one.encode() + b'"], "x": [' + b"9" * 4000 + b"]}"
        answer = client.post("/v1/captions", content=digits, headers=JSON)
        assert "more than 100 digits" in assert_error(answer, 422)["message"]
        not_base64 = {"images": ["%%"] * 3}  # too many images: said before any is decoded
        assert "3 images" in assert_error(client.post("/v1/captions", json=not_base64), 413)["message"]
        url = {"images": ["data:image/png;base64," + base64.b64encode(b"hi").decode()], "num_beams": 1}
        assert client.post("/v1/captions", json=url).json()["captions"] == [{"text": "hi"}]
        no_data = assert_error(client.post("/v1/captions", json={"images": ["data:image/jpeg"]}), 400)
        assert "data URL without data" in no_data["message"]


def test_full_queue_is_503_with_retry_after() -> None:
    settings = Settings(max_batch_size=1, max_queue=2, max_wait_ms=0)
    handler = Gated(settings)
    with serving(settings, handler) as client:
        answers: list = []

        def post(text: str) -> None:
            answers.append(client.post("/", content=text.encode(), headers={"content-type": "image/x"}))

        threads = [threading.Thread(target=post, args=(f"item{i}",)) for i in range(3)]
        threads[0].start()
        assert handler.entered.wait(10)  # item0 is in the model, the queue is empty
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: client.app.state.service.batcher.depth == 2)
        full = client.post("/", content=b"one too many", headers={"content-type": "image/x"})
        assert_error(full, 503, "overloaded")
        assert full.headers["retry-after"] == "1"
        handler.gate.set()
        for thread in threads:
            thread.join(10)
        assert sorted(r.text for r in answers) == ["item0", "item1", "item2"]
        assert client.get("/readyz").status_code == 200


def test_more_images_than_the_queue_holds_is_413_not_503() -> None:
    """A 503 says "retry later"; a request larger than the whole queue could never get in."""
    settings = Settings(max_queue=2, max_images=4)
    with serving(settings, Echo(settings)) as client:
        files = [("file", (f"{i}.png", b"x", "image/png")) for i in range(3)]
        assert_error(client.post("/v1/captions", files=files), 413, "payload_too_large")
        assert client.post("/v1/captions", files=files[:2]).status_code == 200


def model_held_by(client, handler: Gated, body: bytes) -> threading.Thread:
    """A request whose model call waits for `handler.gate`, posted from a thread; returns once it runs."""
    first = threading.Thread(
        target=client.post, args=("/",), kwargs={"content": body, "headers": {"content-type": "image/x"}}
    )
    first.start()
    assert handler.entered.wait(10)
    return first


def test_request_timeout_is_504_and_the_abandoned_item_never_runs() -> None:
    settings = Settings(max_batch_size=1, max_wait_ms=0, request_timeout=0.3)
    handler = Gated(settings)
    with serving(settings, handler) as client:
        first = model_held_by(client, handler, b"A")
        late = client.post("/", content=b"B", headers={"content-type": "image/x"})
        assert_error(late, 504, "timeout")
        handler.gate.set()
        first.join(10)
        assert client.post("/", content=b"C", headers={"content-type": "image/x"}).text == "C"
        assert handler.items() == ["A", "C"]  # B's caller was gone: the model never saw it


def test_a_model_call_past_the_request_timeout_turns_the_probes_away_until_it_ends() -> None:
    """A hung handler makes every request behind it 504: /readyz and /ping must say so, so a load
    balancer (or a container's health check) stops sending traffic there."""
    settings = Settings(max_batch_size=1, max_wait_ms=0, request_timeout=2.5)  # room for a loaded CI machine
    handler = Gated(settings)
    with serving(settings, handler) as client:
        first = model_held_by(client, handler, b"A")
        assert client.get("/readyz").status_code == 200  # a call within the timeout is just busy
        wait_for(lambda: client.get("/readyz").status_code == 503)
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "5"
        assert ready.json()["status"] == "stalled"
        assert "past the request timeout" in ready.json()["error"]["message"]
        ping = client.get("/ping")
        assert_error(ping, 503, "unavailable") and ping.headers["retry-after"] == "5"
        assert client.get("/v1/model").json()["status"] == "stalled"  # one story for every reader
        assert client.get("/healthz").status_code == 200  # the process itself is alive
        handler.gate.set()
        first.join(10)  # its caller had its 504 long ago: the call itself ends a moment after the gate
        wait_for(lambda: client.get("/readyz").status_code == 200)
        assert client.get("/readyz").json() == {"status": "ready"}
        assert client.get("/v1/model").json()["status"] == "ready"
        assert client.get("/ping").status_code == 200


class Dawdling(Echo):
    """Its `example()` (the warm-up input) and `describe()` each wait for their gate."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.examples, self.descriptions = threading.Event(), threading.Event()
        self.in_example, self.in_describe = threading.Event(), threading.Event()
        self.finished: list[str] = []

    def example(self) -> bytes:
        self.in_example.set()
        self.examples.wait(10)
        self.finished.append("example")
        return super().example()

    def describe(self) -> dict:
        self.in_describe.set()
        self.descriptions.wait(10)
        self.finished.append("describe")
        return {"described": True}


def test_a_slow_example_or_describe_leaves_the_probes_answering() -> None:
    """Both ran on the event loop: a slow one held every route, the probes too, for its whole run."""
    handler = Dawdling(Settings())
    with serving(Settings(), handler, wait=False) as client:
        assert handler.in_example.wait(10)
        assert client.get("/ping").status_code == 204  # loading: warm-up still waits for example()
        assert handler.finished == []
        handler.examples.set()
        wait_for(lambda: client.get("/readyz").status_code == 200)
        described = threading.Thread(target=client.get, args=("/v1/model",))
        described.start()
        assert handler.in_describe.wait(10)
        assert client.get("/healthz").status_code == 200 and handler.finished == ["example"]
        handler.descriptions.set()
        described.join(10)
        assert client.get("/v1/model").json()["described"] is True


def test_body_that_stops_arriving_is_408() -> None:
    """TestClient sends bodies whole, so the stalled upload is an ASGI conversation held by hand."""
    settings = Settings(read_timeout=0.2)
    app = create_app(settings, Echo(settings))
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": b"half an ima", "more_body": True}]

    async def receive() -> dict:
        if chunks:
            return chunks.pop()
        await asyncio.sleep(3600)  # the client stalls
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [(b"content-type", b"image/png"), (b"content-length", b"1000")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
        "root_path": "",
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 5))
    start = sent[0]
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    assert json.loads(sent[1]["body"])["error"]["type"] == "request_timeout"


@pytest.mark.parametrize("source", ["flag", "env"])
def test_api_keys_guard_captioning_routes_only(source: str) -> None:
    if source == "flag":
        settings = Settings(api_keys=(KEY, OTHER))
    else:
        settings = Settings.load({"DOCKER_VIT_API_KEYS": f"{KEY}, {OTHER}"})
    assert settings.api_keys == (KEY, OTHER)
    with serving(settings, Echo(settings)) as client:
        body = {"content": b"hi", "headers": {"content-type": "image/x"}}
        for headers in (
            {},
            {"authorization": "Bearer wrong"},
            {"authorization": KEY},
            {"authorization": "Bearer"},
        ):
            for route in ("/", "/v1/captions"):
                response = client.post(route, files={"file": b"hi"}, headers=headers)
                assert_error(response, 401, "unauthorized")
                assert response.headers["www-authenticate"] == "Bearer"
        for key in (KEY, OTHER):
            auth = {"authorization": f"Bearer {key}"}
            assert client.post("/", content=b"hi", headers={**body["headers"], **auth}).text == "hi"
            answer = client.post(
                "/v1/captions", files={"file": b"hi"}, headers={"authorization": f"bearer {key}"}
            )
            assert answer.json()["captions"] == [{"text": "hi"}]
        for probe in ("/healthz", "/readyz", "/ping", "/metrics"):
            assert client.get(probe).status_code == 200, probe


def test_no_keys_means_open() -> None:
    settings = Settings.load({"DOCKER_VIT_API_KEYS": ""})
    with serving(settings, Echo(settings)) as client:
        assert client.post("/", content=b"open", headers={"content-type": "image/x"}).text == "open"


def test_the_docs_pages_count_under_their_own_routes() -> None:
    """FastAPI's /docs and /openapi.json are Starlette routes: no "route" in scope, but not 404s."""
    settings = Settings()
    with serving(settings, Echo(settings)) as client:
        assert client.get("/docs").status_code == client.get("/openapi.json").status_code == 200
        assert client.get("/nope").status_code == 404
        text = client.get("/metrics").text
    assert 'docker_vit_requests_total{route="/docs",status="200"} 1.0' in text
    assert 'docker_vit_requests_total{route="/openapi.json",status="200"} 1.0' in text
    assert 'docker_vit_requests_total{route="unmatched",status="404"} 1.0' in text
    assert 'route="unmatched",status="200"' not in text


def test_behind_a_route_prefix_the_docs_pages_keep_their_labels() -> None:
    """Ray's `--route-prefix` reaches the app as `root_path`, which Starlette keeps in `path`."""
    from fastapi.testclient import TestClient

    from docker_vit.server import create_app

    settings = Settings()
    with TestClient(create_app(settings, Echo(settings)), root_path="/cap") as client:
        assert client.get("/cap/openapi.json").status_code == 200
        text = client.get("/cap/metrics").text
    assert 'docker_vit_requests_total{route="/openapi.json",status="200"} 1.0' in text


def test_keys_never_reach_the_logs_and_the_access_line_has_its_fields(caplog) -> None:
    settings = Settings(api_keys=(KEY,))
    caplog.set_level(logging.DEBUG)
    with serving(settings, Echo(settings)) as client:
        client.post("/", content=b"x", headers={"content-type": "image/x", "authorization": f"Bearer {KEY}"})
        client.post("/", content=b"x", headers={"content-type": "image/x", "authorization": f"Bearer {KEY}x"})
        client.post("/", content=b"x", headers={"content-type": "image/x", "authorization": KEY})
        client.get("/nope", headers={"authorization": f"Bearer {KEY}"})
        client.post(
            "/v1/captions",
            files=[("file", b"a"), ("file", b"b")],
            headers={"authorization": f"Bearer {KEY}", "x-request-id": "trace-42"},
        )
    text, as_json = logging.Formatter("%(levelname)s %(name)s %(message)s"), JsonFormatter()
    lines = [text.format(r) for r in caplog.records] + [as_json.format(r) for r in caplog.records]
    assert lines and not [line for line in lines if KEY in line]
    access = [json.loads(as_json.format(r)) for r in caplog.records if r.name == "docker_vit.access"]
    access = [entry for entry in access if entry["route"] != "/readyz"]  # serving() polls it
    assert [entry["status"] for entry in access] == [200, 401, 401, 404, 200]
    last = access[-1]
    assert {k: last[k] for k in ("method", "route", "status", "images", "request_id")} == {
        "method": "POST",
        "route": "/v1/captions",
        "status": 200,
        "images": 2,
        "request_id": "trace-42",
    }
    assert (
        last["duration_ms"] >= 0
        and last["level"] == "info"
        and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", last["time"])
    )
    assert access[3]["route"] == "unmatched"
    plain = [r.getMessage() for r in caplog.records if r.name == "docker_vit.access"]
    assert plain[-1].startswith("method=POST route=/v1/captions status=200 duration_ms=")
    assert plain[-1].endswith("images=2 request_id=trace-42")


def test_request_id_is_echoed_made_or_replaced_when_unsafe() -> None:
    settings = Settings()
    with serving(settings, Echo(settings)) as client:
        echoed = client.post(
            "/", content=b"x", headers={"content-type": "image/x", "x-request-id": "r-1.2:3"}
        )
        assert echoed.headers["x-request-id"] == "r-1.2:3"
        base64_id = client.get("/healthz", headers={"x-request-id": "ab+c/d=="}).headers["x-request-id"]
        assert base64_id == "ab+c/d=="
        assert client.post("/").headers["x-request-id"]  # errors carry one too
        unsafe = client.get("/healthz", headers={"x-request-id": "bad id\twith spaces"}).headers[
            "x-request-id"
        ]
        assert len(unsafe) == 32 and " " not in unsafe
        assert len(client.get("/healthz", headers={"x-request-id": "x" * 500}).headers["x-request-id"]) == 32


def test_an_unhandled_errors_answer_carries_the_request_id_too() -> None:
    """Starlette sends it from outside the request-id middleware; a route of the app's own breaks here."""
    from fastapi.testclient import TestClient

    settings = Settings()
    app = create_app(settings, Echo(settings))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/boom", headers={"x-request-id": "trace-7"})
    assert answer.status_code == 500 and answer.json()["error"]["message"] == "internal error: RuntimeError"
    assert answer.headers["x-request-id"] == "trace-7"


def test_metrics_count_routes_statuses_batches_and_images() -> None:
    settings = Settings()
    with serving(settings, Echo(settings)) as client:
        client.post("/v1/captions", files=[("file", b"a"), ("file", b"b")])
        client.post("/")
        metrics = client.get("/metrics").text
    assert 'docker_vit_requests_total{route="/v1/captions",status="200"} 1.0' in metrics
    assert 'docker_vit_requests_total{route="/",status="400"} 1.0' in metrics
    assert "docker_vit_images_total 2.0" in metrics  # the clients' images: not the warm-up's
    assert 'docker_vit_request_seconds_count{route="/v1/captions"} 1.0' in metrics
    assert "docker_vit_batch_size_count 1.0" in metrics and "docker_vit_batch_size_sum 2.0" in metrics
    assert "docker_vit_model_seconds_count 1.0" in metrics and "docker_vit_queue_seconds_count 2.0" in metrics
    assert "docker_vit_queue_depth 0.0" in metrics
    assert "docker_vit_model_load_seconds" in metrics


@pytest.mark.parametrize("keys", [("",), ("good", "  ")])
def test_an_empty_api_key_is_refused_at_startup(keys: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="API key"):
        Settings(api_keys=keys)


@pytest.mark.parametrize("key", ["clé", " padded", "trailing ", "tab\tkey", "line\n"])
def test_a_key_http_cannot_carry_as_sent_is_refused_at_startup(key: str) -> None:
    """Headers arrive as Latin-1: a UTF-8 key would never match, and the header's own spaces at either
    end are not part of it."""
    with pytest.raises(ValueError, match="printable ASCII"):
        Settings(api_keys=("good", key))
    with pytest.raises(ValueError, match="printable ASCII"):
        Settings(api_key=key, url="http://127.0.0.1:9")
    assert Settings(api_key=key).api_key == key  # the client's key matters only with --url


def test_a_key_with_spaces_inside_works() -> None:
    settings = Settings(api_keys=("my secret",))
    with serving(settings, Echo(settings)) as client:
        headers = {"authorization": "Bearer my secret", "content-type": "image/x"}
        assert client.post("/", content=b"hi", headers=headers).text == "hi"


def test_library_warnings_print_once_through_the_configured_format(capsys: pytest.CaptureFixture) -> None:
    """huggingface_hub and transformers bring handlers of their own: a Hub warning came out twice."""
    import huggingface_hub  # noqa: F401 -- importing it installs its handler
    import transformers  # noqa: F401

    from docker_vit import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("json")
        logs.adopt_library_loggers()
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s")
        logging.getLogger("transformers.modeling_utils").warning("a loading remark")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["Retrying in 1s", "a loading remark"]


def test_a_server_with_only_the_clients_key_variable_set_is_warned_open() -> None:
    """`serve` and every Ray replica log it: the server reads DOCKER_VIT_API_KEYS, plural."""
    from docker_vit.environment import open_by_mistake

    env = {"DOCKER_VIT_API_KEY": "secret"}
    assert "DOCKER_VIT_API_KEYS: it is open to anyone" in (open_by_mistake(Settings(), env) or "")
    assert open_by_mistake(Settings(api_keys=("secret",)), env) is None
    assert open_by_mistake(Settings(), {}) is None
    assert open_by_mistake(Settings(), {"DOCKER_VIT_API_KEY": ""}) is None


def test_serve_says_it_is_open_by_mistake_and_the_app_reads_no_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The entry point that loaded the settings warns (`serve`, each Ray replica); the app is handed
    its settings whole and never reads a variable itself."""
    from docker_vit import cli, logs
    from docker_vit.environment import server_warnings

    monkeypatch.setenv("DOCKER_VIT_API_KEY", "secret")
    monkeypatch.setenv("DOCKER_VIT_APIKEYS", "k")
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)  # the test's own logging stays
    with caplog.at_level(logging.WARNING, logger="docker_vit"):
        create_app(Settings(), Echo(Settings()))
        assert caplog.records == []
        cli._server(Settings(handler="fake_handlers:Echo"))
    said = [record.getMessage() for record in caplog.records]
    assert said == server_warnings(Settings()) and len(said) == 2
    assert "it is open to anyone" in said[0] and "did you mean DOCKER_VIT_API_KEYS?" in said[1]


def test_a_misspelt_variable_is_named_with_the_setting_it_resembles() -> None:
    """`DOCKER_VIT_APIKEYS` would leave a server open without a word: every entry point says it."""
    from docker_vit.config import env_name, options
    from docker_vit.environment import ignored_variables

    env = {"DOCKER_VIT_APIKEYS": "k", "DOCKER_VIT_PORT": "9", "DOCKER_VIT_ZZZ": "", "OTHER_PORT": "1"}
    assert ignored_variables(env) == [
        "DOCKER_VIT_APIKEYS is not a Docker-ViT setting and is ignored (did you mean DOCKER_VIT_API_KEYS?)",
        "DOCKER_VIT_ZZZ is not a Docker-ViT setting and is ignored",
    ]
    assert ignored_variables({name: "1" for name in map(env_name, options())}) == []


def test_a_servers_misspelt_key_variable_is_pointed_at_its_own_setting() -> None:
    """Pointed at `caption`'s `DOCKER_VIT_API_KEY`, a server's operator would leave it open again; a
    name in lower case is read by no command, so it is said too."""
    from docker_vit.config import SERVING
    from docker_vit.environment import ignored_variables

    env = {"DOCKER_VIT_APIKEY": "k", "docker_vit_api_keys": "k", "DOCKER_VIT_KEY": "k"}
    assert ignored_variables(env, names=SERVING) == [
        "DOCKER_VIT_APIKEY is not a Docker-ViT setting and is ignored (did you mean DOCKER_VIT_API_KEYS?)",
        "DOCKER_VIT_KEY is not a Docker-ViT setting and is ignored",
        "docker_vit_api_keys is not a Docker-ViT setting and is ignored (did you mean DOCKER_VIT_API_KEYS?)",
    ]


def test_kubernetes_service_links_set_nothing_and_stop_nothing() -> None:
    """Every pod gets variables for each Service of its namespace: one named docker-vit gives
    DOCKER_VIT_PORT=tcp://IP:PORT, which stopped `serve` as a port that is not a number."""
    from docker_vit.config import SERVING, Settings
    from docker_vit.environment import ignored_variables

    env = {
        "DOCKER_VIT_PORT": "tcp://10.0.0.11:8000",
        "DOCKER_VIT_SERVICE_HOST": "10.0.0.11",
        "DOCKER_VIT_SERVICE_PORT": "8000",
        "DOCKER_VIT_SERVICE_PORT_HTTP": "8000",
        "DOCKER_VIT_PORT_8000_TCP": "tcp://10.0.0.11:8000",
        "DOCKER_VIT_PORT_8000_TCP_PROTO": "tcp",
        "DOCKER_VIT_PORT_8000_TCP_PORT": "8000",
        "DOCKER_VIT_PORT_8000_TCP_ADDR": "10.0.0.11",
        "DOCKER_VIT_MAX_BATCH": "8",  # a real mistake among them is still said
    }
    assert Settings.load(env, SERVING).port == 8000
    assert Settings.load({**env, "DOCKER_VIT_PORT": "9000"}, SERVING).port == 9000
    assert ignored_variables(env, names=SERVING) == [
        "DOCKER_VIT_PORT='tcp://10.0.0.11:8000' is a Kubernetes service link (of a Service named "
        "docker-vit), not a setting, and is ignored",
        "DOCKER_VIT_MAX_BATCH is not a Docker-ViT setting and is ignored (did you mean DOCKER_VIT_MAX_BATCH_SIZE?)",
    ]
    kuberay = {  # a pod beside KubeRay's docker-vit-head-svc, and no Service named docker-vit
        "DOCKER_VIT_HEAD_SVC_SERVICE_HOST": "10.0.0.12",
        "DOCKER_VIT_HEAD_SVC_SERVICE_PORT": "6379",
        "DOCKER_VIT_HEAD_SVC_SERVICE_PORT_GCS": "6379",
        "DOCKER_VIT_HEAD_SVC_PORT": "tcp://10.0.0.12:6379",
        "DOCKER_VIT_HEAD_SVC_PORT_6379_TCP_ADDR": "10.0.0.12",
    }
    assert ignored_variables(kuberay, names=SERVING) == []
    guess = "DOCKER_VIT_SERVICE_PORT is not a Docker-ViT setting and is ignored"  # no Service beside it
    assert ignored_variables({"DOCKER_VIT_SERVICE_PORT": "9000"}, names=SERVING) == [guess]
    assert ignored_variables({"DOCKER_VIT_PORT": "tcp://10.0.0.11:8000"}, names=["model"]) == []  # caption


def test_a_servers_warnings_name_a_misspelt_variable() -> None:
    from docker_vit.environment import server_warnings

    assert server_warnings(Settings(), {"DOCKER_VIT_NUM_BEAM": "2"}) == [
        "DOCKER_VIT_NUM_BEAM is not a Docker-ViT setting and is ignored (did you mean DOCKER_VIT_NUM_BEAMS?)"
    ]


def test_an_empty_keys_variable_is_warned_open_and_keys_stay_out_of_reprs() -> None:
    """`DOCKER_VIT_API_KEYS=${SECRET}` with the secret unset leaves the server open: it says so."""
    from docker_vit.environment import open_by_mistake

    warned = open_by_mistake(Settings(), {"DOCKER_VIT_API_KEYS": ""}) or ""
    assert "DOCKER_VIT_API_KEYS is set but empty: the server is open to anyone" in warned
    shown = repr(Settings(api_keys=("server-secret",), url="http://a:1", api_key="client-secret"))
    assert "secret" not in shown and "max_queue" in shown


def test_uvicorns_warnings_about_what_a_client_sent_are_left_to_the_access_line(
    capsys: pytest.CaptureFixture,
) -> None:
    """Any client could repeat them into a flood, and the WebSocket advice is wrong here."""
    from docker_vit import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("text", "info")
        uvicorn = logging.getLogger("uvicorn.error")
        uvicorn.warning("Invalid HTTP request received.")
        uvicorn.warning("Unsupported upgrade request.")
        uvicorn.warning("No supported WebSocket library detected. Please use ...")
        uvicorn.warning("something else")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    err = capsys.readouterr().err
    assert (
        "something else" in err and "upgrade" not in err and "Invalid" not in err and "WebSocket" not in err
    )


def test_docs_list_the_fields_the_handlers_options_read_not_the_captioners() -> None:
    from fake_handlers import OwnFields

    settings = Settings()
    with serving(settings, OwnFields(settings)) as client:
        upload = client.get("/openapi.json").json()["paths"]["/v1/captions"]["post"]
    assert [param["name"] for param in upload["parameters"]] == ["shout"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(form) == {"file", "shout"}


def test_docs_describe_the_json_body_and_the_answer_as_the_route_reads_and_writes_them() -> None:
    """The JSON body takes the handler's option fields beside `images` (the README's `num_beams` in the
    body), and the answer is `{"model", "captions": [{"text"}]}`: a client generated from the page
    (or a test that checks answers against it) must see both."""
    from fake_handlers import OwnFields

    settings = Settings()
    with serving(settings, OwnFields(settings)) as client:
        upload = client.get("/openapi.json").json()["paths"]["/v1/captions"]["post"]
        body = {"images": [base64.b64encode(png()).decode()], "shout": True}
        answer = client.post("/v1/captions", json=body)
    schema = upload["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"images", "shout"} and schema["required"] == ["images"]
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["file"]["type"] == "array"  # repeated, one image each
    assert answer.status_code == 200
    ok = upload["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(ok["required"]) == set(answer.json()) == {"model", "captions"}
    (result,) = answer.json()["captions"]
    assert set(ok["properties"]["captions"]["items"]["required"]) <= set(result)


def test_the_model_route_answers_what_its_schema_requires() -> None:
    settings = Settings()
    with serving(settings, Echo(settings)) as client:
        schema = client.get("/openapi.json").json()["paths"]["/v1/model"]["get"]["responses"]["200"]
        info = client.get("/v1/model").json()
    schema = schema["content"]["application/json"]["schema"]
    assert set(schema["required"]) <= set(info) and info["status"] in schema["properties"]["status"]["enum"]
    for part in ("limits", "batching"):
        assert set(schema["properties"][part]["required"]) <= set(info[part])


def test_a_request_without_a_method_logs_a_dash_in_text_and_null_in_json(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bytes that were not HTTP have no method: `method=-` as web servers' access logs write it."""
    from docker_vit.metrics import Metrics
    from docker_vit.middleware import report

    with caplog.at_level(logging.INFO, "docker_vit.access"):
        report(Metrics(), None, "unmatched", 400, 0.0, 0, "rid-1")
    (record,) = [r for r in caplog.records if r.name == "docker_vit.access"]
    assert record.getMessage().startswith("method=- route=unmatched status=400 ")
    assert json.loads(JsonFormatter().format(record))["method"] is None
