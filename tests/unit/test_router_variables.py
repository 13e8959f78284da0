"""Shared variables in the router without a broker: precedence, model and module steering."""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

from dspex.agents.plumbing.catalog import ProgramCatalog, RoutingCatalog
from dspex.agents.plumbing.messages import Consumed
from dspex.agents.router.cache import ResultCache
from dspex.agents.router.router import RouterHandler
from dspex.agents.router.routing import ProgramsResolver, RouteChooser
from dspex.agents.router.variables import SharedVariables
from dspex.streams.serde import make_serde
from dspex.streams.settings import LMBackend, LMSettings, Settings
from dspex.streams.variables import new_update, scope_ref_for, variable_key

NOW_MS = 1_800_000_000_000
SETTINGS = Settings(
    lm=LMSettings(
        backends={
            "echo": LMBackend(model="dspex/echo"),
            "echo2": LMBackend(model="dspex/echo"),
            "hot": LMBackend(model="openai/gpt-4o-mini", temperature=0.7),
        },
        default_variant="echo",
        pool_variants={},
    )
)
SERDE = make_serde(SETTINGS)


class Router:
    """A RouterHandler with a registered program ``qa`` and a variable store."""

    def __init__(self, module_type: str = "BestOfN", config: str = '{"N": 2}') -> None:
        self.variables = SharedVariables(SETTINGS.lm)
        self.programs = ProgramCatalog()
        self.routing = RoutingCatalog()
        self.programs.apply(
            "qa",
            {
                "program_id": "qa",
                "version": 1,
                "signature": "question -> answer",
                "module_type": module_type,
                "module_config_json": config,
                "state_json": "{}",
                "tools": [],
            },
        )
        self.handler = RouterHandler(
            SETTINGS,
            SERDE,
            programs=self.programs,
            routing=self.routing,
            resolver=ProgramsResolver(),
            cache=ResultCache(),
            chooser=RouteChooser(SETTINGS.lm, "general", random.Random(3)),
            clock=lambda: NOW_MS / 1000,
            variables=self.variables,
        )

    def set(self, name: str, value: Any, var_type: str = "float", **where: Any) -> None:
        program, module = where.pop("program", None), where.pop("module", None)
        scope = "module" if module else "program" if program else "global"
        ref = scope_ref_for(scope, program, module)
        key = variable_key(name, scope, ref)
        record = new_update(
            name,
            value,
            var_type=var_type,
            scope=scope,
            scope_ref=ref,
            previous=self.variables.store.get(key),
            constraints=where,
        )
        assert self.variables.apply(key, record) is None

    def forward(self, **fields: Any) -> dict[str, Any]:
        out = self.handler.handle_request(_incoming(_request(**fields)))
        record: dict[str, Any] = SERDE.decode(out[0].value, topic="t").record
        return record


def _request(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "created_at": NOW_MS,
        "program_id": "qa",
        "inputs": {"question": json.dumps("What is 2+2?")},
    }
    return {**base, **fields}


def _incoming(record: dict[str, Any]) -> Consumed:
    value = SERDE.encode("Request", record, topic="t")
    return Consumed("dspex.requests", 0, 7, b"key", value, (), NOW_MS)


def test_store_variables_reach_the_pool_record_with_precedence() -> None:
    router = Router("Predict", "{}")
    router.set("temperature", 0.7)
    router.set("temperature", 0.2, program="qa")
    router.set("max_tokens", 64, "int")
    forwarded = router.forward()
    assert forwarded["variables"] == {"temperature": "0.2", "max_tokens": "64"}
    other = router.forward(program_id=None, signature="question -> answer")
    assert other["variables"] == {"temperature": "0.7", "max_tokens": "64"}
    own = router.forward(variables={"temperature": "0.0"})
    assert own["variables"]["temperature"] == "0.0"


def test_a_changed_variable_changes_the_next_request_and_its_cache_key() -> None:
    router = Router("Predict", "{}")
    router.set("temperature", 0.0, program="qa")
    first = router.forward()
    router.set("temperature", 0.0, program="qa", max=1)  # same value: same key
    assert router.forward()["route"]["cache_key"] == first["route"]["cache_key"]
    router.set("seed", 1, "int")
    second = router.forward()
    assert first["route"]["cache_key"] and second["route"]["cache_key"]
    assert first["route"]["cache_key"] != second["route"]["cache_key"]
    router.set("temperature", 0.5, program="qa")
    third = router.forward()
    assert third["variables"]["temperature"] == "0.5" and third["route"]["cache_key"] is None


def test_module_variable_sets_the_module_type_and_drops_its_config() -> None:
    router = Router("BestOfN", '{"N": 2}')
    assert router.forward()["module_type"] == "BestOfN"
    router.set("module", "ChainOfThought", "module", program="qa")
    forwarded = router.forward()
    assert (forwarded["module_type"], forwarded["module_config_json"]) == ("ChainOfThought", "{}")
    explicit = router.forward(module_type="Predict", module_config_json="{}")
    assert explicit["module_type"] == "Predict"
    via_request = router.forward(variables={"module": '"Predict"'})
    assert via_request["module_type"] == "Predict"


def test_module_scope_applies_to_the_module_type_the_program_runs_as() -> None:
    router = Router("Predict", "{}")
    router.set("temperature", 0.9, program="qa", module="ChainOfThought")
    assert "temperature" not in router.forward()["variables"]
    router.set("module", "ChainOfThought", "module", program="qa")
    assert router.forward()["variables"]["temperature"] == "0.9"


def test_a_bad_module_variable_in_a_request_is_refused_naming_it() -> None:
    router = Router()
    out = router.handler.handle_request(_incoming(_request(variables={"module": '"Magic"'})))
    response = SERDE.decode(out[0].value, topic="t").record
    assert response["status"] == "error" and response["error"]["field"] == "variables.module"


def test_model_variable_naming_a_backend_pins_the_variant() -> None:
    router = Router("Predict", "{}")
    router.set("model", "hot", "choice", choices=["echo", "hot"])
    route = router.forward()["route"]
    assert (route["variant"], route["model"], route["reason"]) == (
        "hot",
        "openai/gpt-4o-mini",
        "variable",
    )
    assert router.forward(variables={"model": '"echo2"'})["route"]["variant"] == "echo2"
    unknown = router.forward(variables={"model": '"gpt-9"'})["route"]
    assert (unknown["variant"], unknown["reason"]) == ("echo", "static")


def test_when_conditions_see_the_routed_variant_as_model() -> None:
    router = Router("Predict", "{}")
    router.set("top_p", 0.5, when={"model": ["hot"]})
    assert "top_p" not in router.forward()["variables"]
    assert router.forward(variables={"model": '"hot"'})["variables"]["top_p"] == "0.5"
    router.set("model", "hot", "string")
    assert router.forward()["variables"]["top_p"] == "0.5"


def test_refused_update_keeps_the_last_good_value() -> None:
    router = Router("Predict", "{}")
    router.set("temperature", 0.3, program="qa", min=0, max=1)
    key = variable_key("temperature", "program", "qa")
    held = router.variables.store.get(key)
    assert held is not None
    error = router.variables.apply(key, {**held, "version": 9, "value_json": "5"})
    assert error is not None and error.field == "value_json"
    assert router.forward()["variables"]["temperature"] == "0.3"
