"""Program versions for ``publish_program``: the record, and the latest version on the topic.

The programs topic is compacted and keyed by program id, so the latest version
of a program is found by reading every partition from its start to its current
end (a compacted topic may have holes in its offsets: positions, not offsets,
say when a partition is done).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from dspex.schemas import records
from dspex.schemas.times import now
from dspex.streams.reader import read_to_end
from dspex.streams.serde import Serde
from dspex.streams.settings import Settings

logger = logging.getLogger(__name__)


def program_version_record(
    program_id: str,
    signature: str,
    *,
    version: int,
    parent_version: int | None,
    module_type: str,
    state_json: str | None,
    module_config_json: str,
    tools: Iterable[str],
    metric: str | None,
    description: str | None,
    created_by: str,
    score: float | None = None,
    adapter: str | None = None,
) -> dict[str, Any]:
    """A ProgramVersion record ready for the serde (``score``: its metric's, when measured)."""
    return records.program_version(
        program_id=program_id,
        version=version,
        signature=signature,
        module_type=module_type,
        module_config_json=module_config_json,
        state_json=state_json or "{}",
        tools=list(tools),
        adapter=adapter,
        metric=metric,
        score=score,
        description=description or "",
        parent_version=parent_version,
        created_at=now(),
        created_by=created_by,
    )


def latest_version(
    settings: Settings, serde: Serde, topic: str, program_id: str, timeout_s: float = 10.0
) -> int:
    """The highest version of ``program_id`` on the programs topic; 0 when there is none."""
    versions = read_versions(settings, serde, topic, timeout_s, program_id=program_id)
    return max((int(r["version"]) for r in versions.get(program_id, [])), default=0)


def read_versions(
    settings: Settings,
    serde: Serde,
    topic: str,
    timeout_s: float = 10.0,
    *,
    program_id: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every ProgramVersion still on the topic, per program id, oldest version first.

    Compaction keeps only the latest record per program id, so older versions
    show up only until the log cleaner has run.
    """
    found: dict[str, list[dict[str, Any]]] = {}
    records = read_to_end(
        settings, serde, topic, "ProgramVersion", key=program_id, timeout_s=timeout_s
    )
    for _, record in records:
        if record is not None:
            found.setdefault(record["program_id"], []).append(record)
    return {pid: sorted(rs, key=lambda r: int(r["version"])) for pid, rs in found.items()}
