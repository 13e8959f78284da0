"""Programs as data: specs from records, validation, building DSPy modules, running them.

A program is a signature string, a module type (built in, or a deployed module the
operator allowlisted: :mod:`dspex.agents.runtime.modules`), optional DSPy JSON state, a
JSON module config, tool names and an adapter name. Nothing from a request or program
version is pickled, eval'd or imported: :func:`validate` checks a spec against a
whitelist, :class:`ProgramBuilder` constructs the module from it, and DSPy JSON state
is applied through
:func:`dspex.agents.runtime.state.apply_state`, which never lets a version set an LM.
Running (:func:`run`) lives in :mod:`dspex.agents.runtime.runner` and is re-exported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import dspy

from dspex.agents.runtime.modules import (
    MODULE_TYPES,
    DeployedModules,
    construct,
    parse_module_config,
)
from dspex.agents.runtime.runner import RunResult, run
from dspex.agents.runtime.signatures import decode_inputs, parse_signature
from dspex.agents.runtime.state import apply_state
from dspex.agents.runtime.tools import ToolRegistry
from dspex.streams.errors import DSPexError, InvalidRequest, ProgramError
from dspex.streams.programs import check_adapter, check_module_type

__all__ = [
    "MODULE_TYPES",
    "ProgramBuilder",
    "ProgramSpec",
    "RunResult",
    "parse_signature",
    "run",
    "spec_from_request",
    "spec_from_version",
    "validate",
]

_EMPTY_STATES = (None, "", "{}")


@dataclass(frozen=True)
class ProgramSpec:
    """Everything needed to build one program; ``program_id``/``version`` only label it."""

    signature: str
    module_type: str = "Predict"
    state_json: str | None = None
    module_config_json: str = "{}"
    tools: tuple[str, ...] = ()
    program_id: str | None = None
    version: int | None = None
    adapter: str | None = None
    """The DSPy adapter its LM calls use (``dspex.streams.programs.ADAPTERS``); None: auto."""

    def key(self) -> str:
        """Stable sha256 of the module's definition (not id, version or adapter), for caches."""
        state = None if self.state_json in _EMPTY_STATES else self.state_json
        definition = [self.signature, self.module_type, state, self.module_config_json, self.tools]
        return hashlib.sha256(json.dumps(definition).encode("utf-8")).hexdigest()


def spec_from_version(record: Mapping[str, Any]) -> ProgramSpec:
    """The spec of a ProgramVersion record (schemas/ProgramVersion.avsc)."""
    state = record.get("state_json")
    return ProgramSpec(
        signature=record["signature"],
        module_type=record.get("module_type") or "Predict",
        state_json=None if state in _EMPTY_STATES else state,
        module_config_json=record.get("module_config_json") or "{}",
        tools=tuple(record.get("tools") or ()),
        program_id=record.get("program_id"),
        version=record.get("version"),
        adapter=record.get("adapter"),
    )


def spec_from_request(record: Mapping[str, Any], registered: ProgramSpec | None) -> ProgramSpec:
    """The spec a Request record (schemas/Request.avsc) asks to run.

    A registered program (``program_id`` set; ``registered`` is its resolved version,
    ``None`` when unknown) with the request's ``module_type``/``module_config_json``
    overrides, or an inline ``signature``.
    """
    request_id = record.get("request_id")
    program_id = record.get("program_id")
    if program_id is not None:
        if registered is None:
            version = record.get("program_version")
            which = f" version {version}" if version is not None else ""
            raise InvalidRequest(
                "program_id", f"unknown program {program_id!r}{which}", request_id=request_id
            )
        return dataclasses.replace(
            registered,
            module_type=record.get("module_type") or registered.module_type,
            module_config_json=record.get("module_config_json") or registered.module_config_json,
            adapter=record.get("adapter") or registered.adapter,
        )
    return _inline_spec(record, request_id)


def _inline_spec(record: Mapping[str, Any], request_id: str | None) -> ProgramSpec:
    signature = record.get("signature")
    if not signature:
        raise InvalidRequest(
            "signature", "either program_id or signature is required", request_id=request_id
        )
    state = record.get("state_json")
    return ProgramSpec(
        signature=signature,
        module_type=record.get("module_type") or "Predict",
        state_json=None if state in _EMPTY_STATES else state,
        module_config_json=record.get("module_config_json") or "{}",
        tools=tuple(record.get("tools") or ()),
        adapter=record.get("adapter"),
    )


def validate(
    spec: ProgramSpec,
    inputs_json: Mapping[str, str],
    *,
    tools: ToolRegistry | Collection[str],
    modules: DeployedModules | Collection[str] = (),
) -> dict[str, Any]:
    """Check a spec and its JSON inputs without building anything; return decoded inputs.

    ``tools`` and ``modules`` are the registered tools and deployed modules (or just
    their names: a router imports neither). Raises ``InvalidRequest`` naming the field:
    ``module_type``, ``module_config_json``, ``tools``, ``adapter``, ``signature`` or
    ``inputs.<name>``.
    """
    deployed = modules.names() if isinstance(modules, DeployedModules) else frozenset(modules)
    check_module_type(spec.module_type, deployed)
    if isinstance(modules, DeployedModules) and spec.module_type in modules:
        modules.config(spec.module_type, spec.module_config_json)
    else:
        parse_module_config(spec.module_type, spec.module_config_json, deployed=deployed)
    _check_tools(spec, tools)
    check_adapter(spec.adapter)
    signature = parse_signature(spec.signature)
    _check_reserved(spec.module_type, signature)
    return decode_inputs(signature, dict(inputs_json))


def _check_tools(spec: ProgramSpec, tools: ToolRegistry | Collection[str]) -> None:
    names = tools.names() if isinstance(tools, ToolRegistry) else frozenset(tools)
    unknown = [name for name in spec.tools if name not in names]
    if unknown:
        raise InvalidRequest("tools", f"unknown tool(s) {unknown} (registered: {sorted(names)})")
    if spec.module_type == "ReAct" and not spec.tools:
        raise InvalidRequest("tools", "ReAct needs at least one tool")


_RESERVED = frozenset(
    {"reasoning", "trajectory", "next_thought", "next_tool_name", "next_tool_args"}
)


def _check_reserved(module_type: str, signature: type[dspy.Signature]) -> None:
    if module_type == "Predict" or module_type not in MODULE_TYPES:
        return  # a deployed module's own predictors are its author's business
    clash = sorted(_RESERVED & set(signature.fields))
    if clash:
        raise InvalidRequest("signature", f"field {clash[0]!r} is reserved by {module_type}")


class ProgramBuilder:
    """Builds DSPy modules from specs, cached by :meth:`ProgramSpec.key` (bounded LRU).

    Cached modules are shared by concurrent runs: they hold no per-call state
    (predictors carry no LM; the LM comes from ``dspy.context`` in :func:`run`).
    """

    def __init__(
        self,
        tools: ToolRegistry,
        *,
        modules: DeployedModules | None = None,
        max_size: int = 256,
    ) -> None:
        self._tools = tools
        self._modules = modules or DeployedModules()
        self._max_size = max_size
        self._cache: OrderedDict[str, dspy.Module] = OrderedDict()
        self._lock = threading.Lock()

    def build(self, spec: ProgramSpec) -> dspy.Module:
        """The module for ``spec``; ``ProgramError`` when it cannot be built."""
        key = spec.key()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        module = _guarded(lambda: self._construct(spec), spec)
        with self._lock:
            self._cache[key] = module
            while len(self._cache) > self._max_size:
                self._cache.popitem(last=False)
        return module

    def _construct(self, spec: ProgramSpec) -> dspy.Module:
        _check_tools(spec, self._tools)
        signature = parse_signature(spec.signature)
        tools = self._tools.dspy_tools(spec.tools)
        if spec.module_type in self._modules:
            config = self._modules.config(spec.module_type, spec.module_config_json)
            module = self._modules.construct(spec.module_type, signature, config, tools)
        elif spec.module_type in MODULE_TYPES:
            config = parse_module_config(spec.module_type, spec.module_config_json)
            module = construct(spec.module_type, signature, config, tools)
        else:
            raise ProgramError(f"unknown module type {spec.module_type!r} (not deployed here)")
        apply_state(module, spec.state_json)
        return module


def _guarded(factory: Callable[[], dspy.Module], spec: ProgramSpec) -> dspy.Module:
    where = f"program {spec.program_id or 'inline'} v{spec.version}: " if spec.program_id else ""
    try:
        return factory()
    except ProgramError:
        raise
    except DSPexError as exc:
        raise ProgramError(f"{where}{exc}") from exc
    except Exception as exc:  # DSPy raises plain ValueError/TypeError/KeyError here
        raise ProgramError(f"{where}cannot build {spec.module_type}: {exc}") from exc
