"""The result cache: which requests may be answered from it, under which key, and the store.

Workers fill it (the final ok Response of a cacheable request goes to the
``cache`` topic under its key); every router follows that topic into a
:class:`ResultCache` and answers identical repeats from it.

Only deterministic requests are cached: the cache is enabled, the request
allows it (``cache`` true) and the effective temperature is exactly 0 — the
effective ``temperature`` variable (the request's, else the variant's, else the
shared one), else the variant's backend setting (an unknown backend is not
deterministic). Modules that sample by design (``BestOfN``, ``Refine`` run at
temperature 1.0) are never cached.

The key is a SHA-256 over canonical JSON of the resolved program (id, version,
signature, module, config, state, tools), the inputs, the effective variables
and the variant (name, model, module type): equal requests hash equally
whatever the JSON spacing or map order.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from dspex.agents.router.routing import Route
from dspex.schemas import records
from dspex.streams.settings import LMSettings
from dspex.streams.signatures import parse_signature_fields, stream_delta

NONDETERMINISTIC_MODULES = frozenset({"BestOfN", "Refine"})


def effective_variables(
    route: Route, request: Mapping[str, Any], shared: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Shared variables overridden by the variant's, overridden by the request's own."""
    return {**(shared or {}), **route.variables, **(request.get("variables") or {})}


def is_cacheable(
    request: Mapping[str, Any],
    program: Mapping[str, Any],
    route: Route,
    lm: LMSettings,
    variables: Mapping[str, str] | None = None,
) -> bool:
    """True when the request may be answered from, and stored in, the result cache.

    ``variables``: the effective variables (default: the variant's and the request's).
    """
    if not request.get("cache", True) or request.get("session_id"):
        return False  # a session's turn must reach its worker: history, counters, pins
    module = route.module_type or program.get("module_type")
    if module in NONDETERMINISTIC_MODULES:
        return False
    if variables is None:
        variables = effective_variables(route, request)
    return effective_temperature(variables, route, lm) == 0.0


def effective_temperature(
    variables: Mapping[str, str], route: Route, lm: LMSettings
) -> float | None:
    """The sampling temperature the worker will use; ``None`` when it cannot be known."""
    if "temperature" in variables:
        return _number(variables["temperature"])
    backend = lm.backends.get(route.variant)
    if backend is None or (route.model is not None and route.model != backend.model):
        return None
    return backend.temperature


def cache_key(
    program: Mapping[str, Any],
    inputs: Mapping[str, str],
    variables: Mapping[str, str],
    route: Route,
    tenant: str | None = None,
) -> str:
    """``sha256:<hex>`` naming one deterministic (program, inputs, variables, variant).

    A tenant's requests have keys of their own: no tenant is answered from another's
    results (nor learns from a cache hit what another asked).
    """
    material: dict[str, Any] = {
        "program": {
            "id": program.get("program_id"),
            "version": program.get("program_version"),
            "signature": program.get("signature"),
            "module_type": program.get("module_type"),
            "module_config": _canonical_value(program.get("module_config_json")),
            "state": program.get("state_json"),
            "tools": sorted(program.get("tools") or []),
            "adapter": program.get("adapter"),
        },
        "inputs": {k: _canonical_value(v) for k, v in inputs.items()},
        "variables": {k: _canonical_value(v) for k, v in variables.items()},
        "variant": [route.variant, route.model, route.module_type],
    }
    if tenant is not None:
        material["tenant"] = tenant
    digest = hashlib.sha256(_canonical(material).encode("utf-8")).hexdigest()
    return f"sha256:{digest}"


class ResultCache:
    """Cached outputs by cache key, materialized from the ``cache`` topic; bounded LRU.

    Workers write the final ok Response of each cacheable request to ``cache``
    (key: the cache key the router put in the route); every router follows the
    topic with its :class:`~dspex.agents.plumbing.catalog.CompactedReader` and :meth:`apply`s
    each record, so a repeat is answered by whichever router receives it, and a
    restarted router starts warm. Beyond ``max_entries`` the least recently used
    entry is dropped from memory (the topic keeps it until retention).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, str] = OrderedDict()

    def get(self, key: str) -> str | None:
        """The cached outputs (:func:`encode_outputs`) under ``key``, else None."""
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def apply(self, key: str, response: Mapping[str, Any] | None) -> None:
        """One ``cache`` record: a final ok Response stores its outputs; a tombstone deletes."""
        if response is None:
            self._entries.pop(key, None)
            return
        outputs = response.get("outputs")
        final_ok = response.get("status") == "ok" and response.get("final", True)
        if not key or not final_ok or outputs is None or response.get("cached"):
            return
        self._entries[key] = encode_outputs(outputs)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def encode_outputs(outputs: Mapping[str, str]) -> str:
    """A cache value: the final outputs map as canonical JSON."""
    return _canonical(dict(outputs))


def decode_outputs(value: str) -> dict[str, str] | None:
    """The outputs map stored by :func:`encode_outputs`; ``None`` for a damaged entry."""
    try:
        outputs = json.loads(value)
    except (TypeError, ValueError):
        return None
    if not isinstance(outputs, dict) or not all(isinstance(v, str) for v in outputs.values()):
        return None
    return outputs


def cached_responses(
    request: Mapping[str, Any], outputs: Mapping[str, str], program: Mapping[str, Any], now_ms: int
) -> list[dict[str, Any]]:
    """The ``Response`` chunks the router answers a cache hit with (no pool).

    A streamed request gets what a run would have streamed (the text output, or the
    last output's JSON; see :func:`dspex.streams.signatures.stream_field`) as one
    progress chunk, then the final chunk; otherwise the final chunk alone.
    """

    def chunk(seq: int, final: bool, **answer: Any) -> dict[str, Any]:
        return records.response(
            request_id=request["request_id"],
            seq=seq,
            final=final,
            cached=True,
            program_id=program.get("program_id"),
            program_version=program.get("program_version"),
            produced_at=now_ms,
            **answer,
        )

    delta = ""
    if request.get("stream"):
        delta = stream_delta(parse_signature_fields(program["signature"]), outputs)
    if not delta:
        return [chunk(0, True, status="ok", outputs=outputs)]
    return [
        chunk(0, False, status="progress", delta=delta),
        chunk(1, True, status="ok", outputs=outputs),
    ]


def _number(text: str) -> float | None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _canonical_value(text: str | None) -> Any:
    """A JSON-encoded value parsed (so spacing and key order vanish), else tagged raw."""
    if text is None:
        return None
    try:
        return {"json": json.loads(text)}
    except ValueError:
        return {"raw": text}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
