"""Write a copy of a compose file that Compose v1 (Debian's docker-compose 1.29) accepts.

Usage: compose_v1.py SOURCE DEST

Compose v1 rejects `depends_on: {app: {restart: true}}` ("contains unsupported option: 'restart'"), a key
that Compose v2.17 added and that the examples rely on. The copy drops only that key and says on stderr
what it dropped; every other line of the example is used as written.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml


def drop_depends_on_restart(document: dict[str, Any]) -> list[str]:
    dropped = []
    for name, service in (document.get("services") or {}).items():
        depends_on = service.get("depends_on")
        if not isinstance(depends_on, dict):
            continue
        for dependency, condition in depends_on.items():
            if isinstance(condition, dict) and "restart" in condition:
                del condition["restart"]
                dropped.append(f"services.{name}.depends_on.{dependency}.restart")
    return dropped


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as source:
        document = yaml.safe_load(source)
    for key in drop_depends_on_restart(document):
        print(f"compose v1: dropped {key} (needs Compose v2.17+)", file=sys.stderr)
    with open(argv[1], "w", encoding="utf-8") as dest:
        yaml.safe_dump(document, dest, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
