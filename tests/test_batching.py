"""The batcher: batches by options, bounded queue, dropped cancellations, failure isolation."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref

import pytest

from docker_vit.batching import Batcher
from docker_vit.errors import QueueFull
from docker_vit.images import InputError
from docker_vit.waiting import HOLD


class Recorder:
    def __init__(self, fail_on: object = None, oom_above: int = 0, delay: float = 0.0) -> None:
        self.calls: list[tuple[list, object]] = []
        self.fail_on, self.oom_above, self.delay = fail_on, oom_above, delay
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items, options):
        self.release.wait(5)
        self.calls.append((list(items), options))
        if self.oom_above and len(items) > self.oom_above:
            raise type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory")
        if self.fail_on in items:
            raise ValueError("poison")
        return [f"{item}:{options}" for item in items]


def run(coroutine):
    return asyncio.run(coroutine)


def make(predict, **kw) -> Batcher:
    return Batcher(predict, **{"max_batch_size": 4, "max_wait": 0.05, "max_queue": 100, **kw})


def test_concurrent_items_share_a_call_grouped_by_options() -> None:
    async def main():
        recorder = Recorder()
        batcher = make(recorder)
        batcher.start()
        futures = batcher.submit([1, 2], "a") + batcher.submit([3], "b") + batcher.submit([4, 5, 6, 7], "a")
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return recorder.calls, results

    calls, results = run(main())
    assert results == ["1:a", "2:a", "3:b", "4:a", "5:a", "6:a", "7:a"]
    assert ([1, 2, 4, 5], "a") in calls and ([3], "b") in calls and ([6, 7], "a") in calls


def test_full_queue_refuses_whole_requests() -> None:
    async def main():
        batcher = make(Recorder(), max_queue=3)
        batcher.start()
        batcher.submit([1, 2], "a")
        with pytest.raises(QueueFull):
            batcher.submit([3, 4], "a")
        assert batcher.depth == 2
        await batcher.stop()

    run(main())


def test_cancelled_items_never_reach_the_model() -> None:
    async def main():
        recorder = Recorder()
        recorder.release.clear()
        batcher = make(recorder, max_batch_size=1, max_wait=0)
        batcher.start()
        first = batcher.submit(["first"], "a")
        await asyncio.sleep(0.05)  # "first" is running; the rest wait
        waiting = batcher.submit(["gone", "kept"], "a")
        waiting[0].cancel()
        recorder.release.set()
        await asyncio.gather(*first, waiting[1])
        await batcher.stop()
        return recorder.calls

    assert [items for items, _ in run(main())] == [["first"], ["kept"]]


def test_outputs_are_counted_also_for_callers_gone_during_the_call() -> None:
    """`docker_vit_images_total` counts what the model captioned, whoever was left to take it."""

    async def main():
        recorder, counted = Recorder(), []
        recorder.release.clear()
        batcher = make(recorder, max_wait=0, on_outputs=counted.append)
        batcher.start()
        futures = batcher.submit(["gone", "kept"], "a")
        while batcher.running_for == 0:  # until both are in the running call
            await asyncio.sleep(0.005)
        futures[0].cancel()
        recorder.release.set()
        await futures[1]
        failed = batcher.submit([1, 2], "a")
        recorder.fail_on = 1
        await asyncio.gather(*failed, return_exceptions=True)  # the halves: [1] fails, [2] is captioned
        await batcher.stop()
        return counted

    assert run(main()) == [2, 1]


def test_each_call_reports_its_items_queue_waits_and_its_own_seconds() -> None:
    """The queue-wait and model-time histograms: one wait per item, one duration per call, failed too."""

    async def main():
        recorder, waits, calls = Recorder(fail_on=9), [], []
        recorder.release.clear()
        batcher = make(recorder, max_wait=0, on_batch=waits.append, on_call=calls.append)
        batcher.start()
        first = batcher.submit([1], "a")
        while batcher.running_for == 0:
            await asyncio.sleep(0.005)
        queued = batcher.submit([2, 3], "a")  # wait for the first call, which holds the device
        await asyncio.sleep(0.2)
        recorder.release.set()
        await asyncio.gather(*first, *queued)
        await asyncio.gather(*batcher.submit([9], "a"), return_exceptions=True)
        await batcher.stop()
        return waits, calls

    waits, calls = run(main())
    assert [len(batch) for batch in waits] == [1, 2, 1] and len(calls) == 3
    assert waits[0][0] < 0.1 and all(0.2 <= wait < 5 for wait in waits[1])  # they queued behind call 1
    assert calls[0] >= 0.2 and all(0 <= seconds < 5 for seconds in calls)


def test_a_poison_item_fails_alone() -> None:
    async def main():
        batcher = make(Recorder(fail_on=3))
        batcher.start()
        futures = batcher.submit([1, 2, 3, 4], "a")
        return await asyncio.gather(*futures, return_exceptions=True), batcher

    results, _ = run(main())
    assert results[:2] == ["1:a", "2:a"] and results[3] == "4:a"
    assert isinstance(results[2], ValueError)


def test_an_abandoned_a_handler_raises_itself_fails_only_its_item() -> None:
    """`Abandoned` means every caller has gone; raised while callers still wait, it is the handler's
    own failure of one item, and its batch-mates are answered, as for any poison item."""
    from docker_vit.abandon import Abandoned

    def gives_up_on_3(items, options):
        if 3 in items:
            raise Abandoned("handler raised it itself")
        return [f"{item}:{options}" for item in items]

    async def main():
        batcher = make(gives_up_on_3)
        batcher.start()
        return await asyncio.gather(*batcher.submit([1, 2, 3, 4], "a"), return_exceptions=True)

    results = run(main())
    assert results[:2] == ["1:a", "2:a"] and results[3] == "4:a" and isinstance(results[2], Abandoned)


def test_a_wrong_output_count_fails_the_batch_without_retries() -> None:
    """Batches of one would pass, so halving would hide a predict that answers once per batch."""
    calls: list[int] = []

    def once_per_batch(items, options):
        calls.append(len(items))
        return ["summary"]

    async def main():
        batcher = make(once_per_batch)
        batcher.start()
        results = await asyncio.gather(*batcher.submit([1, 2, 3, 4], "a"), return_exceptions=True)
        await batcher.stop()
        return results

    results = run(main())
    assert calls == [4]
    assert all("1 outputs for 4 items" in str(result) for result in results), results


def test_callers_who_give_up_while_the_device_is_busy_leave_nothing_queued() -> None:
    """Their items leave the queue at once, not when the next batch is taken: otherwise callers that
    time out (or leave) while a long call runs would pile up their inputs without bound."""

    def predict(items, options):
        time.sleep(0.3 if options == "slow" else 0)
        return list(items)

    async def main():
        batcher = make(predict, max_wait=0, max_queue=4)
        batcher.start()
        slow = batcher.submit(["x"], "slow")
        await asyncio.sleep(0.05)  # on the device now
        kept = []
        for _ in range(50):
            (future,) = batcher.submit([bytearray(1000)], "fast")
            future.cancel()
            await asyncio.sleep(0)
            kept.append(sum(len(group) for group in batcher.waiting._groups.values()))
        await asyncio.gather(*slow)
        await batcher.stop()
        return kept

    assert max(run(main())) == 0


def test_a_group_whose_callers_all_left_holds_no_other_batch_back() -> None:
    async def main():
        batcher = make(lambda items, options: list(items), max_batch_size=2, max_wait=5.0)
        batcher.start()
        (gone,) = batcher.submit(["a"], "A")
        await asyncio.sleep(0.01)
        gone.cancel()
        started = time.monotonic()
        results = await asyncio.gather(*batcher.submit(["b1", "b2"], "B"))  # full: goes at once
        waited = time.monotonic() - started
        await batcher.stop()
        return results, waited

    results, waited = run(main())
    assert results == ["b1", "b2"] and waited < 2.5  # not held for A's 5 s wait


def test_a_full_group_does_not_wait_behind_an_older_one_still_filling() -> None:
    """A review: a lone item of one group, waiting to fill, held a full batch of another group with
    the device idle, for the whole of the lone item's wait."""

    async def main():
        recorder = Recorder()
        batcher = make(recorder, max_batch_size=2, max_wait=5.0)
        batcher.start()
        lone = batcher.submit(["a"], "A")
        await asyncio.sleep(0.01)
        started = time.monotonic()
        results = await asyncio.gather(*batcher.submit(["b1", "b2"], "B"))  # full: goes at once
        waited = time.monotonic() - started
        pending = not lone[0].done()
        await batcher.stop()
        return results, waited, pending

    results, waited, pending = run(main())
    assert results == ["b1:B", "b2:B"] and waited < 2.5 and pending  # A still waits its turn to fill


def test_a_group_passed_over_for_a_full_one_goes_next() -> None:
    """Steady traffic that fills every batch of one group does not starve another: its wait counts
    idle device time, which back-to-back full batches never give it (a review: 70 batches ahead of
    it, and none at a 10 ms wait), so once passed over it goes next."""

    async def main():
        calls = []

        def predict(items, options):
            calls.append(options)
            time.sleep(0.01)
            return list(items)

        batcher = make(predict, max_batch_size=4, max_wait=0.05)
        batcher.start()
        running = True

        async def client() -> None:  # one of a dozen, each sending its next item once answered
            while running:
                await asyncio.gather(*batcher.submit(["b"], "B"))

        clients = [asyncio.ensure_future(client()) for _ in range(12)]
        await asyncio.sleep(0.2)
        before = len(calls)
        await asyncio.wait_for(asyncio.gather(*batcher.submit(["a"], "A")), 2.0)
        ahead = calls[before:].index("A")
        running = False
        await asyncio.gather(*clients)
        await batcher.stop()
        return ahead

    assert run(main()) <= 4  # the B batches already queued or running, then A


def test_out_of_memory_splits_the_batch() -> None:
    async def main():
        recorder = Recorder(oom_above=1)
        batcher = make(recorder)
        batcher.start()
        results = await asyncio.gather(*batcher.submit([1, 2, 3, 4], "a"))
        await batcher.stop()
        return results, recorder.calls

    results, calls = run(main())
    assert results == ["1:a", "2:a", "3:a", "4:a"]
    assert [len(items) for items, _ in calls] == [4, 2, 1, 1, 2, 1, 1]


def test_a_failed_batchs_memory_is_free_before_its_halves_run() -> None:
    """What the failed call held (its frames' locals: activations, caches) must not live on, through
    the exception's traceback, while the smaller retries need that memory."""
    held: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    class Activations:
        pass

    def predict(items, options):
        if len(items) == 1:
            alive_at_retry.append(held[0]() is not None)
            return items
        activations = Activations()  # a local of the failing frame, as a model's tensors are
        held.append(weakref.ref(activations))
        raise MemoryError("out of memory")

    async def main():
        batcher = make(predict)
        batcher.start()
        results = await asyncio.gather(*batcher.submit([1, 2], "a"))
        await batcher.stop()
        return results

    assert run(main()) == [1, 2]
    assert alive_at_retry == [False, False]  # freed before the halves ran, not held by the failure


def test_abandoned_items_free_their_queue_room_at_once() -> None:
    async def main():
        recorder = Recorder()
        recorder.release.clear()
        batcher = make(recorder, max_batch_size=1, max_wait=0, max_queue=2)
        batcher.start()
        running = batcher.submit(["running"], "a")
        await asyncio.sleep(0.05)
        waiting = batcher.submit(["gone", "also gone"], "a")
        for future in waiting:
            future.cancel()
        await asyncio.sleep(0)
        assert batcher.depth == 0
        kept = batcher.submit(["kept", "too"], "a")  # fits: the abandoned two no longer count
        recorder.release.set()
        await asyncio.gather(*running, *kept)
        await batcher.stop()
        return recorder.calls

    assert [items for items, _ in run(main())] == [["running"], ["kept"], ["too"]]


def test_items_still_being_decoded_join_the_batch() -> None:
    async def main():
        recorder = Recorder()
        batcher = make(recorder, max_wait=0.001)
        batcher.start()
        batcher.admit(1, "a")  # a request is accepted and its image is being decoded
        first = batcher.submit([1], "a")
        await asyncio.sleep(0.02)  # well past max_wait, but within HOLD
        batcher.withdraw(1, "a")
        second = batcher.submit([2], "a")
        results = await asyncio.gather(*first, *second)
        await batcher.stop()
        return results, recorder.calls

    results, calls = run(main())
    assert results == ["1:a", "2:a"] and [items for items, _ in calls] == [[1, 2]]


def test_a_lone_item_does_not_wait_for_nothing() -> None:
    async def main():
        recorder = Recorder()
        batcher = make(recorder, max_wait=0.001)
        batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*batcher.submit([1], "a"))
        waited = loop.time() - started
        await batcher.stop()
        return waited

    assert run(main()) < HOLD


def test_option_groups_queued_together_wait_once_not_once_each() -> None:
    """Four groups queued at once: the first waits max_wait to fill, the others have waited through it
    and go as soon as the device is free (they used to wait max_wait again, each in turn)."""
    wait = 0.6

    async def main():
        recorder = Recorder()
        batcher = make(recorder, max_wait=wait)
        batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        futures = [future for group in "abcd" for future in batcher.submit([group], group)]
        await asyncio.gather(*futures)
        took = loop.time() - started
        await batcher.stop()
        return took, recorder.calls

    took, calls = run(main())
    assert [options for _, options in calls] == ["a", "b", "c", "d"]
    assert wait <= took < 2.5 * wait  # once, not four times (2.4 s)


def test_items_queued_during_a_batch_still_wait_for_company() -> None:
    """An item that arrived while the device was busy waits max_wait once it is free, so that
    clients answered by that batch can send their next images into the same call."""

    async def main():
        recorder = Recorder()
        recorder.release.clear()
        batcher = make(recorder, max_wait=0.3)
        batcher.start()
        first = batcher.submit([1], "a")
        await asyncio.sleep(0.4)  # the first call is on the device, held there
        second = batcher.submit([2], "a")
        recorder.release.set()
        await asyncio.gather(*first)
        await asyncio.sleep(0.05)  # the device is free; the next client's image comes in
        third = batcher.submit([3], "a")
        await asyncio.gather(*second, *third)
        await batcher.stop()
        return [items for items, _ in recorder.calls]

    assert run(main()) == [[1], [2, 3]]


def test_the_load_runs_on_the_device_thread_where_the_batches_run() -> None:
    """Loading the model happens on the device thread, so torch's work stays on one thread."""

    async def main():
        threads: list[threading.Thread] = []
        batcher = make(lambda items, options: threads.append(threading.current_thread()) or list(items))
        batcher.start()
        loaded_on = await batcher.device.run(threading.current_thread)
        assert await asyncio.gather(*batcher.submit(["x"], None)) == ["x"]
        await batcher.stop()
        return loaded_on, threads

    loaded_on, threads = run(main())
    assert loaded_on is not threading.main_thread() and threads == [loaded_on]


def test_the_group_waiting_longest_goes_next_so_steady_traffic_starves_no_one() -> None:
    """Group "a" never empties; "b" still goes as soon as its item is the oldest waiting."""

    async def main():
        recorder = Recorder()
        recorder.release.clear()
        batcher = make(recorder, max_batch_size=2, max_wait=0)
        batcher.start()
        futures = batcher.submit(["a1", "a2"], "a")
        while not batcher.device.busy:
            await asyncio.sleep(0.001)
        futures += (
            batcher.submit(["a3"], "a") + batcher.submit(["b1"], "b") + batcher.submit(["a4", "a5"], "a")
        )
        recorder.release.set()
        await asyncio.gather(*futures)
        await batcher.stop()
        return [items for items, _ in recorder.calls]

    assert run(main()) == [["a1", "a2"], ["a3", "a4"], ["b1"], ["a5"]]


def test_items_being_decoded_count_against_the_queue_and_hold_only_their_own_group() -> None:
    async def main():
        recorder = Recorder()
        batcher = make(recorder, max_queue=3, max_wait=0.001)
        batcher.start()
        batcher.admit(2, "a")  # two images of "a" still decoding
        with pytest.raises(QueueFull):
            batcher.admit(2, "b")  # refused before its own decoding starts
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*batcher.submit([1], "b"))  # "b" waits for no decode of "a"
        waited = loop.time() - started
        batcher.withdraw(2, "a")
        await batcher.stop()
        return waited

    assert run(main()) < HOLD / 2


def test_an_empty_submission_forms_no_batch() -> None:
    async def main() -> list:
        batcher = make(Recorder(), max_wait=0)
        batcher.start()
        futures = batcher.submit([], "a") + batcher.submit(["x"], "a")
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return results

    assert run(main()) == ["x:a"]


def test_items_whose_caller_left_during_a_failed_batch_are_not_retried() -> None:
    """A failed batch is retried in halves, without the items whose callers gave up meanwhile."""

    async def main():
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future] = []

        class LeaveDuringFirstCall(Recorder):
            def __call__(self, items, options):
                if not self.calls:  # the other three callers give up while the model runs
                    loop.call_soon_threadsafe(lambda: [f.cancel() for f in futures[1:]])
                    time.sleep(0.05)
                return super().__call__(items, options)

        recorder = LeaveDuringFirstCall(oom_above=1)
        batcher = make(recorder)
        batcher.start()
        futures.extend(batcher.submit([1, 2, 3, 4], "a"))
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        return results, recorder.calls

    results, calls = run(main())
    assert results[0] == "1:a" and all(isinstance(r, asyncio.CancelledError) for r in results[1:])
    assert [items for items, _ in calls] == [[1, 2, 3, 4], [1]]


def test_stop_answers_every_caller_and_leaves_the_counts_at_zero() -> None:
    async def main():
        recorder = Recorder()
        recorder.release.clear()
        batcher = make(recorder, max_batch_size=1, max_wait=0)
        batcher.start()
        running = batcher.submit(["running"], "a")
        await asyncio.sleep(0.05)
        queued = batcher.submit(["queued", "too"], "a")
        batcher.admit(1, "a")
        assert (batcher.depth, batcher.pending) == (2, 3)
        await batcher.stop()
        await asyncio.sleep(0)
        recorder.release.set()
        return [f.cancelled() for f in [*running, *queued]], batcher.depth

    cancelled, depth = run(main())
    assert cancelled == [True, True, True] and depth == 0


def test_stop_during_a_failed_batchs_retries_answers_all_of_it() -> None:
    """The halves not on the device yet belong to the batch too: every caller gets an answer."""

    async def main():
        gate = threading.Event()

        class FailThenBlock(Recorder):
            def __call__(self, items, options):
                self.calls.append(list(items))
                if len(items) > 1:
                    raise RuntimeError("CUDA out of memory")
                gate.wait(5)
                return [f"{items[0]}:{options}"]

        batcher = make(FailThenBlock(), max_wait=0)
        batcher.start()
        futures = batcher.submit([0, 1, 2, 3], "a")
        await asyncio.sleep(0.3)  # [0, 1, 2, 3] and [0, 1] failed; [0] is on the device
        await batcher.stop()
        gate.set()
        return [future.cancelled() for future in futures]

    assert run(main()) == [True, True, True, True]


def test_an_input_refused_inside_predict_is_not_logged_as_a_model_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Refused(InputError):  # the client's mistake, though raised in predict
        pass

    def predict(items, options):
        raise Refused("this input is not for this model")

    async def main():
        batcher = make(predict)
        batcher.start()
        results = await asyncio.gather(*batcher.submit([1], "a"), return_exceptions=True)
        await batcher.stop()
        return results

    with caplog.at_level(logging.INFO, logger="docker_vit.batching"):
        (result,) = run(main())
    assert isinstance(result, Exception) and str(result) == "this input is not for this model"
    assert [r.levelname for r in caplog.records] == ["INFO"] and "refused its input" in caplog.text


class _StatusMethod(Exception):
    def status(self) -> int:  # as some client libraries' errors have: not a status code
        return 404


def test_an_error_of_any_shape_from_predict_never_stops_the_batcher() -> None:
    """A `status` that is no number (a method, say) broke the log's check, which ended the batcher:
    every later request waited for its timeout."""
    calls = []

    def predict(items, options):
        calls.append(items)
        if "bad" in items:
            raise _StatusMethod("upstream said no")
        return list(items)

    async def main():
        batcher = make(predict, max_wait=0)
        batcher.start()
        bad = asyncio.gather(*batcher.submit(["bad"], "a"), return_exceptions=True)
        (failed,) = await asyncio.wait_for(bad, 5)
        later = await asyncio.wait_for(asyncio.gather(*batcher.submit(["good"], "a")), 5)
        await batcher.stop()
        return failed, later

    failed, later = run(main())
    assert isinstance(failed, _StatusMethod) and later == ["good"]


def test_a_batch_whose_callers_all_left_stops_at_its_next_step(caplog) -> None:
    """A long predict that asks `stop_if_abandoned` between steps ends once nobody waits for it, and a
    batch with one caller still waiting runs on."""
    from docker_vit.abandon import Abandoned, stop_if_abandoned

    steps: dict[str, int] = {}
    outcome: dict[str, str] = {}

    def predict(items, options):
        for step in range(2000):  # 20 s if it never stopped
            steps[options] = step
            try:
                stop_if_abandoned()
            except Abandoned:
                outcome[options] = "stopped"
                raise
            if options == "kept" and step == 20:
                break
            time.sleep(0.01)
        outcome[options] = "finished"
        return [f"{item}:{options}" for item in items]

    async def main():
        batcher = make(predict, max_wait=0)
        batcher.start()
        left = batcher.submit([1, 2], "left")
        await asyncio.sleep(0.1)
        for future in left:
            future.cancel()  # both callers give up: a client that left, a 504
        one_left, stays = batcher.submit([3, 4], "kept")
        await asyncio.sleep(0.05)
        one_left.cancel()
        answer = await asyncio.wait_for(stays, 10)
        await batcher.stop()
        return answer

    caplog.set_level(logging.INFO, logger="docker_vit.batching")
    assert run(main()) == "4:kept"
    assert outcome == {"left": "stopped", "kept": "finished"} and steps["left"] < 1000
    assert "batch of 2 stopped: every caller has gone" in caplog.text
    assert "model call failed" not in caplog.text and "retrying" not in caplog.text


def test_outside_a_batch_stop_if_abandoned_never_raises() -> None:
    from docker_vit.abandon import stop_if_abandoned, watched

    assert stop_if_abandoned() is None  # `docker-vit caption` runs predict outside any batch
    with watched(lambda: False):
        assert stop_if_abandoned() is None
    assert stop_if_abandoned() is None


def test_a_stopped_batch_frees_its_work_without_the_cycle_collector() -> None:
    """Abandoned's traceback holds predict's frames (a decode's caches) in a cycle with the batcher's
    frame: left to the cycle collector, a GPU would hold them while the next batch runs."""
    import gc
    import weakref

    from docker_vit.handler import stop_if_abandoned  # where handler authors find it

    class Caches:
        pass

    caches: list[weakref.ref] = []

    def predict(items, options):
        work = Caches()
        caches.append(weakref.ref(work))
        while True:
            stop_if_abandoned()
            time.sleep(0.01)

    async def main():
        batcher = make(predict, max_wait=0)
        batcher.start()
        (future,) = batcher.submit([1], "x")
        await asyncio.sleep(0.1)
        future.cancel()
        while batcher.device.busy:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the batcher's own handling of the stop
        freed = caches[0]() is None
        await batcher.stop()
        return freed

    gc.collect()
    gc.disable()
    try:
        assert run(main())
    finally:
        gc.enable()


def test_a_failing_metrics_callback_breaks_neither_the_batch_nor_the_batcher() -> None:
    """A metrics hiccup is logged; the batch is answered and the next lone item still goes after
    max_wait (the idle clock and running_for are not left as during a call)."""

    def boom(_) -> None:
        raise ValueError("metrics backend hiccup")

    async def main():
        batcher = make(Recorder(), on_batch=boom, on_call=boom, on_outputs=boom)
        batcher.start()
        first = await asyncio.gather(*batcher.submit([1], "a"))
        second = await asyncio.wait_for(asyncio.gather(*batcher.submit([2], "a")), 2)
        running_for = batcher.running_for
        await batcher.stop()
        return first, second, running_for

    assert run(main()) == (["1:a"], ["2:a"], 0.0)


def test_a_retried_half_waits_only_for_the_device_not_for_the_failed_call() -> None:
    async def main():
        recorder, waits = Recorder(fail_on=4), []

        def slow(items, options):
            time.sleep(0.3)
            return recorder(items, options)

        batcher = make(slow, max_wait=0, on_batch=waits.append)
        batcher.start()
        await asyncio.gather(*batcher.submit([1, 2, 3, 4], "a"), return_exceptions=True)
        await batcher.stop()
        return waits

    waits = run(main())
    assert [len(w) for w in waits] == [4, 2, 2, 1, 1]
    assert max(waits[1]) < 0.1  # the first half goes at once: the failed call was model time
    assert all(0.25 < wait < 1.0 for wait in waits[2])  # the second waits for the first half's call
