"""Quality feedback for ``send_feedback``: a Telemetry record of kind ``"feedback"``.

Feedback travels on the telemetry topic keyed by program id, like the execution's
own telemetry, so the learning agent that holds that program's statistics sees
the execution first and the score after it, and credits the variant that ran it.
"""

from __future__ import annotations

import math
from typing import Any

from dspex.schemas import records
from dspex.schemas.times import now
from dspex.streams.errors import InvalidRequest


def feedback_record(
    request_id: str, quality: float, *, program_id: str, variant: str | None = None
) -> dict[str, Any]:
    """A Telemetry ``feedback`` record; :class:`InvalidRequest` names a bad argument."""
    if not request_id:
        raise InvalidRequest("request_id", "feedback needs the id of an answered request")
    if not program_id:
        raise InvalidRequest(
            "program_id", "feedback is learned per registered program; name the program"
        )
    if isinstance(quality, bool) or not isinstance(quality, int | float):
        raise InvalidRequest("quality", f"must be a number in [0, 1], got {quality!r}")
    if not math.isfinite(quality) or not 0.0 <= quality <= 1.0:
        raise InvalidRequest("quality", f"must be in [0, 1], got {quality!r}")
    return records.telemetry(
        kind="feedback",
        request_id=request_id,
        program_id=program_id,
        variant=variant,
        emitted_at=now(),
        quality=float(quality),
    )
