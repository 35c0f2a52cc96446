"""`docker-vit caption` without `--url`: the configured handler in this process, batch by batch.

The counterpart of client.py's RemoteRunner: the same outcomes for folder.py to write. The next batch
is prepared (read and decoded on a thread pool) while the model runs on the current one, and a failed
batch is retried in halves, as the server's batcher does, so one image the model cannot take costs
only itself.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from docker_vit.calls import (
    contained,
    description,
    device_lost,
    drop_frames,
    predict_all,
    read_options,
    respond,
    splittable,
)
from docker_vit.captions_file import record
from docker_vit.config import Settings
from docker_vit.errors import CLIENT_ERRORS, OptionsError
from docker_vit.handler import Result
from docker_vit.loader import batch_size, load_handler, sync_result
from docker_vit.process import cpu_threads
from docker_vit.runner import (
    GIVE_UP_AFTER,
    CaptionError,
    Outcome,
    describe_error,
    generation_defaults,
    read_file,
)


class LocalRunner:
    """The configured handler in this process: batches of its size, the next one prepared meanwhile."""

    def __init__(
        self,
        settings: Settings,
        params: Mapping[str, Any],
        chosen: Collection[str] = (),
        warn: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.warn = warn
        self.handler = load_handler(settings)
        try:
            sync_result("load", contained(self.handler.load))
        except Exception as exc:  # a device torch lacks, a missing folder...: one line, not a traceback
            reason = " ".join(str(exc).split())  # transformers' messages span lines
            raise CaptionError(f"cannot load the model: {type(exc).__name__}: {reason}") from None
        # Only the options the user set, and of those the fields the handler reads when it says: its
        # own defaults hold for the rest, as through --url (its options() may also refuse ours).
        names = self.handler.option_names
        params = {
            key: value for key, value in params.items() if key in chosen and (names is None or key in names)
        }
        try:
            self.options = read_options(self.handler, params)
        except OptionsError as exc:
            self.close()
            raise CaptionError(str(exc)) from None
        except Exception as exc:
            self.close()
            raise CaptionError(f"the handler's options() failed: {type(exc).__name__}: {exc}") from None
        self.params = {**_defaults(self.handler), **params}  # what the records say made them
        self.batch_size = batch_size(self.handler, settings)
        self.max_bytes = settings.max_bytes
        self.failed_in_a_row = 0  # batches in which the model failed on every image
        self.refused_in_a_row = 0  # batches that captioned nothing, the handler refusing their options
        self.lost: Exception | None = None  # what failed the device for good: nothing more runs on it
        self.ends: str | None = None  # why the run ends once this batch's outcomes are out

    def run(self, paths: list[str]) -> Generator[list[Outcome], None, None]:
        batches = [paths[start : start + self.batch_size] for start in range(0, len(paths), self.batch_size)]
        cpu = ThreadPoolExecutor(max_workers=cpu_threads(), thread_name_prefix="docker-vit-prepare")
        try:
            upcoming = self._submit(cpu, batches[0]) if batches else []
            for index in range(len(batches)):
                prepared = upcoming
                upcoming = self._submit(cpu, batches[index + 1]) if index + 1 < len(batches) else []
                yield self._predict(prepared)  # its records and skipped lines stand, the run's end too
                if self.ends is not None:
                    raise CaptionError(self.ends)
        finally:  # the run's end, an error or Ctrl-C alike (folder.py drops the generator at once)
            cpu.shutdown(wait=False, cancel_futures=True)
            self.close()

    def close(self) -> None:
        """The handler's close(), said in one line if it fails: the captions written stand."""
        try:
            sync_result("close", contained(getattr(self.handler, "close", lambda: None)))
        except Exception as exc:
            self.warn(f"the handler's close() failed: {type(exc).__name__}: {exc}")
        except KeyboardInterrupt:  # Ctrl-C on a slow close: the run's records stand, its status too
            self.warn("the handler's close() was interrupted")

    def _submit(self, cpu: ThreadPoolExecutor, batch: list[str]) -> list[tuple[str, Future]]:
        return [(path, cpu.submit(self._prepare, path)) for path in batch]

    def _prepare(self, path: str) -> Any:
        """The file's item; its own failures (unreadable, too big) raise as they are, the handler's
        (but for InputError, the input's) as `_Failed`: a server answers those 500."""
        data = read_file(path, self.max_bytes)
        try:
            return contained(self.handler.prepare, data, self.options)
        except CLIENT_ERRORS:  # the client's, as a server answers them (4xx)
            raise
        except Exception as exc:  # an OSError too: the handler's own files, not the image's
            raise _Failed(exc) from None

    def _predict(self, prepared: list[tuple[str, Future]]) -> list[Outcome]:
        outcomes = [Outcome(path) for path, _ in prepared]
        ready, items, broke, refused = [], [], [], []
        for outcome, (_, future) in zip(outcomes, prepared, strict=True):
            try:
                items.append(future.result())
                ready.append(outcome)
            except _Failed as failed:  # the handler's: counts toward giving up
                outcome.error = f"the model failed: {type(failed.error).__name__}: {failed.error}"
                broke.append(failed.error)
            except Exception as exc:  # the file's: unreadable, or refused
                outcome.error = describe_error(exc)
                refused.append(exc)
        results = self._results(items)
        # the input's fault, as a server answers it (4xx): no sign of a broken model
        self._give_up_on_a_broken_model(
            broke + [result for result in results if not isinstance(result, CLIENT_ERRORS)]
        )
        for outcome, result in zip(ready, results, strict=True):
            if isinstance(result, _NotRun):
                outcome.error = str(result)
            elif isinstance(result, CLIENT_ERRORS):  # `predict` or `respond` refused the input
                outcome.error = describe_error(result)
                refused.append(result)
            elif isinstance(result, Exception):
                outcome.error = f"the model failed: {type(result).__name__}: {result}"
            else:
                outcome.entry = record(outcome.path, result.text, self.handler.name, self.params, result.data)
        self._end_on_refused_options(refused, captioned=any(outcome.entry for outcome in outcomes))
        return outcomes

    def _end_on_refused_options(self, refused: list[Exception], captioned: bool) -> None:
        """Options the handler refuses (OptionsError: a server's 422, which ends a `--url` run) in
        GIVE_UP_AFTER batches in a row that captioned nothing are this run's: every later image would
        be refused too, so the run ends. Options refused for an image or two only skip those."""
        options = [exc for exc in refused if isinstance(exc, OptionsError)]
        if captioned:
            self.refused_in_a_row = 0
        elif options:  # a batch of files that never reached the handler tells nothing
            self.refused_in_a_row += 1
            if self.refused_in_a_row >= GIVE_UP_AFTER and self.ends is None:
                said = f"the handler refused this run's options in {GIVE_UP_AFTER} batches in a row"
                self.ends = f"{said}: {options[-1]}"

    def _give_up_on_a_broken_model(self, results: list[Result | Exception]) -> None:
        """A poison image fails alone; a model that fails on every image of batch after batch is broken
        (a wrong device, an out-of-memory at any size): end the run after this batch rather than retry
        every image."""
        if self.lost is not None:  # `predict` lost the device: every later call on it would fail too
            self.ends = f"the device failed: {type(self.lost).__name__}: {self.lost}"
            return
        if not results or not all(isinstance(result, Exception) for result in results):
            self.failed_in_a_row = 0
            return
        self.failed_in_a_row += 1
        if self.failed_in_a_row >= GIVE_UP_AFTER:
            error = results[-1]
            self.ends = (
                f"the model failed on every image of {GIVE_UP_AFTER} batches in a row: "
                f"{type(error).__name__}: {error}"
            )

    def _results(self, items: list[Any]) -> list[Result | Exception]:
        """Each item's result, or the error of the model on it. `respond` runs per output, as the
        server runs it per request: its mistake is no reason to run the model again."""
        return [
            output.error if isinstance(output, _Failed) else _respond(self.handler, output)
            for output in self._outputs(items)
        ]

    def _outputs(self, items: list[Any]) -> list[Any]:
        """`predict`'s outputs, a `_Failed` for each item it failed on: a failed batch is retried in
        halves, as the server's batcher does, so one image the model cannot take (or an out-of-memory
        batch) costs only what really fails, and a later run can retry it."""
        if not items:
            return []
        if self.lost is not None:  # the other half of a split batch, after the first lost the device
            return [_Failed(_NotRun("not run: the device failed before its turn"))] * len(items)
        try:  # the handler's code, whatever it raises (SystemExit too): an error, not a traceback
            return predict_all(self.handler, list(items), self.options)  # a copy: predict may consume it
        except Exception as exc:
            failure = exc
        drop_frames(failure)  # the failed call's memory must be free for the halves
        if device_lost(failure):
            self.lost = failure
        if len(items) == 1 or not splittable(failure):
            return [_Failed(failure)] * len(items)
        middle = len(items) // 2
        return self._outputs(items[:middle]) + self._outputs(items[middle:])


class _Failed(Exception):
    """The handler's failure on an item: raised from `prepare`, or standing among `predict`'s outputs
    (which may be anything) for an item it failed on."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class _NotRun(Exception):
    """An item of a split batch's other half once the device was lost: the model never saw it, so its
    line must not say the model failed on it."""


def _respond(handler: Any, output: Any) -> Result | Exception:
    try:
        return respond(handler, output)
    except Exception as exc:
        return exc


def _defaults(handler: Any) -> dict[str, Any]:
    """The generation defaults the handler describes; none when its describe() fails (the server
    would answer /v1/model with a 500 then, and a `--url` run would record no defaults either)."""
    try:
        return generation_defaults(description(handler))
    except Exception:
        return {}
