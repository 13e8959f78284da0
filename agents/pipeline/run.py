"""One pipeline run as a state machine, free of Kafka: given what came back, what to send next.

:class:`Run` holds a run's :class:`~dspex.streams.pipelines.plan.Plan`, its Request and
its state (written as a ``PipelineRun`` by :mod:`dspex.agents.pipeline.answers`).
:meth:`Run.advance` starts every stage whose inputs are ready (skipping those whose
``when`` is false or whose inputs a skipped stage never produced), issues map items up
to ``map_concurrency`` and finishes the run once every stage is done; :meth:`Run.answer`
takes a stage's final Response.
Each change appends a ``StageStatus`` event: the progress chunk with seq ``i`` carries
event ``i``, so a resumed run numbers its chunks exactly as before.

Stage executions ("slots") are keyed ``<stage>`` or ``<stage>/<item>``; their request
ids are ``uuid5(run_id/stage/item)``, so a re-sent stage request is the same request.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dspex.agents.plumbing.sessionstate import PIPELINE_META
from dspex.schemas import records
from dspex.schemas.records import Record
from dspex.schemas.times import to_ms
from dspex.streams.pipelines.plan import Plan, StagePlan
from dspex.streams.pipelines.refs import Ref, resolve

NAMESPACE = uuid.UUID("6f2d1c8e-5b0a-4f7e-9c3d-2a1b0e9f8d7c")
"""uuid5 namespace of stage request ids (fixed: a stage's id must not change across restarts)."""
TERMINAL = frozenset({"finished", "failed", "skipped", "defaulted", "cancelled"})
META = PIPELINE_META


def stage_request_id(run_id: str, stage: str, item: int | None) -> str:
    """The request id of one stage execution of a run: the same every time it is derived."""
    return str(uuid.uuid5(NAMESPACE, f"{run_id}/{stage}/{'' if item is None else item}"))


def slot_key(stage: str, item: int | None) -> str:
    """``stage`` or ``stage/item``."""
    return stage if item is None else f"{stage}/{item}"


class _Missing(Exception):
    """A reference whose value a skipped or defaulted stage never produced."""


@dataclass(frozen=True)
class Issue:
    """A stage request to send: its slot and the Request record."""

    key: str
    request_id: str
    request: Record


@dataclass
class Run:
    """A run's plan, Request and state; see the module docstring."""

    plan: Plan
    request: Record
    inputs: Mapping[str, Any]
    replies_topic: str
    status: str = "running"
    partial: bool = False
    events: list[Record] = field(default_factory=list)
    delivered: int = 0
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    issued: set[str] = field(default_factory=set)
    outputs: dict[str, str] | None = None
    error: Record | None = None
    states: dict[str, str] = field(default_factory=dict)
    started: dict[str, int] = field(default_factory=dict)

    @classmethod
    def resume(cls, plan: Plan, request: Record, replies_topic: str, state: Record | None) -> Run:
        """The run ``request`` asks for, from its stored ``state`` when there is one."""
        inputs = {k: json.loads(v) for k, v in (request.get("inputs") or {}).items()}
        run = cls(plan, request, inputs, replies_topic)
        if state is not None:
            run.status, run.partial = state["status"], bool(state["partial"])
            run.delivered, run.issued = int(state["delivered"]), set(state["issued"])
            run.results = {k: json.loads(v) for k, v in state["results"].items()}
            run.outputs, run.error = state.get("outputs"), state.get("error")
            for event in state["events"]:
                run.events.append(dict(event))
                run._note(event)
        return run

    # -- identity ------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return str(self.request["request_id"])

    @property
    def deadline_ms(self) -> int | None:
        return to_ms(self.request.get("deadline_at"))

    @property
    def done(self) -> bool:
        return self.status != "running"

    # -- what is in flight ---------------------------------------------------------------

    def running(self) -> list[str]:
        """Slots started and not answered yet (``stage`` or ``stage/item``)."""
        return [
            key
            for key, state in self.states.items()
            if state == "started"
            and not self._is_map_stage(key)
            and self.states.get(key.partition("/")[0]) == "started"
        ]

    def request_id(self, key: str) -> str:
        """The stage request id of slot ``key``."""
        name, _, item = key.partition("/")
        return stage_request_id(self.run_id, name, int(item) if item else None)

    def issue(self, key: str, now_ms: int) -> Issue:
        """The stage request of a running slot (the same request id every time)."""
        name, _, item_text = key.partition("/")
        item = int(item_text) if item_text else None
        stage = self.plan.stage(name)
        values = self._stage_inputs(stage, item)
        request_id = stage_request_id(self.run_id, name, item)
        metadata = {
            k: v
            for k, v in (self.request.get("metadata") or {}).items()
            if not k.startswith("dspex.")
        }
        metadata |= {
            f"{META}run": self.run_id,
            f"{META}id": self.plan.pipeline_id,
            f"{META}stage": name,
            f"{META}item": "" if item is None else str(item),
        }
        record = records.request(
            request_id=request_id,
            created_at=now_ms,
            deadline_at=self.request.get("deadline_at"),
            session_id=self.request.get("session_id"),  # History inputs read the session
            program_id=stage.program_id,
            program_version=stage.program_version,
            signature=stage.signature,
            module_type=stage.module_type,
            inputs={k: json.dumps(v) for k, v in values.items()},
            variables=self.request.get("variables") or {},
            pool_hint=stage.pool_hint or self.request.get("pool_hint"),
            cache=bool(self.request.get("cache", True)),
            reply_topic=self.replies_topic,
            metadata=metadata,
        )
        return Issue(key, request_id, record)

    # -- advancing -----------------------------------------------------------------------

    def advance(self, now_ms: int) -> list[Issue]:
        """Start what is ready, issue map items, finish the run when every stage is done."""
        issues: list[Issue] = []
        changed = True
        while changed and not self.done:
            changed = False
            for name in self.plan.order():
                stage = self.plan.stage(name)
                state = self.states.get(name)
                if state is None and self._ready(stage):
                    issues += self._start(stage, now_ms)
                    changed = True
                elif state == "started" and stage.map_over is not None:
                    more = self._more_items(stage, now_ms)
                    issues += more
                    changed = changed or bool(more)
            if not self.done and all(self.states.get(s.name) in TERMINAL for s in self.plan.stages):
                self._finish()
        return issues

    def answer(self, key: str, response: Mapping[str, Any], now_ms: int) -> bool:
        """Take a slot's final Response; False when the slot is not waiting for one."""
        if self.done or key not in self.running():
            return False
        name, _, item_text = key.partition("/")
        item = int(item_text) if item_text else None
        stage = self.plan.stage(name)
        pool = response.get("pool")
        if response.get("status") == "ok":
            outputs = {k: json.loads(v) for k, v in (response.get("outputs") or {}).items()}
            self.results[key] = outputs
            if item is not None:
                self._event(name, item, "finished", now_ms, pool=pool)
            if item is None or self._all_items_finished(stage):
                self._stage_finished(stage, now_ms, pool)
            return True
        error = dict(response.get("error") or {})
        text = f"{error.get('error_class', 'Error')}: {error.get('message', 'no details')}"
        self._event(name, item, "failed", now_ms, pool=pool, error=text)
        self._stage_failed(stage, item, now_ms, response, text)
        return True

    def expire(self, now_ms: int) -> None:
        """The run's deadline passed: fail it naming the stages still running."""
        running = sorted({key.partition("/")[0] for key in self.running()})
        where = running[0] if running else None
        self._fail(
            records.error_info(
                error_class="Timeout",
                message=f"the run's deadline passed while stage(s) {', '.join(running) or '-'} ran",
                stage=where,
                retryable=True,
            ),
            "timeout",
            now_ms,
        )

    # -- internals -----------------------------------------------------------------------

    def _env(self) -> dict[str, dict[str, Any]]:
        return {
            name: self.results[name]
            for name in self.results
            if "/" not in name and self.states.get(name) in TERMINAL
        }

    def _value(self, ref: Ref, item: Any = None) -> Any:
        try:
            return resolve(ref, self.inputs, self._env(), item)
        except KeyError:
            raise _Missing(str(ref)) from None

    def _ready(self, stage: StagePlan) -> bool:
        return all(self.states.get(name) in TERMINAL for name in stage.after())

    def _items(self, stage: StagePlan) -> list[Any]:
        if stage.map_over is None:
            raise TypeError(f"stage {stage.name!r} has no map_over")
        value = self._value(stage.map_over)
        if not isinstance(value, list):
            raise TypeError(f"map_over {stage.map_over} is {type(value).__name__}, not a list")
        return value

    def _stage_inputs(self, stage: StagePlan, item: int | None) -> dict[str, Any]:
        current = None if item is None else self._items(stage)[item]
        return {name: self._value(ref, current) for name, ref in stage.inputs.items()}

    def _start(self, stage: StagePlan, now_ms: int) -> list[Issue]:
        try:
            if stage.when is not None and not stage.when.holds(self._value(stage.when.ref)):
                self._skip(stage, now_ms, f"when: {stage.when.ref} is not one of the values")
                return []
            items = self._items(stage) if stage.map_over is not None else None
            if items is None:
                self._stage_inputs(stage, None)
        except _Missing as missing:
            self._skip(stage, now_ms, f"{missing} was not produced (its stage was skipped)")
            return []
        except TypeError as exc:
            text = f"InvalidRequest: {exc}"
            self._event(stage.name, None, "started", now_ms)
            self._event(stage.name, None, "failed", now_ms, error=text)
            self._stage_failed(stage, None, now_ms, {"status": "error"}, text)
            return []
        self._event(stage.name, None, "started", now_ms, items=len(items or ()))
        if items is None:
            return [self.issue(stage.name, now_ms)]
        if not items:
            self._stage_finished(stage, now_ms, None)
        return self._more_items(stage, now_ms)

    def _more_items(self, stage: StagePlan, now_ms: int) -> list[Issue]:
        count = len(self._items(stage))
        states = [self.states.get(slot_key(stage.name, i)) for i in range(count)]
        free = stage.map_concurrency - sum(state == "started" for state in states)
        issues = []
        for item, state in enumerate(states):
            if free <= 0:
                break
            if state is None:
                self._event(stage.name, item, "started", now_ms)
                issues.append(self.issue(slot_key(stage.name, item), now_ms))
                free -= 1
        return issues

    def _all_items_finished(self, stage: StagePlan) -> bool:
        count = len(self._items(stage))
        return all(self.states.get(slot_key(stage.name, i)) == "finished" for i in range(count))

    def _stage_finished(self, stage: StagePlan, now_ms: int, pool: str | None) -> None:
        if stage.map_over is not None:
            count = len(self._items(stage))
            outputs = [self.results.get(slot_key(stage.name, i), {}) for i in range(count)]
            fields = sorted({name for each in outputs for name in each})
            self.results[stage.name] = {f: [each.get(f) for each in outputs] for f in fields}
        else:
            self.results.setdefault(stage.name, {})
        self._event(stage.name, None, "finished", now_ms, pool=pool)

    def _stage_failed(
        self,
        stage: StagePlan,
        item: int | None,
        now_ms: int,
        response: Mapping[str, Any],
        text: str,
    ) -> None:
        where = f"stage {stage.name!r}" + ("" if item is None else f" item {item}")
        if item is not None:
            self._event(stage.name, None, "failed", now_ms, error=f"{where}: {text}")
        if stage.optional:
            self.results[stage.name] = dict(stage.defaults)
            self.partial = True
            self._event(stage.name, None, "defaulted", now_ms, error=f"{where}: {text}")
            return
        error = dict(response.get("error") or {})
        info = records.error_info(
            error_class=str(error.get("error_class") or "StageFailed"),
            message=f"{where} failed: {error.get('message') or text}",
            field=error.get("field"),
            stage=stage.name,
            retryable=bool(error.get("retryable", False)),
        )
        status = "timeout" if response.get("status") == "timeout" else "error"
        self._fail(info, status, now_ms)

    def _skip(self, stage: StagePlan, now_ms: int, why: str) -> None:
        self.results[stage.name] = dict(stage.defaults)
        self._event(stage.name, None, "skipped", now_ms, error=why)

    def _fail(self, error: Record, status: str, now_ms: int) -> None:
        for key in self.running():
            name, _, item = key.partition("/")
            self._event(name, int(item) if item else None, "cancelled", now_ms)
        self.status, self.error, self.outputs = status, error, None

    def _finish(self) -> None:
        outputs: dict[str, str] = {}
        for name, ref in self.plan.outputs.items():
            try:
                outputs[name] = json.dumps(self._value(ref))
            except _Missing:
                outputs[name] = "null"  # its stage was skipped: documented as null
        self.status, self.outputs = "ok", outputs

    def _is_map_stage(self, key: str) -> bool:
        return "/" not in key and self.plan.stage(key).map_over is not None

    def _event(
        self,
        name: str,
        item: int | None,
        state: str,
        now_ms: int,
        *,
        pool: str | None = None,
        error: str | None = None,
        items: int = 0,
    ) -> None:
        """Record a state change of a stage (``item`` None) or of one map item."""
        key = slot_key(name, item)
        started = self.started.get(key, now_ms) if state != "started" else now_ms
        event = records.stage_status(
            name=name,
            item=item,
            state=state,
            pool=pool,
            started_at=started,
            finished_at=None if state == "started" else now_ms,
            items=items,
            error=error,
        )
        self.events.append(event)
        self._note(event)

    def _note(self, event: Mapping[str, Any]) -> None:
        key = slot_key(event["name"], event.get("item"))
        self.states[key] = event["state"]
        if event["state"] == "started":
            self.started[key] = to_ms(event.get("started_at")) or 0
