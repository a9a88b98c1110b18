"""The servers the relays forward to: in-process targets with fault modes, and a process to kill.

A target that stops listening and listens again keeps its port: a placeholder socket stays bound to
it (SO_REUSEPORT, never listening) for the whole run, so no outgoing connection's ephemeral port can
take it while the target is down, and connections meanwhile are refused (the placeholder does not
listen). ``python -m soak.targets --port P`` is the process that the crash fault SIGKILLs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Literal

from bench import proc
from soak import wire

Mode = Literal["normal", "silent"]


def placeholder(host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to a fresh port with SO_REUSEPORT, not listening: it keeps the port ours."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


class Target:
    """An asyncio target on 127.0.0.1 (or on a listening socket given to it, e.g. in a namespace).

    `refuse()` stops listening (new connections are refused, open ones go on), `listen()` starts
    again on the same port; in mode "silent" new connections are accepted and never answered.
    """

    def __init__(self, name: str, sock: socket.socket | None = None) -> None:
        self.name = name
        self.mode: Mode = "normal"
        self._given = sock
        bound = sock if sock is not None else placeholder()  # the port is known before start()
        self._hold = bound if sock is None else None
        self.host, self.port = bound.getsockname()[:2]
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._silent: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._given is not None:
            self._server = await asyncio.start_server(self._handle, sock=self._given)
        else:
            await self.listen()

    async def listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(
                self._handle, self.host, self.port, reuse_address=True, reuse_port=True
            )

    def refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def hang_up_silent(self) -> int:
        """Reset the connections held unanswered, as a real server eventually would; how many.

        A client that half-closed and then gave up cannot be seen by a relay that has nothing to send
        it (nothing polls a socket after its EOF): such a pair lasts until the target ends it.
        """
        held = list(self._silent)
        for writer in held:
            writer.transport.abort()
        return len(held)

    async def close(self) -> None:
        """Stop listening, reset every open connection and wait (briefly) for their handlers."""
        self.refuse()
        for writer in list(self._open):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._hold is not None:
            self._hold.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        self._open.add(writer)
        try:
            if self.mode == "silent":  # read what comes (FIN too), never answer, until the peer goes
                self._silent.add(writer)
                with contextlib.suppress(ConnectionError, OSError):
                    while await reader.read(wire.CHUNK):
                        pass
                    await writer.wait_closed()
                writer.transport.abort()
            else:
                await wire.serve(reader, writer)
        finally:
            self._open.discard(writer)
            self._silent.discard(writer)


class ProcessTarget:
    """``python -m soak.targets`` on a held port: `kill()` SIGKILLs it, `start()` runs a new one."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self._hold = placeholder()
        self.host, self.port = self._hold.getsockname()[:2]
        self._log = workdir / f"target-{name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 10.0) -> None:
        argv = [sys.executable, "-m", "soak.targets", "--port", str(self.port)]
        self._proc = proc.popen(argv, stderr_path=self._log)
        proc.wait_listening(self._proc, self.port, timeout)
        self.starts += 1

    def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)

    def close(self) -> None:
        if self._proc is not None:
            proc.stop(self._proc)
        self._hold.close()


async def _serve_forever(port: int) -> None:
    server = await asyncio.start_server(wire.serve, "127.0.0.1", port, reuse_address=True, reuse_port=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak.targets", description="a soak target process")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(_serve_forever(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
