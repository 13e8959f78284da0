"""Errors raised by the :mod:`schemas` package.

The package imports nothing from ``streams``, so it has its own small tree::

    SchemaContractError (ValueError)   an .avsc file or a change to one breaks the contract
    ├── UnknownSchema                  no schema by that name (or fingerprint)
    └── IncompatibleSchema             a change cannot read data written by a released version

Callers in ``streams`` map these onto the DSPex tree (``SchemaError``,
``SchemaNotFound``) where they catch them.
"""

from __future__ import annotations

from collections.abc import Iterable


class SchemaContractError(ValueError):
    """An .avsc file is invalid, or a change to it breaks the contract."""


class UnknownSchema(SchemaContractError):
    """No schema by that name; the message lists the known names."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown schema {name!r}; known schemas: {', '.join(self.known)}")


class IncompatibleSchema(SchemaContractError):
    """A schema cannot read data written by one of its released versions."""

    def __init__(self, name: str, problems: Iterable[str]) -> None:
        self.name = name
        self.problems = list(problems)
        listed = "; ".join(self.problems)
        super().__init__(f"schema {name!r} is not backward compatible: {listed}")
