"""Split artifacts into chunks, frame them for the wire, verify them on arrival.

A frame is ``b"PFC1" + u32 big-endian header length + ChunkHeader JSON + data``, where
``data`` is the chunk's bytes, zlib-compressed when the header says so. Hashes are taken
over the raw (decompressed) bytes, so the manifest's hashes do not depend on compression.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ArtifactSizeError, ChunkHashError, ProtocolError
from .messages import ChunkHeader, decode

MAGIC = b"PFC1"
DEFAULT_CHUNK_BYTES = 64 * 1024


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(block):
            h.update(buf)
    return h.hexdigest()


@dataclass(frozen=True)
class ChunkPlan:
    """What the manifest says about an artifact's chunks."""

    sha256: str
    size: int
    chunk_bytes: int
    chunk_sha256: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.chunk_sha256)

    def chunk_size(self, index: int) -> int:
        if index < self.count - 1:
            return self.chunk_bytes
        return self.size - self.chunk_bytes * (self.count - 1)


def plan(data: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ChunkPlan:
    hashes = tuple(
        sha256_bytes(data[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)
    )
    return ChunkPlan(sha256_bytes(data), len(data), chunk_bytes, hashes)


def iter_chunks(data: bytes, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    for i, off in enumerate(range(0, len(data), chunk_bytes)):
        yield i, data[off : off + chunk_bytes]


# A chunk is sent compressed only when that saves at least this share of its bytes: dense
# float32 weights barely compress (~7%), and decompressing them would cost every device
# CPU for almost nothing.
MIN_COMPRESSION_SAVING = 0.10


def encode_frame(
    artifact_sha256: str, index: int, count: int, raw: bytes, compression: str = "zlib"
) -> bytes:
    """Frame one chunk; ``"zlib"`` allows compression, used where it pays for itself."""
    body = raw
    used: Literal["none", "zlib"] = "none"
    if compression == "zlib":
        packed = zlib.compress(raw, 6)
        if len(packed) <= len(raw) * (1 - MIN_COMPRESSION_SAVING):
            body, used = packed, "zlib"
    header = ChunkHeader(
        sha256=artifact_sha256, index=index, count=count, compression=used
    ).encode()
    return MAGIC + struct.pack(">I", len(header)) + header + body


def decode_frame(frame: bytes, max_raw_bytes: int) -> tuple[ChunkHeader, bytes]:
    """Return the header and the raw chunk bytes.

    Raises ProtocolError on a malformed frame, ArtifactSizeError when the chunk holds (or
    decompresses to) more than ``max_raw_bytes``: decompression stops there.
    """
    if len(frame) < 8 or frame[:4] != MAGIC:
        raise ProtocolError("chunk frame: bad magic")
    (hlen,) = struct.unpack(">I", frame[4:8])
    if hlen > ChunkHeader.max_bytes or 8 + hlen > len(frame):
        raise ProtocolError("chunk frame: bad header length")
    header = decode(ChunkHeader, frame[8 : 8 + hlen])
    body = frame[8 + hlen :]
    if header.compression == "zlib":
        d = zlib.decompressobj()
        try:
            raw = d.decompress(body, max_raw_bytes + 1)
        except zlib.error as e:
            raise ProtocolError(f"chunk frame: bad zlib data: {e}") from e
        if len(raw) > max_raw_bytes or d.unconsumed_tail:
            raise ArtifactSizeError("chunk frame: decompresses past its declared size")
    else:
        raw = body
        if len(raw) > max_raw_bytes:
            raise ArtifactSizeError("chunk frame: larger than its declared size")
    return header, raw


def verify_chunk(plan_: ChunkPlan, index: int, raw: bytes) -> None:
    if not 0 <= index < plan_.count:
        raise ChunkHashError(f"chunk {index} out of range (0..{plan_.count - 1})")
    if len(raw) != plan_.chunk_size(index):
        raise ArtifactSizeError(
            f"chunk {index}: {len(raw)} bytes, expected {plan_.chunk_size(index)}"
        )
    got = sha256_bytes(raw)
    if got != plan_.chunk_sha256[index]:
        raise ChunkHashError(
            f"chunk {index}: sha256 {got[:12]}… does not match {plan_.chunk_sha256[index][:12]}…"
        )
