"""The Runpod serverless adapter: job shapes, error objects, batching across jobs, the SDK's local mode.

Most tests run the real captioner (real intake, limits, option checks, service and batcher) with the
torch engine swapped for a stub; the last ones load a tiny random model, the last through the
`runpod` SDK itself.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import finished, killed_after
from PIL import Image

from docker_vit import errors
from docker_vit.captioner import Captioner
from docker_vit.config import Settings
from docker_vit.handler import Handler
from docker_vit.runpod import Worker

ROOT = Path(__file__).resolve().parent.parent


def png(width: int = 32, height: int = 24, color: tuple[int, int, int] = (200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class StubEngine:
    """Stands in for CaptionEngine: captions name each image's size and the options used."""

    input_size = None
    max_new_tokens = None

    def __init__(self, fail_load: bool = False) -> None:
        self.fail_load = fail_load
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def load(self) -> None:
        if self.fail_load:
            raise OSError("no weights here")

    def resized(self, width: int, height: int) -> tuple[int, int]:
        return width, height

    def pixels(self, image: Image.Image) -> tuple[int, int]:
        return image.size

    def generate(self, pixels, num_beams: int, max_new_tokens: int, between_steps=None) -> list[str]:
        with self.lock:
            self.batches.append(len(pixels))
        return [f"{w}x{h} beams={num_beams} tokens={max_new_tokens}" for w, h in pixels]

    def text(self, output: str) -> str:
        return output

    def describe(self) -> dict:
        return {"model": "stub"}


def make_worker(engine: StubEngine | None = None, **overrides) -> tuple[Worker, StubEngine]:
    settings = Settings(
        **{"model": "stub-model", "device": "cpu", "max_images": 4, "max_bytes": 50_000, **overrides}
    )
    captioner = Captioner(settings)
    captioner.engine = engine or StubEngine()
    return Worker(settings, captioner), captioner.engine


@pytest.fixture
def worker():
    worker, _ = make_worker()
    yield worker
    worker.close()


def run(worker: Worker, job: dict) -> dict:
    """As Runpod does it: the async handler awaited on a loop of the SDK's own."""
    return asyncio.run(worker.handle(job))


def test_the_module_level_handler_is_the_worker_its_variables_describe(monkeypatch):
    """`runpod.serverless.start({"handler": docker_vit.runpod.handler})`, as Runpod's examples name it:
    one worker, made at the first job, which waits for its load; concurrent first jobs share it."""
    from docker_vit import runpod as adapter

    monkeypatch.setenv("DOCKER_VIT_HANDLER", "fake_handlers:Echo")
    monkeypatch.setenv("DOCKER_VIT_MAX_NEW_TOKENS", "7")
    monkeypatch.setattr(adapter, "_shared", None)

    async def two_jobs() -> list[dict]:
        jobs = [{"id": str(n), "input": {"image": base64.b64encode(b"x" * n).decode()}} for n in (1, 2)]
        return await asyncio.gather(*(adapter.handler(job) for job in jobs))

    monkeypatch.setenv("DOCKER_VIT_HANDLER", "nosuch:X")  # refused at each job, named as it was set
    for _ in range(2):
        with pytest.raises(ValueError, match="^cannot import nosuch for DOCKER_VIT_HANDLER nosuch:X: "):
            asyncio.run(adapter.handler({"input": {"image": "eA=="}}))
    assert not any(thread.name == "docker-vit-runpod" for thread in threading.enumerate())  # none left
    monkeypatch.setenv("DOCKER_VIT_HANDLER", "fake_handlers:Echo")
    try:
        answers = asyncio.run(two_jobs())
        assert [answer["captions"][0]["text"] for answer in answers] == ["x", "xx"]
        assert adapter._shared is not None and adapter._shared.settings.max_new_tokens == 7
        assert asyncio.run(adapter.handler({"input": {}}))["error"]["type"] == "invalid_request"
    finally:
        if adapter._shared is not None:
            adapter._shared.close()


def test_one_image(worker):
    answer = run(worker, {"id": "1", "input": {"image": png(32, 24)}})
    assert answer == {"captions": [{"text": "32x24 beams=4 tokens=15"}], "model": "stub-model"}


def test_several_images_keep_their_order(worker):
    images = [png(10 + i, 20) for i in range(3)]
    answer = run(worker, {"input": {"images": images}})
    assert [c["text"].split()[0] for c in answer["captions"]] == ["10x20", "11x20", "12x20"]


def test_data_url_and_generation_options(worker):
    job = {"input": {"image": "data:image/png;base64," + png(8, 8), "num_beams": 2, "max_new_tokens": 5}}
    assert run(worker, job)["captions"] == [{"text": "8x8 beams=2 tokens=5"}]
    assert (
        run(worker, {"input": {"image": "DATA:image/png;base64," + png(7, 7)}})["captions"][0]["text"][:3]
        == "7x7"
    )


def test_base64_broken_into_lines_or_spaced_out_is_read(worker):
    """MIME's 76 columns, `base64` without -w0, blanks before a data URL; and whitespace costs one copy of
    the text, not an object per piece (`"ab ab ab ..."` took twenty times its size before the 413)."""
    from docker_vit import payloads

    text = png(9, 9)
    lined = "\r\n".join(text[start : start + 76] for start in range(0, len(text), 76))
    for image in (lined, "\t" + text + "\n", "  data:image/png;base64," + " ".join(text)):
        assert run(worker, {"input": {"image": image}})["captions"][0]["text"].startswith("9x9")
    assert payloads.decode_base64("YW Jj\nZA==", 0, 10) == b"abcd"
    with pytest.raises(errors.ApiError, match="over 30 bytes"):
        payloads.decode_base64("ab " * 100, 0, 30)  # counted without its blanks, refused before decoding
    with pytest.raises(errors.ApiError, match="not valid base64"):
        payloads.decode_base64("YWJj\u3000ZA==", 0, 10)  # only ASCII whitespace is passed over


def test_a_data_url_without_its_base64_marker_is_read_if_it_is_base64():
    """RFC 2397's other form, percent-encoded bytes, is not read: said so, not "not valid base64"."""
    from docker_vit import payloads

    assert payloads.decode_base64("data:image/png,YWJjZA==", 0, 10) == b"abcd"
    assert payloads.decode_base64("DATA:image/png; Base64 ,YWJjZA==", 0, 10) == b"abcd"
    with pytest.raises(
        errors.ApiError,
        match=r"image 2 is not valid base64 \(a data URL without ;base64: its bytes must be base64",
    ):
        payloads.decode_base64("data:image/png,%89PNG%0D%0A", 2, 10)
    with pytest.raises(errors.ApiError, match="image 0 is not valid base64$"):
        payloads.decode_base64("data:image/png;base64,%89PNG", 0, 10)


def test_unknown_fields_are_named_a_few_and_short(worker):
    """A job of a million long keys got an answer of millions of bytes, logged whole."""
    job = {"input": {"image": png(), **{f"{index:03}" + "k" * 1000: 1 for index in range(300)}}}
    message = run(worker, job)["error"]["message"]
    assert message.startswith("unknown input field(s): 000" + "k" * 97 + ", 001") and len(message) < 700
    assert message.endswith("(and 295 more)")


def test_base64_is_decoded_off_the_loop_that_runs_the_batches(worker, monkeypatch):
    """Up to max_images x max_bytes of base64: decoded on the loop, it stalled every other job."""
    from docker_vit import payloads

    threads = []
    real = payloads.decode_base64

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(payloads, "decode_base64", recording)
    assert run(worker, {"input": {"image": png(5, 5)}})["captions"][0]["text"].startswith("5x5")
    assert threads and worker._thread not in threads


@pytest.mark.parametrize(
    ("job", "kind"),
    [
        ({}, "invalid_request"),
        ({"input": "not an object"}, "invalid_request"),
        ({"input": {}}, "invalid_request"),
        ({"input": {"image": png(), "images": [png()]}}, "invalid_request"),
        ({"input": {"images": []}}, "invalid_request"),
        ({"input": {"images": "abc"}}, "invalid_request"),
        ({"input": {"image": 42}}, "invalid_request"),
        ({"input": {"image": "not base64!"}}, "invalid_request"),
        (
            {"input": {"image": base64.b64encode(b"plain text, no picture").decode()}},
            "unsupported_media_type",
        ),
        ({"input": {"images": [png()] * 5}}, "payload_too_large"),
        ({"input": {"images": [png()] * 5, "temperature": 0.7}}, "payload_too_large"),  # counted first
        ({"input": {"image": base64.b64encode(b"x" * 60_000).decode()}}, "payload_too_large"),
        ({"input": {"image": png(), "num_beams": 99}}, "invalid_parameters"),
        ({"input": {"image": png(), "max_new_tokens": "many"}}, "invalid_parameters"),
        ({"input": {"image": png(), "max_new_tokens": float("inf")}}, "invalid_parameters"),
        ({"input": {"image": png(), "temperature": 0.7}}, "invalid_parameters"),
    ],
)
def test_bad_input_gets_an_error_object(worker, job, kind):
    answer = run(worker, job)
    assert set(answer) == {"error"}
    assert answer["error"]["type"] == kind
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]


class Counted(Handler):
    """A custom handler with its own option, `n`: the job's other fields go to it, not to a fixed list."""

    name = "counted"
    option_names = ("n",)

    def options(self, raw):
        return int(raw.get("n", 1))

    def prepare(self, data, options):
        return data.decode()

    def predict(self, items, options):
        return [item * options for item in items]

    def example(self):
        return b"x"


def test_a_custom_handler_gets_its_own_options():
    worker = Worker(Settings(max_images=4), Counted(Settings()))
    try:
        hello = base64.b64encode(b"ab").decode()
        assert run(worker, {"input": {"image": hello, "n": 3}}) == {
            "captions": [{"text": "ababab"}],
            "model": "counted",
        }
        refused = run(worker, {"input": {"image": hello, "num_beams": 2}})
        assert refused["error"]["type"] == "invalid_parameters" and "num_beams" in refused["error"]["message"]
        bad = run(
            worker, {"input": {"image": hello, "n": "three"}}
        )  # int() raising: still the client's error
        assert bad["error"]["type"] == "invalid_parameters"
    finally:
        worker.close()


@pytest.mark.parametrize("size", [11, 12])
def test_an_image_a_byte_or_two_over_max_bytes_is_refused_for_any_handler(size: int):
    """As the HTTP API answers: a handler that never calls open_image gets no image over the limit."""
    worker = Worker(Settings(max_bytes=10), Counted(Settings()))
    try:
        fits = run(worker, {"input": {"image": base64.b64encode(b"x" * 10).decode()}})
        assert fits["captions"][0]["text"] == "x" * 10
        over = run(worker, {"input": {"image": base64.b64encode(b"x" * size).decode()}})
        assert over["error"]["type"] == "payload_too_large", over
    finally:
        worker.close()


def test_decompression_bomb_is_refused_by_the_core_intake():
    worker, engine = make_worker(max_pixels=5_000)
    try:
        answer = run(worker, {"input": {"image": png(100, 100)}})
        assert answer["error"]["type"] == "payload_too_large"
        assert engine.batches == [1, 1]  # only the load's probe and the warm-up reached the model
    finally:
        worker.close()


def test_failed_model_load_is_reported():
    worker, _ = make_worker(StubEngine(fail_load=True))
    try:
        answer = run(worker, {"input": {"image": png()}})
        assert answer["error"]["type"] == "unavailable"
        assert "no weights here" in answer["error"]["message"]
    finally:
        worker.close()


def test_concurrent_jobs_share_model_calls():
    worker, engine = make_worker(max_wait_ms=200.0, max_batch_size=8)
    try:
        run(worker, {"input": {"image": png()}})  # after the warm-up

        async def many() -> list[dict]:
            return await asyncio.gather(*(worker.handle({"input": {"image": png(9, 9)}}) for _ in range(6)))

        answers = asyncio.run(many())
        assert all(a["captions"][0]["text"].startswith("9x9") for a in answers)
        assert max(engine.batches[2:]) > 1, engine.batches
    finally:
        worker.close()


def test_a_job_that_does_not_fit_the_queue_waits_for_room_instead_of_failing():
    """Runpod's queue is the buffer: a job the worker took is never failed as `overloaded`."""
    worker, engine = make_worker(max_queue=2, max_images=2, max_batch_size=2, max_wait_ms=0.0)
    try:
        run(worker, {"input": {"image": png()}})

        async def many() -> list[dict]:
            jobs = ({"input": {"images": [png(5 + i, 5), png(5 + i, 6)]}} for i in range(4))
            return await asyncio.gather(*(worker.handle(job) for job in jobs))

        answers = asyncio.run(many())
        assert [[c["text"].split()[0] for c in a["captions"]] for a in answers] == [
            [f"{5 + i}x5", f"{5 + i}x6"] for i in range(4)
        ]
        assert run(worker, {"input": {"images": [png()] * 3}})["error"]["type"] == "payload_too_large"
    finally:
        worker.close()


def test_the_worker_holds_a_model_batch_of_jobs():
    worker, _ = make_worker(max_batch_size=6)
    try:
        assert worker.wait_ready() and worker.concurrency == 6
    finally:
        worker.close()


def test_the_worker_takes_no_more_jobs_than_its_queue_holds():
    """A job taken beyond the queue would wait in this worker, and time out, not in Runpod's queue."""
    worker, _ = make_worker(max_batch_size=6, max_queue=2)
    try:
        assert worker.wait_ready() and worker.concurrency == 2
    finally:
        worker.close()


def run_main(env: dict, job: dict | None = None) -> subprocess.CompletedProcess:
    args = ["--test_input", json.dumps(job or {"input": {"image": png()}})]
    return subprocess.run(
        [sys.executable, "-m", "docker_vit.runpod", *args],
        cwd=ROOT,
        env={**os.environ, "DOCKER_VIT_DEVICE": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_worker_whose_model_fails_to_load_exits_before_taking_a_job(tmp_path):
    pytest.importorskip("runpod")
    done = run_main({"DOCKER_VIT_MODEL": str(tmp_path / "missing"), "DOCKER_VIT_MAX_BATCH": "8"})
    log = done.stdout + done.stderr
    assert done.returncode == 1, log
    assert "no model folder" in log and "local_test" not in log, log
    # a misspelt variable is said before the model loads (the worker's own settings went by it)
    said = "DOCKER_VIT_MAX_BATCH is not a Docker-ViT setting and is ignored (did you mean DOCKER_VIT_MAX_BATCH_SIZE?)"
    assert said in log and log.index(said) < log.index("no model folder"), log


def test_the_local_test_job_ends_past_a_hung_model_call() -> None:
    """The SDK's test mode leaves by sys.exit, which joined the device thread and waited for ever."""
    pytest.importorskip("runpod")
    job = {"input": {"image": base64.b64encode(b"x").decode(), "delay": 3600}}
    env = {"DOCKER_VIT_HANDLER": "fake_handlers:Echo", "PYTHONPATH": str(ROOT / "tests")}
    done = run_main({**env, "DOCKER_VIT_REQUEST_TIMEOUT": "1"}, job)
    assert done.returncode == 1 and "timeout" in done.stdout + done.stderr, done.stdout + done.stderr


def stopped_worker(handler: str, job: dict, until: str, sig: int) -> tuple[subprocess.Popen, str]:
    """`python -m docker_vit.runpod --test_input JOB` with a test handler, sent `sig` once its output
    (stdout and stderr as one) shows `until`; the process, finished, and all it wrote."""
    env = {**os.environ, "DOCKER_VIT_HANDLER": handler, "PYTHONPATH": str(ROOT / "tests")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "docker_vit.runpod",
            "--test_input",
            json.dumps(job),
            "--rp_log_level",
            "INFO",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    with killed_after(process, 90):
        while until not in seen:  # the SDK's import alone can take seconds
            line = process.stdout.readline()
            assert line, f"the worker ended (or was killed after 90 s) before {until!r}: {seen}"
            seen += line
    process.send_signal(sig)
    out, _ = finished(process, 20)
    return process, seen + out


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_a_stop_while_the_model_loads_exits_at_once(sig: int, code: int) -> None:
    """SIGTERM too: as a container's start command the worker is PID 1, which only sees a signal that
    has a handler, and the SDK installs its own only once the model is loaded."""
    pytest.importorskip("runpod")
    # finished within 20 s, not the 30 s the load would take
    process, log = stopped_worker(
        "fake_handlers:SlowLoad", {"input": {"image": "eA=="}}, "slow load started", sig
    )
    assert process.returncode == code and "Traceback" not in log, log


def test_a_stop_during_the_local_test_job_is_no_success() -> None:
    """The stop-while-loading handler is gone once the model is ready: `--test_input` installs no SIGTERM
    handler of its own, so a stopped test job dies by the signal rather than exiting 0 (and the ping
    process the SDK forks on Runpod starts with the default)."""
    pytest.importorskip("runpod")
    job = {"input": {"image": "eA==", "delay": 30}}
    process, log = stopped_worker("fake_handlers:Echo", job, "local_test | Started", signal.SIGTERM)
    assert process.returncode == -signal.SIGTERM and "Traceback" not in log, log


@pytest.mark.parametrize(
    ("name", "value", "said"),
    [
        ("NUM_BEAMS", "abc", "DOCKER_VIT_NUM_BEAMS='abc' is not a valid int"),
        ("NUM_BEAMS", "0", "DOCKER_VIT_NUM_BEAMS must be positive, got 0"),
        ("HANDLER", "nomod:X", "cannot import nomod for DOCKER_VIT_HANDLER nomod:X: ModuleNotFoundError"),
        (
            "HANDLER",
            "loud_import:H",
            "cannot import loud_import for DOCKER_VIT_HANDLER loud_import:H: ValueError: give --model a folder",
        ),
    ],
)
def test_bad_worker_settings_are_one_line(name: str, value: str, said: str):
    """A handler's own words are quoted as they are, flags and all."""
    done = run_main({f"DOCKER_VIT_{name}": value, "PYTHONPATH": str(ROOT / "tests")})
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"docker_vit.runpod: error: {said}")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_vit_gpt2

    return save_vit_gpt2(tmp_path_factory.mktemp("tiny-vit-gpt2"))


def test_tiny_model_matches_the_captioner(tiny_model):
    settings = Settings(model=str(tiny_model), device="cpu", num_beams=2, max_new_tokens=8)
    worker = Worker(settings)
    try:
        image = png(64, 48, (10, 120, 200))
        answer = run(worker, {"input": {"image": image}})
        reference = Captioner(settings)
        reference.load()
        options = reference.options({})
        expected = reference.respond(
            reference.predict([reference.prepare(base64.b64decode(image), options)], options)[0]
        )
        assert answer == {"captions": [{"text": expected.text}], "model": str(tiny_model)}
    finally:
        worker.close()


def test_runpod_sdk_local_test_mode(tiny_model):
    pytest.importorskip("runpod")
    job = {"input": {"image": png(), "num_beams": 1}}
    env = {**os.environ, "DOCKER_VIT_MODEL": str(tiny_model), "DOCKER_VIT_DEVICE": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "docker_vit.runpod", "--test_input", json.dumps(job)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    assert "completed successfully" in log and "'captions': [{'text':" in log, log

    bad = subprocess.run(
        [sys.executable, "-m", "docker_vit.runpod", "--test_input", json.dumps({"input": {"image": "%%"}})],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert bad.returncode == 1 and "invalid_request" in bad.stdout + bad.stderr


class Wedged(StubEngine):
    """Answers the load's probe and the warm-up, then hangs until released: a stuck device."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def generate(self, pixels, num_beams: int, max_new_tokens: int, between_steps=None) -> list[str]:
        if len(self.batches) >= 2:
            self.release.wait(20)
        return super().generate(pixels, num_beams, max_new_tokens)


def test_a_hung_model_call_asks_runpod_for_another_worker():
    """Once a call has outrun the request timeout, the jobs timing out behind it say `refresh_worker`
    and the SDK is told to take no more jobs (a job's own flag only reaches Runpod's side: the SDK
    went on taking jobs and failing each), as the HTTP server's /ping turns a load balancer away;
    other errors never do."""
    engine = Wedged()
    worker, _ = make_worker(engine, request_timeout=0.5, max_wait_ms=0.0)
    refreshed: list[bool] = []
    worker.on_refresh = lambda: refreshed.append(True)
    try:
        first = run(worker, {"input": {"image": png()}})
        assert first["error"]["type"] == "timeout"
        second = run(worker, {"input": {"image": png()}})
        assert second["error"]["type"] == "timeout" and second["refresh_worker"] is True
        assert len(refreshed) == sum("refresh_worker" in answer for answer in (first, second))
        bad = run(worker, {"input": {"image": "not base64!"}})
        assert bad["error"]["type"] == "invalid_request" and "refresh_worker" not in bad
    finally:
        engine.release.set()
        worker.close()
    healthy, _ = make_worker(request_timeout=0.5)
    try:
        assert "refresh_worker" not in run(healthy, {"input": {"image": "not base64!"}})
    finally:
        healthy.close()


def test_a_lost_device_asks_runpod_for_another_worker():
    """A fault that poisons the GPU fails every later job: the job says `refresh_worker`, the SDK is
    told to take no more, and later jobs are refused as not ready; an ordinary model error does not."""
    from fake_handlers import Misbehaving

    worker = Worker(Settings(max_wait_ms=0), type("Lost", (Misbehaving,), {})(Settings()))
    refreshed: list[bool] = []
    worker.on_refresh = lambda: refreshed.append(True)
    one = base64.b64encode(b"a").decode()
    try:
        own = run(worker, {"input": {"image": one, "mode": "timeout"}})
        assert own["error"]["type"] == "model_error" and "refresh_worker" not in own and not refreshed
        lost = run(worker, {"input": {"image": one, "mode": "lost"}})
        assert "CUDA error" in lost["error"]["message"] and lost["refresh_worker"] is True
        later = run(worker, {"input": {"image": one}})
        assert later["error"]["message"].startswith("the device failed: RuntimeError: CUDA error")
        assert later["refresh_worker"] is True and refreshed == [True, True]
    finally:
        worker.close()


def test_a_sigterm_whose_raise_went_astray_still_ends_the_wait_for_the_load(monkeypatch) -> None:
    """A signal that lands in a weakref callback raises there, and Python drops the exception: the
    stop must not wait for the whole load (seen once in a suite run, 30 s of a slow load)."""
    from fake_handlers import DescribesItsModel

    from docker_vit import process

    monkeypatch.setattr(process, "_terminated", threading.Event())
    with pytest.raises(process.Terminated):
        process.terminate(signal.SIGTERM, None)  # raised, as it would be into a callback that drops it
    DescribesItsModel.loaded.clear()
    worker = Worker(Settings(), DescribesItsModel(Settings()))
    try:
        with pytest.raises(process.Terminated):
            worker.wait_ready()  # the load still waits for `loaded`
    finally:
        DescribesItsModel.loaded.set()
        worker.close()
    from fake_handlers import Echo

    worker = Worker(Settings(), Echo(Settings()))
    try:
        with pytest.raises(process.Terminated):  # a load that ends within the first look at it
            worker.wait_ready()
    finally:
        worker.close()


def test_a_handler_breaking_the_interface_is_answered_as_the_server_answers_it():
    from fake_handlers import Misbehaving

    worker = Worker(Settings(max_wait_ms=0), Misbehaving(Settings()))
    try:
        for text in ("plain-string", "number-text", "nan-data", "object-data"):
            answer = run(worker, {"input": {"image": base64.b64encode(text.encode()).decode()}})
            assert (
                answer["error"]["type"] == "model_error" and "respond returned" in answer["error"]["message"]
            )
        one = base64.b64encode(b"a").decode()
        for mode, kind in [
            ("missing", "invalid_parameters"),
            ("unhashable", "model_error"),
            ("crash", "model_error"),
        ]:
            assert run(worker, {"input": {"image": one, "mode": mode}})["error"]["type"] == kind
        assert run(worker, {"input": {"image": one, "mode": "generator"}})["captions"] == [{"text": "A"}]
        own = run(worker, {"input": {"image": one, "mode": "timeout"}})["error"]  # the handler's, not ours
        assert own["type"] == "model_error" and "the disk was slow" in own["message"]
    finally:
        worker.close()
