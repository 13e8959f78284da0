"""What is wrong with a pipeline: each :class:`Problem` with its path, and :class:`InvalidPipeline`.

Every check of a pipeline — reading a file, the builder, validation against the
programs — reports problems rather than stopping at the first, each naming the
path in the pipeline's file vocabulary (``stages.summarize.map.concurrency``)
and so the stage. :class:`InvalidPipeline` carries them all and reads as one line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dspex.streams.errors import InvalidRequest

__all__ = ["InvalidPipeline", "Problem", "Problems"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong, at ``path`` (``stages.<name>...``, ``inputs``, ``outputs.<field>``)."""

    path: str
    message: str

    @property
    def stage(self) -> str | None:
        """The stage the path is in; ``None`` for the pipeline's own inputs and outputs."""
        head, _, rest = self.path.partition(".")
        return (rest.split(".")[0] or None) if head == "stages" else None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidPipeline(InvalidRequest):
    """A pipeline that must not be published or run; ``problems`` lists everything wrong.

    ``field`` and ``reason`` are the first problem's path and message (what an error
    Response shows); the message is one line with every problem.
    """

    def __init__(self, pipeline_id: str, problems: Iterable[Problem]) -> None:
        self.pipeline_id = pipeline_id
        self.problems = tuple(problems) or (Problem("pipeline", "invalid"),)
        first = self.problems[0]
        super().__init__(first.path, first.message)
        self.args = (summary(pipeline_id, self.problems),)


def summary(pipeline_id: str, problems: tuple[Problem, ...]) -> str:
    """``pipeline support is invalid: stages.a.inputs.q: ...; outputs.x: ...`` on one line."""
    count = f" ({len(problems)} problems)" if len(problems) > 1 else ""
    text = "; ".join(" ".join(str(problem).split()) for problem in problems)
    return f"pipeline {pipeline_id or '?'} is invalid{count}: {text}"


class Problems:
    """A collector: ``add`` as checks find things, then ``raise_if_any``."""

    def __init__(self) -> None:
        self.found: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        """Record one problem at ``path``."""
        self.found.append(Problem(path, message))

    def extend(self, problems: Iterable[Problem]) -> None:
        """Record problems found elsewhere."""
        self.found.extend(problems)

    def __bool__(self) -> bool:
        return bool(self.found)

    def raise_if_any(self, pipeline_id: str) -> None:
        """Raise :class:`InvalidPipeline` with everything found, if anything was."""
        if self.found:
            raise InvalidPipeline(pipeline_id, self.found)
