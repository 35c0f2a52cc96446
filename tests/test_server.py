"""The HTTP API: the seed's curl contract, the JSON route, probes, and every error status."""

from __future__ import annotations

import base64
import gzip
import io
import logging
import threading
import time
import warnings
from pathlib import Path

import pytest
from conftest import photo, serving
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

from docker_vit.config import Settings
from docker_vit.handler import Handler
from docker_vit.process import version

PHOTOS = ["french_bulldog.jpg", "astronaut.jpg", "coffee.jpg", "chelsea.jpg"]


def original_caption(folder: Path, data: bytes, num_beams: int = 4, max_length: int = 16) -> str:
    """What the original Flask app answered: its own code path, written out."""
    model = VisionEncoderDecoderModel.from_pretrained(folder)
    pixels = AutoImageProcessor.from_pretrained(folder)(
        images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt"
    ).pixel_values
    ids = model.generate(pixels, num_beams=num_beams, max_length=max_length)
    return AutoTokenizer.from_pretrained(folder).batch_decode(ids, skip_special_tokens=True)[0].strip()


def png(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_curl_contract_matches_the_original_byte_for_byte(serve, vit_gpt2_dir, bulldog) -> None:
    with serve() as client:
        response = client.post("/", files={"file": ("image.jpg", bulldog, "image/jpeg")})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == original_caption(vit_gpt2_dir, bulldog)
    assert response.content == original_caption(vit_gpt2_dir, bulldog).encode()


def test_captions_end_early_like_the_original(eos_model_dir) -> None:
    from conftest import serving

    from docker_vit.config import Settings

    with serving(Settings(model=str(eos_model_dir))) as client:
        for name in PHOTOS:
            data = photo(name).read_bytes()
            assert client.post("/", files={"file": data}).text == original_caption(eos_model_dir, data)


def test_raw_image_body_gives_the_same_caption(client, bulldog) -> None:
    multipart = client.post("/", files={"file": ("a.jpg", bulldog, "image/jpeg")})
    raw = client.post("/", content=bulldog, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200 and raw.text == multipart.text


@pytest.mark.parametrize("path", ["//", "///", "//?num_beams=4"])
def test_leading_slashes_count_as_one_as_in_the_original(client, bulldog, path: str) -> None:
    """`curl -F file=@x "$URL/"` with a `URL` ending in `/` posts to `//`, which the original's Flask
    (Werkzeug) routed to `/`: the same caption, not a 404."""
    expected = client.post("/", files={"file": ("a.jpg", bulldog, "image/jpeg")})
    url = "http://testserver" + path  # a bare `//...` is a URL's host to httpx, not its path
    answer = client.post(url, files={"file": ("a.jpg", bulldog, "image/jpeg")})
    assert answer.status_code == 200 and answer.content == expected.content
    assert client.get("http://testserver//healthz").json() == {"status": "ok"}
    assert_error(client.post("/v1//captions", files={"file": bulldog}), 404)  # only the leading ones


def test_json_route_keeps_input_order(client) -> None:
    datas = [photo(name).read_bytes() for name in PHOTOS]
    singles = [client.post("/", files={"file": data}).text for data in datas]
    response = client.post(
        "/v1/captions", files=[("file", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(datas)]
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model"] and [c["text"] for c in body["captions"]] == singles
    encoded = {"images": [base64.b64encode(d).decode() for d in reversed(datas)]}
    assert [c["text"] for c in client.post("/v1/captions", json=encoded).json()["captions"]] == singles[::-1]


def test_generation_parameters_from_query_form_and_json(client, vit_gpt2_dir, bulldog) -> None:
    expected = original_caption(vit_gpt2_dir, bulldog, num_beams=2, max_length=6)
    query = client.post("/v1/captions?num_beams=2&max_new_tokens=5", files={"file": bulldog})
    form = client.post(
        "/v1/captions", files={"file": bulldog}, data={"num_beams": "2", "max_new_tokens": "5"}
    )
    body = {"images": [base64.b64encode(bulldog).decode()], "num_beams": 2, "max_new_tokens": 5}
    as_json = client.post("/v1/captions", json=body)
    plain = client.post("/?num_beams=2&max_new_tokens=5", files={"file": bulldog})
    for response in (query, form, as_json):
        assert response.json()["captions"][0]["text"] == expected
    assert plain.text == expected


def test_a_blank_form_field_or_json_null_leaves_the_querys_value(client, vit_gpt2_dir, bulldog) -> None:
    """An HTML form sends its empty fields too: they hold no value, so the query's holds."""
    expected = original_caption(vit_gpt2_dir, bulldog, num_beams=2, max_length=6)
    blank = {"num_beams": "", "max_new_tokens": ""}
    form = client.post("/?num_beams=2&max_new_tokens=5", files={"file": bulldog}, data=blank)
    assert form.text == expected
    body = {"images": [base64.b64encode(bulldog).decode()], "num_beams": None, "max_new_tokens": None}
    as_json = client.post("/v1/captions?num_beams=2&max_new_tokens=5", json=body)
    assert as_json.json()["captions"][0]["text"] == expected
    assert_error(client.post("/?num_beams=99", files={"file": bulldog}, data=blank), 422)  # not hidden


def test_a_json_field_the_handler_does_not_read_is_a_422_as_in_a_runpod_job(client, bulldog) -> None:
    """A misspelt `num_beam` in a JSON body would change nothing, unsaid (the Runpod worker refuses it);
    the query and a form stay lenient: a cache-busting parameter, an HTML form's submit button."""
    image = base64.b64encode(bulldog).decode()
    typo = assert_error(client.post("/v1/captions", json={"images": [image], "num_beam": 2}), 422)
    assert typo["message"] == "unknown JSON field(s): num_beam"
    assert client.post("/v1/captions?num_beam=2&_=1", json={"images": [image]}).status_code == 200
    form = client.post("/v1/captions", files={"file": bulldog}, data={"submit": "Caption"})
    assert form.status_code == 200


@pytest.mark.parametrize(
    "query",
    [
        "num_beams=0",
        "num_beams=99",
        "num_beams=two",
        "max_new_tokens=0",
        "max_new_tokens=100000",
        "num_beams=1.5",
        "max_new_tokens=inf",
        "num_beams=-Infinity",
        "num_beams=1_0",
        "num_beams=%D9%A4",  # an Arabic-Indic 4: Python's int() takes it, a client does not mean it
    ],
)
def test_bad_parameters_are_422(client, query) -> None:
    response = client.post(f"/v1/captions?{query}", files={"file": png()})
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_parameters"


def test_a_count_of_thousands_of_digits_is_out_of_range_not_unreadable(client) -> None:
    """Python reads no integer past 4,300 digits; the number is still a number, and too big."""
    response = client.post(f"/v1/captions?num_beams={'9' * 5000}", files={"file": png()})
    assert response.status_code == 422
    assert (
        response.json()["error"]["message"]
        == "num_beams must be between 1 and 8, got a number of 5000 characters"
    )


@pytest.mark.parametrize("query", ["num_beams=04", "num_beams=%2B4", "num_beams=%204%20"])
def test_integers_written_otherwise_are_integers(client, query) -> None:
    assert client.post(f"/v1/captions?{query}", files={"file": png()}).status_code == 200


@pytest.mark.parametrize(("value", "status"), [("2.0", 200), ("2.5", 422), ("true", 422), ('"2.0"', 422)])
def test_a_json_count_may_be_a_whole_float(client, value: str, status: int) -> None:
    """A client that computed 2.0 means 2 (pydantic's lax mode takes it too); not 2.5, true or "2.0"."""
    body = '{"images": ["' + base64.b64encode(png()).decode() + '"], "num_beams": ' + value + "}"
    response = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "1e400"])
def test_an_infinite_json_option_is_422(client, value) -> None:
    body = '{"images": ["aGVsbG8="], "max_new_tokens": ' + value + "}"
    response = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_parameters"


@pytest.mark.parametrize("where", ["images", "num_beams"])
def test_json_nested_past_the_parser_is_400(client, where) -> None:
    nested = "[" * 5000 + "]" * 5000
    body = ('{"images": ' + nested if where == "images" else '{"images": [], "num_beams": ' + nested) + "}"
    response = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request"


def test_json_option_nested_just_within_the_parser_is_422_not_500(client) -> None:
    """The parser takes ~990 levels; showing such a value in the 422 message must not overflow."""
    statuses = set()
    for depth in range(940, 1000, 3):
        body = '{"images": ["aGVsbG8="], "num_beams": ' + "[" * depth + "]" * depth + "}"
        response = client.post("/v1/captions", content=body, headers={"content-type": "application/json"})
        statuses.add(response.status_code)
    assert statuses <= {400, 422} and 422 in statuses, statuses


def assert_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] and error["message"]
    return error


@pytest.mark.parametrize("route", ["/", "/v1/captions"])
def test_a_compressed_body_is_refused_as_such(client, route: str) -> None:
    """A gzipped upload was read as a broken image (415 "not a supported image format") or as JSON
    that is not UTF-8 (400): the coding is named, as RFC 9110's 415 says."""
    packed = gzip.compress(photo("coffee.jpg").read_bytes())
    for headers in ({"content-type": "image/jpeg"}, {"content-type": "application/json"}):
        answer = client.post(route, content=packed, headers={**headers, "content-encoding": "GZIP"})
        assert "'GZIP' is not supported: send the body uncompressed" in assert_error(answer, 415)["message"]
        assert answer.headers["accept-encoding"] == "identity"
    twice = [("content-type", "image/jpeg"), ("content-encoding", "identity"), ("content-encoding", "gzip")]
    said = assert_error(client.post(route, content=packed, headers=twice), 415)["message"]
    assert "'identity, gzip' is not supported" in said  # every header counts
    plain = {"content-type": "image/jpeg", "content-encoding": "identity"}
    assert client.post(route, content=photo("coffee.jpg").read_bytes(), headers=plain).status_code == 200


@pytest.mark.parametrize("route", ["/", "/v1/captions"])
def test_a_transfer_coding_besides_chunked_is_refused(client, route: str) -> None:
    """httptools hands on a `gzip, chunked` body's bytes as if plain (h11 refuses it): refused alike."""
    headers = {"content-type": "image/jpeg", "transfer-encoding": "gzip, chunked"}
    answer = client.post(route, content=photo("coffee.jpg").read_bytes(), headers=headers)
    assert "'gzip, chunked' is not supported" in assert_error(answer, 400)["message"]
    assert answer.headers["connection"] == "close"


def test_a_body_of_the_wrong_type_or_broken_json_says_what_it_got(client) -> None:
    """`curl -d '{"images": ...}'` sends a form; `base64` without -w0 breaks a JSON string's line."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    said = assert_error(client.post("/v1/captions", content=b'{"images": []}', headers=form), 400)["message"]
    assert said.startswith("a body of type 'application/x-www-form-urlencoded' holds no image")
    assert 'JSON {"images": [...]} (Content-Type: application/json)' in said
    garbage = {"content-type": ';;;="'}  # a header was sent: it is named, not said to be missing
    said = assert_error(client.post("/v1/captions", content=b"x", headers=garbage), 400)["message"]
    assert said.startswith("a body of type ';;;=\"' holds no image")
    said = assert_error(client.post("/", content=b"x", headers=form), 400)["message"]
    assert "JSON" not in said and "multipart field 'file'" in said  # the original route takes no JSON
    wrapped = b'{"images": ["iVBORw0KGgo\nAAAA"]}'
    said = assert_error(
        client.post("/v1/captions", content=wrapped, headers={"content-type": "application/json"}), 400
    )
    assert (
        said["message"]
        == "the body is not valid JSON: Invalid control character at: line 1 column 25 (char 24)"
    )


def test_missing_or_malformed_input_is_400(client) -> None:
    assert_error(client.post("/"), 400)
    assert_error(client.post("/", files={"other": png()}), 400)
    assert_error(client.post("/", content=b"hello", headers={"content-type": "text/plain"}), 400)
    assert_error(
        client.post("/v1/captions", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert_error(client.post("/v1/captions", json={"images": "abc"}), 400)
    assert_error(client.post("/v1/captions", json={"images": ["%%%not base64"]}), 400)
    assert_error(client.post("/v1/captions", json={"images": []}), 400)
    assert_error(
        client.post("/", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"}), 400
    )


def test_undecodable_images_are_415(client, bulldog) -> None:
    assert_error(client.post("/", files={"file": b"this is text"}), 415)
    assert_error(client.post("/", content=bulldog[:2000], headers={"content-type": "image/jpeg"}), 415)
    assert_error(client.post("/v1/captions", files=[("file", png()), ("file", b"garbage")]), 415)


def test_size_limits_are_413(serve, bulldog) -> None:
    with serve(max_bytes=10_000, max_pixels=5_000, max_images=2) as client:
        assert_error(client.post("/", files={"file": bulldog}), 413)
        assert_error(client.post("/", content=bulldog, headers={"content-type": "image/jpeg"}), 413)
        assert_error(client.post("/", files={"file": png((100, 100))}), 413)
        many = assert_error(client.post("/v1/captions", files=[("file", png())] * 3), 413)
        assert many["message"] == "3 images in one request; the limit is 2"
        others = [("file", png()), ("file", png())] + [("attachment", png())] * 5  # not images: not counted
        assert client.post("/v1/captions", files=others).status_code == 200
        assert client.post("/", files={"file": png((50, 50))}).status_code == 200
        # the original read the first of several files and nothing else: the others are not judged
        several = [("file", png((50, 50))), ("file", bulldog), ("file", png()), ("file", png())]
        assert client.post("/", files=several).status_code == 200
        assert_error(client.post("/v1/captions", files=several[:2]), 413)


def test_no_image_says_how_to_send_one_for_the_body_used(client) -> None:
    empty = assert_error(client.post("/v1/captions", json={"images": []}), 400)
    assert empty["message"] == 'no image: send it in the "images" list'
    text_field = assert_error(client.post("/", data={"file": "not a file"}, files={"x": b""}), 400)
    assert "multipart field 'file'" in text_field["message"]


def test_unknown_routes_and_methods_answer_json(client) -> None:
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/v1/captions"), 405)
    assert client.get("/v1/captions").headers["allow"] == "POST"
    for path in ("/healthz", "/v1/model", "/docs"):  # every GET route answers HEAD too: its Allow says so
        response = client.post(path)
        assert_error(response, 405)
        assert set(response.headers["allow"].split(", ")) == {"GET", "HEAD"}, path
        assert client.head(path).status_code in (200, 204), path
    for path in ("/v1/captions/", "/healthz/"):  # not a redirect to wherever the Host header says
        response = client.post(path, headers={"host": "evil.example"}, follow_redirects=False)
        assert_error(response, 404)
        assert "location" not in response.headers


def test_probes_model_docs_and_metrics(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/ping").status_code == 200
    info = client.get("/v1/model").json()
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["generation"] == {"num_beams": 4, "max_new_tokens": 15}
    assert info["jpeg_draft"] is False  # opt-in: what the model sees of a big JPEG
    assert info["server"] == {"name": "docker-vit", "version": version()}
    assert (
        info["batching"] == {"max_batch_size": 16, "max_wait_ms": 5.0}
        and info["limits"]["request_timeout"] == 60
    )
    assert client.get("/docs").status_code == 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # FastAPI warns of duplicate operation ids
        paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/captions" in paths and "head" not in paths["/healthz"]
    assert {"200", "503"} <= set(paths["/readyz"]["get"]["responses"])
    assert {"200", "204", "503"} <= set(paths["/ping"]["get"]["responses"])
    upload = paths["/"]["post"]
    assert {"multipart/form-data", "image/*", "application/octet-stream"} <= set(
        upload["requestBody"]["content"]
    )
    assert {"200", "400", "401", "408", "413", "415", "422", "431", "500", "503", "504"} <= set(
        upload["responses"]
    )
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"file", "num_beams", "max_new_tokens"} <= set(form)
    client.post("/", files={"file": png()})
    metrics = client.get("/metrics").text
    for name in (
        "docker_vit_requests_total",
        "docker_vit_request_seconds_bucket",
        "docker_vit_batch_size_bucket",
        "docker_vit_queue_seconds_bucket",
        "docker_vit_model_seconds_bucket",
        "docker_vit_queue_depth",
        "docker_vit_images_total",
        "docker_vit_model_load_seconds",
    ):
        assert name in metrics


def test_request_id_is_echoed_or_made(client) -> None:
    assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32


class SlowLoading(Handler):
    """Loads only when the test says so; answers the input's length."""

    gate = threading.Event()

    def load(self) -> None:
        assert self.gate.wait(30)

    def prepare(self, data: bytes, options: object) -> int:
        return len(data)

    def predict(self, items, options):
        return items


def test_not_ready_until_loaded_and_warmed_up() -> None:
    from conftest import serving

    with serving(Settings(), SlowLoading(Settings()), wait=False) as client:
        assert client.get("/healthz").status_code == 200
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == "5"
        assert client.get("/ping").status_code == 204
        assert_error(client.post("/", files={"file": b"abc"}), 503)
        SlowLoading.gate.set()
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert client.post("/", files={"file": b"abc"}).text == "3"
        assert client.get("/ping").json() == {"status": "healthy"}
        for path in (
            "/healthz",
            "/readyz",
            "/ping",
            "/v1/model",
            "/metrics",
        ):  # load balancers probe with HEAD
            head = client.head(path)
            assert head.status_code == 200 and head.content == b"", path
        schema = client.get("/openapi.json").json()["paths"]["/metrics"]
        assert set(schema) == {"get"}
        assert set(schema["get"]["responses"]["200"]["content"]) == {"text/plain"}  # Prometheus text


class BrokenLoading(SlowLoading):
    def load(self) -> None:
        raise OSError("no weights here")


def test_a_failed_load_is_reported_by_every_probe_in_json() -> None:
    from conftest import serving

    with serving(Settings(), BrokenLoading(Settings()), wait=False) as client:
        deadline = time.monotonic() + 10
        while client.get("/ping").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert "no weights here" in assert_error(client.get("/ping"), 503)["message"]
        assert_error(client.get("/readyz"), 503)
        assert_error(client.post("/", files={"file": b"abc"}), 503)


class OfflineLoading(SlowLoading):
    def load(self) -> None:  # transformers' words when the Hub is out of reach, over two lines
        raise OSError(
            "We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet"
        )


def test_a_failed_load_is_said_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """README: a model that cannot be fetched fails "after huggingface_hub's retries, then one line"."""
    from conftest import serving

    with (
        caplog.at_level(logging.ERROR, "docker_vit"),
        serving(Settings(), OfflineLoading(Settings()), wait=False) as client,
    ):
        deadline = time.monotonic() + 10
        while "connect" not in client.get("/readyz").text:  # 503 "loading" until the load fails
            assert time.monotonic() < deadline
            time.sleep(0.01)
        message = assert_error(client.get("/readyz"), 503)["message"]
    assert "to load the files. Check your internet" in message and "\n" not in message
    said = [
        record.getMessage() for record in caplog.records if "loading the model failed" in record.getMessage()
    ]
    assert len(said) == 1 and "\n" not in said[0] and said[0].endswith("load the files. Check your internet")


def test_concurrent_requests_are_batched_with_the_same_captions(serve) -> None:
    from concurrent.futures import ThreadPoolExecutor

    datas = [photo(name).read_bytes() for name in PHOTOS] * 2
    with serve(max_wait_ms=300) as client:
        alone = [client.post("/", files={"file": data}).text for data in datas[:4]]
        with ThreadPoolExecutor(len(datas)) as pool:
            together = list(pool.map(lambda d: client.post("/", files={"file": d}).text, datas))
        metrics = client.get("/metrics").text
    assert together == alone * 2
    batches = next(line for line in metrics.splitlines() if line.startswith("docker_vit_batch_size_count"))
    assert float(batches.split()[-1]) < 4 + len(datas)  # the singles + fewer calls than requests


def test_a_huge_bad_option_is_not_echoed_back_whole(client) -> None:
    response = client.post("/", data={"num_beams": "x" * 100_000}, files={"file": b"x"})
    assert response.status_code == 422
    assert len(response.json()["error"]["message"]) < 200


def test_a_bad_image_among_several_is_named_by_its_place(client, bulldog: bytes) -> None:
    response = client.post("/v1/captions", files=[("file", bulldog), ("file", b"not a picture")])
    assert response.status_code == 415
    assert response.json()["error"]["message"].startswith("image 1: ")
    alone = client.post("/v1/captions", files=[("file", b"not a picture")])
    assert not alone.json()["error"]["message"].startswith("image ")


def test_the_log_says_what_was_loaded_where(vit_gpt2_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Start-up lines an operator reads: the model, its device and dtype, and the load time."""
    with caplog.at_level(logging.INFO, logger="docker_vit"), serving(Settings(model=str(vit_gpt2_dir))):
        pass
    said = [record.getMessage() for record in caplog.records]
    assert f"{vit_gpt2_dir} on cpu, float32" in said, said
    assert any(line.startswith(f"loaded {vit_gpt2_dir} in ") for line in said), said
