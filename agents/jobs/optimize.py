"""One optimization, start to finish: score, compile with a DSPy optimizer, search variables, score.

:class:`Optimization` runs the steps of an optimizer job that need no Kafka of
their own:

1. **baseline** — the program as registered, with the variables in force for it,
   scored on the held-out examples;
2. **compile** — DSPy's optimizer (BootstrapFewShot, MIPROv2, SIMBA, GEPA) on the
   training examples, in a thread, with the compile LM in ``dspy.context``; the
   result is exported as DSPy JSON state (never pickled);
3. **search** — every combination of the searched variables' values (a full
   grid, in the order given) scored with the compiled program;
4. the best trial (ties: fewest changed variables, then grid order) is the result.

With a :class:`Checkpointer` (:mod:`dspex.agents.jobs.checkpoints`), each step's
result is saved when it is done and a restarted job skips the steps already saved
(the baseline, the compile, the trials done).

Scoring goes through an :class:`Evaluator`. In production it is
:class:`PipelineEvaluator`: every example becomes a Request through the router to
the general pool, all sent at once (``AsyncClient.submit_many``), so an
evaluation of N examples runs in parallel on the pool, not N calls in a row.
Cancellation is cooperative: a threading event checked between steps, between
trials and before every LM call of the compile (:class:`JobCancelled`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dspy
from dspy.utils.callback import BaseCallback

from dspex.agents.jobs.jobspec import JobSpec
from dspex.agents.runtime.programs import ProgramBuilder, ProgramSpec
from dspex.agents.runtime.scoring import Metric
from dspex.agents.runtime.tools import default_tools
from dspex.streams.client.client import AsyncClient, Program
from dspex.streams.errors import DSPexError, ProgramError, RetryableError

logger = logging.getLogger(__name__)

_EVAL_BATCH = 256


class JobCancelled(BaseException):
    """The job was cancelled (or its partition revoked) while it ran.

    A ``BaseException`` on purpose: DSPy's optimizers catch ``Exception`` around
    each example and would keep going.
    """


class EvaluationFailed(RetryableError):
    """No evaluation request was answered (pool or broker unavailable): retry the job later."""


@dataclass(frozen=True)
class Evaluation:
    """The mean metric over some examples; requests that failed score 0."""

    score: float
    answered: int
    failed: int
    first_error: str | None = None


@dataclass(frozen=True)
class Trial:
    """One point of the search grid and how the (compiled) program scored with it."""

    index: int
    variables: dict[str, Any]
    evaluation: Evaluation


@dataclass(frozen=True)
class Progress:
    """A progress event for the job's Response chunks and Telemetry."""

    phase: str  # "baseline" | "compile" | "search" | "resume" (from a checkpoint)
    trial: int = 0
    trials: int = 0
    score: float | None = None
    best: float | None = None
    message: str = ""


@dataclass(frozen=True)
class OptimizationResult:
    """What the optimization found; nothing is published yet."""

    base: ProgramSpec
    candidate: ProgramSpec
    compiled: bool
    score_before: float
    trials: list[Trial]
    best: Trial
    current: dict[str, Any]

    @property
    def score_after(self) -> float:
        return self.best.evaluation.score

    @property
    def improved(self) -> bool:
        return self.score_after > self.score_before

    def changed_variables(self) -> dict[str, Any]:
        """The best trial's values that differ from the values in force and that matter.

        A value matters when every trial that set the variable otherwise scored lower:
        if another value did as well (a tie), the search found nothing about it, and
        nothing is published for it.
        """
        changed = {}
        for name, value in self.best.variables.items():
            if self.current.get(name) == value:
                continue
            others = [t.evaluation.score for t in self.trials if t.variables.get(name) != value]
            if others and max(others) >= self.score_after:
                continue
            changed[name] = value
        return changed


class Evaluator(Protocol):
    """Scores a program with some variables on some examples."""

    async def evaluate(
        self, program: ProgramSpec, variables: Mapping[str, Any], examples: Sequence[dspy.Example]
    ) -> Evaluation: ...


class Checkpointer(Protocol):
    """Where a job's progress is kept between attempts (JSON-able state)."""

    def load(self) -> dict[str, Any] | None: ...

    def save(self, phase: str, state: Mapping[str, Any]) -> None: ...


class Optimization:
    """The steps of one job (see the module doc); ``run`` returns the result or raises."""

    def __init__(
        self,
        spec: JobSpec,
        base: ProgramSpec,
        evaluator: Evaluator,
        *,
        compile_lm: dspy.BaseLM,
        current: Mapping[str, Any],
        cancel: threading.Event,
        progress: Callable[[Progress], None],
        checkpoint: Checkpointer | None = None,
    ) -> None:
        self._checkpoint = checkpoint
        self._saved: dict[str, Any] = {}
        self._spec = spec
        self._base = base
        self._evaluator = evaluator
        self._lm = compile_lm
        self._current = dict(current)
        self._cancel = cancel
        self._progress = progress

    async def run(
        self, train: Sequence[dspy.Example], val: Sequence[dspy.Example]
    ) -> OptimizationResult:
        """Baseline, compile, search; :class:`JobCancelled` when cancelled on the way."""
        await self._resume()
        before = await self._baseline(val)
        candidate = self._base
        if self._spec.optimizer is not None:
            candidate = await self._compiled(train, val)
        trials = await self._search(candidate, val)
        return OptimizationResult(
            base=self._base,
            candidate=candidate,
            compiled=self._spec.optimizer is not None,
            score_before=before.score,
            trials=trials,
            best=best_trial(trials, self._current),
            current=self._current,
        )

    async def _resume(self) -> None:
        if self._checkpoint is None:
            return
        saved = await asyncio.to_thread(self._checkpoint.load)
        self._saved = saved or {}
        if self._saved:
            done = len(self._saved.get("trials", []))
            steps = "baseline" + (", compile" if "state_json" in self._saved else "")
            message = f"resumed from checkpoint: {steps}, {done} trial(s) done"
            self._progress(Progress("resume", message=message))

    async def _save(self, phase: str) -> None:
        if self._checkpoint is not None:
            await asyncio.to_thread(self._checkpoint.save, phase, self._saved)

    async def _baseline(self, val: Sequence[dspy.Example]) -> Evaluation:
        if "baseline" in self._saved:
            before = Evaluation(**self._saved["baseline"])
        else:
            before = await self._evaluate(self._base, self._current, val)
            self._saved["baseline"] = dataclasses.asdict(before)
            await self._save("baseline")
        self._progress(Progress("baseline", score=before.score, best=before.score))
        return before

    async def _compiled(
        self, train: Sequence[dspy.Example], val: Sequence[dspy.Example]
    ) -> ProgramSpec:
        if "state_json" in self._saved:
            return dataclasses.replace(self._base, state_json=self._saved["state_json"])
        self._check_cancel()
        candidate = await asyncio.to_thread(self._compile, list(train))
        candidate = await self._earned_instructions(candidate, val)
        self._saved["state_json"] = candidate.state_json
        await self._save("compile")
        return candidate

    async def _search(self, candidate: ProgramSpec, val: Sequence[dspy.Example]) -> list[Trial]:
        grid = self._spec.trials()
        trials = [
            Trial(int(t["index"]), dict(t["variables"]), Evaluation(**t["evaluation"]))
            for t in self._saved.get("trials", [])
        ]
        for index, overrides in enumerate(grid):
            if index < len(trials):
                continue
            self._check_cancel()
            evaluation = await self._evaluate(candidate, {**self._current, **overrides}, val)
            trials.append(Trial(index, overrides, evaluation))
            self._saved["trials"] = [dataclasses.asdict(t) for t in trials]
            await self._save("search")
            best = max(t.evaluation.score for t in trials)
            shown = " ".join(f"{k}={v}" for k, v in overrides.items()) or "no variables"
            self._progress(
                Progress(
                    "search",
                    trial=index + 1,
                    trials=len(grid),
                    score=evaluation.score,
                    best=best,
                    message=shown,
                )
            )
        return trials

    async def _evaluate(
        self, program: ProgramSpec, variables: Mapping[str, Any], val: Sequence[dspy.Example]
    ) -> Evaluation:
        task = asyncio.ensure_future(self._evaluator.evaluate(program, variables, val))
        while not task.done():  # evaluations are long: notice a cancellation meanwhile
            await asyncio.wait([task], timeout=0.2)
            if self._cancel.is_set():
                task.cancel()
                raise JobCancelled
        return task.result()

    def _compile(self, train: list[dspy.Example]) -> ProgramSpec:
        module = ProgramBuilder(default_tools()).build(self._base)
        watch = _Watch(self._cancel, self._progress)
        with dspy.context(lm=self._lm, callbacks=[watch]):
            optimizer, kwargs = build_optimizer(self._spec, self._lm, len(train))
            self._progress(Progress("compile", message=f"{self._spec.optimizer} started"))
            compiled = optimizer.compile(module, trainset=train, **kwargs)
        watch.report(final=True)
        return dataclasses.replace(self._base, state_json=export_state(compiled))

    async def _earned_instructions(
        self, candidate: ProgramSpec, val: Sequence[dspy.Example]
    ) -> ProgramSpec:
        """The compiled program, its proposed instructions kept only if they earn their place.

        An optimizer that proposes instructions (MIPROv2, GEPA, SIMBA) asks the LM for
        them, and a model can answer with anything (a simulation says "I do not know").
        The compiled program is scored again with the original instructions and its
        demos; the proposed instructions stay only when they score strictly higher.
        """
        original = {
            name: predictor.signature.instructions
            for name, predictor in ProgramBuilder(default_tools())
            .build(self._base)
            .named_predictors()
        }
        restored = with_instructions(candidate.state_json or "{}", original)
        if restored == candidate.state_json:
            return candidate
        plain = dataclasses.replace(candidate, state_json=restored)
        proposed = await self._evaluate(candidate, self._current, val)
        kept = await self._evaluate(plain, self._current, val)
        better = proposed.score > kept.score
        message = (
            f"proposed instructions {'kept' if better else 'dropped'}: "
            f"{proposed.score:.4f} vs {kept.score:.4f} with the original ones"
        )
        self._progress(Progress("compile", message=message))
        return candidate if better else plain

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled


def with_instructions(state_json: str, instructions: Mapping[str, str]) -> str:
    """``state_json`` with each named predictor's instructions set to ``instructions``."""
    state = json.loads(state_json)
    changed = False
    for name, text in instructions.items():
        signature = state.get(name, {}).get("signature")
        if isinstance(signature, dict) and signature.get("instructions") != text:
            signature["instructions"] = text
            changed = True
    return json.dumps(state, allow_nan=False) if changed else state_json


def best_trial(trials: Sequence[Trial], current: Mapping[str, Any]) -> Trial:
    """The highest score; ties go to the trial changing fewest variables, then the earliest."""

    def rank(trial: Trial) -> tuple[float, int, int]:
        changed = sum(current.get(k) != v for k, v in trial.variables.items())
        return (-trial.evaluation.score, changed, trial.index)

    return min(trials, key=rank)


def build_optimizer(spec: JobSpec, lm: dspy.BaseLM, train_size: int) -> tuple[Any, dict[str, Any]]:
    """The DSPy optimizer the spec names, and its compile keyword arguments.

    Call inside ``dspy.context(lm=...)``: MIPROv2 reads the configured LM when built.
    """
    init = dict(spec.init_config)
    compile_kwargs = dict(spec.compile_config)
    metric = spec.metric
    if spec.optimizer == "BootstrapFewShot":
        return dspy.BootstrapFewShot(metric=metric, **init), compile_kwargs
    if spec.optimizer == "MIPROv2":
        return dspy.MIPROv2(metric=metric, **init), compile_kwargs
    if spec.optimizer == "SIMBA":
        init.setdefault("bsize", max(1, min(32, train_size)))
        return dspy.SIMBA(metric=metric, **init), compile_kwargs
    if spec.optimizer == "GEPA":
        if not {"auto", "max_full_evals", "max_metric_calls"} & set(init):
            init["auto"] = "light"
        return dspy.GEPA(metric=gepa_metric(metric), reflection_lm=lm, **init), compile_kwargs
    raise ProgramError(f"no optimizer {spec.optimizer!r}")


def gepa_metric(metric: Metric) -> Callable[..., float]:
    """GEPA calls metrics with five arguments; DSPex's take three."""

    def scored(
        gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
    ) -> float:
        return metric(gold, pred, trace)

    return scored


def export_state(module: dspy.Module) -> str:
    """The module's DSPy JSON state keyed by predictor name, as ``runtime.state`` loads it."""
    state: dict[str, Any] = {}
    for name, predictor in module.named_predictors():
        entry = dict(predictor.dump_state())
        entry.pop("lm", None)  # a version never carries an LM (dspex.agents.runtime.state)
        entry["traces"], entry["train"] = [], []
        state[name] = entry
    try:
        return json.dumps(state, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProgramError(f"compiled state is not JSON: {exc}") from exc


class _Watch(BaseCallback):  # type: ignore[misc]
    """DSPy callback: stops the compile at the next LM call once cancelled; counts calls."""

    def __init__(self, cancel: threading.Event, progress: Callable[[Progress], None]) -> None:
        self._cancel = cancel
        self._progress = progress
        self._calls = 0
        self._lock = threading.Lock()
        self._reported = time.monotonic()

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        if self._cancel.is_set():
            raise JobCancelled

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        with self._lock:
            self._calls += 1
        if time.monotonic() - self._reported >= 1.0:
            self.report()

    def report(self, *, final: bool = False) -> None:
        self._reported = time.monotonic()
        done = "finished" if final else "running"
        self._progress(Progress("compile", message=f"compile {done}: {self._calls} LM calls"))


class PipelineEvaluator:
    """Scores programs through the real pipeline: one Request per example, all in flight at once.

    Requests carry the candidate inline (signature, module type, DSPy JSON state),
    the variables as per-request overrides, ``pool_hint`` (default general),
    ``cache=False`` and the job id in ``metadata["dspex-job"]``. A failed request
    scores 0; if none is answered and every failure is retryable (timeouts, broker
    trouble), :class:`EvaluationFailed` is raised instead of a misleading 0.
    """

    def __init__(
        self, client: AsyncClient, metric: Metric, *, pool: str, deadline_s: float, job_id: str
    ) -> None:
        self._client = client
        self._metric = metric
        self._pool = pool
        self._deadline_s = deadline_s
        self._job_id = job_id

    async def evaluate(
        self, program: ProgramSpec, variables: Mapping[str, Any], examples: Sequence[dspy.Example]
    ) -> Evaluation:
        inline = Program.inline(
            program.signature,
            program.module_type,
            state_json=program.state_json,
            module_config_json=program.module_config_json,
            tools=program.tools,
        )
        scores: list[float] = []
        errors: list[DSPexError] = []
        for start in range(0, len(examples), _EVAL_BATCH):
            batch = examples[start : start + _EVAL_BATCH]
            results = await self._client.submit_many(
                [(inline, dict(example.inputs().items())) for example in batch],
                pool_hint=self._pool,
                variables=dict(variables),
                cache=False,
                deadline_s=self._deadline_s,
                metadata={"dspex-job": self._job_id},
            )
            for example, result in zip(batch, results, strict=True):
                if isinstance(result, DSPexError):
                    errors.append(result)
                    scores.append(0.0)
                else:
                    scores.append(self._score(example, result.outputs))
        return self._summary(scores, errors)

    def _score(self, example: dspy.Example, outputs: Mapping[str, Any]) -> float:
        try:
            return float(self._metric(example, dspy.Prediction(**outputs)))
        except Exception:  # a metric that chokes on one odd output scores it 0
            logger.warning("metric failed job_id=%s", self._job_id, exc_info=True)
            return 0.0

    def _summary(self, scores: list[float], errors: list[DSPexError]) -> Evaluation:
        first = str(errors[0]) if errors else None
        if (
            scores
            and len(errors) == len(scores)
            and all(isinstance(e, RetryableError) for e in errors)
        ):
            raise EvaluationFailed(
                f"job_id={self._job_id}: no evaluation request answered: {first}"
            )
        mean = sum(scores) / len(scores) if scores else 0.0
        return Evaluation(mean, len(scores) - len(errors), len(errors), first)
