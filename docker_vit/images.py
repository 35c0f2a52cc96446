"""Image intake for handlers of pictures (`Handler.open_image`): untrusted bytes in, one plain RGB
picture out.

Every check that is cheap happens before the expensive full decode: the byte limit, the format
allow-list, the decoding work counted from the file's structure (structure.py), and the pixel limit
read from the header (decompression bombs never get decoded). Then the decode, under a pixel budget
shared by every thread, the EXIF orientation, and any mode to 8-bit RGB.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from docker_vit import libtiff, memory, structure
from docker_vit.budget import Budget
from docker_vit.errors import ImageError, InputError, NotAnImage, TooLarge

# Formats worth accepting from strangers; the rest of Pillow's zoo stays closed. (MPO, the stereo
# JPEG, comes through the JPEG opener.) Only names this Pillow registers: `Image.open` stops at the
# first unknown name in the list, and every format after it would be refused. Not AVIF: libavif decodes
# the frame its AV1 data holds, whatever size the container claims, so a pixel limit read from the
# container would let a 1 KB file claiming 100 x 100 decode 144 megapixels (a review, 2026-11-30).
Image.init()
FORMATS = tuple(
    f for f in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "TGA") if f in Image.OPEN
)
WHITE = (255, 255, 255)
UNSUPPORTED = "cannot decode the image: not a supported image format"
MAX_JPEG_SCANS = 256  # each scan of a progressive JPEG is a pass over the whole picture; cameras write ~10
FEW_JPEG_SCANS = 16  # always taken; past it, the scans' passes over the picture are bounded together:
MAX_JPEG_SCAN_PIXELS = 1_000_000_000  # ~1 s of decoding here (256 scans of 40 MP: 8 s from 248 KB)
MAX_JPEG_SEGMENTS = 4096  # tables, comments, metadata: a photo has tens (a big ICC profile, a few more)
MAX_PNG_CHUNKS = 50_000  # Pillow reads chunks in Python (~13 us each); encoders write 8-64 KB chunks
MAX_PNG_PROFILES = 64  # iCCP chunks (one a picture), each inflated up to 1 MB as the file opens
MAX_JPEG_JUNK = 65_536  # bytes outside any segment before the first scan (fill bytes: read one by one)
MAX_EXIF_BYTES = 1_000_000  # Pillow joins a JPEG's Exif segments and parses the block whole
MAX_TIFF_PIECES = 50_000  # strips or tiles, each read in Python (~4 us): a scanner's TIFF has hundreds
# libtiff decodes a TIFF's JPEG strips itself, allowing 100 scans each (past FEW_JPEG_SCANS, the
# scans of a JPEG are bounded by the picture's size): the same few for a strip. A decoder's knob, which
# libtiff reads from the environment as each strip is decoded; one set by the user stays.
os.environ.setdefault("LIBTIFF_JPEG_MAX_ALLOWED_SCAN_NUMBER", str(FEW_JPEG_SCANS))
libtiff.quiet_errors()  # its errors, written to stderr past the logging: a client's broken TIFF
# Pixels decoded at once, over every thread: a picture at the pixel limit costs 0.5-0.8 GB to decode and
# convert (a lossless WebP of it is 1.6 KB), and there is a decoding thread per core. Two such at once;
# photos of ordinary size (12 megapixels, or a draft of a bigger JPEG) six at once.
DECODING_PIXELS = 80_000_000


def open_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    draft: int | None = None,
    then: Callable[[Image.Image], Any] | None = None,
) -> Any:
    """Decode `data` into an RGB image, refusing what is too big or not a picture.

    `draft` lets JPEGs decode at a reduced DCT scale when they are far larger than the model input:
    the result stays at least twice `draft` on each side, by a scale that divides both sides, so the
    model's own resize still decides the pixels it sees. `then` (a processor's resize, say) runs on the
    image, and its result is returned, while the decode budget still counts the image: the full-size
    copies a processor makes cost more memory, and longer, than the decode itself.
    """
    scans = _check_before_opening(data, max_bytes, max_pixels)
    _let_pillow_open(max_pixels)
    with _refusals(max_pixels):
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        _check_pixels(image, max_pixels, scans)
        _scale_png_transparency(image)
        scale = _draft_scale(image.size, 2 * draft) if draft and image.format == "JPEG" else 1
        if scale > 1:
            image.draft("RGB", (image.width // scale, image.height // scale))  # Pillow picks `scale`
    pixels = _decoding_pixels(image, scale)
    try:
        return _decoded(image, pixels, max_pixels, then)
    finally:  # its copies are freed (the picture too, unless it is what is returned): back to the OS,
        del image  # as a decoding thread's heap would keep them, and a busy server never pauses to
        if pixels >= DECODING_PIXELS // 8:  # trim: on a many-core host, cores x a picture, kept
            memory.release_free_memory()


def _decoding_pixels(image: Image.Image, scale: int) -> int:
    """What decoding `image` costs, in the budget's pixels: its own, but a drafted progressive JPEG's
    coefficients stay full-size at any DCT scale (2 bytes a sample: 240 MB for 40 MP at 4:4:4, about a
    third of a decoded picture's cost)."""
    pixels = image.width * image.height
    if scale > 1 and image.info.get("progressive"):
        return max(pixels, scale * scale * pixels // 3)
    return pixels


def _decoded(
    image: Image.Image, pixels: int, max_pixels: int, then: Callable[[Image.Image], Any] | None
) -> Any:
    """`image` decoded to RGB, and `then` run on it, while the budget counts `pixels`."""
    with decode_budget.hold(pixels):
        with _refusals(max_pixels):  # Pillow's failures are the client's; what `then` raises is not
            _drop_xmp(image)  # before `load`: a TIFF's caches the orientation it finds there
            image.load()
            _check_exif(len(image.info.get("exif") or b""))  # a PNG's eXIf may follow its pixels
            rgb = _to_rgb(_orient(image))
        return rgb if then is None else then(rgb)


def _check_before_opening(data: bytes, max_bytes: int, max_pixels: int) -> int:
    """What the bytes alone tell (size, an icon's pictures, the decoding work); a JPEG's scans."""
    if len(data) > max_bytes:
        raise TooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}", "max_bytes")
    if not data:  # missing input (400), rather than bytes that are not a picture (415)
        raise InputError("image is empty: it has no bytes")
    scans = _check_decoding_work(data)  # first: it bounds the icon's chunks read below
    if structure.ico_pixels(data, MAX_PNG_CHUNKS) > max_pixels:
        raise TooLarge(f"an icon in the file has more pixels than the limit, {max_pixels}", "max_pixels")
    return scans


def _let_pillow_open(max_pixels: int) -> None:
    """Pillow refuses a picture over twice its `MAX_IMAGE_PIXELS` (~179 M) as it opens it, before our
    own limit is read: a `max_pixels` set higher than that raises Pillow's cap to match, and ours,
    checked right after opening, stays the one that holds."""
    cap = Image.MAX_IMAGE_PIXELS
    if cap is not None and 2 * cap < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1


@contextmanager
def _refusals(max_pixels: int) -> Iterator[None]:
    """Pillow's failures on a client's bytes, as the client's errors; its warnings (a truncated
    file, odd metadata) kept quiet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own cap, met before ours (`_let_pillow_open`)
        raise TooLarge(f"image has too many pixels; the limit is {max_pixels}", "max_pixels") from None
    except UnidentifiedImageError:  # its own message names an object's memory address
        raise NotAnImage(UNSUPPORTED) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise NotAnImage(f"cannot decode the image: {exc}") from None
    except Exception:  # Pillow raises many more types for broken files: all mean "not an image"
        raise NotAnImage(UNSUPPORTED) from None


decode_budget = Budget(DECODING_PIXELS)  # the memory of decoding is bounded by it, not by cores x pixel limit


def _scale_png_transparency(image: Image.Image) -> None:
    """A PNG's transparent color (tRNS) in the scale of its decoded pixels. Pillow keeps a 2- or 4-bit
    gray's and a 16-bit RGB's as the file writes it, while it decodes those pixels to 8 bits: the gray
    matched no pixel, and Pillow compares the RGB by its low bytes (a key of 0x4000 made black white).
    A 16-bit key is compared by its high bytes, the ones Pillow decodes."""
    rawmode = image.tile[0][3] if image.format == "PNG" and image.tile else None
    key = image.info.get("transparency")
    if rawmode in ("L;2", "L;4") and isinstance(key, int):
        image.info["transparency"] = key * 255 // (2 ** int(rawmode[-1]) - 1)  # as Pillow scales them
    elif rawmode == "RGB;16B" and isinstance(key, tuple):
        image.info["transparency"] = tuple(value >> 8 for value in key)


def _draft_scale(size: tuple[int, int], least: int) -> int:
    """The largest DCT scale (8, 4 or 2) that leaves `least` pixels a side and divides both sides, or
    1. A side that is no multiple of the scale ends in part of a block, which the reduced decode makes
    one whole pixel: the picture comes out stretched by up to half a reduced pixel, and a resize then
    samples it elsewhere (up to 21/255 off, measured), where an exact scale stays within 1-2/255."""
    width, height = size
    for scale in (8, 4, 2):
        if min(width, height) // scale >= least and width % scale == 0 and height % scale == 0:
            return scale
    return 1


def _check_decoding_work(data: bytes) -> int:
    """Refuse files whose decoding costs far more than their pixels and bytes suggest: a JPEG of
    thousands of (empty) scans took 22 s to decode from 316 KB, a PNG of tiny chunks ~20 s from 20 MB,
    a TIFF of 1.8 million one-row strips 7.6 s from 20 MB, all the while holding a decode thread that
    other clients' images need. Returns a JPEG's scans, which are bounded again once its size is known."""
    scans = 0
    if data[:2] == b"\xff\xd8":
        walk = structure.jpeg_segments(data, MAX_JPEG_SEGMENTS + 1)
        scans = walk.scans
        if scans > MAX_JPEG_SCANS:
            raise TooLarge(f"the JPEG has {scans} scans; the limit is {MAX_JPEG_SCANS}")
        if walk.segments > MAX_JPEG_SEGMENTS:
            raise TooLarge(f"the JPEG has more than {MAX_JPEG_SEGMENTS} segments")
        if walk.junk > MAX_JPEG_JUNK:
            raise TooLarge(
                f"the JPEG has {walk.junk} bytes between its segments; the limit is {MAX_JPEG_JUNK}"
            )
        if walk.frames > 1:  # libjpeg refuses a second one, after Pillow has read them all
            raise NotAnImage(f"cannot decode the image: the JPEG has {walk.frames} frame headers (SOF)")
        _check_exif(walk.exif)
    chunks = structure.png_chunks(data, MAX_PNG_CHUNKS + 1)
    if chunks.total() > MAX_PNG_CHUNKS:
        raise TooLarge(f"the PNG has more than {MAX_PNG_CHUNKS} chunks")
    if chunks[b"iCCP"] > MAX_PNG_PROFILES:
        raise TooLarge(f"the PNG has {chunks[b'iCCP']} color profiles; the limit is {MAX_PNG_PROFILES}")
    if structure.tiff_pieces(data) > MAX_TIFF_PIECES:
        raise TooLarge(f"the TIFF has more than {MAX_TIFF_PIECES} strips or tiles")
    return scans


def _check_exif(size: int) -> None:
    """Pillow parses an EXIF block whole, a Python object per value of a tag: 19 MB of one RATIONAL
    tag took ~4 s and ~500 MB (a review). A camera's fits one 64 KB segment."""
    if size > MAX_EXIF_BYTES:
        raise TooLarge(f"the image's EXIF block is {size} bytes; the limit is {MAX_EXIF_BYTES}")


def _check_pixels(image: Image.Image, max_pixels: int, scans: int = 0) -> None:
    """The pixels the header gives, and a JPEG's passes over them (past FEW_JPEG_SCANS scans)."""
    width, height = image.size
    if width * height > max_pixels:
        raise TooLarge(f"image is {width}x{height} pixels; the limit is {max_pixels}", "max_pixels")
    if width == 0 or height == 0:
        raise NotAnImage("image has no pixels")
    if scans > FEW_JPEG_SCANS and scans * width * height > MAX_JPEG_SCAN_PIXELS:
        raise TooLarge(
            f"the JPEG has {scans} scans of {width}x{height} pixels; past "
            f"{FEW_JPEG_SCANS} scans, the limit is {MAX_JPEG_SCAN_PIXELS:,} pixels over all of them"
        )


def _orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block is ignored rather than fatal. Pillow also turns
    by an XMP packet's `tiff:Orientation` where the EXIF names none (a stripper that kept the XMP):
    no EXIF rotation, and not what the original service did, so the XMP is set aside first (again:
    a PNG's may come after its pixels)."""
    _drop_xmp(image)
    try:
        return ImageOps.exif_transpose(image, in_place=True) or image  # no copy of an upright one
    except Exception:
        return image


def _drop_xmp(image: Image.Image) -> None:
    """Pillow's keys for an XMP packet (JPEG, WebP and TIFF "xmp"; PNG both)."""
    for key in ("xmp", "XML:com.adobe.xmp"):
        image.info.pop(key, None)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, deep grays scaled, not clipped."""
    if "transparency" in image.info and image.mode in ("P", "1", "L", "RGB"):  # a transparent color (tRNS)
        image = image.convert("RGBA")
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGB")
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        key = image.info.get("transparency")  # a 16-bit gray PNG's transparent value
        opaque = np.asarray(image) != key if isinstance(key, int) else None
        image = _deep_to_gray(image)
        if opaque is not None:
            image.putalpha(Image.fromarray(opaque.astype(np.uint8) * 255))  # "LA": composited below
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _on_white(image if image.mode == "RGBA" else image.convert("RGBA"))
    return image.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composited onto white in place, a full-size copy fewer than `Image.alpha_composite` makes: a
    40-megapixel RGBA picture is 160 MB a copy, and a few kilobytes of WebP can hold one."""
    picture = Image.new("RGBA", rgba.size, WHITE + (255,))
    picture.alpha_composite(rgba)
    return picture.convert("RGB")


def _deep_to_gray(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grays keep their contrast: the value range becomes 0..255. Done in
    the image's own integer type where it can be (a float64 copy of a 40-megapixel image is 320 MB)."""
    values = np.asarray(image)
    if image.mode != "F" and values.size and values.min() >= 0 and values.max() <= 65535:
        return Image.fromarray((values // 257).astype(np.uint8))  # 16-bit values: 65535 -> 255
    values = values.astype(np.float32)  # floats, or integers beyond 16 bits: scale min..max
    finite = np.isfinite(values)
    if not finite.all():
        good = values[finite]
        low = float(good.min()) if good.size else 0.0
        values[~finite] = low
    low, high = float(values.min()), float(values.max())
    values -= low
    values *= 255.0 / ((high - low) or 1.0)
    return Image.fromarray(np.clip(values, 0, 255, out=values).astype(np.uint8))
