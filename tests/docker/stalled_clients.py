"""The engine test's clients that stop reading: python3 stalled_clients.py RELAY_PORT TARGET_PORT ECHO_PORT N.

Run with the checkout's bench/ on PYTHONPATH: the sending target is bench.stalled's Firehose.

Runs in the app's place (a container sharing the relay's network namespace): a "host" service on
127.0.0.1:TARGET_PORT that sends as fast as it may, an echo service on 127.0.0.1:ECHO_PORT + 1, and N
clients of the relay's RELAY_PORT that never read. Once every sending connection is blocked (three looks
in a row, 0.25 s apart), a client of the relay's ECHO_PORT must get its echo. Prints one line and exits
0 when it did, 1 otherwise. Standard library and bench/ only (it runs on the test's base image).
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench.stalled import Firehose, connect_idle

ECHOED = asyncio.Event()  # the echo service's one client has gone: nothing is left to cancel at exit


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
    except OSError:
        writer.transport.abort()
    finally:
        ECHOED.set()


async def main(relay: int, target: int, echo_port: int, count: int) -> int:
    loop = asyncio.get_running_loop()
    hose = await loop.create_server(Firehose, "127.0.0.1", target, backlog=4096)
    echoes = await asyncio.start_server(echo, "127.0.0.1", echo_port + 1)
    sem = asyncio.Semaphore(64)
    socks = [
        s
        for s in await asyncio.gather(*(connect_idle(relay, sem, rcvbuf=16384) for _ in range(count)))
        if s is not None
    ]
    start, calm = time.monotonic(), 0
    while calm < 3 and time.monotonic() - start < 60:
        full = len(Firehose.open) >= len(socks) and Firehose.blocked >= Firehose.open
        calm = calm + 1 if full else 0
        await asyncio.sleep(0.25)
    settled = f"{len(socks)} of {count} clients connected, {len(Firehose.blocked)} senders blocked"
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", echo_port), 5)
        writer.write(b"p" * 64)
        await asyncio.wait_for(reader.readexactly(64), 5)
        took = time.perf_counter() - t0
        writer.close()
        await asyncio.wait_for(ECHOED.wait(), 5)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
        print(f"{settled}; no echo while they stalled: {err!r}")
        return 1
    finally:
        for sock in socks:
            sock.close()
        hose.close()
        echoes.close()
    if calm < 3:
        print(f"{settled}; never settled in 60 s")
        return 1
    print(f"{settled}; echo while they stalled: {took * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(*(int(a) for a in sys.argv[1:5]))))
