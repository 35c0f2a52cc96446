"""Image intake: every awkward form becomes a plain RGB picture; everything else is refused cleanly."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import conftest
import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from docker_vit import images
from docker_vit.images import FORMATS, WHITE, InputError, NotAnImage, TooLarge, open_image

LIMITS = {"max_bytes": 20_000_000, "max_pixels": 40_000_000}


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def test_rgb_jpeg_passes_through(bulldog: bytes) -> None:
    image = open_image(bulldog, **LIMITS)
    assert image.mode == "RGB" and image.size == (640, 427)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(bulldog)).convert("RGB")))


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    result = open_image(encode(image, "JPEG", exif=exif.tobytes()), **LIMITS)
    assert result.size == (20, 40)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(mode: str) -> None:
    image = Image.new(mode, (8, 8), (0, 0) if mode == "LA" else (0, 0, 0, 0))
    result = open_image(encode(image), **LIMITS)
    assert result.mode == "RGB" and result.getpixel((3, 3)) == (255, 255, 255)


def test_half_transparent_black_becomes_gray() -> None:
    result = open_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128))), **LIMITS)
    assert result.getpixel((0, 0)) == (127, 127, 127)


def test_palette_with_transparency() -> None:
    image = Image.new("P", (6, 6), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 1
    result = open_image(encode(image, transparency=1), **LIMITS)
    assert result.mode == "RGB" and result.getpixel((2, 2)) == (255, 255, 255)


@pytest.mark.parametrize(("mode", "clear"), [("L", 0), ("RGB", (0, 0, 0))])
def test_a_transparent_color_of_a_gray_or_rgb_png_is_composited_on_white(mode: str, clear: object) -> None:
    image = Image.new(mode, (8, 8), clear)
    image.putpixel((1, 1), 200 if mode == "L" else (200, 10, 10))
    result = open_image(encode(image, transparency=clear), **LIMITS)
    assert result.getpixel((0, 0)) == WHITE
    assert result.getpixel((1, 1)) == ((200, 200, 200) if mode == "L" else (200, 10, 10))


def test_a_transparent_value_of_a_16_bit_gray_png_is_composited_on_white() -> None:
    values = np.full((8, 8), 1000, np.uint16)
    values[1, 1] = 30000
    result = open_image(encode(Image.fromarray(values), transparency=1000), **LIMITS)
    assert result.getpixel((0, 0)) == WHITE and result.getpixel((1, 1)) == (116, 116, 116)  # 30000 // 257


def _png_with_transparent_color(depth: int, color_type: int, rows: list[bytes], key: bytes) -> bytes:
    """A PNG Pillow cannot write: 2- or 4-bit gray, or 16-bit RGB, with a transparent color (tRNS)."""
    width = 8 * len(rows[0]) // depth // (3 if color_type == 2 else 1)
    head = struct.pack(">IIBBBBB", width, len(rows), depth, color_type, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\0" + row for row in rows))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"tRNS", key)
    return png + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize("depth", [2, 4])
def test_a_transparent_gray_of_a_png_of_few_bits_is_composited_on_white(depth: int) -> None:
    samples = 8 // depth  # a byte of 1s, then a byte of 0s: the gray 1 is transparent, black is not
    data = _png_with_transparent_color(depth, 0, [bytes([int(f"{1:0{depth}b}" * samples, 2), 0])], b"\0\1")
    result = open_image(data, **LIMITS)
    assert result.getpixel((0, 0)) == WHITE and result.getpixel((samples, 0)) == (0, 0, 0)


def test_a_transparent_black_of_a_one_bit_png_is_composited_on_white() -> None:
    image = Image.new("1", (8, 8), 0)
    image.putpixel((1, 1), 1)
    result = open_image(encode(image, transparency=0), **LIMITS)
    assert result.getpixel((0, 0)) == WHITE and result.getpixel((1, 1)) == WHITE
    assert open_image(encode(image), **LIMITS).getpixel((0, 0)) == (0, 0, 0)  # opaque without the key


def test_a_transparent_color_of_a_16_bit_rgb_png_is_composited_on_white_and_black_stays() -> None:
    key = struct.pack(">3H", 0x4000, 0x8000, 0xC000)  # whose low bytes, all 0, Pillow compared alone
    data = _png_with_transparent_color(16, 2, [key + bytes(6)], key)
    result = open_image(data, **LIMITS)
    assert result.getpixel((0, 0)) == WHITE and result.getpixel((1, 0)) == (0, 0, 0)


def test_plain_palette_keeps_its_colors() -> None:
    image = Image.new("P", (6, 6), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert open_image(encode(image), **LIMITS).getpixel((1, 1)) == (10, 200, 30)


def test_grayscale_and_cmyk() -> None:
    gray = open_image(encode(Image.new("L", (5, 5), 90)), **LIMITS)
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (90, 90, 90)
    cmyk = open_image(encode(Image.new("CMYK", (5, 5), (0, 255, 255, 0)), "JPEG"), **LIMITS)
    red, green, blue = cmyk.getpixel((2, 2))
    assert cmyk.mode == "RGB" and red > 200 and green < 60 and blue < 60


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    values = np.full((4, 4), 32768, dtype=np.uint16)
    result = open_image(encode(Image.fromarray(values)), **LIMITS)
    assert result.getpixel((0, 0)) == (127, 127, 127)


def test_deeper_and_float_grays_are_scaled_over_their_range() -> None:
    wide = np.array([[0, 1 << 20], [1 << 24, 1 << 30]], dtype=np.int32)  # 32-bit integers
    assert [
        open_image(encode(Image.fromarray(wide), "TIFF"), **LIMITS).getpixel(xy)[0] for xy in ((0, 0), (1, 1))
    ] == [0, 255]
    floats = np.array([[-1.0, np.inf], [np.nan, 1.0]], dtype=np.float32)
    result = open_image(encode(Image.fromarray(floats), "TIFF"), **LIMITS)
    assert result.getpixel((0, 0)) == (0, 0, 0) and result.getpixel((1, 1)) == (255, 255, 255)


def test_an_icon_hiding_a_huge_png_is_refused_before_pillow_decodes_it() -> None:
    """Pillow decodes an ICO's largest picture inside `Image.open`: its size is read first."""
    picture = _png_header_only(3_000, 3_000)
    directory = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(picture), 22)
    with pytest.raises(TooLarge, match="icon"):
        open_image(directory + picture, max_bytes=10**7, max_pixels=1_000_000)
    small = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(small, format="ICO", sizes=[(32, 32)])
    assert open_image(small.getvalue(), **LIMITS).size == (32, 32)
    bitmap = io.BytesIO()  # a DIB icon: its header's height counts the mask too, not the picture
    Image.new("RGB", (64, 43), (1, 2, 3)).save(bitmap, format="ICO", sizes=[(64, 43)], bitmap_format="bmp")
    assert open_image(bitmap.getvalue(), max_bytes=10**6, max_pixels=64 * 64).size[0] == 64


@pytest.mark.parametrize("text_first", [False, True])
def test_an_icons_png_whose_size_stands_in_a_later_header_is_refused(text_first: bool) -> None:
    """Pillow takes the last IHDR before the pixels: a 1 x 1 one first hid a 3000 x 3000 picture,
    decoded whole while the icon opened (a review: 583 MB for 12000 x 12000 from 688 KB)."""
    one = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    big = chunk(b"IHDR", struct.pack(">IIBBBBB", 3_000, 3_000, 8, 2, 0, 0, 0))
    before = chunk(b"tEXt", b"k\x00v") if text_first else b""
    picture = (
        b"\x89PNG\r\n\x1a\n" + one + before + big + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    directory = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(picture), 22)
    with pytest.raises(TooLarge, match="icon"):
        open_image(directory + picture, max_bytes=10**7, max_pixels=1_000_000)


def test_a_png_of_many_color_profiles_is_refused_before_decoding() -> None:
    """Pillow inflates each iCCP chunk (up to 1 MB) as it opens the file: 18,553 of them in 19.5 MB
    held a decoding thread 46-56 s (a review). The spec allows one."""
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    pixels = chunk(b"IDAT", zlib.compress(b"".join(b"\x00" + bytes(8) for _ in range(8)))) + chunk(
        b"IEND", b""
    )
    profile = chunk(b"iCCP", b"p\x00\x00" + zlib.compress(bytes(1000)))
    assert open_image(head + profile + pixels, **LIMITS).size == (8, 8)
    with pytest.raises(TooLarge, match="65 color profiles; the limit is 64"):
        open_image(head + profile * 65 + pixels, **LIMITS)


@pytest.mark.parametrize("tail", [False, True])
def test_a_jpeg_padded_between_its_segments_is_refused_before_decoding(tail: bool) -> None:
    """Pillow reads bytes outside a segment one at a time: 19 MB of 0xFF fill after the start
    marker held a thread ~9 s (a review). A few fill bytes, as the format allows, are read."""
    jpeg = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG")
    assert open_image(jpeg[:2] + b"\xff" * 10 + jpeg[2:], **LIMITS).size == (16, 16)
    padded = jpeg[:2] + b"\xff" * 70_000 + (jpeg[2:] if tail else b"")
    with pytest.raises(TooLarge, match="70000 bytes between its segments"):
        open_image(padded, **LIMITS)


@pytest.mark.parametrize(
    "marker",
    [b"\xff\xd9", b"\xff\xc8\xff\xff", b"\xff\xf0\xff\xff"],  # EOI, JPG, JPG0 before any scan
)
def test_a_marker_pillow_reads_no_length_after_does_not_hide_padding(marker: bytes) -> None:
    """Pillow reads on past an EOI before the first scan, and reads no length after JPG and JPGn
    markers: what follows them is read a byte at a time (a review: ~5 s for 19 MB), so it counts."""
    jpeg = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG")
    padded = jpeg[:2] + marker + b"\xff" * 70_000 + jpeg[2:]
    with pytest.raises(TooLarge, match="bytes between its segments"):
        open_image(padded, **LIMITS)


def _exif_of_one_rational_tag(tag: int, values: int) -> bytes:
    """A little-endian TIFF block whose one entry, `tag`, is RATIONAL with `values` values."""
    head = b"II*\x00" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little")
    entry = struct.pack("<HHII", tag, 5, values, 8 + 2 + 12 + 4)
    return head + entry + bytes(4) + bytes(8 * values)


def test_an_exif_block_past_its_bound_is_refused_before_pillow_parses_it() -> None:
    """Pillow makes an object per value of an EXIF tag, and joins a JPEG's Exif segments: 19 MB of an
    orientation tag took ~4 s and ~500 MB a picture of 16 x 16 (a review)."""
    exif = b"Exif\x00\x00" + _exif_of_one_rational_tag(0x0112, 150_000)  # 1.2 MB
    jpeg = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG")
    pieces = [exif[i : i + 60_000] for i in range(0, len(exif), 60_000)]
    segments = b"".join(b"\xff\xe1" + (len(part) + 2).to_bytes(2, "big") + part for part in pieces[:1])
    segments += b"".join(  # the rest, each its own segment, as Pillow joins them
        b"\xff\xe1" + (len(part) + 8).to_bytes(2, "big") + b"Exif\x00\x00" + part for part in pieces[1:]
    )
    with pytest.raises(TooLarge, match="EXIF block"):
        open_image(jpeg[:2] + segments + jpeg[2:], **LIMITS)
    png = encode(Image.new("RGB", (16, 16), (1, 2, 3)), exif=exif[6:])
    with pytest.raises(TooLarge, match="EXIF block"):
        open_image(png, **LIMITS)
    plain = encode(Image.new("RGB", (16, 16), (1, 2, 3)))
    end = plain.rindex(b"IEND") - 4  # an eXIf chunk after the pixels, which Pillow reads as it loads them
    late = plain[:end] + chunk(b"eXIf", exif[6:]) + plain[end:]
    with pytest.raises(TooLarge, match="EXIF block"):
        open_image(late, **LIMITS)
    small = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG", exif=Image.Exif())
    assert open_image(small, **LIMITS).size == (16, 16)


def test_a_jpeg_of_many_frame_headers_is_refused_before_pillow_reads_them() -> None:
    """Pillow keeps a tuple per 3 bytes of every frame header (SOF): 303 of 65 KB took ~580 MB before
    libjpeg refused the second one (a review)."""
    jpeg = encode(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG")
    start = jpeg.index(b"\xff\xc0")
    frame = jpeg[start : start + 2 + int.from_bytes(jpeg[start + 2 : start + 4], "big")]
    with pytest.raises(NotAnImage, match="2 frame headers"):
        open_image(jpeg[:start] + frame + jpeg[start:], **LIMITS)


def test_one_bit_image() -> None:
    result = open_image(encode(Image.new("1", (9, 9), 1)), **LIMITS)
    assert result.getpixel((4, 4)) == (255, 255, 255)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), color) for color in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    result = open_image(data, **LIMITS)
    red, green, blue = result.getpixel((5, 5))
    assert red > 200 and blue < 50


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "TGA", "MPO"])
def test_every_listed_format_decodes(fmt: str) -> None:
    """Each format the README lists, the last ones too (an unknown name early in the allow-list once
    made Pillow refuse everything after it)."""
    picture = Image.new("RGB", (12, 12), (0, 255, 0))
    sizes = {"sizes": [picture.size]} if fmt == "ICO" else {}  # Pillow before 13: no icon under 16 px
    image = open_image(encode(picture, fmt, **sizes), **LIMITS)
    assert image.size == (12, 12) and image.getpixel((6, 6))[1] > 200


def test_byte_limit_is_checked_before_decoding(bulldog: bytes) -> None:
    with pytest.raises(TooLarge) as info:
        open_image(bulldog, max_bytes=1000, max_pixels=10**9)
    assert info.value.status == 413


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, kind, body, CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a size but holds almost nothing: a decompression bomb's calling card."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_pixel_limit_refuses_bombs_before_decoding() -> None:
    with pytest.raises(TooLarge):
        open_image(_png_header_only(50_000, 50_000), **LIMITS)
    with pytest.raises(TooLarge):
        open_image(encode(Image.new("RGB", (100, 100))), max_bytes=10**6, max_pixels=9_999)


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding() -> None:
    """Each scan is a pass over the whole picture: 30,000 empty ones took 22 s from 316 KB."""
    progressive = encode(Image.new("RGB", (64, 64), (10, 120, 200)), "JPEG", progressive=True)
    assert open_image(progressive, **LIMITS).size == (64, 64)  # ~10 scans: fine
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    with pytest.raises(TooLarge, match="scans; the limit is 256"):
        open_image(progressive[:-2] + empty_scan * 3000 + b"\xff\xd9", **LIMITS)
    hidden = progressive[:-2] + b"\xff\xfe\x00\x04\xff\xd9" + empty_scan * 3000  # a comment holding an
    with pytest.raises(TooLarge, match="scans; the limit is 256"):  # end-of-image marker's bytes
        open_image(hidden + b"\xff\xd9", **LIMITS)
    with pytest.raises(TooLarge, match="more than 4096 segments"):
        open_image(progressive[:-2] + b"\xff\xfe\x00\x02" * 100_000 + b"\xff\xd9", **LIMITS)
    first_scan = progressive.index(b"\xff\xda")  # a stray byte before it does not hide the count
    with pytest.raises(TooLarge, match="scans; the limit is 256"):
        open_image(
            progressive[:first_scan] + b"\x00" + progressive[first_scan:-2] + empty_scan * 3000, **LIMITS
        )


def test_many_scans_of_a_big_picture_are_bounded_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """256 scans of 40 MP (248 KB) took 8 s to decode: past 16 scans, scans x pixels is bounded."""
    progressive = encode(Image.new("RGB", (64, 64), (10, 120, 200)), "JPEG", progressive=True)
    scans = progressive.count(b"\xff\xda")
    last_scan = progressive[progressive.rindex(b"\xff\xda") : -2]  # repeated, it still decodes
    monkeypatch.setattr(images, "MAX_JPEG_SCAN_PIXELS", 64 * 64 * 20)
    with_scans = {n: progressive[:-2] + last_scan * (n - scans) + b"\xff\xd9" for n in (16, 20, 21)}
    for n in (16, 20):  # few scans, or within the budget
        assert open_image(with_scans[n], **LIMITS).size == (64, 64)
    with pytest.raises(TooLarge, match="21 scans of 64x64 pixels"):
        open_image(with_scans[21], **LIMITS)
    monkeypatch.setattr(images, "MAX_JPEG_SCAN_PIXELS", 1)
    assert open_image(with_scans[16], **LIMITS).size == (64, 64)  # 16 scans are always taken


def test_what_follows_a_picture_is_not_counted_as_its_scans_or_chunks() -> None:
    """A phone's motion photo carries its video after the JPEG; files may end in padding."""
    rng = np.random.default_rng(0)
    trailer = rng.integers(0, 256, 18_000_000, dtype=np.uint8).tobytes()  # ~275 random ff da pairs
    jpeg = encode(Image.new("RGB", (32, 32), (1, 2, 3)), "JPEG", progressive=True)
    assert open_image(jpeg + trailer, max_bytes=10**8, max_pixels=10**6).size == (32, 32)
    png = encode(Image.new("RGB", (32, 32), (1, 2, 3)))
    assert open_image(png + bytes(600_000), **LIMITS).size == (32, 32)


def test_a_png_of_tiny_chunks_is_refused_before_decoding() -> None:
    """Pillow reads chunks one by one in Python: a 20 MB file of tiny ones kept a thread ~20 s."""
    image = Image.new("L", (64, 64), 99)
    pixels = zlib.compress(
        b"".join(b"\x00" + bytes(image.tobytes()[y * 64 : y * 64 + 64]) for y in range(64))
    )
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
    few = head + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    assert open_image(few, **LIMITS).getpixel((5, 5)) == (99, 99, 99)
    tiny = b"".join(chunk(b"tEXt", b"k\x00v") for _ in range(60_000))
    slow = head + tiny + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    with pytest.raises(TooLarge, match="more than 50000 chunks"):
        open_image(slow, **LIMITS)
    icon = struct.pack("<HHH", 0, 1, 2)  # the same picture in an icon, named twice by its directory
    icon += struct.pack("<BBBBHHII", 64, 64, 0, 0, 1, 32, len(slow), 38) * 2
    with pytest.raises(TooLarge, match="more than 50000 chunks"):
        open_image(icon + slow, **LIMITS)


def _tiff_of_one_jpeg_strip(jpeg: bytes, width: int, height: int) -> bytes:
    """A grayscale TIFF whose one strip is `jpeg` (compression 7): libtiff decodes it, not Pillow."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 7), (262, 3, 1), (277, 3, 1)]
    tags += [(278, 4, height), (273, 4, 8 + 2 + 9 * 12 + 4), (279, 4, len(jpeg))]
    entries = b"".join(
        struct.pack("<HHI", tag, kind, 1)
        + struct.pack("<HH" if kind == 3 else "<I", *((value, 0) if kind == 3 else (value,)))
        for tag, kind, value in tags
    )
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + bytes(4) + jpeg


def test_a_tiffs_jpeg_strip_of_many_scans_is_refused() -> None:
    """A JPEG of 99 scans is refused as a .jpg (its scans times its pixels); wrapped in a TIFF, libtiff
    decoded it (100 scans a strip, its own cap): seconds of a thread from 161 KB."""
    jpeg = encode(Image.new("L", (64, 64), 128), "JPEG", progressive=True)
    assert open_image(_tiff_of_one_jpeg_strip(jpeg, 64, 64), **LIMITS).getpixel((5, 5))[0] in range(126, 131)
    last_scan = jpeg[jpeg.rindex(b"\xff\xda") : jpeg.rindex(b"\xff\xd9")]
    many = jpeg[: jpeg.rindex(b"\xff\xd9")] + last_scan * 40 + b"\xff\xd9"
    with pytest.raises(NotAnImage):
        open_image(_tiff_of_one_jpeg_strip(many, 64, 64), **LIMITS)


def test_a_broken_tiff_is_refused_without_a_line_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """libtiff writes its errors to descriptor 2 itself (`ZIPDecode: Decoding error ...`): the one line
    of a server's output, set off by a client's file, that was not JSON under `--log-format json`."""
    tiff = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "TIFF", compression="tiff_deflate")
    tags = TiffImagePlugin.TiffImageFile(io.BytesIO(tiff)).tag_v2
    end = tags[273][0] + tags[279][0]  # the one deflated strip's end: its checksum's last byte
    broken = tiff[: end - 4] + bytes(b ^ 0xFF for b in tiff[end - 4 : end]) + tiff[end:]
    capfd.readouterr()
    with pytest.raises(NotAnImage, match="cannot decode the image"):
        open_image(broken, **LIMITS)
    assert capfd.readouterr() == ("", "")


def test_a_tiff_of_a_million_strips_is_refused_before_decoding() -> None:
    """Pillow reads each strip in Python: 1.8 million one-row strips (20 MB, 1.8 megapixels) held a
    decode thread for 7.6 s. A TIFF of ordinary strips, or of tiles, decodes."""
    many = encode(Image.new("RGB", (1, 60_000), (1, 2, 3)), "TIFF", tiffinfo={278: 1})
    started = time.perf_counter()
    with pytest.raises(TooLarge, match="the TIFF has more than 50000 strips or tiles"):
        open_image(many, **LIMITS)
    assert time.perf_counter() - started < 1  # refused from its directory, not after a slow open
    assert open_image(encode(Image.new("RGB", (64, 600), (1, 2, 3)), "TIFF", tiffinfo={278: 8}), **LIMITS)
    tiled = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "TIFF", tile=(16, 16))
    assert open_image(tiled, **LIMITS).getpixel((40, 40)) == (1, 2, 3)


@pytest.mark.parametrize(
    ("head", "pieces"),
    [
        (
            b"II*\x00"
            + struct.pack("<IH", 8, 2)
            + struct.pack("<HHII", 256, 4, 1, 9)
            + struct.pack("<HHII", 324, 4, 70_000, 0),
            70_000,
        ),
        (b"MM\x00*" + struct.pack(">IH", 8, 1) + struct.pack(">HHII", 273, 4, 60_001, 0), 60_001),
        (b"II+\x00" + struct.pack("<HHQQ", 8, 0, 16, 1) + struct.pack("<HHQQ", 273, 16, 99_999, 0), 99_999),
        (
            b"II*\x00"
            + struct.pack("<IH", 8, 4101)
            + struct.pack("<HHII", 65000, 4, 1, 0) * 4100
            + struct.pack("<HHII", 273, 4, 60_001, 0),
            60_001,
        ),  # Pillow reads every entry
        (
            b"II*\x00"
            + struct.pack("<IH", 8, 2)
            + struct.pack("<HHII", 273, 4, 60_001, 0)
            + struct.pack("<HHII", 273, 4, 1, 0),
            60_001,
        ),  # a repeated tag
        (b"MM\x00*" + struct.pack(">IH", 8, 500), 0),  # a directory cut short: Pillow's to refuse
        (b"II*\x00" + struct.pack("<I", 10**9), 0),  # a directory past the end
        (b"GIF89a", 0),
    ],
)
def test_tiff_pieces_read_from_either_byte_order_and_bigtiff(head: bytes, pieces: int) -> None:
    from docker_vit import structure

    assert structure.tiff_pieces(head) == pieces


def test_a_bomb_past_pillows_own_cap_names_the_limit_that_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # put back after the test
    with pytest.raises(TooLarge, match=r"too many pixels; the limit is 40000000$") as info:
        open_image(_png_header_only(50_000, 50_000), max_bytes=10**6, max_pixels=40_000_000)
    assert info.value.setting == "max_pixels"  # so `caption` says which flag raises it
    with pytest.raises(TooLarge, match=r"too many pixels; the limit is 1000000000$"):
        open_image(_png_header_only(50_000, 50_000), max_bytes=10**6, max_pixels=10**9)


def test_a_pixel_limit_past_pillows_own_cap_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses 179 M pixels as it opens a file: a higher --max-pixels lets such a picture
    through to the decode (here a header without pixel data: 225 M pixels, not decodable)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    assert 2 * Image.MAX_IMAGE_PIXELS < 15_000 * 15_000
    with pytest.raises(TooLarge, match="too many pixels; the limit is 100000000$"):
        open_image(_png_header_only(15_000, 15_000), max_bytes=10**6, max_pixels=10**8)
    with pytest.raises(NotAnImage):
        open_image(_png_header_only(15_000, 15_000), max_bytes=10**6, max_pixels=10**9)


def test_no_bytes_at_all_is_missing_input() -> None:
    with pytest.raises(InputError) as info:
        open_image(b"", **LIMITS)
    assert info.value.status == 400 and not isinstance(info.value, NotAnImage)


@pytest.mark.parametrize("data", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, b"GIF89a"])
def test_garbage_is_not_an_image(data: bytes) -> None:
    with pytest.raises(NotAnImage) as info:
        open_image(data, **LIMITS)
    assert info.value.status == 415


def test_truncated_jpeg_is_not_an_image(bulldog: bytes) -> None:
    with pytest.raises(NotAnImage):
        open_image(bulldog[: len(bulldog) // 2], **LIMITS)


def test_unlisted_formats_are_refused() -> None:
    with pytest.raises(NotAnImage, match="^cannot decode the image: not a supported image format$"):
        open_image(encode(Image.new("RGB", (8, 8)), "PDF"), **LIMITS)
    # libavif decodes the frame its AV1 data holds, whatever size the container claims: a pixel
    # limit could not hold it (1.2 KB claiming 100 x 100 decoded 144 megapixels)
    assert "AVIF" not in FORMATS


@pytest.mark.parametrize(
    ("size", "drafted"),
    [
        ((4100, 4098), (2050, 2049)),
        ((2049, 2049), (2049, 2049)),
        ((5183, 3457), (5183, 3457)),
        ((4032, 3024), (2016, 1512)),
    ],
)
def test_draft_scales_only_by_a_factor_dividing_both_sides(size: tuple, drafted: tuple) -> None:
    """A side that is no multiple of the scale ends in a part block, which the reduced decode stretches
    over a whole pixel: the picture shifted, up to 21/255 off after a 224 px resize."""
    photo = Image.open(conftest.photo("coffee.jpg")).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    data = encode(photo, "JPEG")
    image = open_image(data, **LIMITS, draft=512)
    assert image.size == drafted
    whole = np.asarray(open_image(data, **LIMITS).resize((224, 224), Image.Resampling.BILINEAR), dtype=int)
    small = np.asarray(image.resize((224, 224), Image.Resampling.BILINEAR), dtype=int)
    assert np.abs(whole - small).max() <= 2


def test_draft_decodes_huge_jpegs_smaller_but_never_below_twice_the_input() -> None:
    big = encode(Image.new("RGB", (4000, 3000), (30, 90, 150)), "JPEG")
    image = open_image(big, **LIMITS, draft=224)
    assert 448 <= min(image.size) < 3000
    assert open_image(big, **LIMITS).size == (4000, 3000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_an_orientation_in_xmp_alone_does_not_turn_the_picture(fmt: str) -> None:
    """Only EXIF's orientation is applied (README): Pillow also read XMP's `tiff:Orientation` when the
    EXIF had none, and turned a picture the original captioned as it was stored."""
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
    )
    limits = {"max_bytes": 10**8, "max_pixels": 10**8}
    picture = Image.new("RGB", (60, 40), (200, 30, 30))
    assert open_image(encode(picture, fmt, **_xmp_params(fmt, xmp)), **limits).size == (60, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert open_image(encode(picture, fmt, exif=exif, xmp=xmp), **limits).size == (40, 60)  # EXIF: turned


def test_a_drafted_progressive_jpeg_counts_its_full_size_coefficients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libjpeg keeps a progressive JPEG's coefficients at full size at any DCT scale: counted at its
    drafted size, 32 of them (238 MB each at 40 MP) fit the budget at once."""
    held: list[int] = []
    budget = images.Budget(images.DECODING_PIXELS)
    monkeypatch.setattr(images, "decode_budget", budget)
    monkeypatch.setattr(budget, "hold", lambda amount: held.append(amount) or images.Budget(10**12).hold(0))
    picture = Image.new("RGB", (4096, 4096), (90, 120, 150))
    limits = {"max_bytes": 10**8, "max_pixels": 10**8, "draft": 224}
    assert open_image(encode(picture, "JPEG", progressive=True), **limits).size == (512, 512)
    assert open_image(encode(picture, "JPEG"), **limits).size == (512, 512)
    assert held == [4096 * 4096 // 3, 512 * 512]  # a baseline JPEG's drafted decode is its own size


def test_a_big_pictures_freed_memory_goes_back_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each decoding thread's heap kept its largest picture, and a busy server never pauses to trim:
    on a many-core host, cores x a picture stayed held. A picture of an eighth of the budget or more
    hands its memory back once decoded; small ones cost no trim."""
    trims: list[int] = []
    monkeypatch.setattr(images.memory, "release_free_memory", lambda: trims.append(1))
    limits = {"max_bytes": 10**8, "max_pixels": 10**8}
    open_image(encode(Image.new("RGB", (640, 480), (1, 2, 3))), **limits)
    assert trims == []
    open_image(encode(Image.new("RGB", (4000, 2500), (1, 2, 3))), **limits)
    assert trims == [1]


def _xmp_params(fmt: str, xmp: bytes) -> dict[str, object]:
    """How each format's encoder takes an XMP packet (PNG as an iTXt chunk, TIFF as tag 700)."""
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode())
        return {"pnginfo": info}
    if fmt == "TIFF":
        tags = TiffImagePlugin.ImageFileDirectory_v2()
        tags[700] = xmp
        return {"tiffinfo": tags}
    return {"xmp": xmp}


def test_what_then_raises_is_its_own_error_not_the_clients(bulldog: bytes) -> None:
    """A processor's failure (out of memory on a big picture) is the server's 500, not a 415."""

    def fails(image: Image.Image) -> None:
        raise MemoryError("DefaultCPUAllocator: can't allocate memory")

    with pytest.raises(MemoryError):
        open_image(bulldog, max_bytes=10**8, max_pixels=10**8, then=fails)
    assert images.decode_budget.taken == 0


def test_a_then_that_decodes_again_runs_on_its_threads_share() -> None:
    """Queued behind another thread's wait while holding its own share, a nested hold waited for ever."""
    budget = images.Budget(100)
    done: list[str] = []

    def outer() -> None:
        with budget.hold(60):
            time.sleep(0.2)  # meanwhile `waiter` queues for more than is left
            with budget.hold(30):
                done.append("nested")

    def waiter() -> None:
        time.sleep(0.05)
        with budget.hold(80):
            done.append("waiter")

    threads = [threading.Thread(target=outer), threading.Thread(target=waiter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert done == ["nested", "waiter"] and budget.taken == 0


def test_decoding_holds_its_pixels_of_a_shared_budget_and_gives_them_back() -> None:
    """Pictures at the pixel limit cost 0.5-0.8 GB each to decode: cores x that was the only bound."""
    budget = images.Budget(100)
    order: list[str] = []
    seen: list[int] = []

    def second() -> None:
        with budget.hold(50):
            order.append("second")
            seen.append(budget.taken)

    with budget.hold(80):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.2)
        order.append("first done")
    waiter.join(5)
    assert order == ["first done", "second"] and seen == [50] and budget.taken == 0
    with budget.hold(1000):  # more than all of it: alone, not forever
        assert budget.taken == 100


def test_the_budget_serves_in_turn_so_a_big_share_is_not_starved() -> None:
    """Small decodes that would fit keep behind a big one that waits: otherwise a stream of them
    could keep a 40-megapixel picture waiting until its client timed out."""
    budget = images.Budget(100)
    order: list[str] = []

    def take(name: str, amount: int) -> None:
        with budget.hold(amount):
            order.append(name)

    with budget.hold(80):
        big = threading.Thread(target=take, args=("big", 50))
        big.start()
        time.sleep(0.1)
        small = threading.Thread(target=take, args=("small", 10))  # fits now, but comes second
        small.start()
        time.sleep(0.2)
        assert order == []
    big.join(5)
    small.join(5)
    assert order == ["big", "small"] and budget.taken == 0


def test_an_icons_pngs_share_one_chunk_allowance() -> None:
    """Thousands of directory entries, each starting a walk of one long chain just under the bound:
    counted per PNG, a 3 MB icon cost a thread ~17 minutes."""
    count = 3
    first = 6 + 16 * count  # after the directory: per picture, a PNG signature and a chunk head
    chain_at = first + 16 * count + 4  # room for the last chunk head's CRC
    directory = struct.pack("<HHH", 0, 1, count)
    pictures = b""
    for index in range(count):
        at = first + 16 * index
        directory += struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, 100, at)
        pictures += (
            b"\x89PNG\r\n\x1a\n" + struct.pack(">I", chain_at - at - 20) + b"prVt"
        )  # jumps to the chain
    chain = b"".join(chunk(b"tEXt", b"") for _ in range(30_000)) + chunk(b"IEND", b"")
    icon = (
        directory + pictures + bytes(4) + chain
    )  # each picture: 30,001 chunks, under the bound; all three: over
    with pytest.raises(TooLarge, match="more than 50000 chunks"):  # (no IHDR: any "size" passes the pixels)
        open_image(icon, max_bytes=10**7, max_pixels=10**20)


def test_open_image_gives_its_budget_back_after_a_failed_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "decode_budget", images.Budget(10_000))
    data = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    held: list[int] = []
    real = images.Budget.hold

    def watched(self, amount):
        held.append(amount)
        return real(self, amount)

    monkeypatch.setattr(images.Budget, "hold", watched)
    assert open_image(data, **LIMITS).size == (64, 64)
    with pytest.raises(NotAnImage):
        open_image(data[: len(data) - 30], **LIMITS)
    assert held == [64 * 64, 64 * 64] and images.decode_budget.taken == 0
