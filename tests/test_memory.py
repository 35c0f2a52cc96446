"""Host memory: a batch's freed memory is handed back only once the device pauses."""

from __future__ import annotations

import threading
import time

from docker_vit import memory


def test_released_once_the_device_pauses():
    calls: list = []
    done = threading.Event()
    heap = memory.IdleRelease(delay=0.05, release=lambda: (calls.append(time.monotonic()), done.set()))
    ended = time.monotonic()
    with heap:
        pass
    assert done.wait(5)
    assert len(calls) == 1 and calls[0] - ended >= 0.05


def test_a_batch_that_follows_at_once_keeps_the_memory():
    calls: list = []
    done = threading.Event()
    heap = memory.IdleRelease(delay=0.3, release=lambda: (calls.append(1), done.set()))
    for _ in range(5):  # batches back to back: no release between them
        with heap:
            time.sleep(0.01)
    assert calls == []
    assert done.wait(5) and calls == [1]  # then one, after the last


def test_overlapping_batches_release_after_the_last():
    calls: list = []
    done = threading.Event()
    heap = memory.IdleRelease(delay=0.01, release=lambda: (calls.append(1), done.set()))
    inside, leave = threading.Event(), threading.Event()

    def long_batch() -> None:
        with heap:
            inside.set()
            leave.wait(5)

    worker = threading.Thread(target=long_batch)
    worker.start()
    assert inside.wait(5)
    with heap:  # a short batch ends while the long one still runs
        pass
    time.sleep(0.1)
    assert calls == []
    leave.set()
    worker.join(5)
    assert done.wait(5) and calls == [1]


def test_outside_glibc_the_calls_do_nothing(monkeypatch):
    tried = []

    def no_libc(name: str):
        tried.append(name)
        raise OSError(name)

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.keep_freed_blocks() is None and memory.release_free_memory() is None  # no error
    assert tried == ["libc.so.6", "libc.so.6"]


def test_a_refused_upload_hands_its_memory_back_once_the_server_is_idle(monkeypatch):
    """An upload that never reaches the model (not an image) still leaves its bytes in the heap."""
    from conftest import serving
    from fake_handlers import Pictures

    from docker_vit.config import Settings

    released = threading.Event()
    monkeypatch.setattr(memory, "in_use", memory.IdleRelease(delay=0.01, release=released.set))
    settings = Settings()
    with serving(settings, Pictures(settings)) as client:
        released.clear()  # the warm-up's
        answer = client.post("/", content=b"not an image" * 1000, headers={"content-type": "image/png"})
        assert answer.status_code == 415
        assert released.wait(5)
