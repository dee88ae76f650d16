"""One logger for the whole package: progress lines go to stdout from rank 0 only, prefixed with the
stage (`[pretrain] ...`); warnings from any rank go to stderr with the rank named.

Modules log through `logging.getLogger(__name__)` (children of `cosctl`), or through `log` below;
`setup_logging(rank, stage)` is called once per process when a command starts.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("cosctl")


class _Format(logging.Formatter):
    def __init__(self, rank: int, stage: str | None):
        super().__init__()
        self.rank, self.stage = rank, stage

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"[{self.stage}] " if self.stage else ""
        if record.levelno >= logging.WARNING and self.rank:
            prefix += f"rank {self.rank}: "
        return prefix + record.getMessage()


class _CurrentStream(logging.StreamHandler):
    """Writes to whatever `sys.stdout`/`sys.stderr` is at the time (tests and the CLI runner swap them)."""

    def __init__(self, name: str):
        super().__init__()
        self.name_of_stream = name

    @property
    def stream(self):
        return getattr(sys, self.name_of_stream)

    @stream.setter
    def stream(self, value) -> None:
        pass


class _RankFilter(logging.Filter):
    """Rank 0 shows everything at INFO and above; other ranks only warnings and errors."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int = 0, stage: str | None = None) -> None:
    """(Re)configure the `cosctl` logger for this process: idempotent, replaces earlier handlers."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
    info = _CurrentStream("stdout")
    info.setLevel(logging.INFO)
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    warn = _CurrentStream("stderr")
    warn.setLevel(logging.WARNING)
    for handler in (info, warn):
        handler.setFormatter(_Format(rank, stage))
        handler.addFilter(_RankFilter(rank))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
