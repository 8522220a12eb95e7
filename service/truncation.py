"""Encoded images whose data ends before the size their header declares.

Pillow refuses most short files itself ("image file is truncated"), but not all, and not
always before the work: libjpeg fills every block after a premature end of the scan with
grey, so a few hundred bytes of JPEG whose header says 16384x16384 used to decode for
seconds into gigabytes (docs/engine.md "Measurements behind the code").
:func:`check_encoded` reads only headers and marker segments, in milliseconds, and raises
:class:`InvalidImage` with :data:`TRUNCATED` for:

- WebP: fewer bytes than the RIFF header declares;
- JPEG (Huffman-coded): fewer entropy-coded bytes than one bit per 8x8 block, which no
  complete scan can be (a block's DC code alone takes at least one bit);
- TIFF: a first directory, tag value, strip or tile that lies past the end of the data.

PNG, BMP and the rest of the cases end in Pillow's own truncation error, which
``image_input.decode`` words with the same message.
"""

from __future__ import annotations

import math
import struct

from densemap.service.errors import InvalidImage

TRUNCATED = "the image data ends before its declared size"
_SOF_HUFFMAN = frozenset((0xC0, 0xC1, 0xC2))  # baseline, extended, progressive
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RST0-7, SOI: no length field
_TIFF_STRIPS = ((273, 279), (324, 325))  # (offsets, byte counts) of strips, of tiles
_TIFF_TYPE_BYTES = {3: 2, 4: 4, 5: 8, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}


def truncated(detail: str) -> InvalidImage:
    return InvalidImage(f"{TRUNCATED} ({detail}): send the whole file")


def check_encoded(data: bytes) -> None:
    """Raise for WebP and JPEG data shorter than their headers declare."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 12:
        declared = struct.unpack("<I", data[4:8])[0] + 8
        if len(data) < declared:
            raise truncated(f"WebP: {len(data)} of {declared} bytes")
    elif data[:2] == b"\xff\xd8":
        _check_jpeg(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*") and len(data) >= 8:
        _check_tiff_directory(data)


def _check_tiff_directory(data: bytes) -> None:
    """The first directory, and the tag values it points to, lie within the data."""
    order = "<" if data[:2] == b"II" else ">"
    directory = struct.unpack(order + "I", data[4:8])[0]
    end = directory + 2
    if end <= len(data):  # 2 bytes of entry count, 12 per entry, 4 of next offset
        count = struct.unpack(order + "H", data[directory:end])[0]
        end += 12 * count + 4
    if end > len(data):
        raise truncated(f"TIFF: its first directory runs to byte {end} of {len(data)}")
    for entry in range(directory + 2, directory + 2 + 12 * count, 12):
        kind, values, offset = struct.unpack(order + "2xHII", data[entry : entry + 12])
        size = values * _TIFF_TYPE_BYTES.get(kind, 1)
        if size > 4 and offset + size > len(data):
            raise truncated(f"TIFF: a tag's values run to byte {offset + size} of {len(data)}")


def check_tiff_strips(image, size: int) -> None:
    """Raise when a strip or tile of an opened TIFF's current frame lies past ``size``."""
    tags = getattr(image, "tag_v2", None)
    if tags is None:
        return
    for offsets_tag, counts_tag in _TIFF_STRIPS:
        offsets, counts = tags.get(offsets_tag), tags.get(counts_tag)
        if not offsets or not counts:
            continue
        offsets = offsets if isinstance(offsets, tuple) else (offsets,)
        counts = counts if isinstance(counts, tuple) else (counts,)
        end = max(int(o) + int(c) for o, c in zip(offsets, counts, strict=False))
        if end > size:
            raise truncated(f"TIFF: its pixel data runs to byte {end} of {size}")


def _check_jpeg(data: bytes) -> None:
    frame, entropy_bytes, scans = None, 0, 0
    pos, size = 2, len(data)
    while pos + 1 < size:
        if data[pos] != 0xFF:
            return  # not a marker: corrupt, not short; Pillow words it
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > size:
            break
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segment = data[pos + 4 : pos + 2 + length]
        pos += 2 + length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            frame = (marker, segment)
        elif marker == 0xDA:
            scans += 1
            end = _scan_end(data, pos)
            entropy_bytes += end - pos
            pos = end
    if frame is None or frame[0] not in _SOF_HUFFMAN:
        return  # no frame (Pillow refuses it), or arithmetic/lossless coding: not bounded
    blocks = _jpeg_blocks(frame[1])
    if blocks and scans == 0:
        raise truncated("JPEG: the data ends before its first scan")
    if 8 * entropy_bytes < blocks:
        raise truncated(
            f"JPEG: {entropy_bytes} bytes of scan data cannot hold the {blocks} blocks of "
            "8x8 pixels its header declares"
        )


def _scan_end(data: bytes, pos: int) -> int:
    """Where a scan's entropy-coded data ends: the first marker other than RSTn."""
    while True:
        k = data.find(b"\xff", pos)
        if k < 0 or k + 1 >= len(data):
            return len(data)
        following = data[k + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos = k + 1 if following == 0xFF else k + 2
            continue
        return k


def _jpeg_blocks(segment: bytes) -> int:
    """8x8 blocks of all components that a frame header (SOF payload) declares."""
    if len(segment) < 6:
        return 0
    height, width, count = struct.unpack(">HHB", segment[1:6])
    sampling = [
        (segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15)
        for i in range(count)
        if 8 + 3 * i <= len(segment)
    ]
    if not height or not width or not sampling:
        return 0  # height from a DNL marker, or a header too short to tell
    h_max = max(h for h, _ in sampling) or 1
    v_max = max(v for _, v in sampling) or 1
    return sum(
        math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)
        for h, v in sampling
    )
