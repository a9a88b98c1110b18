"""Client operations through a relay, each returning a Result with every byte checked.

Every wait on the network is bounded by STALL (no progress for that long: the client gives up, error
"timeout"); an idle hold is the only pause that is not. Errors are named by kind, never by message:
refused, reset, eof (the stream ended early), timeout, or the errno name.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import random
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from relay.pump import LINGER_RST
from soak import wire
from soak.ledger import Result

T = TypeVar("T")
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Dial = Callable[[str, int], Awaitable[Streams]]

STALL = 10.0
SLOW_READ = 16 * 1024  # a slow reader (or paced writer) moves this much, then pauses SLOW_PAUSE: ~1.6 MB/s
SLOW_PAUSE = 0.01


class Corrupt(Exception):
    """A byte that was not the one sent."""


async def dial_loopback(host: str, port: int) -> Streams:
    return await asyncio.open_connection(host, port)


async def within(aw: Awaitable[T]) -> T:
    return await asyncio.wait_for(aw, STALL)


def error_name(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:  # shutdown() after a reset
        return "reset"
    if isinstance(exc, asyncio.IncompleteReadError | EOFError):
        return "eof"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"oserror:{errno.errorcode.get(exc.errno, exc.errno)}"
    return f"error:{type(exc).__name__}"


Body = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Result], Awaitable[None]]


async def run(dial: Dial, kind: str, route: str, address: tuple[str, int], body: Body) -> Result:
    """Dial, run `body` (which fills in the verified byte counts), and turn what went wrong into the
    Result's error or corrupt field. The socket is closed (reset if the body failed) in every case."""
    result = Result(kind, route, time.monotonic(), 0.0)
    writer: asyncio.StreamWriter | None = None
    try:
        _, writer = streams = await within(dial(*address))
        await body(*streams, result)
    except Corrupt as exc:
        result.corrupt = str(exc)
    except (OSError, EOFError, asyncio.IncompleteReadError) as exc:  # TimeoutError is an OSError
        result.error = error_name(exc)
    finally:
        if writer is not None:
            if result.error or result.corrupt:
                writer.transport.abort()
            else:
                writer.close()
        result.end = time.monotonic()
    return result


def transfer(up: int, down: int, rng: random.Random, *, slow: bool = False, paced: bool = False) -> Body:
    """Upload `up` bytes, FIN, then check the target's receipt and `down` bytes of reply. A `slow`
    reader takes the reply in small pieces with pauses; a `paced` writer sends its upload that way."""
    up_seed, down_seed = rng.randrange(wire.POOL_SIZE), rng.randrange(wire.POOL_SIZE)

    async def body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, result: Result) -> None:
        writer.write(wire.HEADER.pack(wire.MAGIC, wire.TRANSFER, down, down_seed))
        sent = hashlib.sha256()
        for piece in wire.pattern(up_seed, up, SLOW_READ if paced else wire.CHUNK):
            sent.update(piece)
            writer.write(piece)
            await within(writer.drain())
            if paced:
                await asyncio.sleep(SLOW_PAUSE)
        writer.write_eof()
        length, digest = wire.RECEIPT.unpack(await within(reader.readexactly(wire.RECEIPT.size)))
        if length != up or digest != sent.digest():
            same = "matches" if digest == sent.digest() else "differs"
            raise Corrupt(f"the target received {length} of {up} bytes; sha256 {same}")
        result.up = up
        expect = wire.Expect(down_seed, down)
        while chunk := await within(reader.read(SLOW_READ if slow else wire.CHUNK)):
            expect.feed(chunk)
            if expect.bad_at is not None:
                raise Corrupt(f"reply byte {expect.bad_at} of {down} is wrong")
            if slow:
                await asyncio.sleep(SLOW_PAUSE)
        if not expect.complete:
            raise EOFError(f"reply ended after {expect.seen} of {down} bytes")
        result.down = down

    return body


def exchange(rounds: int, rng: random.Random, *, hold: Callable[[], Awaitable[object]] | None = None) -> Body:
    """`rounds` request/response frames (small, random sizes); with `hold`, the connection stays open
    and silent until it returns, before the last round."""

    async def body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, result: Result) -> None:
        writer.write(wire.HEADER.pack(wire.MAGIC, wire.EXCHANGE, 0, 0))
        for i in range(rounds):
            if hold is not None and i == rounds - 1:
                await hold()
            request = rng.randbytes(rng.randint(1, 4096))
            size, seed = rng.randint(1, 8192), rng.randrange(wire.POOL_SIZE)
            writer.write(wire.FRAME.pack(len(request), size, seed) + request)
            if await within(reader.readexactly(wire.DIGEST)) != hashlib.sha256(request).digest():
                raise Corrupt(f"round {i}: the target's digest of the request is wrong")
            expect = wire.Expect(seed, size)
            expect.feed(await within(reader.readexactly(size)))
            if not expect.complete:
                raise Corrupt(f"round {i}: response byte {expect.bad_at} of {size} is wrong")
            result.up += len(request)
            result.down += size
        writer.write(wire.FRAME.pack(0, 0, 0))
        writer.write_eof()
        if extra := await within(reader.read(1)):
            raise Corrupt(f"{len(extra)} byte(s) after the last response")

    return body


def early_reset(rng: random.Random) -> Body:
    """Reset 0-1 ms after connecting (SO_LINGER 0, close), having sent nothing."""

    async def body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, result: Result) -> None:
        await asyncio.sleep(rng.uniform(0, 0.001))
        _reset(writer)

    return body


def garbage_reset(rng: random.Random) -> Body:
    """Random bytes, then a reset."""

    async def body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, result: Result) -> None:
        writer.write(rng.randbytes(rng.randint(1, 8192)))
        await asyncio.sleep(rng.uniform(0, 0.001))
        _reset(writer)

    return body


def garbage_fin(rng: random.Random) -> Body:
    """Random bytes, then FIN; the target reads them and closes, so the client must see a clean EOF."""

    async def body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, result: Result) -> None:
        writer.write(rng.randbytes(rng.randint(1, 8192)))
        writer.write_eof()
        if extra := await within(reader.read(wire.CHUNK)):
            raise Corrupt(f"{len(extra)} byte(s) from a target that sends none")

    return body


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    writer.transport.abort()
