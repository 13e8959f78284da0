"""The records every workload sends, encoded by the project's serde: realistic sizes.

One typical request: an inline Predict ``question -> answer`` with one question,
as :class:`~dspex.streams.client.client.AsyncClient` builds it; the pool record the router
forwards (the program embedded, a route attached); the final Response a worker sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dspex.agents.plumbing.records import ExecutionResult, final_response
from dspex.streams.client._requests import Program, build_request
from dspex.streams.serde import Serde
from tests.bench.config import SIGNATURE, question

PROGRAM = Program.inline(SIGNATURE)


def request_record(i: int = 0, *, cache: bool = False) -> dict[str, Any]:
    """The Request the client sends for question ``i``."""
    return build_request(PROGRAM, {"question": question(i)}, cache=cache)


def pool_record(request: dict[str, Any]) -> dict[str, Any]:
    """The Request the router forwards to ``pool.general``."""
    now = datetime.now(UTC)
    route = {
        "pool": "general",
        "variant": "echo",
        "model": "dspex/echo",
        "module_type": "Predict",
        "reason": "default",
        "routing_table_version": None,
        "decided_at": now.replace(microsecond=now.microsecond // 1000 * 1000),
        "cache_key": None,
    }
    return {**request, "module_type": "Predict", "module_config_json": "{}", "route": route}


def response_record(request: dict[str, Any]) -> dict[str, Any]:
    """The final ok Response a worker sends for ``request``."""
    now = datetime.now(UTC)
    answer = {"answer": f"echo: {question(0)}"}
    result = ExecutionResult("ok", now, now, now, outputs=answer)
    return final_response(request, result, 0, "general")


@dataclass(frozen=True)
class Payloads:
    """Encoded bytes of the three hops' records."""

    request: bytes
    pool: bytes
    response: bytes

    @classmethod
    def build(cls, serde: Serde, topic_prefix: str) -> Payloads:
        request = request_record()
        return cls(
            request=serde.encode("Request", request, topic=f"{topic_prefix}requests"),
            pool=serde.encode("Request", pool_record(request), topic=f"{topic_prefix}pool.general"),
            response=serde.encode(
                "Response", response_record(request), topic=f"{topic_prefix}responses"
            ),
        )

    def sizes(self) -> dict[str, int]:
        return {
            "request": len(self.request),
            "pool": len(self.pool),
            "response": len(self.response),
        }
