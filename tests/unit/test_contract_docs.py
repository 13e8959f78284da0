"""The README's wire contract against the code: its fingerprint snippet and header bytes."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import avro.schema
import pytest

from dspex import schemas
from dspex.streams.client._async import DEFAULT_GRACE_S

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
SCHEMA_FILES = sorted((REPO / "schemas").glob("*.avsc")) + sorted(
    (REPO / "schemas" / "history").glob("*.avsc")
)


def _snippet() -> Callable[[str], int]:
    """``spec_fingerprint`` as the README's rule 1 defines it."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    (code,) = [b for b in blocks if "def spec_fingerprint" in b]
    namespace: dict[str, object] = {}
    exec(re.sub(r"(?m)^   ", "", code), namespace)  # noqa: S102 - the README's own code
    function = namespace["spec_fingerprint"]
    assert callable(function)
    return function


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_the_readme_snippet_computes_the_fingerprint_dspex_frames_with(path: Path) -> None:
    name = path.name.split(".")[0]
    text = path.read_text(encoding="utf-8")
    known = {s.fingerprint for s in schemas.versions(name)}
    assert _snippet()(text) in known


def test_apache_avros_own_fingerprint_differs_as_the_readme_warns() -> None:
    text = (REPO / "schemas" / "Request.avsc").read_text(encoding="utf-8")
    own = int.from_bytes(avro.schema.parse(text).fingerprint("CRC-64-AVRO"), "little")
    assert own != schemas.current("Request").fingerprint


def test_the_readme_names_the_current_request_header() -> None:
    fingerprint = schemas.current("Request").fingerprint
    header = (b"\xc3\x01" + fingerprint.to_bytes(8, "little")).hex(" ")
    assert f"`0x{fingerprint:016x}`, so the header is\n   `{header}`" in README


def test_the_readme_grace_is_the_clients() -> None:
    assert f"plus a grace of **{DEFAULT_GRACE_S:g} s**" in README
