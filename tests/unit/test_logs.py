"""The one log format of both commands: text and JSON lines, level names in any case, env twins."""

from __future__ import annotations

import argparse
import io
import json
import logging

import pytest

from sidecar import logs


def _emit(fmt: str) -> str:
    out = io.StringIO()
    logs.setup("info", fmt, out)
    log = logging.getLogger("spiffe_sidecar.test")
    log.debug("hidden")
    log.warning("app port %d answers", 8080)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    return out.getvalue()


def test_text_lines() -> None:
    first = _emit("text").splitlines()[0]
    stamp, level, rest = first.split(" ", 2)
    assert stamp.endswith("Z") and len(stamp) == len("2026-11-29T16:18:19.123Z")
    assert (level, rest) == ("WARNING", "spiffe_sidecar.test: app port 8080 answers")


def test_json_lines() -> None:
    records = [json.loads(line) for line in _emit("json").splitlines()]
    assert [r["level"] for r in records] == ["warning", "error"]
    assert records[0]["logger"] == "spiffe_sidecar.test" and records[0]["message"] == "app port 8080 answers"
    assert "ValueError: boom" in records[1]["exception"]


def test_level_and_format_arguments() -> None:
    p = argparse.ArgumentParser()
    logs.add_arguments(p, level_help="level")
    args = p.parse_args(["--log-level", "WARNING", "--log-format", "JSON"])
    assert (args.log_level, args.log_format) == ("warning", "json")
    with pytest.raises(SystemExit):
        p.parse_args(["--log-level", "trace"])
    assert logs.from_env({"SPIFFE_SIDECAR_LOG_FORMAT": " Json "}, logs.ENV_LOG_FORMAT, logs.FORMATS) == "json"
    assert logs.from_env({}, logs.ENV_LOG_LEVEL, logs.LEVELS) is None
    with pytest.raises(ValueError, match="SPIFFE_SIDECAR_LOG_LEVEL"):
        logs.from_env({"SPIFFE_SIDECAR_LOG_LEVEL": "chatty"}, logs.ENV_LOG_LEVEL, logs.LEVELS)
