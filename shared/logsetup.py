"""Log output of both command lines (``prunefleet`` and ``prunefleet-agent``).

Under systemd, stderr goes to the journal, which stamps each line with its own time and
reads a ``<N>`` prefix as the line's syslog priority (sd-daemon(3)); a timestamp of ours
would only repeat the journal's. So the format follows where the lines go:

* ``journal``: ``<N>logger: message``, one prefix per line (a traceback keeps its level);
* ``text``: ``2024-05-01 12:00:00,123 WARNING logger: message``;
* ``json``: one object per line (``ts``, ``level``, ``logger``, ``message``, ``exc``);
* ``auto`` (the default): ``journal`` when ``$JOURNAL_STREAM`` names the very stream we
  write to (systemd sets it for a service's stdout/stderr; a child whose stderr was
  redirected elsewhere must not use it), else ``text``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import IO

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "add_logging_options",
    "configure_logging",
    "journal_stream",
    "syslog_priority",
]

LOG_FORMATS = ("auto", "journal", "text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    """syslog priority of a logging level: debug 7, info 6, warning 4, error 3, crit 2."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def journal_stream(stream: IO[str], env: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is connected to the journal (``$JOURNAL_STREAM`` is its
    ``device:inode``)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a test's StringIO)
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """``<N>logger: message`` on every line: the journal adds the time itself."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers that parse fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _formatter(fmt: str, stream: IO[str], env: Mapping[str, str] | None) -> logging.Formatter:
    if fmt == "auto":
        fmt = "journal" if journal_stream(stream, env) else "text"
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")


def configure_logging(level: str | int = "INFO", fmt: str = "auto",
                      stream: IO[str] | None = None,
                      env: Mapping[str, str] | None = None,
                      force: bool = False) -> logging.Handler | None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr) in
    format ``fmt`` (one of :data:`LOG_FORMATS`).

    As :func:`logging.basicConfig`, it leaves a root logger that already has handlers (a
    program embedding the CLI, a test runner) alone and returns None, unless ``force``:
    then the handlers set before are replaced."""
    _formatter(fmt, sys.stderr, {})  # a bad format is an error whatever else holds
    root = logging.getLogger()
    if root.handlers and not force:
        return None
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_formatter(fmt, stream, env))
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def add_logging_options(p: argparse.ArgumentParser, default_level: str | None = "INFO",
                        level_help: str | None = None) -> None:
    """``--log-level`` and ``--log-format``, the same on both command lines."""
    p.add_argument("--log-level", default=default_level, type=str.upper, choices=LOG_LEVELS,
                   metavar="LEVEL",
                   help=f"{', '.join(LOG_LEVELS)}; {level_help or f'default {default_level}'}")
    p.add_argument("--log-format", default="auto", choices=LOG_FORMATS,
                   help="journal: <N> syslog priorities and no timestamp (what journald "
                        "reads); auto (default): journal when stderr is the journal "
                        "($JOURNAL_STREAM), else text")
