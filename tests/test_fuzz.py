"""Fuzzing the image intake: random and mutated bytes never earn a 5xx, an odd exception, or a hang.

Mutations start from small real files of every common format (flip, insert, truncate, scribble over
the header, where the dimensions live). A bounded, derandomized run, so CI sees the same examples.
"""

from __future__ import annotations

import base64
import io
from datetime import timedelta

import pytest
from conftest import photo, serving
from fake_handlers import Pictures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from docker_vit.config import Settings
from docker_vit.images import InputError, TooLarge, open_image

MAX_PIXELS = 1_000_000
LIMITS = {"max_bytes": 200_000, "max_pixels": MAX_PIXELS}
FUZZ = settings(
    max_examples=150,
    deadline=timedelta(seconds=10),  # "never a hang", with room for a busy machine
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _samples() -> list[bytes]:
    picture = Image.open(photo("french_bulldog.jpg")).convert("RGB").resize((48, 40))
    files = []
    for fmt, extra in [
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("PNG", {}),
        ("GIF", {}),
        ("WEBP", {}),
        ("BMP", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ]:
        buffer = io.BytesIO()
        picture.save(buffer, format=fmt, **extra)
        files.append(buffer.getvalue())
    buffer = io.BytesIO()
    picture.convert("RGBA").save(buffer, format="PNG")
    files.append(buffer.getvalue())
    buffer = io.BytesIO()
    frames = [picture.convert("P"), picture.rotate(90).convert("P")]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    files.append(buffer.getvalue())
    return files


SAMPLES = _samples()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "truncate", "header"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "truncate":
            del data[at:]
        else:  # the header holds the dimensions: make them huge, zero or nonsense
            start = draw(st.integers(0, min(len(data), 64)))
            data[start : start + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff"])
            )
    return bytes(data)


def check_open(data: bytes) -> None:
    try:
        image = open_image(data, **LIMITS)
    except InputError:  # the answers a client gets: 400 (no bytes), 413, 415
        return
    assert image.mode == "RGB" and image.width * image.height <= MAX_PIXELS


@FUZZ
@given(st.binary(max_size=4096))
def test_open_image_random_bytes(data: bytes) -> None:
    check_open(data)


@FUZZ
@given(mutated())
def test_open_image_mutated_files(data: bytes) -> None:
    check_open(data)


def test_every_sample_decodes_and_a_bomb_header_is_refused_undecoded() -> None:
    for data in SAMPLES:
        assert open_image(data, **LIMITS).size == (48, 40)
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")  # 50 MB of pixels in ~60 KB
    with pytest.raises(TooLarge):
        open_image(bomb.getvalue(), **LIMITS)


@pytest.fixture(scope="module")
def client():
    config = Settings(max_images=4, **LIMITS)
    with serving(config, Pictures(config)) as test_client:
        yield test_client


def assert_client_error(response) -> None:
    assert response.status_code in (200, 400, 413, 415, 422), (response.status_code, response.text)
    if response.status_code != 200:
        assert response.json()["error"]["type"]


bodies = st.one_of(mutated(), st.binary(max_size=2048))


@FUZZ
@given(data=bodies, how=st.sampled_from(["raw", "multipart", "json", "several"]))
def test_http_intake_never_answers_5xx(client, data: bytes, how: str) -> None:
    if how == "raw":
        response = client.post("/", content=data, headers={"content-type": "image/jpeg"})
    elif how == "multipart":
        response = client.post("/", files={"file": ("x.jpg", data, "image/jpeg")})
    elif how == "json":
        response = client.post("/v1/captions", json={"images": [base64.b64encode(data).decode()]})
    else:
        response = client.post("/v1/captions", files=[("file", SAMPLES[0]), ("file", data)])
    assert_client_error(response)


@FUZZ
@given(
    body=st.binary(max_size=1024),
    content_type=st.sampled_from(
        [
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "application/json",
            "image/png",
            "text/plain",
            "",
        ]
    ),
)
def test_malformed_bodies_and_framing_never_answer_5xx(client, body: bytes, content_type: str) -> None:
    for route in ("/", "/v1/captions"):
        assert_client_error(client.post(route, content=body, headers={"content-type": content_type}))
