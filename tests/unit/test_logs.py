"""Repeated log lines are summarised: the first passes, then one per window with a count."""

from __future__ import annotations

import logging

from dspex.streams.logs import RepeatFilter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(message: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord("librdkafka", level, __file__, 1, message, args, None)


def test_an_outage_of_identical_errors_leaves_one_line_per_window_with_a_count() -> None:
    clock = Clock()
    repeats = RepeatFilter(30.0, clock=clock)
    written = []
    for tick in range(1500):  # 15 s of 100 errors a second, numbers changing
        clock.now = tick / 100
        record = _record("Connect to 127.0.0.1:%d failed after %dms", 9092, tick)
        if repeats.filter(record):
            written.append(record.getMessage())
    assert written == ["Connect to 127.0.0.1:9092 failed after 0ms"]
    clock.now = 31.0
    late = _record("Connect to 127.0.0.1:%d failed after %dms", 9092, 7)
    assert repeats.filter(late)
    assert late.getMessage() == (
        "Connect to 127.0.0.1:9092 failed after 7ms [1499 more like this since the last one]"
    )


def test_different_lines_and_levels_are_not_merged() -> None:
    repeats = RepeatFilter(30.0, clock=Clock())
    assert repeats.filter(_record("broker down"))
    assert repeats.filter(_record("broker down", level=logging.WARNING))
    assert repeats.filter(_record("partition revoked"))
    assert not repeats.filter(_record("broker down"))


def test_memory_is_bounded_and_the_oldest_kind_is_forgotten() -> None:
    repeats = RepeatFilter(30.0, capacity=2, clock=Clock())
    for text in ("a", "b", "c"):
        assert repeats.filter(_record(text))
    assert repeats.filter(_record("a"))  # forgotten: written again
    assert not repeats.filter(_record("c"))


def test_a_self_healing_librdkafka_retry_is_debug_not_a_warning() -> None:
    from dspex.streams.logs import TransientFilter

    transient = TransientFilter()
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.WARNING)
        message = (
            "GETPID [p] Failed to acquire idempotence PID: Coordinator load in progress: retrying"
        )
        record = _record(message, level=logging.WARNING)
        assert transient.filter(record) is False and record.levelname == "DEBUG"
        root.setLevel(logging.DEBUG)
        assert transient.filter(_record(message, level=logging.WARNING)) is True
        assert transient.filter(_record("Connect to broker failed", level=logging.WARNING))
    finally:
        root.setLevel(before)
