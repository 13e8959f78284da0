"""How much work each figure does: the full run and the ``--quick`` (smoke) run."""

from __future__ import annotations

from dataclasses import dataclass

SIGNATURE = "question -> answer"
PAD = "What is the capital of France? Please answer in one word. "
"""Padding that makes each question about as long as a typical user question."""


@dataclass(frozen=True)
class BenchConfig:
    """Counts and durations for one run."""

    quick: bool
    ceiling_messages: int
    ceiling_window: int
    paced_rate: float
    paced_s: float
    ceiling_paced_s: float
    miss_requests: int
    hit_requests: int
    in_process_calls: int
    async_concurrency: int
    worker_in_flight: int
    scaling: tuple[int, ...]
    serde_records: int
    profile_requests: int
    composition_runs: int
    """Runs of the pipeline-overhead composition, one after another and then all at once."""
    warm_up_requests: int
    """Cache misses before each miss-saturation phase: on fresh topics and groups the
    broker spent 1.5-3x the CPU per request in the first few thousand requests as in
    later phases of the same run (steady state is what the figures describe)."""

    @classmethod
    def full(cls) -> BenchConfig:
        return cls(
            quick=False,
            ceiling_messages=20_000,
            ceiling_window=2_000,
            paced_rate=100.0,
            paced_s=20.0,
            ceiling_paced_s=10.0,
            miss_requests=3_000,
            hit_requests=10_000,
            in_process_calls=3_000,
            async_concurrency=32,
            worker_in_flight=32,
            scaling=(1, 2, 4),
            serde_records=20_000,
            profile_requests=2_000,
            composition_runs=50,
            warm_up_requests=2_000,
        )

    @classmethod
    def quick_run(cls) -> BenchConfig:
        return cls(
            quick=True,
            ceiling_messages=500,
            ceiling_window=200,
            paced_rate=100.0,
            paced_s=1.0,
            ceiling_paced_s=0.5,
            miss_requests=100,
            hit_requests=200,
            in_process_calls=100,
            async_concurrency=8,
            worker_in_flight=32,
            scaling=(1, 2),
            serde_records=500,
            profile_requests=100,
            composition_runs=3,
            warm_up_requests=10,
        )


def question(i: int) -> str:
    """A unique question (a cache miss at the router)."""
    return f"{PAD}#{i:07d}"
