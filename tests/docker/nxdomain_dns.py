"""A DNS server that answers every query "no such name" at once, for the Docker engine test.

Usage: nxdomain_dns.py ADDRESS

The test machine has no reachable resolver, so Docker's embedded DNS would wait out its timeouts for
names missing from /etc/hosts (host.docker.internal without extra_hosts): ten seconds per name. The app
containers name this server (on the docker0 address the test created) as their DNS, which makes a lookup
fail the way it does on a user's machine: promptly, with NXDOMAIN. Prints `ready` once bound; runs until
SIGTERM.
"""

from __future__ import annotations

import socket
import struct
import sys

HEADER = struct.Struct("!HHHHHH")
QR, RD_MASK, RA, NXDOMAIN = 0x8000, 0x0100, 0x0080, 3


def answer(query: bytes) -> bytes | None:
    """Return the NXDOMAIN response to one query (its question echoed), or None for a malformed one."""
    if len(query) < HEADER.size:
        return None
    ident, flags, qdcount, _, _, _ = HEADER.unpack_from(query)
    if flags & QR or qdcount != 1:
        return None
    end = HEADER.size
    while end < len(query) and query[end] != 0:  # the question's name: length-prefixed labels, then 0
        end += 1 + query[end]
    end += 1 + 4  # the terminating 0, then QTYPE and QCLASS
    if end > len(query):
        return None
    reply_flags = QR | (flags & RD_MASK) | RA | NXDOMAIN
    return HEADER.pack(ident, reply_flags, 1, 0, 0, 0) + query[HEADER.size : end]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((argv[0], 53))
        print("ready", flush=True)
        while True:
            query, peer = sock.recvfrom(4096)
            reply = answer(query)
            if reply is not None:
                sock.sendto(reply, peer)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
