"""The LiteLLM arm of the routing benchmark: ``litellm.Router`` with latency-based routing.

The same simulated backends are the deployments of one model group (``sim``),
each reached exactly as DSPex's workers reach them (``openai/<name>`` at the
simulation's ``api_base``). The router is LiteLLM's own, with
``routing_strategy="latency-based-routing"`` and its other settings at their
defaults (retries on another deployment, cooldowns), driven from this process
with the same questions and concurrency as the DSPex arms. Prompts are built
and parsed by DSPy's ChatAdapter, so every arm sends the backends the same text.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from tests.bench.routing_sim import Backend, SimFleet
from tests.bench.routing_workload import Outcome, Task, drive, tasks

MODEL_GROUP = "sim"
STRATEGY = "latency-based-routing"
DEADLINE_S = 30.0
WARM_UP_QID = 950_000


def _quiet_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
    import litellm

    litellm.suppress_debug_info = True
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return litellm


_CALLBACK_LISTS = (
    "callbacks",
    "success_callback",
    "failure_callback",
    "_async_success_callback",
    "_async_failure_callback",
)


def _forget_earlier_routers(litellm: Any) -> None:
    """Drop latency handlers of earlier Routers from LiteLLM's process-wide callback lists.

    LiteLLM registers each Router's latency handler in global lists and skips a
    second handler of the same type: a second latency-based Router in one process
    would never hear of a completed call and would choose at random.
    """
    from litellm.router_strategy.lowest_latency import LowestLatencyLoggingHandler

    for name in _CALLBACK_LISTS:
        callbacks = getattr(litellm, name, None)
        if isinstance(callbacks, list):
            stale = [c for c in callbacks if isinstance(c, LowestLatencyLoggingHandler)]
            for callback in stale:
                callbacks.remove(callback)


def make_router(fleet: SimFleet, backends: Sequence[Backend]) -> Any:
    """A fresh ``litellm.Router`` over the simulated backends (no latency history)."""
    litellm = _quiet_litellm()
    _forget_earlier_routers(litellm)
    model_list = [
        {
            "model_name": MODEL_GROUP,
            "litellm_params": {
                "model": f"openai/{b.name}",
                "api_base": fleet.api_base(b.name),
                "api_key": "sim",
            },
            "model_info": {"id": b.name},
        }
        for b in backends
    ]
    return litellm.Router(model_list=model_list, routing_strategy=STRATEGY)


def router_settings(router: Any) -> dict[str, Any]:
    """The router's settings that shape the comparison (recorded in the report)."""
    return {
        "routing_strategy": STRATEGY,
        "num_retries": router.num_retries,
        "allowed_fails": router.allowed_fails,
        "cooldown_time_s": router.cooldown_time,
        "routing_strategy_args": router.routing_strategy_args,
        "litellm": _version(),
    }


def _version() -> str:
    from importlib.metadata import version

    return version("litellm")


class _Prompts:
    """DSPy's ChatAdapter: the prompt the DSPex worker sends, and its parser."""

    def __init__(self) -> None:
        import dspy

        self.adapter = dspy.ChatAdapter()
        self.signature = dspy.Signature("question -> answer")

    def messages(self, question: str) -> list[dict[str, Any]]:
        formatted: list[dict[str, Any]] = self.adapter.format(
            self.signature, demos=[], inputs={"question": question}
        )
        return formatted

    def answer(self, content: str) -> str:
        return str(self.adapter.parse(self.signature, content)["answer"])


def asker(router: Any, prompts: _Prompts) -> Callable[[Task], Awaitable[str]]:
    async def ask(task: Task) -> str:
        response = await router.acompletion(
            model=MODEL_GROUP,
            messages=prompts.messages(task.question),
            temperature=0.0,
            max_tokens=512,
            timeout=DEADLINE_S,
        )
        return prompts.answer(response.choices[0].message.content or "")

    return ask


async def run_arm(
    fleet: SimFleet,
    backends: Sequence[Backend],
    work: Sequence[Task],
    concurrency: int,
    hooks: dict[int, Callable[[], Awaitable[None]]],
) -> tuple[list[Outcome], dict[str, Any]]:
    """Warm up on a throwaway router, then run the workload on a fresh one."""
    prompts = _Prompts()
    warm = tasks(8, seed=1, first_qid=WARM_UP_QID)
    await drive(warm, 4, asker(make_router(fleet, backends), prompts))
    fleet.reset()
    router = make_router(fleet, backends)
    outcomes = await drive(work, concurrency, asker(router, prompts), hooks)
    return outcomes, {"router": router_settings(router)}
