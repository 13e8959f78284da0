"""``client.pipelines``: publish pipeline versions (validated first), list and read them.

The pipelines topic is compacted and keyed by pipeline id, like programs: the
latest version is found by reading every partition to its current end, and a
``put`` takes the latest + 1 inside a transaction fenced per pipeline
(:mod:`dspex.streams.client.fenced`: two puts at once never take the same number),
then returns once readers can see it. Before anything is produced the pipeline is checked
against the programs registered on the programs topic, with the rules the
pipeline agent applies (:mod:`dspex.streams.pipelines.validate`): an invalid one
raises :class:`~dspex.streams.pipelines.problems.InvalidPipeline` and nothing is sent.
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer

from dspex.schemas.records import Record
from dspex.streams.client.fenced import Delivered, fenced_publish, until_visible
from dspex.streams.client.programs import read_versions
from dspex.streams.client.variables import default_author
from dspex.streams.errors import BrokerUnavailable
from dspex.streams.pipelines import files
from dspex.streams.pipelines.problems import InvalidPipeline, Problem
from dspex.streams.pipelines.spec import Pipeline, PublishedPipeline
from dspex.streams.pipelines.validate import ProgramResolver, check
from dspex.streams.reader import read_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings
from dspex.streams.topics import Topics

__all__ = ["Pipelines", "program_resolver", "read_pipelines"]

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 10.0


class Pipelines:
    """Pipeline versions on the compacted pipelines topic (``client.pipelines``)."""

    def __init__(self, settings: Settings, serde: Serde) -> None:
        self._settings = settings
        self._serde = serde
        self._topic = Topics(settings.topics).name("pipelines")

    def put(
        self,
        source: Pipeline | str | Path,
        *,
        pipeline_id: str | None = None,
        description: str | None = None,
        created_by: str | None = None,
    ) -> PublishedPipeline:
        """Validate and publish the next version of a pipeline; return what was published.

        ``source``: a :class:`Pipeline` (the builder's result) or the path of a YAML/JSON
        file. ``pipeline_id`` names the pipeline (it must agree with the one in the
        source, if any). Raises :class:`InvalidPipeline` listing every problem.
        """
        pipeline = _pipeline_of(source, pipeline_id, description)
        resolver = program_resolver(self._settings, self._serde)
        check(pipeline, resolver)
        author = created_by or default_author()
        delivered = Delivered()

        def attempt(producer: Producer, latest: int) -> Record:
            delivered.clear()
            record = pipeline.to_record(version=latest + 1, created_by=author)
            value = self._serde.encode("PipelineVersion", record, topic=self._topic)
            key = pipeline.pipeline_id.encode("utf-8")
            producer.produce(self._topic, value, key, on_delivery=delivered)
            return record

        def latest() -> int:
            return latest_pipeline_version(self._settings, self._serde, pipeline.pipeline_id)

        txn_id = pipeline_txn_id(self._settings, pipeline.pipeline_id)
        try:
            record = fenced_publish(self._settings, txn_id, latest, attempt)
        except KafkaException as exc:
            raise BrokerUnavailable(
                f"topic={self._topic} pipeline_id={pipeline.pipeline_id}: not published: {exc}"
            ) from exc
        what = f"pipeline_id={pipeline.pipeline_id} version={record['version']}"
        until_visible(self._settings, delivered.where(), what)
        logger.info("published %s", what)
        return PublishedPipeline.from_record(record)

    def list(self) -> builtins.list[PublishedPipeline]:
        """The latest version of every pipeline, by id."""
        found = read_pipelines(self._settings, self._serde, self._topic)
        return [versions[-1] for _, versions in sorted(found.items())]

    def get(self, pipeline_id: str, version: int | None = None) -> PublishedPipeline | None:
        """One version (default: the latest) of a pipeline; ``None`` when it is not on the
        topic (compaction keeps only the latest version of each pipeline for long)."""
        versions = self.versions(pipeline_id)
        if version is None:
            return versions[-1] if versions else None
        return next((p for p in versions if p.version == version), None)

    def versions(self, pipeline_id: str) -> builtins.list[PublishedPipeline]:
        """Every version of ``pipeline_id`` still on the topic, oldest first."""
        found = read_pipelines(self._settings, self._serde, self._topic, pipeline_id=pipeline_id)
        return found.get(pipeline_id, [])


def latest_pipeline_version(settings: Settings, serde: Serde, pipeline_id: str) -> int:
    """The highest version of ``pipeline_id`` on the pipelines topic; 0 when there is none."""
    topic = Topics(settings.topics).name("pipelines")
    found = read_pipelines(settings, serde, topic, pipeline_id=pipeline_id)
    return max((p.version for p in found.get(pipeline_id, [])), default=0)


def pipeline_txn_id(settings: Settings, pipeline_id: str) -> str:
    """The ``transactional.id`` every publisher of ``pipeline_id``'s versions uses."""
    return f"{settings.topics.prefix}pipelines-{pipeline_id}"


def _pipeline_of(
    source: Pipeline | str | Path, pipeline_id: str | None, description: str | None
) -> Pipeline:
    if isinstance(source, Pipeline):
        if pipeline_id not in (None, source.pipeline_id):
            named = f"the pipeline is {source.pipeline_id!r}, not {pipeline_id!r}"
            raise InvalidPipeline(pipeline_id or "", [Problem("pipeline", named)])
        pipeline = source
    else:
        pipeline = files.load(source, pipeline_id=pipeline_id)
    if description is None:
        return pipeline
    return dataclasses.replace(pipeline, description=description)


def read_pipelines(
    settings: Settings, serde: Serde, topic: str, *, pipeline_id: str | None = None
) -> dict[str, list[PublishedPipeline]]:
    """Every PipelineVersion still on ``topic``, per pipeline id, oldest version first."""
    found: dict[str, list[PublishedPipeline]] = {}
    for _, record in read_to_end(
        settings, serde, topic, "PipelineVersion", key=pipeline_id, timeout_s=READ_TIMEOUT_S
    ):
        if record is not None:
            published = PublishedPipeline.from_record(record)
            found.setdefault(published.pipeline.pipeline_id, []).append(published)
    return {pid: sorted(ps, key=lambda p: p.version) for pid, ps in found.items()}


def program_resolver(settings: Settings, serde: Serde) -> ProgramResolver:
    """Signatures of the programs on the programs topic, read once, as the router resolves
    them: the pinned version if it is still there, else the latest."""
    topic = Topics(settings.topics).name("programs")
    return resolver_of(read_versions(settings, serde, topic, READ_TIMEOUT_S))


def resolver_of(versions: Mapping[str, list[dict[str, Any]]]) -> ProgramResolver:
    """A resolver over ProgramVersion records per program id (oldest first)."""

    def resolve(program_id: str, version: int | None) -> str | None:
        held = versions.get(program_id) or []
        if version is None:
            return str(held[-1]["signature"]) if held else None
        return next((str(r["signature"]) for r in held if int(r["version"]) == version), None)

    return resolve
