"""One log format for `spiffe-sidecar` and `spiffe-spire` (edge: configures the stdlib root logger).

Levels: debug, info, warning, error, accepted in any case on the command line (`--log-level INFO` works).
Formats (`--log-format`, or the SPIFFE_SIDECAR_LOG_FORMAT environment variable; default text):

    text  2026-11-29T16:18:19.123Z INFO spiffe_sidecar.app: ready: inbound 0.0.0.0:8443 ...
    json  {"time":"2026-11-29T16:18:19.123Z","level":"info","logger":"spiffe_sidecar.app","message":"ready: ..."}

Time is UTC with milliseconds in both (the audit log uses the same stamp). Logs go to stderr; the audit
log (one JSON line per decision) goes to its own destination, stdout by default, so a pipeline can tell
them apart by stream, and in json mode each stream is JSON lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Final

__all__ = ["ENV_LOG_FORMAT", "ENV_LOG_LEVEL", "FORMATS", "LEVELS", "JsonFormatter", "add_arguments", "setup"]

LEVELS: Final = ("debug", "info", "warning", "error")
FORMATS: Final = ("text", "json")
ENV_LOG_FORMAT: Final = "SPIFFE_SIDECAR_LOG_FORMAT"
ENV_LOG_LEVEL: Final = "SPIFFE_SIDECAR_LOG_LEVEL"


def _stamp(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_stamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level (lower case), logger, message, and `exception` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": _stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def level_name(text: str) -> str:
    """argparse `type`: a level name in any case -> its lower-case form (else an argparse error)."""
    lowered = text.strip().lower()
    if lowered not in LEVELS:
        raise argparse.ArgumentTypeError(f"invalid level {text!r} (choose from {', '.join(LEVELS)}; any case)")
    return lowered


def format_name(text: str) -> str:
    lowered = text.strip().lower()
    if lowered not in FORMATS:
        raise argparse.ArgumentTypeError(f"invalid format {text!r} (choose from {', '.join(FORMATS)})")
    return lowered


def add_arguments(parser: argparse.ArgumentParser, *, level_help: str) -> None:
    """`--log-level` and `--log-format`, the same in both commands."""
    parser.add_argument("--log-level", type=level_name, metavar="LEVEL",
                        help=f"{level_help} ({', '.join(LEVELS)}; any case; env {ENV_LOG_LEVEL})")  # fmt: skip
    parser.add_argument("--log-format", type=format_name, metavar="FORMAT",
                        help=f"log line format: text (default) or json (env {ENV_LOG_FORMAT})")  # fmt: skip


def from_env(environ: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    """The environment twin of a flag, or None when unset; a bad value is a usage error (ValueError)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    if raw.lower() not in choices:
        raise ValueError(f"env {name}: expected one of {', '.join(choices)}, got {raw!r}")
    return raw.lower()


def setup(level: str, fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Point the root logger at `stream` (stderr) with one handler in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
