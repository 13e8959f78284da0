"""The Avro contract of DSPex: ``*.avsc`` record schemas and the code that loads them.

Every topic carries one of these records (see the README's topic table). The
``.avsc`` files are the public contract that clients in any language code
against; this package loads them lazily, computes their Parsing Canonical Form
and CRC-64-AVRO fingerprint, and keeps every released version so that old data
stays readable (:mod:`dspex.schemas.evolution`). :mod:`dspex.schemas.records` is the one
place each record is built (a typed constructor per schema), :mod:`dspex.schemas.times`
the one place timestamps are converted; :mod:`dspex.schemas.samples` builds valid
example records.

It imports nothing from ``streams`` or ``agents``.
"""

from __future__ import annotations

from dspex.schemas.errors import IncompatibleSchema, SchemaContractError, UnknownSchema
from dspex.schemas.registry import NAMESPACE, Schema, default_store

__all__ = [
    "NAMESPACE",
    "IncompatibleSchema",
    "Schema",
    "SchemaContractError",
    "UnknownSchema",
    "by_fingerprint",
    "current",
    "names",
    "versions",
]


def names() -> list[str]:
    """Short names of the record schemas (``"Request"``, ``"Response"``, ...), sorted."""
    return default_store().names()


def current(name: str) -> Schema:
    """The current schema for ``name``; raises :class:`UnknownSchema` for an unknown name."""
    return default_store().current(name)


def versions(name: str) -> list[Schema]:
    """Released versions of ``name`` plus the current one, oldest first, one per fingerprint."""
    return default_store().versions(name)


def by_fingerprint(fp: int) -> Schema | None:
    """The schema (any name, any known version) with this CRC-64-AVRO fingerprint, or ``None``."""
    return default_store().by_fingerprint(fp)
