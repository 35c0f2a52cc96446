"""An image file's structure, read from its bytes before anything decodes it: a JPEG's scans and
segments, a PNG's chunks, a TIFF's strips or tiles, an icon's pictures.

Pillow walks each of these pieces in Python, or decodes the whole picture once per piece, so a file can
cost far more to decode than its bytes and pixels suggest; images.py bounds these counts. Every walk
here is bounded too, whatever the file says of itself: a count stops at the limit it is asked about.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

ICO_MAGIC, PNG_MAGIC = b"\x00\x00\x01\x00", b"\x89PNG\r\n\x1a\n"
TIFF_MAGICS = {b"II*\x00": "little", b"MM\x00*": "big", b"II+\x00": "little", b"MM\x00+": "big"}
TIFF_PIECES = (273, 324)  # StripOffsets, TileOffsets: one value per strip or tile

# A marker: 0xFF and a byte that is not 0x00 (an escaped 0xFF in scan data), a restart marker (inside a
# scan) or 0xFF (fill before the marker). One 0xFF only: a pattern with a run of them backtracks.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xd0-\xd7\xff])")
# Markers without a length after them, as Pillow reads them (what follows is read a byte at a time).
_JPEG_BARE = {0x01, 0xC8, 0xD8, 0xD9, *range(0xF0, 0xFE)}
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class JpegWalk(NamedTuple):
    """What `jpeg_segments` counts of a JPEG."""

    scans: int
    segments: int
    junk: int  # bytes before the first scan in no segment (fill, junk), which Pillow reads one by one
    frames: int  # frame headers (SOF) before the first scan: Pillow keeps a tuple per 3 bytes of each
    exif: int  # bytes of Exif APP1 segments, which Pillow joins and parses whole


def jpeg_segments(data: bytes, stop: int) -> JpegWalk:
    """Scans and segments of a JPEG up to its end (EOI), as the decoder walks them: each segment is
    skipped by its length (a comment may hold any bytes), scan data is searched for the next marker
    (it escapes every 0xFF). At most `stop` segments are walked."""
    scans = segments = junk = frames = exif = 0
    pos = 2
    while segments < stop:
        found = _JPEG_MARKER.search(data, pos)
        junk += 0 if scans else max(0, (found.start() if found else len(data)) - pos)
        if not found:
            break
        marker, pos = found.group(1)[0], found.end()
        if marker == 0xD9 and scans:  # the picture's end: a trailer (a phone's video, an MPO's next
            break  # frame) is never decoded; before a scan, Pillow reads on
        segments += 1
        scans += marker == 0xDA
        if marker in _JPEG_BARE:
            continue
        length = int.from_bytes(data[pos : pos + 2], "big")  # the rest carry one (SOS: its header's)
        frames += not scans and marker in _JPEG_FRAMES
        exif += length if marker == 0xE1 and data[pos + 2 : pos + 8] == b"Exif\0\0" else 0
        pos += length
    return JpegWalk(scans, segments, junk, frames, exif)


def png_chunks(data: bytes, stop: int) -> Counter[bytes]:
    """Chunks of a PNG, or of all the PNG pictures of an icon together (its directory may name 65,535),
    by type, up to `stop` in all; empty for other files."""
    starts = {0} if data[:8] == PNG_MAGIC else _ico_pngs(data) if data[:4] == ICO_MAGIC else set()
    kinds: Counter[bytes] = Counter()
    for start in starts:
        kinds.update(kind for kind, _ in _png_walk(data, start, stop - kinds.total()))
        if kinds.total() >= stop:
            break
    return kinds


def _png_walk(data: bytes, start: int, stop: int) -> Iterator[tuple[bytes, int]]:
    """The type and data offset of each chunk of the PNG at `start` up to its end (IEND), at most
    `stop` of them: each is 12 bytes of framing around its length's data."""
    pos = start + len(PNG_MAGIC)
    for _ in range(stop):
        if pos + 8 > len(data) or data[pos + 4 : pos + 8] == b"IEND":
            return
        yield data[pos + 4 : pos + 8], pos + 8
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")


def tiff_pieces(data: bytes) -> int:
    """Strips or tiles of a TIFF's first picture (the one Pillow decodes), from its first directory;
    0 for other files, or when the directory cannot be read (Pillow then refuses the file itself).
    Every entry is read, as Pillow reads them (thousands of private tags may stand before the strips),
    and a repeated tag counts at its largest."""
    order = TIFF_MAGICS.get(data[:4])
    if order is None:
        return 0
    big = data[2:4] in (b"+\x00", b"\x00+")  # BigTIFF: 8-byte offsets and counts, 20-byte entries
    end = "<" if order == "little" else ">"
    width = 8 if big else 4
    directory = int.from_bytes(data[8:16] if big else data[4:8], order)
    first = directory + (8 if big else 2)
    entry = np.dtype(
        [("tag", end + "u2"), ("type", end + "u2"), ("count", f"{end}u{width}"), ("value", f"{end}u{width}")]
    )
    stated = int.from_bytes(data[directory:first], order)
    entries = min(stated, max(0, len(data) - first) // entry.itemsize)  # those the file holds
    if entries == 0:
        return 0
    table = np.frombuffer(data, dtype=entry, count=entries, offset=first)
    counts = table["count"][np.isin(table["tag"], TIFF_PIECES)]
    return int(counts.max()) if counts.size else 0


def ico_pixels(data: bytes, stop: int) -> int:
    """The pixels of the largest picture in an ICO file, from the pictures' own headers (Pillow
    decodes the largest one while opening the file, before its size could be checked, and the
    directory's sizes, at most 256 x 256, need not be true); 0 for other files. At most `stop` chunks
    of its PNG pictures are read in all."""
    if data[:4] != ICO_MAGIC:
        return 0
    largest = 0
    for offset in dict.fromkeys(_ico_entries(data)):  # a picture named twice is read once
        head = data[offset : offset + 24]
        if head[:8] == PNG_MAGIC:
            pixels, read = _png_pixels(data, offset, stop)
            largest, stop = max(largest, pixels), stop - read
        else:  # a DIB header, whose height counts the picture and its mask
            width = abs(int.from_bytes(head[4:8], "little", signed=True))
            height = abs(int.from_bytes(head[8:12], "little", signed=True)) // 2
            largest = max(largest, width * height)
    return largest


def _png_pixels(data: bytes, start: int, stop: int) -> tuple[int, int]:
    """The largest size an IHDR chunk (width and height, big-endian) of the PNG at `start` gives
    before its pixels, and the chunks read: Pillow takes the last IHDR it meets, not the first."""
    largest = read = 0
    for kind, at in _png_walk(data, start, stop):
        read += 1
        if kind in (b"IDAT", b"fdAT"):
            break
        if kind == b"IHDR":
            size = int.from_bytes(data[at : at + 4], "big") * int.from_bytes(data[at + 4 : at + 8], "big")
            largest = max(largest, size)
    return largest, read


def _ico_entries(data: bytes) -> Iterator[int]:
    """Where each picture of an ICO file starts, as its directory says."""
    for start in range(6, 6 + 16 * int.from_bytes(data[4:6], "little"), 16):
        yield int.from_bytes(data[start + 12 : start + 16], "little")


def _ico_pngs(data: bytes) -> set[int]:
    """Where the PNG pictures of an ICO file start (each counted once, however many entries name it)."""
    return {offset for offset in _ico_entries(data) if data[offset : offset + 8] == PNG_MAGIC}
