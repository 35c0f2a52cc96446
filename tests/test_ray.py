"""The Ray Serve adapter: a local Ray instance serves a tiny random model through `docker_vit.ray:app`.

One module-scoped Ray instance (starting Ray is slow) serves the app on a free loopback port; the
captions are compared with those of `docker-vit serve`'s own app, concurrent requests must share
model calls, and the last test shuts Ray down and checks that nothing is left listening.
Without the `ray` extra the module is skipped, and pytest reports why.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

ray = pytest.importorskip(
    "ray", reason="the Ray Serve adapter needs the extra: pip install 'docker-vit[ray]'"
)
from conftest import free_port, photo, serving  # noqa: E402
from ray import serve  # noqa: E402

from docker_vit import ray as ray_adapter  # noqa: E402
from docker_vit.config import Settings  # noqa: E402
from docker_vit.service import FAILED, LOADING, READY, Service  # noqa: E402

ARGS = {"num_beams": "2", "max_new_tokens": "8", "max_wait_ms": "50", "max_batch_size": "8"}
PREFIX = "/cap"  # served under a route prefix: every route must work below it


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import save_vit_gpt2

    return save_vit_gpt2(tmp_path_factory.mktemp("ray-vit-gpt2"))


@pytest.fixture(scope="module")
def ray_url(tiny_model: Path) -> Iterator[str]:
    """The app served by a local Ray instance (2 CPUs, no dashboard, no usage reporting)."""
    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # the workers inherit it: no traffic beyond loopback
    port = free_port()
    # a cluster of its own, even where a stale /tmp/ray/ray_current_cluster names one long gone
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # serve.run returns once the replica passed its first health check: model loaded and warm.
        app = ray_adapter.app({"model": str(tiny_model), **ARGS})
        serve.run(app, name="docker-vit", route_prefix=PREFIX)
        yield f"http://127.0.0.1:{port}{PREFIX}"
    finally:
        if ray.is_initialized():  # test_shutdown_is_clean may have done it already
            serve.shutdown()
            ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved


def post_photo(url: str, name: str = "french_bulldog.jpg") -> httpx.Response:
    with open(photo(name), "rb") as file:
        return httpx.post(url + "/", files={"file": (name, file, "image/jpeg")}, timeout=60)


@pytest.fixture(scope="module")
def local(tiny_model: Path) -> Iterator[TestClient]:
    """The same model and settings in `docker-vit serve`'s own app, in-process: the reference."""
    same = {"num_beams": 2, "max_new_tokens": 8, "max_wait_ms": 50.0, "max_batch_size": 8}  # as ARGS
    with serving(Settings(model=str(tiny_model), **same)) as client:
        yield client


def test_caption_matches_docker_vit_serve(ray_url: str, local: TestClient) -> None:
    reply = post_photo(ray_url)
    with open(photo("french_bulldog.jpg"), "rb") as file:
        expected = local.post("/", files={"file": ("bulldog.jpg", file, "image/jpeg")})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    assert expected.status_code == 200
    assert reply.text == expected.text and reply.text
    assert len(reply.headers.get_list("x-request-id")) == 1  # the proxy's, not a second one of ours


def test_the_bare_route_prefix_is_the_original_call(ray_url: str) -> None:
    """`curl -F file=@x http://HOST/cap` under `--route-prefix /cap`: the caption, not a redirect."""
    with open(photo("french_bulldog.jpg"), "rb") as file:
        reply = httpx.post(ray_url, files={"file": ("dog.jpg", file, "image/jpeg")}, timeout=60)
    assert reply.status_code == 200 and reply.text == post_photo(ray_url).text
    assert httpx.get(ray_url + "x/healthz").status_code == 404  # only the prefix itself is taken as `/`


def test_the_same_routes_answer(ray_url: str, local: TestClient, tiny_model: Path) -> None:
    model = httpx.get(ray_url + "/v1/model").json()
    assert model == local.get("/v1/model").json()
    assert model["model"] == str(tiny_model) and model["status"] == READY
    assert model["generation"] == {"num_beams": 2, "max_new_tokens": 8}
    assert httpx.get(ray_url + "/readyz").json() == {"status": READY}
    files = [
        ("file", (name, photo(name).read_bytes(), "image/jpeg")) for name in ("coffee.jpg", "chelsea.jpg")
    ]
    reply = httpx.post(ray_url + "/v1/captions", files=files, timeout=60)
    assert reply.status_code == 200
    assert reply.json() == local.post("/v1/captions", files=files).json()
    assert len(reply.json()["captions"]) == 2


@pytest.mark.parametrize(
    "request_args",
    [
        {"content": b"not an image", "headers": {"content-type": "image/png"}},
        {"content": b"{}", "headers": {"content-type": "text/plain"}},
        {"params": {"num_beams": "99"}, "files": {"file": b"\x89PNG"}},
    ],
    ids=["not-an-image", "wrong-content-type", "num-beams-too-large"],
)
def test_bad_input_gets_the_same_4xx(ray_url: str, local: TestClient, request_args: dict) -> None:
    reply = httpx.post(ray_url + "/", **request_args)
    expected = local.post("/", **request_args)
    assert 400 <= reply.status_code < 500
    assert (reply.status_code, reply.json()) == (expected.status_code, expected.json())


def test_concurrent_requests_share_model_calls(ray_url: str) -> None:
    def batches() -> tuple[float, float]:
        text = httpx.get(ray_url + "/metrics").text
        count = float(re.search(r"^docker_vit_batch_size_count (\S+)$", text, re.M).group(1))
        ones = float(re.search(r'^docker_vit_batch_size_bucket\{le="1\.0"\} (\S+)$', text, re.M).group(1))
        return count, ones

    count_before, ones_before = batches()
    with ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(pool.map(lambda _: post_photo(ray_url, "astronaut.jpg"), range(12)))
    assert [reply.status_code for reply in replies] == [200] * 12
    assert len({reply.text for reply in replies}) == 1
    count, ones = batches()
    calls, single = count - count_before, ones - ones_before
    assert calls < 12, "12 concurrent requests took 12 model calls: nothing was batched"
    assert single < calls, "no model call held more than one image"


def test_arguments_become_settings_and_deployment_options() -> None:
    args = {"model": "/m", "num_beams": "3", "api_keys": ["a", "b"], "num_gpus": "0.5", "max_replicas": "4"}
    overrides, deployment = ray_adapter.split_args(args)
    assert overrides == {"model": "/m", "num_beams": 3, "api_keys": ("a", "b")}
    options = ray_adapter.deployment_options(Settings(**overrides), deployment)
    assert options["ray_actor_options"] == {"num_gpus": 0.5}
    assert options["autoscaling_config"] == {"max_replicas": 4, "target_ongoing_requests": 16}
    assert options["max_ongoing_requests"] == 2 * Settings().max_batch_size
    assert options["max_queued_requests"] == Settings().max_queue
    assert "num_replicas" not in options
    _, few = ray_adapter.split_args({"min_replicas": "1", "max_ongoing_requests": "4"})
    assert (
        ray_adapter.deployment_options(Settings(), few)["autoscaling_config"]["target_ongoing_requests"] == 4
    )
    _, auto = ray_adapter.split_args({"num_replicas": "auto"})
    options = ray_adapter.deployment_options(Settings(), auto)  # Ray's autoscaling, our target
    assert options["num_replicas"] == "auto" and options["autoscaling_config"] == {
        "target_ongoing_requests": 16
    }
    _, tuned = ray_adapter.split_args(
        {"num_replicas": "auto", "max_replicas": "3", "target_ongoing_requests": "8"}
    )
    options = ray_adapter.deployment_options(Settings(), tuned)
    assert options["autoscaling_config"] == {"max_replicas": 3, "target_ongoing_requests": 8}
    _, fixed = ray_adapter.split_args({"num_replicas": "2"})
    options = ray_adapter.deployment_options(Settings(), fixed)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options


def test_a_replica_takes_no_more_requests_than_its_queue_holds(caplog: pytest.LogCaptureFixture) -> None:
    """Else it answers 503 "queue is full" while Ray's router could wait for another replica's room."""
    with caplog.at_level("WARNING", logger="docker_vit"):
        options = ray_adapter.deployment_options(Settings(max_queue=8), {"num_replicas": 2})
    assert options["max_ongoing_requests"] == 8 and "below the batch size" not in caplog.text


def test_max_ongoing_requests_below_the_batch_size_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    _, few = ray_adapter.split_args({"max_ongoing_requests": "2"})
    with caplog.at_level("WARNING", logger="docker_vit"):
        assert ray_adapter.deployment_options(Settings(max_batch_size=4), few)["max_ongoing_requests"] == 2
    assert "max_ongoing_requests=2 is below the batch size 4" in caplog.text
    caplog.clear()
    ray_adapter.deployment_options(Settings(max_batch_size=4), {})
    assert "below the batch size" not in caplog.text


def test_a_scaling_target_above_what_a_replica_takes_is_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    _, high = ray_adapter.split_args({"target_ongoing_requests": "40", "max_replicas": "3"})
    with caplog.at_level("WARNING", logger="docker_vit"):
        options = ray_adapter.deployment_options(Settings(max_batch_size=16), high)
    assert options["autoscaling_config"]["target_ongoing_requests"] == 40
    assert "target_ongoing_requests=40 is above max_ongoing_requests=32" in caplog.text
    caplog.clear()
    ray_adapter.deployment_options(Settings(max_batch_size=16), {"max_replicas": 3})
    assert "target_ongoing_requests" not in caplog.text


@pytest.mark.parametrize(
    "args, message",
    [
        ({"modle": "x"}, "unknown argument"),
        ({"port": "9000"}, "Ray's HTTP proxy"),
        ({"num_beams": "many"}, "num_beams='many' is not a valid int"),
        ({"load_timeout_s": "0"}, "load_timeout_s must be positive"),
        ({"load_timeout_s": "-5"}, "load_timeout_s must be positive"),
        ({"num_gpus": "one"}, "num_gpus='one'"),
        ({"num_beams": "0"}, "num_beams must be positive"),
        ({"num_replicas": "2", "min_replicas": "1"}, "not both"),
        ({"min_replicas": "3"}, "min_replicas=3 needs max_replicas"),
        ({"num_replicas": "auto", "min_replicas": "101"}, "min_replicas=101 needs max_replicas"),
        ({"load_timeout_s": "nan"}, "load_timeout_s must be a finite number"),
        ({"target_ongoing_requests": "inf"}, "target_ongoing_requests must be a finite number"),
        ({"target_ongoing_requests": "0"}, "target_ongoing_requests must be positive, got 0"),
        ({"max_ongoing_requests": "0"}, "max_ongoing_requests must be at least 1, got 0"),
        ({"num_replicas": "-1"}, "num_replicas must be at least 1, got -1"),
        ({"max_queued_requests": "0"}, "max_queued_requests must be -1 (no limit) or at least 1, got 0"),
        ({"min_replicas": "-2"}, "min_replicas must be at least 0, got -2"),
        ({"num_gpus": "-0.5"}, "num_gpus must be at least 0, got -0.5"),
        (
            {"handler": "no_such_module:Handler"},
            "cannot import no_such_module for handler no_such_module:Handler",
        ),
        ({"handler": "fake_handlers"}, "handler must look like module:Class"),
        ({"handler": "loud_import:H"}, "for handler loud_import:H: ValueError: give --model a folder"),
        ({"handler": "fake_handlers:WordBatch"}, "WordBatch.max_batch_size must be a positive int, got '8'"),
        ({"handler": "fake_handlers:AsyncPrepare"}, "AsyncPrepare.prepare is an async def"),
        ({"handler": "fake_handlers:OnlyPredicts"}, "OnlyPredicts does not implement prepare()"),
        # as `docker-vit serve` refuses them, in one line, not in a traceback from every replica
        ({"handler": "fake_handlers:NumberName"}, "NumberName.name must be a str, got 7"),
        (
            {"handler": "fake_handlers:OneStringOfNames"},
            "OneStringOfNames.option_names must be a tuple or a list of str, or None; got 'shout'",
        ),
    ],
)
def test_bad_arguments_fail_in_the_builder(args: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ray_adapter.app(args)


def test_the_builder_builds_no_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building one may start CUDA in `serve run`'s own process: the class is read instead."""
    from docker_vit.captioner import Captioner

    def refuse(*args: object) -> None:
        raise AssertionError("the builder built a handler")

    monkeypatch.setattr(Captioner, "__init__", refuse)
    application = ray_adapter.app({"num_replicas": "1"})
    assert application._bound_deployment.num_replicas == 1  # built all the same


def test_the_builder_leaves_a_handlers_properties_to_its_replicas() -> None:
    """A property is read per instance (it may raise before `load`): the replicas check it."""
    for handler in (
        "fake_handlers:RaisingName",
        "fake_handlers:RaisingBatchSize",
        "fake_handlers:CachedKnobs",
    ):
        application = ray_adapter.app({"handler": handler})
        assert application._bound_deployment.max_ongoing_requests == 2 * 16  # the setting's batch size


def test_a_handlers_own_batch_size_sizes_the_replicas_concurrency() -> None:
    application = ray_adapter.app({"handler": "examples.minimal_handler:ColorNamer", "min_replicas": "1"})
    deployment = application._bound_deployment  # the options Ray will deploy with
    assert deployment.max_ongoing_requests == 2 * 64  # ColorNamer.max_batch_size, not the setting's 16
    assert deployment._deployment_config.autoscaling_config.target_ongoing_requests == 64


def test_replicas_without_a_gpu_run_on_the_cpu() -> None:
    """Ray 2.60 leaves CUDA visible to a replica given no GPU: `device=auto` must not take it."""
    assert ray_adapter.replica_device("auto", []) == "cpu"
    assert ray_adapter.replica_device("auto", [0]) == "auto"  # the GPU Ray assigned
    assert ray_adapter.replica_device("cuda", []) == "cuda"  # as asked (argument or DOCKER_VIT_DEVICE)


def test_an_argument_left_empty_in_a_config_file_is_unset_not_the_text_none() -> None:
    overrides, deployment = ray_adapter.split_args(
        {"api_keys": None, "model": None, "max_queued_requests": None}
    )
    assert overrides == {} and deployment == {}
    overrides, deployment = ray_adapter.split_args({"api_keys": [], "model": "", "num_replicas": 2.0})
    assert overrides == {} and deployment == {"num_replicas": 2}


def test_one_request_id_header_the_proxys() -> None:
    reply = TestClient(ray_adapter.create_app(Settings(), proxied=True)).get("/healthz")
    assert reply.status_code == 200 and "x-request-id" not in reply.headers


def test_a_replica_says_the_servers_warnings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As `serve` does: the app itself reads no environment, so the replica that loaded its settings says them."""
    from docker_vit.environment import server_warnings

    monkeypatch.setenv("DOCKER_VIT_API_KEY", "secret")
    monkeypatch.setattr(ray_adapter.ray, "get_gpu_ids", lambda: [])  # not in a Ray worker
    monkeypatch.setattr(ray_adapter.logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.setattr(ray_adapter.REPLICA_APP, "app", None, raising=False)
    with caplog.at_level(logging.WARNING, logger="docker_vit"):
        replica = ray_adapter.DockerViT.func_or_class
        asyncio.run(
            replica.__init__(replica.__new__(replica), {"handler": "fake_handlers:Echo"})
        )  # ingress's: async
    said = [record.getMessage() for record in caplog.records if record.name == "docker_vit"]
    assert said == server_warnings(Settings()) and "open to anyone" in said[0]


def test_the_handler_setting_is_named_as_it_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """An argument as the argument, a variable as the variable; a handler's own words as they are, also
    from a replica, where the handler is built."""
    monkeypatch.setenv("DOCKER_VIT_HANDLER", "nosuch:X")
    with pytest.raises(ValueError, match="^cannot import nosuch for DOCKER_VIT_HANDLER nosuch:X: "):
        ray_adapter.app({})
    monkeypatch.setattr(ray_adapter.ray, "get_gpu_ids", lambda: [])  # not in a Ray worker
    monkeypatch.setattr(ray_adapter.logs, "configure", lambda *args, **kwargs: None)
    replica = ray_adapter.DockerViT.func_or_class
    for given, said in ((None, "DOCKER_VIT_HANDLER"), ("fake_handlers:BrokenInit", "handler")):
        monkeypatch.setenv("DOCKER_VIT_HANDLER", "fake_handlers:BrokenInit")
        overrides = {} if given is None else {"handler": given}
        with pytest.raises(ValueError) as failed:
            asyncio.run(replica.__init__(replica.__new__(replica), overrides))
        assert str(failed.value) == f"{said} fake_handlers:BrokenInit: RuntimeError: set --model to a folder"


def test_health_check_waits_for_the_load_then_reports_its_outcome() -> None:
    check = ray_adapter.DockerViT.func_or_class.check_health

    async def scenario(final: str, load_timeout_s: float = 30) -> str | None:
        class StubService(SimpleNamespace):  # state and error only, and the real wait for and wording of them
            why_not_ready, settled, overran = Service.why_not_ready, Service.settled, Service.overran

        service = StubService(
            state=LOADING,
            error=None,
            failure="the model failed to load",
            batcher=SimpleNamespace(running_for=0.0),  # no model call running
            pools=SimpleNamespace(jammed_for=0.0),  # nor a jammed pool
            settings=SimpleNamespace(request_timeout=60.0),
        )
        replica = SimpleNamespace(service=service, load_timeout_s=load_timeout_s)

        async def finish_loading() -> None:
            await asyncio.sleep(0.3)
            replica.service.state = final
            replica.service.error = None if final == READY else "OSError: no weights here"

        loader = asyncio.ensure_future(finish_loading())
        try:
            await check(replica)
        except RuntimeError as exc:
            return str(exc)
        finally:
            await loader
        return None

    assert asyncio.run(scenario(READY)) is None
    assert asyncio.run(scenario(FAILED)) == "the model failed to load: OSError: no weights here"
    assert (
        asyncio.run(scenario(READY, load_timeout_s=0.05)) == "the model is loading after load_timeout_s=0.05"
    )


def test_health_check_fails_while_a_model_call_outruns_five_request_timeouts() -> None:
    """A hung handler call: Ray replaces a replica whose health check raises."""
    check = ray_adapter.DockerViT.func_or_class.check_health

    class StubService(SimpleNamespace):
        why_not_ready, settled, overran = Service.why_not_ready, Service.settled, Service.overran

    def service(running_for: float) -> StubService:
        return StubService(
            state=READY,
            error=None,
            failure="the model failed to load",
            settings=SimpleNamespace(request_timeout=60.0),
            batcher=SimpleNamespace(running_for=running_for),
            pools=SimpleNamespace(jammed_for=0.0),
        )

    # a long but valid batch (a client's 16 images at 8 beams on a slow CPU) is not a reason to kill
    asyncio.run(check(SimpleNamespace(service=service(299.0), load_timeout_s=30)))
    with pytest.raises(RuntimeError, match="a model call has run for 301.0 s, past the request timeout"):
        asyncio.run(check(SimpleNamespace(service=service(301.0), load_timeout_s=30)))
    # a GPU that failed for good (the service says so: tests/test_faults.py) fails the check too
    lost = service(0.0)
    lost.state, lost.failure, lost.error = (
        "failed",
        "the device failed",
        "RuntimeError: CUDA error: an illegal memory",
    )
    with pytest.raises(
        RuntimeError, match="^the device failed: RuntimeError: CUDA error: an illegal memory$"
    ):
        asyncio.run(check(SimpleNamespace(service=lost, load_timeout_s=30)))


def test_shutdown_is_clean(ray_url: str) -> None:
    """Runs last in this module: deleting the app, then stopping Serve and Ray, leaves nothing behind."""
    assert post_photo(ray_url).status_code == 200
    serve.delete("docker-vit")
    assert "docker-vit" not in serve.status().applications
    serve.shutdown()
    ray.shutdown()
    assert not ray.is_initialized()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            httpx.get(ray_url + "/healthz", timeout=1)
        except httpx.TransportError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("Ray's HTTP proxy still answers after serve.shutdown() and ray.shutdown()")
