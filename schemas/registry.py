"""Load, fingerprint and version the Avro schemas shipped in this package.

A :class:`SchemaStore` reads one directory: the current contract as
``<Name>.avsc`` and every released version as ``history/<Name>.v<N>.avsc``.
Nothing is read until first asked for; results are cached per store. The
module-level functions in :mod:`schemas` use the store over this package's
own directory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import SchemaParseException, fingerprint, to_parsing_canonical_form

from dspex.schemas.errors import SchemaContractError, UnknownSchema

NAMESPACE = "io.dspex"
PACKAGE_DIR = Path(__file__).parent
_RELEASE_FILE = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)\.v(?P<version>[1-9][0-9]*)\.avsc$")


@dataclass(frozen=True)
class Schema:
    """One version of one record schema, ready for fastavro.

    ``definition`` and ``parsed`` are shared with the cache: copy before changing them.
    """

    name: str
    full_name: str
    version: int
    definition: dict[str, Any] = field(compare=False, repr=False)
    parsed: Any = field(compare=False, repr=False)
    canonical: str = field(repr=False)
    fingerprint: int


def rabin_fingerprint(canonical: str) -> int:
    """CRC-64-AVRO fingerprint of a Parsing Canonical Form, as an unsigned 64-bit int.

    fastavro returns the 8 bytes little-endian as hex (as Java's SchemaNormalization
    writes them); the int is the Avro spec's ``fingerprint64`` value.
    """
    return int.from_bytes(bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")), "little")


def build(definition: dict[str, Any], version: int, origin: str = "<definition>") -> Schema:
    """Parse a record definition with fastavro and compute its canonical form and fingerprint."""
    try:
        parsed = fastavro.parse_schema(definition)
        canonical = to_parsing_canonical_form(definition)
    except (SchemaParseException, ValueError, TypeError, KeyError) as exc:
        raise SchemaContractError(f"{origin}: not a valid Avro schema: {exc}") from exc
    name = str(definition.get("name", ""))
    namespace = definition.get("namespace")
    full_name = name if "." in name or not namespace else f"{namespace}.{name}"
    return Schema(
        name=full_name.rsplit(".", 1)[-1],
        full_name=full_name,
        version=version,
        definition=definition,
        parsed=parsed,
        canonical=canonical,
        fingerprint=rabin_fingerprint(canonical),
    )


def load_definition(path: Path, expected_name: str) -> dict[str, Any]:
    """Read one .avsc file: a JSON record schema named ``io.dspex.<expected_name>``."""
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SchemaContractError(f"{path}: cannot read schema: {exc}") from exc
    if not isinstance(definition, dict) or definition.get("type") != "record":
        raise SchemaContractError(f"{path}: top level must be an Avro record schema")
    if definition.get("name") != expected_name or definition.get("namespace") != NAMESPACE:
        raise SchemaContractError(
            f"{path}: must define record {NAMESPACE}.{expected_name} "
            f"(name={definition.get('name')!r}, namespace={definition.get('namespace')!r})"
        )
    return definition


class SchemaStore:
    """The schemas of one directory (``<Name>.avsc`` plus ``history/``), loaded lazily."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._released: dict[str, list[Schema]] = {}
        self._current: dict[str, Schema] = {}
        self._names: list[str] | None = None
        self._by_fp: dict[int, Schema] | None = None

    @property
    def history_dir(self) -> Path:
        """Where released versions live."""
        return self.root / "history"

    def names(self) -> list[str]:
        """Short names of the current record schemas, sorted."""
        if self._names is None:
            self._names = sorted(p.stem for p in self.root.glob("*.avsc"))
        return list(self._names)

    def released(self, name: str) -> list[Schema]:
        """Every released version of ``name``, oldest first."""
        self._require(name)
        if name not in self._released:
            self._released[name] = self._load_released(name)
        return list(self._released[name])

    def current(self, name: str) -> Schema:
        """The schema in ``<Name>.avsc``, numbered as the latest release or the one after it."""
        self._require(name)
        if name not in self._current:
            self._current[name] = self._load_current(name)
        return self._current[name]

    def versions(self, name: str) -> list[Schema]:
        """Released versions and the current one, oldest first, one per fingerprint."""
        head = self.current(name)
        seen = {head.fingerprint}
        older: list[Schema] = []
        for schema in self.released(name):
            if schema.fingerprint not in seen:
                seen.add(schema.fingerprint)
                older.append(schema)
        return [*older, head]

    def by_fingerprint(self, fp: int) -> Schema | None:
        """Any known version of any schema with this fingerprint, else ``None``."""
        if self._by_fp is None:
            self._by_fp = {s.fingerprint: s for n in self.names() for s in self.versions(n)}
        return self._by_fp.get(fp)

    def write_release(self, name: str, version: int) -> Path:
        """Copy ``<Name>.avsc`` to ``history/<Name>.v<version>.avsc``; never overwrites."""
        target = self.history_dir / f"{name}.v{version}.avsc"
        text = (self.root / f"{name}.avsc").read_text(encoding="utf-8")
        self.history_dir.mkdir(exist_ok=True)
        try:
            with target.open("x", encoding="utf-8") as out:
                out.write(text)
        except FileExistsError as exc:
            raise SchemaContractError(f"{target}: release already exists") from exc
        self.clear()
        return target

    def clear(self) -> None:
        """Forget everything loaded, so the next call re-reads the files."""
        self._released.clear()
        self._current.clear()
        self._names = None
        self._by_fp = None

    def _require(self, name: str) -> None:
        if name not in self.names():
            raise UnknownSchema(name, self.names())

    def _load_released(self, name: str) -> list[Schema]:
        found: list[tuple[int, Path]] = []
        for path in self.history_dir.glob(f"{name}.v*.avsc"):
            match = _RELEASE_FILE.match(path.name)
            if match and match["name"] == name:
                found.append((int(match["version"]), path))
        return [build(load_definition(p, name), v, str(p)) for v, p in sorted(found)]

    def _load_current(self, name: str) -> Schema:
        path = self.root / f"{name}.avsc"
        definition = load_definition(path, name)
        released = self.released(name)
        schema = build(definition, 1, str(path))
        if not released:
            return schema
        latest = released[-1]
        changed = latest.fingerprint != schema.fingerprint
        return dataclasses.replace(schema, version=latest.version + int(changed))


@functools.cache
def default_store() -> SchemaStore:
    """The store over the schemas shipped in this package (created on first use)."""
    return SchemaStore(PACKAGE_DIR)
