"""The ``python -m dspex.agents`` commands (:mod:`dspex.agents.__main__` is the entry point).

``dspex up`` starts these through its supervisor; they can also be run (and scaled)
by hand, by systemd or by Kubernetes. Settings come from the environment and
``--settings FILE``, exactly as for ``dspex``.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Protocol

import typer

from dspex.streams import tracing
from dspex.streams.errors import DSPexError
from dspex.streams.logs import configure_logging
from dspex.streams.settings import Settings, load_settings

app = typer.Typer(help="Run one DSPex agent process.", no_args_is_help=True)
SettingsFile = Annotated[Path | None, typer.Option("--settings", help="TOML settings file.")]


InstanceId = Annotated[
    str | None,
    typer.Option(
        help="Stable id of a supervised process (static group membership): restarted "
        "within the session timeout, it takes its partitions back without a rebalance."
    ),
]


@app.command("router")
def router(settings_file: SettingsFile = None, instance_id: InstanceId = None) -> None:
    """The router agent: validate, resolve, route and cache requests."""
    from dspex.agents.router.router import make_router

    _serve(partial(make_router, instance_id=instance_id), settings_file, "router")


@app.command("pipeline")
def pipeline(settings_file: SettingsFile = None, instance_id: InstanceId = None) -> None:
    """The pipeline agent: runs pipelines as stage requests and answers each run once."""
    # each command imports only its own agent: the pipeline agent needs no DSPy, and a
    # restarted agent answers sooner when it does not load it (docs/pipelines.md)
    from dspex.agents.pipeline.agent import make_pipeline_agent

    _serve(partial(make_pipeline_agent, instance_id=instance_id), settings_file, "pipeline")


@app.command("learner")
def learner(settings_file: SettingsFile = None) -> None:
    """The learning agent: telemetry in, routing tables out."""
    from dspex.agents.learner.learner import make_learner

    _serve(make_learner, settings_file, "learner")


@app.command("metrics")
def metrics(settings_file: SettingsFile = None) -> None:
    """The metrics agent: telemetry in, metric snapshots and Prometheus metrics out."""
    from dspex.agents.metrics.metrics import make_metrics

    _serve(make_metrics, settings_file, "metrics")


@app.command("sessions")
def sessions(settings_file: SettingsFile = None) -> None:
    """The sessions agent: tombstones sessions whose TTL has passed."""
    from dspex.agents.sessions.sweeper import SessionSweeper

    _serve(SessionSweeper, settings_file, "sessions")


@app.command("worker")
def pool_worker(
    pool: Annotated[str, typer.Option(help="general, optimizer or gpu")],
    settings_file: SettingsFile = None,
    instance_id: InstanceId = None,
) -> None:
    """One member of a worker pool's consumer group."""
    from dspex.agents.worker import worker

    if pool not in ("general", "optimizer", "gpu"):
        raise typer.BadParameter(f"unknown pool {pool!r}: general, optimizer or gpu")
    settings = _load(settings_file, "worker")
    freeze_startup_heap()
    raise typer.Exit(worker.main(settings, pool, instance_id))


@app.command("jobs")
def job_runner(settings_file: SettingsFile = None) -> None:
    """One optimizer-pool job runner: optimizer jobs from the jobs topic."""
    from dspex.agents.jobs import jobs  # DSPy's optimizers load only in this process

    settings = _load(settings_file, "jobs")
    freeze_startup_heap()
    raise typer.Exit(jobs.main(settings))


class _Agent(Protocol):
    def run(self) -> None: ...


def _load(settings_file: Path | None, process: str) -> Settings:
    """The settings; spans exported as ``OTEL_*`` variables say (service ``dspex-<process>``)."""
    settings = load_settings(settings_file)
    tracing.configure(settings, f"dspex-{process}")
    return settings


def _serve(make: Callable[[Settings], _Agent], settings_file: Path | None, process: str) -> None:
    """Build the agent from the settings, freeze the start-up heap, run until stopped."""
    settings = _load(settings_file, process)
    configure_logging(settings.log_level)
    agent = make(settings)
    freeze_startup_heap()
    agent.run()


def freeze_startup_heap() -> None:
    """Collect once, then keep everything imported and built so far out of later collections.

    A full collection in an agent walks the import graph of DSPy, LiteLLM, faust and
    pydantic: 70-110 ms on the 2-core bench machine, during which the event loop
    serves nobody, and it happens whenever enough objects have survived since the
    last one. After ``gc.freeze`` full collections walk only what was made since.
    """
    gc.collect()
    gc.freeze()


def main() -> None:
    """Entry point: a DSPex error at start-up is one line on stderr and exit code 1."""
    try:
        app()
    except DSPexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
