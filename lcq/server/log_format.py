"""How `lcq serve` writes its log: plain lines, or with --json-output (TGI's launcher's flag) one JSON object a
line in TGI's shape, for log collectors (Loki, Elasticsearch, Cloud Logging) that index fields instead of parsing
text. Both lcq's loggers and uvicorn's go through it."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

PLAIN = "%(levelname)s:     %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """A record as {"timestamp", "level", "fields": {"message", and "exception" where one is logged}, "target"}:
    the keys TGI's router writes with --json-output, so that dashboards and queries built on them carry over."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"message": record.getMessage()}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        stamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="microseconds")
        return json.dumps({"timestamp": stamp.replace("+00:00", "Z"), "level": record.levelname, "fields": fields,
                           "target": record.name}, ensure_ascii=False)


def configure_logging(level: str, json_output: bool) -> None:
    """Sets up the root logger at `level` (uvicorn's names; trace is DEBUG here) where nothing has yet, as
    logging.basicConfig does."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_output else logging.Formatter(PLAIN))
    logging.basicConfig(level=_level(level), handlers=[handler])


def uvicorn_log_config(level: str, json_output: bool) -> dict[str, Any] | None:
    """The log_config uvicorn is to take: None (its own) unless json_output, when its loggers write JSON lines."""
    if not json_output:
        return None
    loggers = ("uvicorn", "uvicorn.error", "uvicorn.access")
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
            "handlers": {"json": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
            "loggers": {name: {"handlers": ["json"], "level": _level(level), "propagate": False} for name in loggers}}


def _level(name: str) -> str:
    return "DEBUG" if name == "trace" else name.upper()
