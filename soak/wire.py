"""What the soak's clients and targets say to each other, and the bytes they check.

A client opens with HEADER (magic, mode, reply length, reply seed), then:
- TRANSFER: its upload, then FIN. Only after that FIN (a half-close reply) the target answers with the
  upload's length and sha256, then `reply length` bytes of the pattern at `seed`, then FIN.
- EXCHANGE: frames FRAME (request length, response length, seed) + request; the target answers each
  with sha256(request) + the pattern at `seed`. A (0, 0, 0) frame ends it; the target then closes.
Anything else (garbage, an early reset) is read and dropped until EOF, then closed.

Payloads are slices of one random pool, the same in every process (fixed seed), so a receiver checks
each chunk against the expected bytes as it arrives and never holds a whole payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import struct
from collections.abc import Iterator

MAGIC = b"SOAK"
TRANSFER, EXCHANGE = 1, 2
HEADER = struct.Struct("!4sBQQ")  # magic, mode, reply length, reply seed
FRAME = struct.Struct("!IIQ")  # request length, response length, response seed
RECEIPT = struct.Struct("!Q32s")  # what the target received: length, sha256
DIGEST = 32
CHUNK = 64 * 1024
POOL_SIZE = 1 << 20
POOL = random.Random(0x50A4).randbytes(POOL_SIZE)


def pattern(seed: int, length: int, chunk: int = CHUNK) -> Iterator[bytes]:
    """`length` bytes of the pool from offset `seed`, wrapping, in pieces of at most `chunk`."""
    pos = seed % POOL_SIZE
    left = length
    while left > 0:
        n = min(chunk, left, POOL_SIZE - pos)
        yield POOL[pos : pos + n]
        pos = (pos + n) % POOL_SIZE
        left -= n


class Expect:
    """Checks a byte stream against the pattern at `seed`, chunk by chunk, as it arrives."""

    __slots__ = ("bad_at", "length", "pos", "seen")

    def __init__(self, seed: int, length: int) -> None:
        self.length = length
        self.pos = seed % POOL_SIZE
        self.seen = 0
        self.bad_at: int | None = None  # offset of the first wrong byte (or of a byte past the end)

    def feed(self, data: bytes) -> None:
        if self.bad_at is not None:
            return
        if self.seen + len(data) > self.length:
            self.bad_at = self.length
            return
        view = memoryview(data)
        while view:
            n = min(len(view), POOL_SIZE - self.pos)
            if view[:n] != POOL[self.pos : self.pos + n]:
                self.bad_at = self.seen + next(i for i in range(n) if view[i] != POOL[self.pos + i])
                return
            self.seen += n
            self.pos = (self.pos + n) % POOL_SIZE
            view = view[n:]

    @property
    def complete(self) -> bool:
        return self.bad_at is None and self.seen == self.length


def digest_of(seed: int, length: int) -> bytes:
    h = hashlib.sha256()
    for piece in pattern(seed, length):
        h.update(piece)
    return h.digest()


# --- the target's side -----------------------------------------------------------------------------------


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One target connection, by the rules in the module docstring; errors end it quietly."""
    try:
        head = await reader.readexactly(HEADER.size)
        magic, mode, reply_len, seed = HEADER.unpack(head)
        if magic != MAGIC:
            await _drain(reader)
        elif mode == TRANSFER:
            await _transfer(reader, writer, reply_len, seed)
        elif mode == EXCHANGE:
            await _exchange(reader, writer)
        else:
            await _drain(reader)
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        writer.transport.abort()
        return
    with contextlib.suppress(ConnectionError, OSError):
        writer.close()
        await writer.wait_closed()


async def _drain(reader: asyncio.StreamReader) -> None:
    while await reader.read(CHUNK):
        pass


async def _transfer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply_len: int, seed: int
) -> None:
    h = hashlib.sha256()
    received = 0
    while data := await reader.read(4 * CHUNK):
        h.update(data)
        received += len(data)
    writer.write(RECEIPT.pack(received, h.digest()))
    for piece in pattern(seed, reply_len):
        writer.write(piece)
        await writer.drain()
    await writer.drain()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        req_len, resp_len, seed = FRAME.unpack(await reader.readexactly(FRAME.size))
        if req_len == 0 and resp_len == 0:
            await _drain(reader)
            return
        request = await reader.readexactly(req_len)
        writer.write(hashlib.sha256(request).digest())
        for piece in pattern(seed, resp_len):
            writer.write(piece)
        await writer.drain()
