"""Figure 5, serde: encode + decode of a typical Request, the project's serde vs ``json``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from dspex.streams.serde import Serde
from tests.bench.messages import request_record


def measure(serde: Serde, records: int, topic: str) -> dict[str, Any]:
    """Microseconds per encode+decode round trip, for the serde and for json."""
    record = request_record()
    encoded = serde.encode("Request", record, topic=topic)
    as_json = json.dumps(record, default=_jsonable)

    def avro() -> None:
        serde.decode(serde.encode("Request", record, topic=topic), topic=topic, expect="Request")

    def plain() -> None:
        json.loads(json.dumps(record, default=_jsonable))

    serde_us, json_us = _per_call_us(avro, records), _per_call_us(plain, records)
    return {
        "records": records,
        "serde": type(serde).__name__,
        "serde_us": round(serde_us, 2),
        "json_us": round(json_us, 2),
        "serde_over_json": round(serde_us / json_us, 2),
        "serde_bytes": len(encoded),
        "json_bytes": len(as_json.encode()),
    }


def _per_call_us(call: Callable[[], None], count: int) -> float:
    for _ in range(min(count, 200)):
        call()
    best = float("inf")
    for _ in range(3):  # best of three: the least disturbed by other load
        started = time.perf_counter()
        for _ in range(count):
            call()
        best = min(best, time.perf_counter() - started)
    return best / count * 1e6


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)
