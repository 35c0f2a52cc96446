"""The handler's pools: what a stall is (every thread of a request-path pool held past the timeout),
and that a hung describe() holds neither a request's thread nor the warm-up."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

from conftest import serving
from fake_handlers import Echo

from docker_vit.config import Settings
from docker_vit.pools import Pools


def test_a_pool_is_jammed_only_while_every_thread_is_held_by_the_same_calls() -> None:
    release = threading.Event()

    async def scenario() -> list[float]:
        pools, seen = Pools(workers=2), []
        first = asyncio.ensure_future(pools.run(pools.pre, release.wait))
        await asyncio.sleep(0.2)
        seen.append(pools.jammed_for)  # one thread still free: decoding goes on
        second = asyncio.ensure_future(pools.run(pools.pre, release.wait))
        third = asyncio.ensure_future(pools.run(pools.side, release.wait))  # describe's: never a jam
        await asyncio.sleep(0.2)
        seen.append(pools.jammed_for)
        assert pools.busy
        release.set()
        await asyncio.gather(first, second, third)
        seen.append(pools.jammed_for)
        assert not pools.busy
        pools.shutdown()
        return seen

    try:
        free, jammed, after = asyncio.run(scenario())
    finally:
        release.set()
    assert free == 0.0 and 0.1 < jammed < 5 and after == 0.0


class LoadsSlowlyDescribesNever(Echo):
    """A load of two seconds; describe() hangs until the test lets it go."""

    let_go = threading.Event()

    def load(self) -> None:
        time.sleep(2)

    def describe(self) -> dict[str, Any]:
        self.let_go.wait(30)
        return {}


def test_describes_hung_while_the_model_loads_leave_the_warm_up_its_thread() -> None:
    """They shared a pool of two with example(): the model never became ready."""
    settings = Settings(request_timeout=0.3)
    handler = LoadsSlowlyDescribesNever(settings)
    try:
        with serving(settings, handler, wait=False) as client:
            for _ in range(3):  # more than the describe pool's threads
                answer = client.get("/v1/model")  # the base description, after the timeout
                assert answer.status_code == 200 and answer.json()["handler"].endswith(
                    "LoadsSlowlyDescribesNever"
                )
            deadline = time.monotonic() + 10
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, client.get("/readyz").json()
                time.sleep(0.05)
            assert client.get("/v1/model").status_code == 504  # ready now: its describe() is owed
    finally:
        LoadsSlowlyDescribesNever.let_go.set()


class DescribeTimesOut(Echo):
    def describe(self) -> dict[str, Any]:
        raise TimeoutError("the model registry did not answer")


def test_a_timeout_error_of_describes_own_is_its_failure_not_the_request_timeout() -> None:
    settings = Settings()
    with serving(settings, DescribeTimesOut(settings)) as client:
        answer = client.get("/v1/model")
    assert (
        answer.status_code == 500 and "the model registry did not answer" in answer.json()["error"]["message"]
    )


class DescribeBreaksLate(Echo):
    let_go = threading.Event()

    def describe(self) -> dict[str, Any]:
        self.let_go.wait(30)
        raise RuntimeError("describe broke late")


def test_a_describe_whose_caller_left_is_not_left_behind_to_fail_unseen() -> None:
    """Ray cancels a request whose client left: its describe() failing later logged 'Task exception
    was never retrieved', with a traceback, as if the server had a bug."""
    from docker_vit.service import Service

    async def scenario() -> list[dict]:
        unseen: list[dict] = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unseen.append(context))
        settings = Settings()
        service = Service(settings, DescribeBreaksLate(settings))
        asker = asyncio.ensure_future(service.describe())
        await asyncio.sleep(0.2)
        asker.cancel()
        DescribeBreaksLate.let_go.set()
        while service.busy:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        gc.collect()  # an unretrieved exception is reported when its task is collected
        service.pools.shutdown()
        return unseen

    try:
        assert asyncio.run(scenario()) == []
    finally:
        DescribeBreaksLate.let_go.set()
