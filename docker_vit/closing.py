"""The end of a handler's life: its close() runs on the device thread after its last call, and a stop
waits for it, but only so long, so that a hung model call or close() cannot hold up an exit for ever.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future

log = logging.getLogger("docker_vit.service")

CLOSE_WAIT = 10.0  # seconds a stop waits for a model call still running, then for the handler's close()
SAY_WAITING = 1.0  # seconds of that wait before the log says what it waits for


async def closed(final: Future) -> None:
    """Wait for `final` (the handler's close(), queued behind its last call), at most CLOSE_WAIT
    seconds, saying so after SAY_WAITING; a close() that failed or never ran is logged, not raised."""
    # asyncio.wait, not wait_for: a TimeoutError close() raises is its failure, not our wait's end
    # (and on 3.10 wait_for's own is asyncio.TimeoutError, which `except TimeoutError` misses)
    waiting = asyncio.wrap_future(final)
    say = min(SAY_WAITING, CLOSE_WAIT)
    done, _ = await asyncio.wait({waiting}, timeout=say)
    if not done and say < CLOSE_WAIT:  # said, so that a stop behind a long call is no silent pause
        behind = "" if final.running() else " after the load or model call still running"
        log.info("waiting for the handler's close()%s, at most %g s", behind, CLOSE_WAIT)
        done, _ = await asyncio.wait({waiting}, timeout=CLOSE_WAIT - say)
    if not done:
        dropped = final.cancel()  # a close() not started yet never runs; a running one goes on
        waiting.cancel()
        if dropped:
            log.warning(
                "the handler's close() was not called: the load or a model call still ran after %g s",
                CLOSE_WAIT,
            )
        else:
            log.warning("the handler's close() still runs after %g s; going on without it", CLOSE_WAIT)
        return
    if waiting.exception() is not None:
        log.error("the handler's close() failed", exc_info=waiting.exception())
