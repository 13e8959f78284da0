"""``dspex up`` (start and supervise everything) and ``dspex settings``."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from dspex.streams import kafka
from dspex.streams.cli._app import app, err, out, settings_of
from dspex.streams.cli.cluster import create_topics, ensure_cluster, topics_table
from dspex.streams.client.client import Client, Program
from dspex.streams.dashboard.server import Dashboard
from dspex.streams.errors import DSPexError
from dspex.streams.ops.autoscale import HintFollower, desired_processes, scalable
from dspex.streams.ops.cluster import LocalCluster
from dspex.streams.ops.extras import require_server_extra
from dspex.streams.ops.ports import choose_port, reachable_host
from dspex.streams.ops.supervisor import Supervisor
from dspex.streams.settings import POOLS, Settings

DEMO_QUESTION = "What is the capital of France?"


@app.command("settings")
def show_settings(ctx: typer.Context) -> None:
    """Print the effective settings (secrets masked)."""
    out.print_json(settings_of(ctx).model_dump_json())


@app.command("up")
def up(
    ctx: typer.Context,
    agents: Annotated[bool, typer.Option(help="Start the router and the pools.")] = True,
    demo: Annotated[bool, typer.Option(help="Stream one request through the gpu pool.")] = True,
    once: Annotated[bool, typer.Option(help="Stop everything after the demo.")] = False,
    dashboard: Annotated[bool, typer.Option(help="Serve the web dashboard.")] = True,
) -> None:
    """Start everything: broker (unless a cluster is configured), topics, router, pools."""
    if agents:
        require_server_extra()  # before the broker starts: the agents could not run
    settings = settings_of(ctx)
    started = ensure_cluster(settings)
    out.print(topics_table(create_topics(settings)))
    stop = _stop_on_signals()  # before saying so: a SIGTERM from then on stops it cleanly
    out.print(f"[green bold]DSPex is up[/] on {kafka.bootstrap_servers(settings)}")
    if agents:
        for line in pool_models(settings):
            out.print(line, highlight=False)
    board = Dashboard(settings) if dashboard else None
    if board is not None:
        board.start()
        out.print(f"dashboard  {board.url}")
    try:
        if agents:
            failed = _run_agents(settings, ctx.meta.get("settings_file"), stop, demo, once)
        else:
            out.print("no agents started (--no-agents); Ctrl-C stops.")
            stop.wait()
            failed = False
    finally:
        if board is not None:
            board.stop()
    if started is not None:
        LocalCluster(settings.local_broker).stop()
        out.print("local broker stopped")
    if failed:
        raise typer.Exit(1)


def pool_models(settings: Settings) -> list[str]:
    """One line per pool: the variant and model that answers, simulations labelled as such."""
    lines = []
    for pool in POOLS:
        variant = settings.lm.variant_for_pool(pool)
        backend = settings.lm.backends[variant]
        label = "  [yellow](a SIMULATION, not a model)[/]" if backend.simulated else ""
        lines.append(f"pool {pool:<9} answers with {variant} ({backend.model}){label}")
    return lines


def _run_agents(
    settings: Settings, settings_file: Path | None, stop: threading.Event, demo: bool, once: bool
) -> bool:
    # the cluster by address: a child restarted during a broker outage waits for it
    env = {"DSPEX_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers(settings)}
    metrics = settings.metrics
    if metrics.prometheus_port:  # a second stack on this machine: another free port
        port = choose_port(metrics.prometheus_port, host=metrics.bind_host)
        env["DSPEX_METRICS__PROMETHEUS_PORT"] = str(port)
        out.print(f"prometheus http://{reachable_host(metrics.bind_host)}:{port}/metrics")
    supervisor = Supervisor(
        agent_commands(settings, settings_file),
        on_event=lambda line: err.print(f"[dim]{line}[/]"),
        env=env,
    )
    drain_s = settings.reliability.drain_timeout_s
    runner = threading.Thread(
        target=supervisor.run, args=(stop,), kwargs={"drain_timeout_s": drain_s}, name="supervisor"
    )
    runner.start()
    if scalable(settings.pools):
        scaler = threading.Thread(
            target=follow_pool_hints,
            args=(settings, settings_file, supervisor, stop),
            name="pool-scaler",
            daemon=True,
        )
        scaler.start()
    failed = False
    try:
        if demo:
            failed = not run_demo(settings)
        if once:
            stop.set()
        else:
            out.print("Ctrl-C (or SIGTERM) drains in-flight work and stops everything.")
    finally:
        while runner.is_alive():
            runner.join(0.5)
    if supervisor.undrained:
        err.print(
            f"[red]not drained within {drain_s:g} s, killed:[/] {', '.join(supervisor.undrained)}"
            " (their unfinished requests are redone when DSPex runs again)"
        )
    return failed or bool(supervisor.undrained)


def agent_commands(
    settings: Settings, settings_file: Path | None, processes: Mapping[str, int] | None = None
) -> dict[str, list[str]]:
    """One command line per agent process: router, pipeline agent, learner, metrics, sessions,
    each pool's workers, and one optimizer-job runner (``jobs-N``) beside each optimizer-pool
    worker.

    ``processes`` (workers per pool) defaults to each pool's configured ``processes``.
    """
    extra = ["--settings", str(settings_file)] if settings_file else []
    base = [sys.executable, "-m", "dspex.agents"]
    commands = {
        name: [*base, name, *extra] for name in ("router", "learner", "metrics", "sessions")
    }
    commands["router"] = [*base, "router", "--instance-id", "1", *extra]  # quick restarts
    commands["pipeline"] = [*base, "pipeline", "--instance-id", "1", *extra]
    for pool in POOLS:
        count = getattr(settings.pools, pool).processes if processes is None else processes[pool]
        for n in range(count):
            instance = ["--instance-id", str(n + 1)]  # static membership: quick restarts
            commands[f"{pool}-{n + 1}"] = [*base, "worker", "--pool", pool, *instance, *extra]
            if pool == "optimizer":  # each optimizer process also runs optimizer jobs
                commands[f"jobs-{n + 1}"] = [*base, "jobs", *extra]
    return commands


def follow_pool_hints(
    settings: Settings, settings_file: Path | None, supervisor: Supervisor, stop: threading.Event
) -> None:
    """Resize the pools to the learning agent's hints (within each pool's bounds) until ``stop``."""
    follower = HintFollower(settings)
    follower.start()
    current = desired_processes({}, settings.pools)
    try:
        while not stop.wait(settings.learner.hints_check_s):
            hints = follower.hints()
            desired = desired_processes(hints, settings.pools)
            if desired == current:
                continue
            changes = ", ".join(
                f"{pool} {current[pool]} -> {desired[pool]}"
                for pool in POOLS
                if desired[pool] != current[pool]
            )
            err.print(f"[yellow]scaling pools[/] {changes} (learning agent hints {hints})")
            supervisor.set_children(agent_commands(settings, settings_file, desired))
            current = desired
    finally:
        follower.stop()


def run_demo(settings: Settings) -> bool:
    """Stream one question through router and gpu pool (the local model); True when answered."""
    out.print(f"\n[bold]demo[/] gpu pool, local model, streamed: {DEMO_QUESTION}")
    try:
        with Client(settings) as client:
            program = Program.inline("question -> answer")
            chunks = client.stream(
                program, {"question": DEMO_QUESTION}, pool_hint="gpu", deadline_s=180, cache=False
            )
            for chunk in chunks:
                if chunk.seq == 0:
                    out.print("[bold]answer:[/] ", end="")
                out.print(chunk.delta, end="", highlight=False)
                if chunk.final:
                    out.print(f"\n[dim]status={chunk.status} pool={chunk.pool}[/]")
                    return chunk.status == "ok"
    except DSPexError as exc:
        err.print(f"\n[red]demo failed:[/] {exc}")
    return False


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def _handler(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    return stop
