"""The router's checked pipelines: each version validated and planned once, not once per run.

A run names a pipeline version; validating it (every stage against its program's
signature) and building its plan depend only on that version's record and on the
registered programs. :class:`CheckedPipelines` keeps the outcome — the plan, or the
refusal — per (pipeline id, version), and redoes it only when the record held for that
version is another one or the programs catalog changed since (a program a stage names
may have been published, replaced or removed). Per run, only the run's inputs are checked.
"""

from __future__ import annotations

from dspex.agents.plumbing.catalog import ProgramCatalog
from dspex.schemas.records import Record
from dspex.streams.errors import InvalidRequest
from dspex.streams.pipelines.plan import Plan
from dspex.streams.pipelines.spec import Pipeline
from dspex.streams.pipelines.validate import check

_Checked = tuple[Record, int, Plan | InvalidRequest]
"""The record checked, the programs catalog's change count then, and the outcome."""


class CheckedPipelines:
    """Plans of validated pipeline versions, cached per (id, version, programs catalog)."""

    def __init__(self, programs: ProgramCatalog) -> None:
        self._programs = programs
        self._held: dict[tuple[str, int], _Checked] = {}
        self.checks = 0
        """How many times a pipeline version was validated (tests and logs)."""

    def plan(self, version: Record) -> Plan:
        """The plan of a pipeline version record; :class:`InvalidRequest` (every problem named)."""
        key = (str(version["pipeline_id"]), int(version["version"]))
        held = self._held.get(key)
        if held is None or held[0] is not version or held[1] != self._programs.changes:
            held = (version, self._programs.changes, self._check(version, key[1]))
            self._held[key] = held
        outcome = held[2]
        if isinstance(outcome, InvalidRequest):
            raise outcome.with_traceback(None)
        return outcome

    def _check(self, version: Record, number: int) -> Plan | InvalidRequest:
        self.checks += 1
        try:
            spec = Pipeline.from_record(version)
            # the client checked it before publishing; a record produced past the client, or
            # a program changed since, is refused here with every problem named
            check(spec, self._signature_of)
            return Plan.from_spec(spec, number)
        except InvalidRequest as exc:
            return exc

    def _signature_of(self, program_id: str, version: int | None) -> str | None:
        """A registered program's signature for pipeline validation; None when unknown."""
        try:
            return str(self._programs.resolve(program_id, version)["signature"])
        except InvalidRequest:
            return None
