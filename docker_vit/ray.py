"""Ray Serve adapter: the same HTTP app as `docker-vit serve`, run as replicas of a Ray Serve deployment.

    pip install ".[ray]"   # from the repository root
    serve run docker_vit.ray:app model=nlpconnect/vit-gpt2-image-captioning num_gpus=1 num_replicas=2

`app` is a Ray application builder: Ray's CLI hands it the `key=value` arguments (or the `args:` of a
Serve config file). Every `Settings` field is an argument (`model`, `num_beams`, `max_new_tokens`,
`device`, `max_batch_size`, ...), layered over the replica's own `DOCKER_VIT_*` variables; the rest
shape the deployment (`DEPLOYMENT_ARGS`). Each replica builds the app with `server.create_app`, so the
routes, limits, errors and metrics are those of `docker-vit serve`; Ray's proxy (port 8000 by default)
spreads requests over the replicas, and inside each one the project's batcher gathers them into model
calls (rather than `@serve.batch`, which would be a second batching path beside the one every other
entry point uses, without its per-options grouping, queue limit and failed-batch splitting).

Readiness is Ray's health check: Ray calls `check_health` once before routing traffic to a new
replica, and that first call waits for the model to load and warm up; a load that failed raises, so
Ray replaces the replica instead of sending it requests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve  # the real Ray: absolute imports never resolve to this module

from docker_vit import logs
from docker_vit.config import SERVING, Settings, env_name, options
from docker_vit.environment import parse, server_warnings
from docker_vit.handler import HandlerError
from docker_vit.loader import check_class_knobs, check_methods, handler_class
from docker_vit.server import create_app
from docker_vit.service import LOADING

# Arguments that configure the Ray deployment rather than Docker-ViT itself, with their types.
DEPLOYMENT_ARGS: dict[str, type] = {
    "num_replicas": int,  # fixed replica count (or "auto": Ray's default autoscaling)
    "min_replicas": int,  # any of these three turns autoscaling on
    "max_replicas": int,
    "target_ongoing_requests": float,
    "num_gpus": float,  # per replica; fractions share a GPU between replicas
    "num_cpus": float,  # per replica
    "max_ongoing_requests": int,  # per replica (default: two full batches)
    "max_queued_requests": int,  # per caller (Ray's proxy) beyond which Ray answers 503 (default: max_queue)
    "load_timeout_s": float,  # longest model load + warm-up before the replica counts as failed
}
LOAD_TIMEOUT_S = 1800.0
HUNG_AFTER = 5  # request timeouts a model call may run before the health check fails
# Ray's proxy owns the listening socket (`serve start --http-port`, or http_options in a config file).
NOT_UNDER_RAY = ("host", "port")


class _ReplicaApp:
    """The ASGI app handed to `serve.ingress`: it forwards to the FastAPI app its replica built.

    Ray pickles the ingress app along with the deployment, before any replica exists, and a model
    service cannot be pickled; so this carries nothing and pickles by name, resolving in every Ray
    worker process (one replica each) to that process's instance, which the replica's constructor
    fills in before Ray runs the lifespan (which starts the service) or routes any request.
    """

    app: FastAPI | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.app is None:
            raise RuntimeError("no replica has installed its app in this process")
        root = scope.get("root_path", "")
        if scope["type"] == "http" and root and scope["path"] in ("", root):
            # Under `--route-prefix /cap`, `POST /cap` is the original `POST /`: answered, not redirected.
            scope = {**scope, "path": root + "/", "raw_path": (root + "/").encode()}
        await self.app(scope, receive, send)

    def __reduce__(self) -> str:
        return "REPLICA_APP"


REPLICA_APP = _ReplicaApp()


@serve.deployment(name="DockerViT")
@serve.ingress(REPLICA_APP)
class DockerViT:
    """One replica: the settings loaded where it runs, its app, and Ray's health check."""

    def __init__(self, overrides: Mapping[str, Any], load_timeout_s: float = LOAD_TIMEOUT_S) -> None:
        # Loaded here, not in the builder, so the replica's own DOCKER_VIT_* variables apply.
        settings = Settings.load(None, SERVING, **overrides)
        settings = replace(settings, device=replica_device(settings.device, ray.get_gpu_ids()))
        try:
            handler_class(settings)
        except HandlerError as exc:  # the builder found it on `serve run`'s path, this worker did not
            raise HandlerError(
                f"{_as_argument(exc, overrides)} (in a replica: ship the module with `serve run --working-dir .`, "
                "or a config's runtime_env working_dir, or install it where Ray's workers run)"
            ) from None
        logs.configure(settings.log_format, settings.log_level, logger="docker_vit")
        for line in server_warnings(settings):
            logging.getLogger("docker_vit").warning(line)
        try:  # proxied: Ray's proxy gives the request ids, and cancels the requests of clients gone
            web = create_app(settings, proxied=True)
        except HandlerError as exc:  # the handler's own constructor failed
            raise HandlerError(_as_argument(exc, overrides)) from None
        self.service = web.state.service
        self.load_timeout_s = load_timeout_s
        REPLICA_APP.app = web

    async def check_health(self) -> None:
        """Raises unless the model is ready; the first call waits for the load to end either way. A
        model call far past the request timeout (a hung handler: `HUNG_AFTER` timeouts, where a long but
        valid batch has ended) raises too, so Ray replaces the replica."""
        service = self.service
        settled = await service.settled(self.load_timeout_s)
        if not settled or service.overran(HUNG_AFTER):
            late = f" after load_timeout_s={self.load_timeout_s:g}" if service.state == LOADING else ""
            raise RuntimeError(service.why_not_ready + late)


def replica_device(device: str, gpus: Sequence[Any]) -> str:
    """`auto` on a replica Ray gave no GPU is the CPU: Ray 2.60 and later leave a GPU node's devices
    visible to such a replica, and `auto` would put every one of them on GPU 0, outside Ray's count."""
    return "cpu" if device == "auto" and not gpus else device


def app(args: Mapping[str, Any]) -> serve.Application:
    """Ray's application builder: `serve run docker_vit.ray:app model=... num_gpus=1`."""
    overrides, deployment = split_args(args)
    settings = Settings.load(None, SERVING, **overrides)  # bad arguments fail here, before any replica
    # A handler's own batch size sizes the concurrency: read from its class, as building a handler
    # may touch the GPU, which this process (`serve run`, the controller) must leave to the replicas.
    try:
        cls = handler_class(settings)
        # Checked here: the replicas would refuse a bad one, each with a traceback, and `serve run` exit 0.
        check_methods(cls)
        size = check_class_knobs(cls)  # name, option_names, max_batch_size: class attributes, as documented
    except HandlerError as exc:
        raise HandlerError(_as_argument(exc, overrides)) from None
    load_timeout_s = deployment.pop("load_timeout_s", LOAD_TIMEOUT_S)
    options = deployment_options(settings, deployment, size)
    return DockerViT.options(**options).bind(overrides, load_timeout_s)


def _as_argument(exc: HandlerError, given: Mapping[str, Any]) -> str:
    """The loader's message naming the setting as it was set here: the argument, or the variable."""
    return exc.said_as("handler" if "handler" in given else env_name("handler"))


def split_args(args: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Typed `Settings` overrides and deployment arguments from Ray's strings (or a config's values)."""
    fields = {name: options()[name] for name in SERVING}
    unknown = sorted(set(args) - set(fields) - set(DEPLOYMENT_ARGS))
    if unknown:
        known = ", ".join([*(name for name in fields if name not in NOT_UNDER_RAY), *DEPLOYMENT_ARGS])
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {known}")
    taken = [name for name in NOT_UNDER_RAY if name in args]
    if taken:
        where = "serve start --http-port PORT before serve run, or http_options in a config file"
        raise ValueError(f"{', '.join(taken)}: Ray's HTTP proxy listens ({where})")
    overrides, deployment = {}, {}
    for name, value in args.items():
        if value is None or value == "" or value == []:  # left empty in a config file: unset, as an
            continue  # empty DOCKER_VIT_* variable is (not the text "None", nor a model named "")
        if isinstance(value, float) and value.is_integer():  # YAML's 2.0 where a count is meant
            value = int(value)
        text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        kind = type(fields[name].default) if name in fields else DEPLOYMENT_ARGS[name]
        try:
            if name in fields:
                overrides[name] = parse(fields[name], text)
            elif name == "num_replicas" and text == "auto":
                deployment[name] = text
            else:
                deployment[name] = kind(text)
        except ValueError:  # named as the argument it is, not as the variable `parse` would name
            raise ValueError(f"{name}={text!r} is not a valid {kind.__name__}") from None
    _check_ranges(deployment)
    return overrides, deployment


# The least each deployment argument may be: Ray refuses less in a page of pydantic's words, and only
# after the tuning warnings that a value it refuses would set off.
_LEAST = {
    "num_replicas": 1,
    "min_replicas": 0,
    "max_replicas": 1,
    "num_gpus": 0,
    "num_cpus": 0,
    "max_ongoing_requests": 1,
    "max_queued_requests": 1,
}


def _check_ranges(deployment: Mapping[str, Any]) -> None:
    """Each deployment argument in its range, refused in one line naming it."""
    for name, value in deployment.items():  # Ray checks its own options, but not for nan or inf
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        if name == "max_queued_requests" and value == -1:  # Ray's "no limit"
            continue
        if name in _LEAST and value != "auto" and value < _LEAST[name]:
            least = (
                "-1 (no limit) or at least 1" if name == "max_queued_requests" else f"at least {_LEAST[name]}"
            )
            raise ValueError(f"{name} must be {least}, got {value}")
    for name in ("target_ongoing_requests", "load_timeout_s"):
        if deployment.get(name, 1) <= 0:
            raise ValueError(f"{name} must be positive, got {deployment[name]}")


def deployment_options(
    settings: Settings, deployment: Mapping[str, Any], batch: int | None = None
) -> dict[str, Any]:
    """Ray's deployment options: replicas or autoscaling, resources per replica, concurrency.

    `batch` is the most images one model call takes (the handler's own `max_batch_size`, else the
    setting's)."""
    batch = batch or settings.max_batch_size
    scaling_keys = ("min_replicas", "max_replicas", "target_ongoing_requests")
    scaling = {key: deployment[key] for key in scaling_keys if key in deployment}
    actor = {key: deployment[key] for key in ("num_gpus", "num_cpus") if key in deployment}
    result: dict[str, Any] = {
        # One batch runs while the next one forms; more would only wait in this replica's queue
        # instead of Ray's router, which can still send them to a less busy replica (and never more
        # than that queue holds, or the replica answers 503 while another has room; counted in
        # requests, so that holds for one-image requests: several images each can still fill it).
        "max_ongoing_requests": deployment.get("max_ongoing_requests", min(2 * batch, settings.max_queue)),
        # Requests wait in Ray's router before a replica's own queue limit can see them: bound them too.
        "max_queued_requests": deployment.get("max_queued_requests", settings.max_queue),
        "graceful_shutdown_timeout_s": settings.shutdown_timeout,
        "ray_actor_options": actor,
    }
    if "max_ongoing_requests" in deployment and result["max_ongoing_requests"] < batch:
        logging.getLogger("docker_vit").warning(
            "max_ongoing_requests=%d is below the batch size %d: a replica's batches can never fill",
            result["max_ongoing_requests"],
            batch,
        )
    auto = deployment.get("num_replicas") == "auto"  # Ray's default autoscaling, which the keys tune
    if scaling or auto:
        if "num_replicas" in deployment and not auto:
            raise ValueError("give num_replicas or min/max_replicas (autoscaling), not both")
        top = scaling.get("max_replicas", 100 if auto else 1)  # Ray's default max: 100 with auto, else 1
        if scaling.get("min_replicas", 0) > top:
            raise ValueError(f"min_replicas={scaling['min_replicas']} needs max_replicas as large or larger")
        # Ray's default target (2) would scale out long before a replica's batches fill.
        scaling.setdefault("target_ongoing_requests", min(batch, result["max_ongoing_requests"]))
        if scaling["target_ongoing_requests"] > result["max_ongoing_requests"]:
            logging.getLogger("docker_vit").warning(
                "target_ongoing_requests=%g is above max_ongoing_requests=%d: requests wait in Ray's "
                "queue before another replica is started",
                scaling["target_ongoing_requests"],
                result["max_ongoing_requests"],
            )
        result["autoscaling_config"] = scaling
    if not scaling or auto:
        result["num_replicas"] = deployment.get("num_replicas", 1)
    return result
