"""Shared, typed variables: keys, VariableUpdate records, and the latest-value store.

Pure logic, no Kafka. The client validates an update with :func:`new_update`
before producing it; the router validates every record of the compacted
``variables`` topic again while it materializes it into a :class:`VariableStore`.
An invalid record is refused with :class:`~dspex.streams.errors.InvalidRequest` naming
the record field (``value_json``, ``constraints_json``, ``scope_ref``, ...) and
the reason, and the store keeps the last good value. Types, constraints, scopes
and ``when`` conditions are described in ``docs/variables.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dspex.schemas import records
from dspex.schemas.times import now
from dspex.streams._vartypes import (
    MODULE_TYPES,
    NAME,
    VAR_TYPES,
    canonical,
    canonical_text,
    check_constraints,
    check_type,
    check_value,
    decode_json,
    encode_json,
)
from dspex.streams.errors import InvalidRequest

__all__ = [
    "MODULE_TYPES",
    "RESERVED_TYPES",
    "SCOPES",
    "VAR_TYPES",
    "VariableStore",
    "constraints_of",
    "new_update",
    "parse_value",
    "scope_ref_for",
    "validate_update",
    "variable_key",
]

SCOPES = ("global", "program", "module", "session")
MAX_SESSION_REF_BYTES = 512
# A variable named "module" steers the module type a program runs as, so it must be typed so.
RESERVED_TYPES = {"module": "module"}


def variable_key(name: str, scope: str = "global", scope_ref: str | None = None) -> str:
    """The Kafka key: ``name``, ``program/<program_id>/<name>``, ``module/<id>/<m>/<name>``
    or ``session/<session_id>/<name>``."""
    _check_scope(scope, scope_ref)
    if scope == "global":
        return name
    return f"{scope}/{scope_ref}/{name}"


def scope_ref_for(
    scope: str, program: str | None, module: str | None, session: str | None = None
) -> str | None:
    """The ``scope_ref`` a scope needs: None, ``<program>``, ``<program>/<module>`` or
    ``<session id>``."""
    needs = {
        "global": (),
        "program": ("program",),
        "module": ("program", "module"),
        "session": ("session",),
    }.get(scope)
    if needs is None:
        raise InvalidRequest("scope", f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    given = {"program": program, "module": module, "session": session}
    extra = [part for part, value in given.items() if value is not None and part not in needs]
    if extra:
        raise InvalidRequest("scope", f"a {extra[0]} was named for a {scope} variable")
    missing = [part for part in needs if not given[part]]
    if missing:
        raise InvalidRequest("scope_ref", f"a {scope} variable needs a {missing[0]}")
    ref = "/".join(str(given[part]) for part in needs) or None
    _check_scope(scope, ref)
    return ref


def parse_value(var_type: str, value_json: str, constraints: Mapping[str, Any]) -> Any:
    """The decoded value when it has type ``var_type`` and meets ``constraints``.

    Raises :class:`InvalidRequest` with field ``value_json`` (or
    ``value_json.<member>`` inside a composite), ``constraints_json`` when the
    constraints themselves are malformed, ``var_type`` for an unknown type.
    """
    check_type(var_type)
    check_constraints(var_type, constraints)
    value = decode_json("value_json", value_json)
    check_value("value_json", var_type, value, constraints)
    return value


def validate_update(record: Mapping[str, Any]) -> Any:
    """Check a whole VariableUpdate record; return its decoded value."""
    name = record.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequest(
            "name", f"{name!r} is not a variable name (letters, digits, _ . -; at most 128)"
        )
    var_type = record.get("var_type")
    check_type(var_type)
    reserved = RESERVED_TYPES.get(name)
    if reserved is not None and var_type != reserved:
        raise InvalidRequest("var_type", f"the variable {name!r} must have type {reserved!r}")
    _check_scope(record.get("scope", "global"), record.get("scope_ref"))
    _check_version(record.get("version"))
    _check_observers(record.get("observers", []))
    previous = record.get("previous_value_json")
    if previous is not None:
        decode_json("previous_value_json", previous)
    return parse_value(str(var_type), record.get("value_json", ""), constraints_of(record))


def constraints_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's ``constraints_json`` decoded; it must be a JSON object."""
    constraints = decode_json("constraints_json", record.get("constraints_json") or "{}")
    if not isinstance(constraints, dict):
        raise InvalidRequest("constraints_json", "must be a JSON object")
    return constraints


def new_update(
    name: str,
    value: Any,
    *,
    var_type: str | None = None,
    constraints: Mapping[str, Any] | None = None,
    scope: str = "global",
    scope_ref: str | None = None,
    previous: Mapping[str, Any] | None = None,
    updated_by: str = "",
    source: str = "person",
    reason: str = "",
    observers: Sequence[str] = (),
) -> dict[str, Any]:
    """A validated VariableUpdate record: the next version after ``previous`` (1 without).

    ``var_type`` and ``observers`` default to ``previous``'s, ``constraints`` too
    unless the type changes (then they default to none).
    """
    key = variable_key(name, scope, scope_ref)
    if previous is not None and _key_of(previous) != key:
        raise InvalidRequest("name", f"previous record is for {_key_of(previous)!r}, not {key!r}")
    kind = var_type or (previous["var_type"] if previous is not None else None)
    if kind is None:
        raise InvalidRequest("var_type", f"a new variable {name!r} needs a type")
    if constraints is None:  # kept while the type is; a new type starts unconstrained
        same_type = previous is not None and previous["var_type"] == kind
        constraints = constraints_of(previous) if previous is not None and same_type else {}
    earlier = previous or {}
    record = records.variable_update(
        name=name,
        var_type=kind,
        value_json=encode_json("value_json", value),
        constraints_json=encode_json("constraints_json", dict(constraints)),
        scope=scope,
        scope_ref=scope_ref,
        version=int(earlier.get("version", 0)) + 1,
        previous_value_json=earlier.get("value_json"),
        updated_at=now(),
        updated_by=updated_by,
        source=source,
        reason=reason,
        observers=list(observers or earlier.get("observers") or []),
    )
    validate_update(record)
    return record


class VariableStore:
    """The latest good VariableUpdate per key, and the variables in force for a request."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._when: dict[str, dict[str, list[str]]] = {}
        self._by_name: dict[str, dict[str, str]] = {}  # name -> {scope ref label -> key}

    def apply(self, key: str, record: Mapping[str, Any] | None) -> InvalidRequest | None:
        """Take one record of the compacted topic (``None``: a tombstone deletes ``key``).

        An invalid record, or one not newer than the version held, is refused: the
        held value stays and the error is returned for the caller to log and dead-letter.
        """
        if record is None:
            self._drop(key)
            return None
        if self._records.get(key) == dict(record):
            return None  # the record in force, again: a router restoring it after a refusal
        try:
            self._check(key, record)
        except InvalidRequest as exc:
            return exc
        self._keep(key, dict(record))
        return None

    def get(self, key: str) -> dict[str, Any] | None:
        """The record in force for ``key``, or ``None``."""
        record = self._records.get(key)
        return dict(record) if record is not None else None

    def records(self) -> list[dict[str, Any]]:
        """Every record in force, ordered by key."""
        return [dict(self._records[key]) for key in sorted(self._records)]

    def resolve(
        self,
        program_id: str | None,
        module: str | None = None,
        *,
        context: Mapping[str, str] | None = None,
        session_id: str | None = None,
    ) -> dict[str, str]:
        """Effective ``name -> value_json`` for a program (and module, and session):
        global < program < module < session.

        A record whose constraints carry ``"when": {"<var>": [JSON values]}`` applies
        only while ``<var>``'s effective value is one of them; otherwise the next
        scope down is tried. ``context`` (e.g. a request's own variables) takes
        precedence over the store when conditions are evaluated; it is not returned.
        """
        if not self._by_name:
            return {}
        resolver = _Resolver(self, program_id, module, context or {}, session_id)
        found = {name: resolver.value(name, frozenset()) for name in self._by_name}
        return {name: value for name, value in found.items() if value is not None}

    def candidates(
        self, name: str, program_id: str | None, module: str | None, session_id: str | None = None
    ) -> list[str]:
        """Keys of ``name``'s records that could apply, most specific scope first."""
        keys = self._by_name.get(name, {})
        refs = [f"session/{session_id}"] if session_id else []
        if program_id is not None and module is not None:
            refs.append(f"module/{program_id}/{module}")
        if program_id is not None:
            refs.append(f"program/{program_id}")
        refs.append("global")
        return [keys[ref] for ref in refs if ref in keys]

    def when(self, key: str) -> dict[str, list[str]]:
        """The record's ``when`` condition as canonical JSON values per variable."""
        return self._when.get(key, {})

    def value_json(self, key: str) -> str:
        """The JSON value of the record held for ``key``."""
        return str(self._records[key]["value_json"])

    def _check(self, key: str, record: Mapping[str, Any]) -> None:
        validate_update(record)
        expected = _key_of(record)
        if key != expected:
            raise InvalidRequest("key", f"record for {expected!r} arrived under key {key!r}")
        held = self._records.get(key)
        if held is not None and int(record["version"]) <= int(held["version"]):
            raise InvalidRequest(
                "version",
                f"{record['version']} is not newer than the version in force ({held['version']})",
            )

    def _keep(self, key: str, record: dict[str, Any]) -> None:
        self._drop(key)
        self._records[key] = record
        when = constraints_of(record).get("when") or {}
        self._when[key] = {name: [canonical(v) for v in values] for name, values in when.items()}
        self._by_name.setdefault(record["name"], {})[_ref_label(record)] = key

    def _drop(self, key: str) -> None:
        record = self._records.pop(key, None)
        self._when.pop(key, None)
        if record is None:
            return
        refs = self._by_name.get(record["name"], {})
        refs.pop(_ref_label(record), None)
        if not refs:
            self._by_name.pop(record["name"], None)


class _Resolver:
    """One :meth:`VariableStore.resolve` call: memoized values, cycle-safe conditions."""

    def __init__(
        self,
        store: VariableStore,
        program_id: str | None,
        module: str | None,
        context: Mapping[str, str],
        session_id: str | None = None,
    ) -> None:
        self._session_id = session_id
        self._store = store
        self._program_id = program_id
        self._module = module
        self._context = context
        self._memo: dict[str, str | None] = {}

    def value(self, name: str, visiting: frozenset[str]) -> str | None:
        """The store's effective value of ``name``; ``None`` when no record applies."""
        if name in self._memo:
            return self._memo[name]
        found = None
        candidates = self._store.candidates(name, self._program_id, self._module, self._session_id)
        for key in candidates:
            if self._holds(key, visiting | {name}):
                found = self._store.value_json(key)
                break
        if not visiting:  # inside a chain of conditions a cycle may have cut the answer short
            self._memo[name] = found
        return found

    def _holds(self, key: str, visiting: frozenset[str]) -> bool:
        for other, allowed in self._store.when(key).items():
            if other in self._context:
                current: str | None = self._context[other]
            elif other in visiting:  # a cycle of conditions: none of them applies
                return False
            else:
                current = self.value(other, visiting)
            if current is None or canonical_text(current) not in allowed:
                return False
        return True


def _ref_label(record: Mapping[str, Any]) -> str:
    scope = record.get("scope", "global")
    return "global" if scope == "global" else f"{scope}/{record.get('scope_ref')}"


def _check_scope(scope: Any, scope_ref: Any) -> None:
    if scope not in SCOPES:
        raise InvalidRequest("scope", f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    if scope == "global":
        if scope_ref not in (None, ""):
            raise InvalidRequest("scope_ref", "must be null for a global variable")
        return
    if scope == "session":  # any session id (it may contain "/"), as the client sends it
        if not isinstance(scope_ref, str) or not scope_ref.strip():
            raise InvalidRequest("scope_ref", "a session variable needs the session id")
        if len(scope_ref.encode("utf-8")) > MAX_SESSION_REF_BYTES:
            raise InvalidRequest("scope_ref", f"longer than {MAX_SESSION_REF_BYTES} bytes")
        return
    parts = scope_ref.split("/") if isinstance(scope_ref, str) else []
    wanted = 1 if scope == "program" else 2
    if len(parts) != wanted or not all(part.strip() for part in parts):
        shape = "<program_id>" if scope == "program" else "<program_id>/<module>"
        raise InvalidRequest(
            "scope_ref", f"a {scope} variable needs scope_ref {shape}, got {scope_ref!r}"
        )


def _check_version(version: Any) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidRequest("version", f"must be an integer >= 1, got {version!r}")


def _check_observers(observers: Any) -> None:
    if not isinstance(observers, list) or not all(isinstance(o, str) and o for o in observers):
        raise InvalidRequest("observers", "must be a list of non-empty strings")


def _key_of(record: Mapping[str, Any]) -> str:
    return variable_key(record["name"], record.get("scope", "global"), record.get("scope_ref"))
