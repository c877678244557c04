"""Request-body decompression with a cap on the *decompressed* size (zip-bomb guard). Pure: no I/O.

Rules (reference otlp-receiver.md §1.2): servers MUST handle no encoding and ``gzip`` (spec §"OTLP/HTTP Request");
like the OTel Collector (core ``config/confighttp/compression.go``) we also take ``zstd``, ``zlib`` and ``deflate``,
route ``deflate`` to the zlib (RFC 1950) reader, and count the size cap after decompression (spec v1.11.0: over the
cap is 413). Unlike the Collector we also accept raw RFC 1951 deflate under ``deflate``/``zlib`` (some HTTP clients
send that), and answer an unknown coding with 415, not 400.

Every decoder stops once it has produced ``max_bytes + 1`` bytes, so a bomb costs about ``max_bytes`` of memory
(plus one 8 MiB zlib step) and the time to produce it, never the size it claims.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import zstandard

from receiver.errors import InvalidCompressedData, PayloadTooLarge, UnsupportedEncoding

__all__ = ["decompress", "SUPPORTED_ENCODINGS"]

# Header values (lower-cased, stripped) that mean "not compressed". "none" is the spec's name for it.
_IDENTITY = frozenset({"", "identity", "none"})


def decompress(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """Decode an HTTP request body according to its ``Content-Encoding`` header, capping the decoded size.

    Args:
        body: the raw request body (bytes; any bytes-like object works).
        content_encoding: the ``Content-Encoding`` header value or None. Case-insensitive, surrounding whitespace
            ignored. None, ``""``, ``identity`` and ``none`` mean uncompressed; ``gzip``/``x-gzip`` (multi-member
            allowed), ``zstd`` (several frames and skippable frames allowed), ``deflate``/``zlib`` (RFC 1950
            zlib stream, or raw RFC 1951 deflate when the zlib header is absent).
        max_bytes: the cap, in bytes, on the decoded body (int, >= 0). An uncompressed body is held to it too.

    Returns:
        The decoded body (bytes). An empty body decodes to ``b""`` under any supported encoding.
        Uncompressed bodies are returned as given (no copy).

    Raises:
        UnsupportedEncoding: unknown coding, or a stacked list such as ``gzip, zstd`` (415).
        PayloadTooLarge: the decoded body would exceed ``max_bytes`` (413).
        InvalidCompressedData: corrupt or truncated data, or trailing bytes after the compressed stream (400).
        ValueError: ``max_bytes`` is negative (a caller bug, not a client error).
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    coding = _normalize(content_encoding)
    decoder = _DECODERS.get(coding)
    if decoder is None and coding not in _IDENTITY:
        raise UnsupportedEncoding(content_encoding or "")
    if decoder is None or not body:
        # An empty body is unambiguous whatever the header says; don't call it "truncated".
        if len(body) > max_bytes:
            raise PayloadTooLarge(max_bytes)
        return body
    return decoder(body, max_bytes)


def _normalize(content_encoding: str | None) -> str:
    """Lower-case one coding name; a list is accepted only if at most one entry is a real coding."""
    if content_encoding is None:
        return ""
    coding = content_encoding.strip().lower()
    if "," in coding:
        # Stacked codings (RFC 9110 §8.4) are legal HTTP but no OTLP client sends them; decoding them in order
        # would multiply the bomb surface, so take only the degenerate "gzip, identity" form.
        real = [c for c in (part.strip() for part in coding.split(",")) if c not in _IDENTITY]
        if len(real) > 1:
            raise UnsupportedEncoding(
                content_encoding,
                f"stacked Content-Encoding {content_encoding!r} is not supported; send a single coding",
            )
        coding = real[0] if real else ""
    return coding


# --- gzip / zlib / deflate ------------------------------------------------------------------------------------


# Output asked of zlib per call. CPython's zlib builds the result in blocks and joins them, so one call briefly holds
# twice its output; asking in steps keeps a bomb's peak near max_bytes + 2 * _STEP rather than 2 * max_bytes, and a
# normal body (< 8 MiB decoded) still takes a single call.
_STEP = 8 << 20


def _inflate(body: bytes, wbits: int, max_bytes: int, name: str, *, multi_member: bool) -> bytes:
    """Run zlib with an output cap, in as few C calls as possible (one for a normal body).

    ``decompress(data, max_length)`` stops after ``max_length`` output bytes and keeps the rest of the input in
    ``unconsumed_tail``. We never ask for more than ``max_bytes + 1`` in total: more than ``max_bytes`` came out ->
    too large; a short answer with no input left and no ``eof`` -> truncated.
    """
    parts: list[bytes] = []
    total = 0
    data = body
    member = 0
    while True:  # one iteration per gzip member (RFC 1952 §2.2 allows several; Go's gzip.Reader reads them all)
        d = zlib.decompressobj(wbits)
        while True:  # one iteration per _STEP of output
            ask = min(_STEP, max_bytes - total + 1)
            try:
                out = d.decompress(data, ask)
            except zlib.error as exc:
                if member:
                    raise InvalidCompressedData(f"invalid {name} data after member {member}: {exc}") from None
                raise InvalidCompressedData(f"invalid {name} data: {exc}") from None
            total += len(out)
            if total > max_bytes:
                raise PayloadTooLarge(max_bytes)
            parts.append(out)
            if d.eof:
                break
            data = d.unconsumed_tail
            if not data and len(out) < ask:
                raise InvalidCompressedData(f"truncated {name} data")
        data = d.unused_data
        if not data:
            break
        if not multi_member:
            raise InvalidCompressedData(f"{len(data)} bytes of trailing data after the {name} stream")
        member += 1
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _gzip(body: bytes, max_bytes: int) -> bytes:
    return _inflate(body, 16 + zlib.MAX_WBITS, max_bytes, "gzip", multi_member=True)


def _looks_like_zlib(body: bytes) -> bool:
    """RFC 1950 §2.2 header: CM = 8 (deflate), CINFO <= 7, and CMF*256 + FLG divisible by 31."""
    return len(body) >= 2 and body[0] & 0x0F == 8 and body[0] >> 4 <= 7 and ((body[0] << 8) | body[1]) % 31 == 0


def _zlib(body: bytes, max_bytes: int) -> bytes:
    if not _looks_like_zlib(body):
        return _inflate(body, -zlib.MAX_WBITS, max_bytes, "deflate", multi_member=False)
    try:
        return _inflate(body, zlib.MAX_WBITS, max_bytes, "zlib", multi_member=False)
    except InvalidCompressedData as first:
        # About 1 in 31 raw deflate streams that open with a stored block pass the header check by chance.
        try:
            return _inflate(body, -zlib.MAX_WBITS, max_bytes, "deflate", multi_member=False)
        except InvalidCompressedData:
            raise first from None


# --- zstd -----------------------------------------------------------------------------------------------------

# RFC 8878 §3.1.1: frame magic, skippable-frame magic range, header field sizes.
_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK, _SKIPPABLE_MAGIC = 0xFFFFFFF0, 0x184D2A50
_DICT_ID_SIZES = (0, 1, 2, 4)
_FCS_SIZES = (0, 2, 4, 8)  # by Frame_Content_Size_flag; flag 0 means 1 byte if Single_Segment_flag else absent
_BLOCK_MAX = 128 * 1024  # Block_Maximum_Size upper limit (§3.1.1.2): no block decodes to more


def _zstd_upper_bound(body: bytes, max_bytes: int) -> int:
    """Walk zstd frame and block headers without decoding; return an upper bound on the decoded size.

    Why: python-zstandard's bounded reader (``stream_reader``) silently returns a short result on a truncated frame
    and its ``decompressobj`` has no output cap, so truncation and trailing garbage are found here (a few hundred
    header reads even for a 64 MiB body). Block contents, checksums and declared-vs-actual sizes are left to libzstd.
    Raises PayloadTooLarge early when declared Frame_Content_Size values already exceed ``max_bytes``.
    """
    n = len(body)
    pos = 0
    declared = 0
    bound = 0

    def truncated() -> InvalidCompressedData:
        return InvalidCompressedData("truncated zstd data")

    while pos < n:
        if n - pos < 4:
            raise truncated() if pos == 0 else InvalidCompressedData("trailing data after the zstd frame")
        magic = int.from_bytes(body[pos : pos + 4], "little")
        if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
            if n - pos < 8:
                raise truncated()
            pos += 8 + int.from_bytes(body[pos + 4 : pos + 8], "little")
            if pos > n:
                raise truncated()
            continue
        if magic != _ZSTD_MAGIC:
            if pos == 0:
                raise InvalidCompressedData("invalid zstd data: bad frame magic number")
            raise InvalidCompressedData("trailing data after the zstd frame")
        pos += 4
        if pos >= n:
            raise truncated()
        fhd = body[pos]
        pos += 1
        if fhd & 0x08:
            raise InvalidCompressedData("invalid zstd data: reserved frame header bit set")
        single_segment = (fhd >> 5) & 1
        fcs_size = _FCS_SIZES[fhd >> 6] or single_segment
        header = (1 - single_segment) + _DICT_ID_SIZES[fhd & 3] + fcs_size
        if pos + header > n:
            raise truncated()
        if fcs_size:
            fcs = int.from_bytes(body[pos + header - fcs_size : pos + header], "little") + (256 if fcs_size == 2 else 0)
            declared += fcs
            if declared > max_bytes:
                raise PayloadTooLarge(max_bytes)
        pos += header
        while True:  # blocks: 3-byte little-endian header = Last_Block:1, Block_Type:2, Block_Size:21
            if pos + 3 > n:
                raise truncated()
            block = int.from_bytes(body[pos : pos + 3], "little")
            pos += 3
            kind, size = (block >> 1) & 3, block >> 3
            if kind == 3:
                raise InvalidCompressedData("invalid zstd data: reserved block type")
            if kind == 1:  # RLE: one byte repeated Block_Size times
                pos += 1
                bound += size
            else:  # raw (size = content bytes) or compressed (size = compressed bytes, decodes to <= 128 KiB)
                pos += size
                bound += size if kind == 0 else _BLOCK_MAX
            if pos > n:
                raise truncated()
            if block & 1:
                break
        if fhd & 0x04:  # Content_Checksum_flag: 4-byte XXH64 tail
            pos += 4
            if pos > n:
                raise truncated()
    return bound


def _zstd(body: bytes, max_bytes: int) -> bytes:
    bound = _zstd_upper_bound(body, max_bytes)
    want = min(bound, max_bytes) + 1  # allocate for what can come out, not for the whole cap
    try:
        # A fresh context per call: cheap (~10 µs) and safe if the caller runs us in a thread pool.
        with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
            parts: list[bytes] = []
            got = 0
            while got < want:  # read() normally fills the request in one call; loop only for short reads
                chunk = reader.read(want - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
    except zstandard.ZstdError as exc:
        raise InvalidCompressedData(f"invalid zstd data: {exc}") from None
    if got > max_bytes:
        raise PayloadTooLarge(max_bytes)
    if got > bound:  # cannot happen for valid zstd; guards against a short read hiding data
        raise InvalidCompressedData("invalid zstd data: decodes to more than its block headers allow")
    return parts[0] if len(parts) == 1 else b"".join(parts)


_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _gzip,
    "x-gzip": _gzip,
    "zstd": _zstd,
    "zlib": _zlib,
    "deflate": _zlib,
}

#: Content-Encoding names accepted besides the identity ones (lower case), e.g. for the ``Accept-Encoding`` header
#: RFC 9110 §15.5.16 suggests on a 415.
SUPPORTED_ENCODINGS: frozenset[str] = frozenset(_DECODERS)
