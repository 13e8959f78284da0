"""The module types a program can name: DSPy's built-ins and the operator's deployed modules.

Built-in types (``Predict``, ``ChainOfThought``, ``ReAct``, ``BestOfN``, ``Refine``)
take a whitelisted JSON config (:func:`dspex.streams.programs.parse_module_config`),
so a config can never pass LM connection settings (``api_base``, ``api_key``) into a
predictor. BestOfN and Refine need a reward function: programs name one from
:data:`REWARDS`.

*Deployed* modules are ``dspy.Module`` subclasses an operator installs with the
workers and allowlists in settings (``modules``: name -> ``package.module:Class``).
:meth:`DeployedModules.load` imports exactly those paths, once, at worker start, and
fails fast naming the one that does not import; a name read from a topic only ever
selects an already imported class (docs/modules.md).
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import dspy

from dspex.streams.errors import ConfigError, InvalidRequest, ProgramError
from dspex.streams.programs import BUILTIN_MODULES, parse_module_config

__all__ = [
    "MODULE_TYPES",
    "REWARDS",
    "DeployedModules",
    "construct",
    "import_allowlisted",
    "nonempty",
    "parse_module_config",
]

MODULE_TYPES: frozenset[str] = BUILTIN_MODULES

_CONFIG = "module_config_json"
# Parameters DSPex fills itself when a deployed module's constructor takes them.
_SIGNATURE_PARAM, _TOOLS_PARAM = "signature", "tools"


def nonempty(args: dict[str, Any], pred: dspy.Prediction) -> float:
    """Reward 1.0 when every output field of the prediction is non-empty, else 0.0."""
    values = [value for key, value in pred.items() if key != "reasoning"]
    return 1.0 if values and all(value not in (None, "", [], {}) for value in values) else 0.0


REWARDS: dict[str, Callable[[dict[str, Any], dspy.Prediction], float]] = {"nonempty": nonempty}


def import_allowlisted(where: str, path: str) -> Any:
    """The attribute ``package.module:Attribute`` names; ``ConfigError`` naming ``where``."""
    module_name, _, attribute = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except Exception as exc:  # ImportError, AttributeError, or the module's own failure
        raise ConfigError(f"{where}: cannot import {path!r}: {type(exc).__name__}: {exc}") from exc
    return found


@dataclass(frozen=True)
class DeployedModule:
    """One allowlisted module class and the config keys its constructor takes."""

    name: str
    path: str
    cls: type[dspy.Module]
    config_keys: frozenset[str]
    takes_signature: bool
    takes_tools: bool


class DeployedModules:
    """The operator's allowlisted ``dspy.Module`` classes by name (empty: none deployed)."""

    def __init__(self, modules: Mapping[str, DeployedModule] | None = None) -> None:
        self._modules = dict(modules or {})

    @classmethod
    def load(cls, allowlist: Mapping[str, str]) -> DeployedModules:
        """Import every allowlisted path now; ``ConfigError`` for one that is not a module."""
        return cls({name: _inspect(name, path) for name, path in allowlist.items()})

    def names(self) -> frozenset[str]:
        """The deployed module names."""
        return frozenset(self._modules)

    def __contains__(self, name: object) -> bool:
        return name in self._modules

    def get(self, name: str) -> DeployedModule:
        """The deployed module ``name``; ``KeyError`` when it is not deployed."""
        return self._modules[name]

    def config(self, name: str, config_json: str) -> dict[str, Any]:
        """The program's config for deployed module ``name``: only its constructor's keys."""
        module = self._modules[name]
        config = parse_module_config(name, config_json, deployed=self._modules)
        unknown = sorted(set(config) - module.config_keys)
        if unknown:
            allowed = ", ".join(sorted(module.config_keys)) or "none"
            raise InvalidRequest(
                _CONFIG, f"unknown key {unknown[0]!r} for {name} (allowed: {allowed})"
            )
        return config

    def construct(
        self,
        name: str,
        signature: type[dspy.Signature],
        config: Mapping[str, Any],
        tools: list[dspy.Tool],
    ) -> dspy.Module:
        """A fresh instance: the config as keyword arguments, plus signature/tools if taken."""
        module = self._modules[name]
        kwargs = dict(config)
        if module.takes_signature:
            kwargs[_SIGNATURE_PARAM] = signature
        if module.takes_tools:
            kwargs[_TOOLS_PARAM] = tools
        instance = module.cls(**kwargs)
        if not isinstance(instance, dspy.Module):
            raise ProgramError(f"{name}: {module.path} did not construct a dspy.Module")
        return instance


def _inspect(name: str, path: str) -> DeployedModule:
    where = f"settings modules.{name}"
    found = import_allowlisted(where, path)
    if not (isinstance(found, type) and issubclass(found, dspy.Module)):
        raise ConfigError(f"{where}: {path!r} is not a dspy.Module subclass")
    params = inspect.signature(cast(Any, found).__init__).parameters
    keys = {
        key
        for key, param in params.items()
        if key != "self" and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    }
    return DeployedModule(
        name=name,
        path=path,
        cls=found,
        config_keys=frozenset(keys - {_SIGNATURE_PARAM, _TOOLS_PARAM}),
        takes_signature=_SIGNATURE_PARAM in keys,
        takes_tools=_TOOLS_PARAM in keys,
    )


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
