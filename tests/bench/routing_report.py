"""The routing benchmark's report: per-arm figures, the comparison, the targets, the table.

Targets (issue 4) are reported as met / not met, never asserted: learned routing
at least 20% above static uniform routing, and not below LiteLLM's latency-based
router, on the objective — correct answers per second over the steady phase.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench.routing_sim import iter_first_calls
from tests.bench.routing_workload import Outcome, phase_figures, traffic_shift

ARMS = ("learned", "static", "litellm")
LABELS = {
    "learned": "DSPex learned routing",
    "static": "DSPex static uniform",
    "litellm": "LiteLLM latency-based",
}
BEAT_STATIC = 1.2
MATCH_LITELLM = 1.0


def arm_figures(
    outcomes: Sequence[Outcome],
    calls: Sequence[dict[str, Any]],
    backends: Sequence[str],
    steady: int,
    shift: dict[str, Any],
) -> dict[str, Any]:
    """Steady phase, its second half (converged), the drift phase, and the traffic shift.

    ``first_calls``: the backend (index into the config's backends) of each question's
    first call, in send order, so any other shift or share figure can be recomputed.
    """
    firsts = dict(iter_first_calls(list(calls)))
    index = {name: str(i) for i, name in enumerate(backends)}
    return {
        "first_calls": "".join(index[firsts[o.qid]] for o in outcomes if o.qid in firsts),
        "steady": phase_figures(outcomes[:steady], calls, backends),
        "converged": phase_figures(outcomes[steady // 2 : steady], calls, backends),
        "drift": phase_figures(outcomes[steady:], calls, backends),
        "shift": traffic_shift(outcomes, calls, **shift),
    }


def _ratio(report: dict[str, Any], phase: str, figure: str, a: str, b: str) -> float | None:
    arms = report["arms"]
    if a not in arms or b not in arms:
        return None
    top, bottom = arms[a][phase].get(figure), arms[b][phase].get(figure)
    return round(top / bottom, 3) if top and bottom else None


def comparison(report: dict[str, Any]) -> dict[str, Any]:
    """Learned over the two baselines, end to end and inside the backends.

    Not for the drift phase: there each arm lost a different backend (its own favourite).
    """
    out: dict[str, Any] = {}
    for phase in ("steady", "converged"):
        for other in ("static", "litellm"):
            for figure in ("correct_per_s", "correct_per_backend_s"):
                key = f"{phase}.{figure}.learned_over_{other}"
                out[key] = _ratio(report, phase, figure, "learned", other)
    return out


def targets(ratios: dict[str, Any]) -> dict[str, Any]:
    """The issue's two targets on the steady phase's correct answers per second."""
    static = ratios.get("steady.correct_per_s.learned_over_static")
    litellm = ratios.get("steady.correct_per_s.learned_over_litellm")
    return {
        "learned_vs_static": _target(static, BEAT_STATIC),
        "learned_vs_litellm": _target(litellm, MATCH_LITELLM),
    }


def _target(value: float | None, floor: float) -> dict[str, Any]:
    return {"value": value, "target": f">= {floor:g}", "met": value is not None and value >= floor}


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = out / "routing.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def print_table(report: dict[str, Any]) -> None:
    """Per arm and phase: the objective, latency, accuracy, traffic by backend; then targets."""
    from rich.console import Console
    from rich.table import Table

    names = [b["name"].removeprefix("sim-") for b in report["config"]["backends"]]
    table = Table(title="Routing benchmark on SIMULATED backends (objective: correct answers/s)")
    for column in ("arm", "phase", "correct/s", "per backend-s", "p50 / p95 ms", "accuracy"):
        table.add_column(column, justify="right" if column != "arm" else "left")
    table.add_column(f"traffic % ({'/'.join(names)})", justify="right")
    table.add_column("failed", justify="right")
    for arm in ARMS:
        figures = report["arms"].get(arm)
        if figures is None:
            continue
        for phase in ("steady", "drift"):
            table.add_row(arm if phase == "steady" else "", phase, *_row(figures[phase]))
        table.add_row("", "shift", _shift_text(figures["shift"]), "", "", "", "", "")
    console = Console(width=max(Console().width, 110))
    console.print(table)
    for name, check in report["targets"].items():
        status = "[green]met[/green]" if check["met"] else "[red]not met[/red]"
        console.print(f"{name}: {check['value']} (target {check['target']}) {status}")
    for warning in warnings(report):
        console.print(f"[red]{warning}[/red]")


def _row(phase: dict[str, Any]) -> list[str]:
    if not phase.get("requests"):
        return ["-"] * 6
    latency = phase["latency_ms"]
    return [
        f"{phase['correct_per_s']:.2f}",
        f"{phase['correct_per_backend_s']:.2f}",
        f"{latency['p50']:.0f} / {latency['p95']:.0f}",
        f"{phase['accuracy']:.2f}",
        "/".join(f"{share * 100:.0f}" for share in phase["share"].values()),
        str(phase["failed"]),
    ]


def _shift_text(shift: dict[str, Any]) -> str:
    moved = shift["requests_to_shift"]
    when = "never" if moved is None else f"after {moved} req ({shift['seconds_to_shift']} s)"
    return f"{shift['degraded']} degraded: {when}"


def warnings(report: dict[str, Any]) -> list[str]:
    """What makes a run's figures suspect: agent errors, a learner that published nothing."""
    found = []
    for arm, figures in report["arms"].items():
        errors = {k: v for k, v in (figures.get("logged_errors") or {}).items() if v}
        if errors:
            found.append(f"{arm}: ERROR lines in agent logs {errors} (routing-logs/{arm}/)")
    learned = report["arms"].get("learned")
    if learned is not None and len(learned.get("tables") or []) <= 1:
        found.append(
            "learned: no learned table could be read back (none published, or written with "
            "a newer schema than this process knows): check the traffic shares"
        )
    return found
