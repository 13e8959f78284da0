"""Avro serdes for every DSPex topic, chosen by the settings.

With ``schema_registry.url`` set: the Confluent wire format through the registry
(:class:`ConfluentSerde`). Without: Avro single-object encoding
(:class:`SingleObjectSerde`), which any Avro tool decodes without a registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dspex.streams.serde.base import AvroSchema, Decoded, SchemaCatalog, Serde
from dspex.streams.serde.single_object import SingleObjectSerde
from dspex.streams.settings import Settings

if TYPE_CHECKING:
    from dspex.streams.serde.confluent import ConfluentSerde

__all__ = [
    "AvroSchema",
    "ConfluentSerde",
    "Decoded",
    "SchemaCatalog",
    "Serde",
    "SingleObjectSerde",
    "make_serde",
]


def make_serde(settings: Settings, catalog: SchemaCatalog | None = None) -> Serde:
    """The serde the settings call for; ``catalog`` defaults to the ``schemas`` package."""
    if settings.schema_registry.url:
        from dspex.streams.serde.confluent import ConfluentSerde

        return ConfluentSerde.from_settings(settings, catalog)
    return SingleObjectSerde(catalog)


def __getattr__(name: str) -> object:
    # the registry client (httpx, authlib) loads only when a registry is configured
    if name == "ConfluentSerde":
        from dspex.streams.serde.confluent import ConfluentSerde

        return ConfluentSerde
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
