"""A request's images and options: from a multipart form, a raw image body or JSON, within the limits.

The web layer's half of intake: bytes come out, still undecoded (the handler's `prepare` decodes them). Every
limit that can be judged before decoding is judged here, with the 4xx it deserves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from typing import Any

from fastapi import Request
from python_multipart.exceptions import FormParserError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from docker_vit import errors, payloads
from docker_vit.config import Settings

MAX_JSON_COMMAS = 10_000  # options' values (a handler's prompt or labels); parsing 10,000 takes ~5 ms
MAX_FORM_FILES = 1000  # file parts in a form, whatever their field (Starlette's default); `file`s are images
MAX_DIGITS = 100  # an integer's, in JSON: turning 4,000 digits into an int takes the interpreter's lock
MAX_FORM_FIELDS = 64  # multipart fields that are not files (options), each at most 1 MiB (Starlette's)


class _LongNumber(ValueError):
    pass


def _short_int(text: str) -> int:
    if len(text) > MAX_DIGITS:
        raise _LongNumber
    return int(text)


async def read_inputs(
    request: Request,
    settings: Settings,
    json_allowed: bool,
    first_only: bool = False,
    option_names: Collection[str] | None = None,
) -> tuple[list[bytes], dict]:
    """The request's images and options, from multipart, a raw image body, or JSON; `first_only`: the
    original's reading of several files, the first one alone (the others are neither counted nor checked).
    A JSON body's fields besides `images` must be among `option_names` (None: any), as a Runpod job's;
    the query and a form stay lenient (a cache-busting parameter, an HTML form's submit button)."""
    if coding := _coded(request, "content-encoding", "identity"):  # compressed: RFC 9110's 415
        raise errors.ApiError(
            415,
            f"Content-Encoding {coding[:40]!r} is not supported: send the body uncompressed",
            headers={**errors.CLOSE, "Accept-Encoding": "identity"},
        )
    if coding := _coded(request, "transfer-encoding", "chunked"):  # h11 refuses it; httptools passes it
        raise errors.ApiError(  # on as if plain. A 4xx, where RFC 9112 has 501
            400,
            f"Transfer-Encoding {coding[:40]!r} is not supported: send the body plain or chunked",
            headers=errors.CLOSE,
        )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options: dict[str, Any] = dict(request.query_params)
    if content_type == "multipart/form-data":
        inputs, fields = await _read_form(request, settings, first_only)
        options.update(_given(fields))
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        inputs = [await _read_image_body(request, settings.max_bytes)]
    elif content_type == "application/json" and json_allowed:
        # parsing and base64 of a large body take CPU seconds: off the loop, other clients go on
        inputs, fields = await asyncio.to_thread(_read_json, await request.body(), settings, option_names)
        options.update(_given(fields))
    else:
        raise errors.ApiError(400, _unreadable(request.headers.get("content-type"), json_allowed))
    if not inputs:
        how = {
            "multipart/form-data": "as a file in the multipart field 'file' (curl -F file=@image.jpg)",
            "application/json": 'in the "images" list',
        }.get(content_type, "as the request body")
        raise errors.ApiError(400, f"no image: send it {how}")
    for data in inputs:
        if len(data) > settings.max_bytes:
            raise _too_large(len(data), settings.max_bytes)
    request.state.images = len(inputs)
    return inputs, options


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    """The body's options that hold a value: a blank form field (an HTML form sends every field) or a
    JSON null is no value, so the query's, else the default, holds."""
    return {name: value for name, value in fields.items() if value not in ("", None)}


def _coded(request: Request, header: str, plain: str) -> str:
    """The codings a body was sent in (every `header` of the request, each coding it lists), where
    any is other than `plain`; else "". A body so coded is refused unread, not read as a broken image
    or JSON."""
    coding = ", ".join(request.headers.getlist(header))
    return coding if {part.strip().lower() for part in coding.split(",")} - {"", plain} else ""


async def _read_form(
    request: Request, settings: Settings, first_only: bool
) -> tuple[list[bytes], dict[str, str]]:
    """The form's `file` parts (at most `max_images`, or only the first is kept) and its other fields.
    File parts under other names are ignored, not counted as images. Starlette has parsed the whole
    form by then (bounded by the body limit and MAX_FORM_FILES); it keeps a file part past 1 MiB in a
    temporary file, so a full disk is the server's want of room, for the client to retry (503), and a
    part past `max_bytes` is refused there, never read into memory."""
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except (HTTPException, FormParserError) as exc:
        raise _refused_form(exc) from None
    except OSError as exc:
        raise _no_room(exc) from None
    try:
        files = [item for item in form.getlist("file") if isinstance(item, UploadFile)]
        if first_only:
            files = files[:1]
        else:
            payloads.count_images(len(files), settings.max_images)
        for upload in files:
            if upload.size is not None and upload.size > settings.max_bytes:
                raise _too_large(upload.size, settings.max_bytes)
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        return [await upload.read() for upload in files], fields
    except OSError as exc:
        raise _no_room(exc) from None
    finally:
        await form.close()


def _refused_form(exc: Exception) -> errors.ApiError:
    """Starlette's word on a form it would not parse, or python-multipart's own error: Starlette 1.7
    and later report it as "Invalid multipart data.", earlier ones let it through."""
    detail = str(exc.detail) if isinstance(exc, HTTPException) else "Invalid multipart data."
    if "Too many files" in detail:
        return errors.ApiError(413, f"more than {MAX_FORM_FILES} file parts in one form")
    if "Too many fields" in detail:
        return errors.ApiError(413, f"more than {MAX_FORM_FIELDS} form fields in one request")
    if "exceeded maximum size" in detail:  # a field that is not a file, past Starlette's 1 MiB
        return errors.ApiError(413, f"a form field that is not a file is over 1 MiB: {detail}")
    if bound := _parsers_bound(exc):
        return errors.ApiError(413, f"a multipart part's headers are over the parser's bound: {bound}")
    return errors.ApiError(400, f"malformed multipart body: {detail}")


def _parsers_bound(exc: BaseException | None) -> str | None:
    """python-multipart's own bound on a part's headers (a file name past about 4,000 characters),
    in its error or behind Starlette's."""
    for _ in range(4):
        if exc is None:
            return None
        if str(exc).startswith("Maximum header"):  # "... size exceeded", "... count exceeded"
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _too_large(size: int, max_bytes: int, headers: dict[str, str] | None = None) -> errors.ApiError:
    """One wording for an image over the limit, however it came (a form part, a body, base64)."""
    return errors.ApiError(413, f"an image is {size} bytes; the limit is {max_bytes}", headers=headers)


def _no_room(exc: OSError) -> errors.ApiError:
    reason = exc.strerror or type(exc).__name__  # never the temporary file's name
    message = f"the server cannot hold this upload now ({reason}); try again later"
    return errors.ApiError(503, message, "overloaded", headers={**errors.CLOSE, "Retry-After": "5"})


async def _read_image_body(request: Request, max_bytes: int) -> bytes:
    """A raw body is one image: refused (413) as soon as it is longer than one image may be, not
    after the whole request body limit has been read into memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(int(declared), max_bytes, errors.CLOSE)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            message = f"an image is over {max_bytes} bytes; the limit is {max_bytes}"
            raise errors.ApiError(413, message, headers=errors.CLOSE)
        chunks.append(chunk)
    return b"".join(chunks)


def _unreadable(content_type: str | None, json_allowed: bool) -> str:
    """What a body of another type should be, naming the type it has: `curl -d '{"images": ...}'`
    sends a form, and its sender believes it sent JSON."""
    got = (
        f"a body of type {content_type[:100]!r}"
        if content_type is not None
        else "a body with no Content-Type"
    )
    json_too = ', JSON {"images": [...]} (Content-Type: application/json)' if json_allowed else ""
    either = "an image/* or application/octet-stream body"
    return f"{got} holds no image: send it as multipart field 'file'{json_too}, or {either}"


def _read_json(
    body: bytes, settings: Settings, option_names: Collection[str] | None = None
) -> tuple[list[bytes], dict[str, Any]]:
    # Each JSON value costs the parser far more than its bytes, and it holds the interpreter lock
    # (the event loop stops too): millions of tiny values froze the server for seconds. Values are
    # separated by commas, and base64 has none: a body of images and options has few.
    if body.count(b",") > MAX_JSON_COMMAS + 2 * settings.max_images:
        raise errors.ApiError(
            413, f"the JSON body holds more than {MAX_JSON_COMMAS} values besides its images"
        )
    try:
        payload = json.loads(body, parse_int=_short_int)
    except _LongNumber:
        raise errors.ApiError(422, f"a number in the JSON body has more than {MAX_DIGITS} digits") from None
    except RecursionError:  # nested deeper than the parser goes
        raise errors.ApiError(400, "the body is not valid JSON: nested too deep") from None
    except ValueError as exc:  # where, not what: a line break inside a string (`base64` without -w0)
        raise errors.ApiError(400, f"the body is not valid JSON: {exc}") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise errors.ApiError(400, 'JSON body must be {"images": [base64 strings]}')
    payloads.count_images(len(images), settings.max_images)  # before decoding any of them
    fields = {key: value for key, value in payload.items() if key != "images"}
    payloads.refuse_unknown(fields, option_names, "JSON field")  # a 413 first, as a Runpod job's
    return payloads.decode_images(images, settings.max_bytes), fields
