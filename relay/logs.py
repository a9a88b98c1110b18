"""Logging set-up (text or JSON lines on stderr) and a rate limiter for repeated warnings."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

log = logging.getLogger("relay")

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    """`2026-11-28T13:00:00.123Z INFO message`; the message names the route itself."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and any extra fields (route, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    log.setLevel(level.upper())


class RateLimited:
    """Log the first of a kind of message, then at most one per interval with a count of those dropped."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def warning(self, key: str, msg: str, **extra: Any) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return
        dropped = self._dropped.pop(key, 0)
        if dropped:
            msg = f"{msg} ({dropped} more like this in the last {self.interval:g}s)"
        self._next[key] = now + self.interval
        log.warning(msg, extra=extra)
