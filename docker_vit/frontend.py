"""What every front end does with one request, whatever carried it (the HTTP server, the Runpod worker;
Ray Serve runs the server): read its options, run it on the service within the request timeout, and
turn each way it can fail into the `ApiError` its client reads; and the model's description
(`/v1/model`). No web framework here: each front end writes these answers in its own form.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

from docker_vit import errors
from docker_vit.errors import QueueFull
from docker_vit.handler import Handler, Result
from docker_vit.service import READY, Service, Unanswered

ROOM_POLL = 0.05  # seconds between looks for queue room, for a caller that waits for it


class ClientGone(Exception):
    """The caller left before its answer was ready; its work was stopped."""


async def answer(
    service: Service,
    inputs: Sequence[bytes],
    raw: dict[str, Any],
    *,
    gone: Callable[[], Awaitable[Any]] | None = None,
    patient: bool = False,
) -> list[Result]:
    """The results of `inputs`, or an ApiError for each way a request fails: bad options (422), a full
    queue (503), a bad input (4xx), a timeout (504), the model (500). `gone()` ends once the client has
    left: its work stops and ClientGone is raised. `patient`: wait for queue room instead of a 503 (a
    Runpod job, whose platform queue is the buffer; a job over the whole queue still fails at once)."""
    try:
        options = service.options(raw)
    except Exception as exc:  # a client's mistake (422) or the handler's (500)
        raise errors.from_service(exc) from None
    work = asyncio.ensure_future(
        _when_room(service, inputs, options) if patient else service.run(inputs, options)
    )
    # the client's leaving (a future that never ends, where no one says)
    left = asyncio.ensure_future(gone()) if gone is not None else asyncio.get_running_loop().create_future()
    left.add_done_callback(lambda task: task.cancelled() or task.exception())  # nobody else reads it
    # not wait_for: a TimeoutError the handler raises would read as our own timeout
    try:
        done, _ = await asyncio.wait(
            {work, left}, timeout=service.settings.request_timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:  # timed out, the client left, or this task was cancelled (Ray does it when its client leaves)
        work.cancel()  # no-op once done; otherwise its images leave the queue
        left.cancel()
    if work not in done:
        if left in done:
            raise ClientGone
        raise errors.ApiError(504, f"no answer within {service.settings.request_timeout:g} s")
    failure = work.exception()  # not re-raised here: its traceback would hold this frame, and so `work`
    if failure is not None:
        raise errors.from_service(failure)
    return work.result()


async def _when_room(service: Service, inputs: Sequence[bytes], options: Hashable) -> list[Result]:
    """`service.run`, once the queue has room for the inputs."""
    while True:
        try:
            return await service.run(inputs, options)
        except QueueFull:
            await asyncio.sleep(ROOM_POLL)


async def model_info(service: Service) -> dict[str, Any]:
    """`/v1/model`: the handler's name and class, the options a request may set, what its
    `describe()` adds, the limits a request meets, and the model's state."""
    handler = service.handler
    base = Handler.describe(handler)  # name and class: what a describe() adds to
    try:
        info = {**base, **await service.describe()}
    except Exception as exc:
        if service.state == READY and isinstance(exc, Unanswered):
            raise errors.ApiError(504, str(exc)) from None
        if service.state == READY:
            raise errors.from_service(exc) from None
        info = base  # a describe() that needs the loaded model, asked while it loads
    info = {key: value for key, value in info.items() if key != "options"}  # not describe()'s: the
    if handler.option_names is not None:  # fields a request may set (`caption --url` sends no others)
        info["options"] = list(handler.option_names)
    limits = info.get("limits") if isinstance(info.get("limits"), dict) else {}
    settings = service.settings
    request = {"max_bytes": settings.max_bytes, "max_pixels": settings.max_pixels}
    request |= {"max_images": settings.max_images, "max_queue": settings.max_queue}
    request |= {"request_timeout": settings.request_timeout}
    # what TorchServe's describe and Triton's config tell a client that sizes its own concurrency
    batching = {"max_batch_size": service.batch_size, "max_wait_ms": settings.max_wait_ms}
    return {**info, "limits": {**limits, **request}, "batching": batching, "status": service.status}
