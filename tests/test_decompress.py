"""receiver.decompress: codings, the decoded-size cap, bombs, truncation, and the "only ReceiverError" property."""

from __future__ import annotations

import gzip
import io
import os
import struct
import time
import tracemalloc
import zlib

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.decompress import SUPPORTED_ENCODINGS, decompress
from receiver.errors import (
    BadRequest,
    InvalidCompressedData,
    PayloadTooLarge,
    ReceiverError,
    UnsupportedEncoding,
    UnsupportedMediaType,
)

MiB = 1 << 20
# Compressible, but not trivially: something like a protobuf export body.
DATA = b"".join(b"span-%05d gen_ai.request.model=gpt-4o " % i + os.urandom(8) for i in range(20000))


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def zstd_streamed(data: bytes, chunk: int = 64 * 1024) -> bytes:
    """A zstd frame without Frame_Content_Size, as a streaming encoder writes it."""
    buf = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(buf, closefd=False) as writer:
        for i in range(0, len(data), chunk):
            writer.write(data[i : i + chunk])
    return buf.getvalue()


ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "zlib": zlib.compress,
    "deflate": zlib.compress,  # the Collector's reading of "deflate": a zlib stream
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
}
# (header value, compressor) pairs covering every accepted wire form.
FORMS = [
    ("gzip", gzip.compress),
    ("GZIP", gzip.compress),
    ("x-gzip", gzip.compress),
    (" Gzip ", gzip.compress),
    ("zlib", zlib.compress),
    ("deflate", zlib.compress),
    ("Deflate", raw_deflate),  # raw RFC 1951, no zlib header: accepted too
    ("zlib", raw_deflate),
    ("zstd", lambda d: zstandard.ZstdCompressor().compress(d)),
    ("ZSTD", zstd_streamed),
    ("zstd", lambda d: zstandard.ZstdCompressor(level=12, write_checksum=True).compress(d)),
]


@pytest.mark.parametrize("header", [None, "", "identity", "IDENTITY", " none ", "identity, identity"])
def test_identity_is_returned_as_is(header: str | None) -> None:
    assert decompress(DATA, header, len(DATA)) is DATA


@pytest.mark.parametrize("header", [None, "identity"])
def test_identity_is_capped_too(header: str | None) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        decompress(DATA, header, len(DATA) - 1)
    assert info.value.limit == len(DATA) - 1
    assert info.value.http_status == 413


@pytest.mark.parametrize(("header", "compress"), FORMS)
def test_round_trip(header: str, compress) -> None:
    assert decompress(compress(DATA), header, 64 * MiB) == DATA


@pytest.mark.parametrize(("header", "compress"), FORMS)
def test_cap_is_exact(header: str, compress) -> None:
    body = compress(DATA)
    assert decompress(body, header, len(DATA)) == DATA
    with pytest.raises(PayloadTooLarge):
        decompress(body, header, len(DATA) - 1)


@pytest.mark.parametrize("header", sorted(SUPPORTED_ENCODINGS))
def test_empty_body_is_empty_under_any_coding(header: str) -> None:
    assert decompress(b"", header, 0) == b""


def test_empty_payload_compressed() -> None:
    for header, compress in FORMS:
        assert decompress(compress(b""), header, 0) == b"", header


def test_gzip_multi_member() -> None:
    body = gzip.compress(b"hello ") + gzip.compress(b"world")
    assert decompress(body, "gzip", 11) == b"hello world"
    with pytest.raises(PayloadTooLarge):
        decompress(body, "gzip", 10)


def test_zstd_multi_frame_and_skippable_frames() -> None:
    skippable = struct.pack("<II", 0x184D2A5E, 3) + b"abc"
    body = skippable + zstandard.ZstdCompressor().compress(b"hello ") + skippable + zstd_streamed(b"world")
    assert decompress(body, "zstd", 11) == b"hello world"
    assert decompress(skippable, "zstd", 0) == b""
    with pytest.raises(PayloadTooLarge):
        decompress(body, "zstd", 10)


def test_zstd_declared_content_size_over_cap_fails_before_decoding() -> None:
    body = zstandard.ZstdCompressor().compress(bytes(64 * MiB))  # Frame_Content_Size = 64 MiB in the header
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            decompress(body, "zstd", MiB)
        assert tracemalloc.get_traced_memory()[1] < MiB
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("header", "compress"), FORMS)
def test_truncated_data_is_rejected(header: str, compress) -> None:
    body = compress(DATA)
    for cut in (1, 2, 4, 9, len(body) // 2, len(body) - 1):
        with pytest.raises(InvalidCompressedData) as info:
            decompress(body[:cut], header, 64 * MiB)
        assert isinstance(info.value, BadRequest) and info.value.http_status == 400


@pytest.mark.parametrize(("header", "compress"), FORMS)
def test_trailing_garbage_is_rejected(header: str, compress) -> None:
    with pytest.raises(InvalidCompressedData):
        decompress(compress(DATA) + b"garbage!", header, 64 * MiB)


@pytest.mark.parametrize("header", sorted(SUPPORTED_ENCODINGS))
def test_not_compressed_at_all(header: str) -> None:
    with pytest.raises(InvalidCompressedData) as info:
        decompress(b'{"resourceSpans":[]}', header, MiB)
    assert header.removeprefix("x-") in info.value.message or "deflate" in info.value.message


def test_corrupt_zstd_checksum() -> None:
    body = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(DATA))
    body[-1] ^= 0xFF
    with pytest.raises(InvalidCompressedData, match="checksum"):
        decompress(bytes(body), "zstd", 64 * MiB)


def test_corrupt_gzip_crc() -> None:
    body = bytearray(gzip.compress(DATA))
    body[-6] ^= 0xFF  # CRC32 in the 8-byte trailer
    with pytest.raises(InvalidCompressedData, match="gzip"):
        decompress(bytes(body), "gzip", 64 * MiB)


@pytest.mark.parametrize("header", ["br", "snappy", "lz4", "compress", "gzip2", "x-snappy-framed"])
def test_unknown_coding(header: str) -> None:
    with pytest.raises(UnsupportedEncoding) as info:
        decompress(b"x", header, MiB)
    assert info.value.encoding == header
    assert header in info.value.message
    assert isinstance(info.value, UnsupportedMediaType) and info.value.http_status == 415


def test_stacked_codings_are_rejected_but_identity_entries_are_ignored() -> None:
    body = gzip.compress(DATA)
    with pytest.raises(UnsupportedEncoding, match="stacked"):
        decompress(zstandard.ZstdCompressor().compress(body), "gzip, zstd", 64 * MiB)
    assert decompress(body, "identity, gzip", 64 * MiB) == DATA


def test_negative_cap_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        decompress(b"", None, -1)


# --- bombs --------------------------------------------------------------------------------------------------------


def _gzip_bomb(total: int) -> bytes:
    """`total` zero bytes gzip-compressed by streaming 1 MiB chunks (never allocates `total`)."""
    c = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zero = bytes(MiB)
    return b"".join([c.compress(zero) for _ in range(total // MiB)] + [c.flush()])


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    return _gzip_bomb(1 << 30)  # 1 GiB of zeros -> about 4.5 MB


def _assert_bounded(body: bytes, header: str, cap: int) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PayloadTooLarge):
            decompress(body, header, cap)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 5.0, elapsed  # generous: shared CI machines; memory is the real guard
    # Bounded by the cap plus one decode step (receiver.decompress._STEP = 8 MiB, held twice while joined).
    assert peak < cap + 20 * MiB, peak / MiB


def test_gzip_bomb(gzip_bomb: bytes) -> None:
    _assert_bounded(gzip_bomb, "gzip", 16 * MiB)


def test_gzip_bomb_small_cap(gzip_bomb: bytes) -> None:
    _assert_bounded(gzip_bomb, "gzip", 1000)


def test_zlib_bomb() -> None:
    c = zlib.compressobj(1)
    zero = bytes(MiB)
    body = b"".join([c.compress(zero) for _ in range(256)] + [c.flush()])
    _assert_bounded(body, "deflate", 16 * MiB)


def test_zstd_bomb_without_content_size() -> None:
    body = zstd_streamed(bytes(MiB), chunk=MiB)  # warm the path with a small one first
    assert decompress(body, "zstd", MiB) == bytes(MiB)
    buf = io.BytesIO()
    zero = bytes(MiB)
    with zstandard.ZstdCompressor(level=1).stream_writer(buf, closefd=False) as writer:
        for _ in range(1024):
            writer.write(zero)
    bomb = buf.getvalue()
    assert zstandard.frame_content_size(bomb) == -1  # no size in the header: only the streaming cap can stop it
    _assert_bounded(bomb, "zstd", 16 * MiB)


def test_gzip_bomb_in_many_members() -> None:
    member = gzip.compress(bytes(MiB))
    _assert_bounded(member * 1024, "gzip", 16 * MiB)


# --- property tests -------------------------------------------------------------------------------------------

CODINGS = sorted(SUPPORTED_ENCODINGS) + ["identity", "br", "gzip, zstd"]
_MAGIC = {"gzip": b"\x1f\x8b\x08", "x-gzip": b"\x1f\x8b\x08", "zlib": b"\x78\x9c", "deflate": b"\x78\x01", "zstd": b"\x28\xb5\x2f\xfd"}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=512), coding=st.sampled_from(CODINGS), with_magic=st.booleans(), cap=st.integers(0, 4096))
def test_random_bytes_raise_only_receiver_errors(body: bytes, coding: str, with_magic: bool, cap: int) -> None:
    if with_magic:
        body = _MAGIC.get(coding, b"") + body
    try:
        out = decompress(body, coding, cap)
    except ReceiverError:
        return
    assert len(out) <= cap


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=4096), header_compress=st.sampled_from(FORMS), cut=st.integers(0, 10_000), cap=st.integers(0, 8192))
def test_round_trip_or_receiver_error(data: bytes, header_compress, cut: int, cap: int) -> None:
    """Any prefix of a valid body, under any cap: exactly the data, or a ReceiverError, never a wrong answer."""
    header, compress = header_compress
    body = compress(data)
    prefix = body[: cut % (len(body) + 1)]
    try:
        out = decompress(prefix, header, cap)
    except ReceiverError:
        return
    assert out == data or (prefix == b"" and out == b"")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=2048), header_compress=st.sampled_from(FORMS), flips=st.lists(st.integers(0, 1 << 30), min_size=1, max_size=4))
def test_bit_flips_raise_only_receiver_errors(data: bytes, header_compress, flips: list[int]) -> None:
    header, compress = header_compress
    body = bytearray(compress(data))
    for flip in flips:
        body[flip % len(body)] ^= 1 << (flip % 8)
    try:
        decompress(bytes(body), header, 1 << 16)
    except ReceiverError:
        pass
