"""The DSPy module types a program can name, their whitelisted configs and construction.

A module config is a JSON object; only the keys listed here are accepted, so a config
can never pass LM connection settings (``api_base``, ``api_key``) into a predictor.
BestOfN and Refine need a reward function: programs name one from :data:`REWARDS`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import dspy

from dspex.streams.errors import InvalidRequest, ProgramError

MODULE_TYPES: frozenset[str] = frozenset(
    {"Predict", "ChainOfThought", "ReAct", "BestOfN", "Refine"}
)

_FIELD = "module_config_json"
_LM_KEYS: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "max_tokens": (int, 1, 100_000),
}
_ALLOWED: dict[str, dict[str, tuple[type, float, float]]] = {
    "Predict": _LM_KEYS,
    "ChainOfThought": _LM_KEYS,
    "ReAct": {"max_iters": (int, 1, 50)},
    "BestOfN": {"N": (int, 1, 16), "threshold": (float, -1e9, 1e9), "fail_count": (int, 0, 16)},
    "Refine": {"N": (int, 1, 16), "threshold": (float, -1e9, 1e9), "fail_count": (int, 0, 16)},
}
_CHOICES: dict[str, set[str]] = {"module": {"Predict", "ChainOfThought"}, "reward": {"nonempty"}}


def nonempty(args: dict[str, Any], pred: dspy.Prediction) -> float:
    """Reward 1.0 when every output field of the prediction is non-empty, else 0.0."""
    values = [value for key, value in pred.items() if key != "reasoning"]
    return 1.0 if values and all(value not in (None, "", [], {}) for value in values) else 0.0


REWARDS: dict[str, Callable[[dict[str, Any], dspy.Prediction], float]] = {"nonempty": nonempty}


def parse_module_config(module_type: str, config_json: str) -> dict[str, Any]:
    """The decoded, whitelisted config; ``InvalidRequest(field="module_config_json")`` otherwise."""
    try:
        config = json.loads(config_json or "{}", parse_constant=_refuse)
    except ValueError as exc:
        raise InvalidRequest(_FIELD, f"invalid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidRequest(_FIELD, "must be a JSON object")
    allowed = _ALLOWED.get(module_type, {})
    choices = _CHOICES if module_type in ("BestOfN", "Refine") else {}
    for key, value in config.items():
        if key in allowed:
            _check_number(key, value, *allowed[key])
        elif key in choices:
            _check_choice(key, value, choices[key])
        else:
            names = ", ".join(sorted([*allowed, *choices])) or "none"
            raise InvalidRequest(
                _FIELD, f"unknown key {key!r} for {module_type} (allowed: {names})"
            )
    return config


def _refuse(token: str) -> Any:
    raise ValueError(f"{token} is not allowed")


def _check_number(key: str, value: Any, kind: type, low: float, high: float) -> None:
    ok_type = isinstance(value, int | float) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise InvalidRequest(_FIELD, f"{key} must be a{'n integer' if kind is int else ' number'}")
    if not low <= value <= high:
        raise InvalidRequest(_FIELD, f"{key} must be between {low:g} and {high:g}")


def _check_choice(key: str, value: Any, options: set[str]) -> None:
    if value not in options:
        raise InvalidRequest(_FIELD, f"{key} must be one of {sorted(options)}")


def construct(
    module_type: str,
    signature: type[dspy.Signature],
    config: Mapping[str, Any],
    tools: list[dspy.Tool],
) -> dspy.Module:
    """A fresh module of ``module_type`` (which the caller has checked is known)."""
    if module_type == "Predict":
        return dspy.Predict(signature, **config)
    if module_type == "ChainOfThought":
        return dspy.ChainOfThought(signature, **config)
    if module_type == "ReAct":
        return dspy.ReAct(signature, tools=tools, max_iters=config.get("max_iters", 5))
    inner_type = config.get("module", "Predict")
    inner = dspy.Predict(signature) if inner_type == "Predict" else dspy.ChainOfThought(signature)
    cls: type[dspy.Module] = AsyncBestOfN if module_type == "BestOfN" else PerCallRefine
    return cls(
        module=inner,
        N=config.get("N", 3),
        reward_fn=REWARDS[config.get("reward", "nonempty")],
        threshold=config.get("threshold", 1.0),
        fail_count=config.get("fail_count"),
    )


class AsyncBestOfN(dspy.BestOfN):  # type: ignore[misc]
    """``dspy.BestOfN`` with a native ``aforward`` (DSPy 3.4 has none) and no shared state.

    DSPy's BestOfN decrements ``self.fail_count`` on failures, which would leak across
    requests sharing a cached module; here the failure budget is per call. Each attempt
    runs under its own LM copy (``rollout_id``, ``temperature=1.0``) as DSPy's does.
    """

    async def aforward(self, **kwargs: Any) -> dspy.Prediction:
        lm = self.module.get_lm() or dspy.settings.lm
        start = lm.kwargs.get("rollout_id", 0) or 0
        best: tuple[float, Any, list[Any]] | None = None
        failures = 0
        for idx in range(self.N):
            try:
                reward, pred, trace = await self._attempt(
                    lm.copy(rollout_id=start + idx, temperature=1.0), kwargs
                )
            except dspy.LMError:
                raise
            except Exception:
                failures += 1
                if failures > self.fail_count:
                    raise
                continue
            if best is None or reward > best[0]:
                best = (reward, pred, trace)
            if reward >= self.threshold:
                break
        if best is None:
            raise ProgramError(f"BestOfN: all {self.N} attempts failed")
        if dspy.settings.trace is not None:
            dspy.settings.trace.extend(best[2])
        return best[1]

    async def _attempt(
        self, lm: dspy.BaseLM, kwargs: dict[str, Any]
    ) -> tuple[float, Any, list[Any]]:
        with dspy.context(lm=lm, trace=[]):
            pred = await self.module.acall(**kwargs)
            trace = list(dspy.settings.trace)
            return float(self.reward_fn(kwargs, pred)), pred, trace


class PerCallRefine(dspy.Refine):  # type: ignore[misc]
    """``dspy.Refine`` run on a shallow copy per call, so its failure budget is per call.

    Refine has no async path in DSPy 3.4; :func:`dspex.agents.runtime.runner.run` runs it in DSPy's
    worker threads (``dspy.asyncify``), which carry the caller's ``dspy.context``.
    """

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        return dspy.Refine.forward(copy.copy(self), **kwargs)
