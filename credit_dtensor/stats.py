"""Communication accounting: every byte credit_dtensor sends goes through :mod:`.comm`, which
records it here, so tests and benchmarks can compare traffic with the arithmetic minimum.

>>> with comm_stats() as s:
...     y = conv(x)
>>> s.sent_bytes, s.by_op["conv2d"].sent_bytes
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["CommCounter", "CommStats", "comm_stats", "record", "op_label"]


@dataclass
class CommCounter:
    sent_bytes: int = 0
    recv_bytes: int = 0
    messages: int = 0  # point-to-point sends (collectives count one each)
    collectives: int = 0

    def add(self, sent: int, recv: int, messages: int, collectives: int) -> None:
        self.sent_bytes += sent
        self.recv_bytes += recv
        self.messages += messages
        self.collectives += collectives


@dataclass
class CommStats(CommCounter):
    """Totals plus a per-op breakdown (the label set by :func:`op_label`)."""

    by_op: dict[str, CommCounter] = field(default_factory=lambda: defaultdict(CommCounter))


_state = threading.local()


def _active() -> list[CommStats]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack


def _labels() -> list[str]:
    if not hasattr(_state, "labels"):
        _state.labels = []
    return _state.labels


@contextlib.contextmanager
def comm_stats() -> Iterator[CommStats]:
    """Count bytes this rank sends/receives through credit_dtensor inside the block (nestable)."""
    stats = CommStats()
    _active().append(stats)
    try:
        yield stats
    finally:
        _active().remove(stats)


@contextlib.contextmanager
def op_label(label: str) -> Iterator[None]:
    """Attribute traffic inside the block to ``label`` (innermost label wins)."""
    _labels().append(label)
    try:
        yield
    finally:
        _labels().pop()


def record(sent: int, recv: int, messages: int = 0, collectives: int = 0) -> None:
    stack = _active()
    if not stack:
        return
    labels = _labels()
    label = labels[-1] if labels else "other"
    for s in stack:
        s.add(sent, recv, messages, collectives)
        s.by_op[label].add(sent, recv, messages, collectives)
