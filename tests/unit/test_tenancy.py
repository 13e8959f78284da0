"""Tenants at the router without a broker: admission, forced replies, stamping, limits."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from dspex import AsyncClient
from dspex.agents.plumbing.catalog import ProgramCatalog, RoutingCatalog
from dspex.agents.plumbing.messages import Consumed, TokenUsage
from dspex.agents.plumbing.records import ExecutionResult, execution, telemetry
from dspex.agents.router.cache import ResultCache, cache_key
from dspex.agents.router.router import RouterHandler
from dspex.agents.router.routing import Route
from dspex.agents.router.tenancy import (
    DAY_MS,
    DailyUsage,
    Quotas,
    TokenBucket,
    admit,
    start_of_day_ms,
    tenant_of_topic,
)
from dspex.schemas import records
from dspex.streams.cli import app
from dspex.streams.cli import programs as programs_cli
from dspex.streams.errors import ConfigError, InvalidRequest, QuotaExceeded
from dspex.streams.serde import make_serde
from dspex.streams.settings import Settings, TenantLimits, TenantsSettings, load_settings
from tests.fakes import FakeResolver
from tests.unit.test_router import NOW_MS, request

PREFIX = "dspex."
ACME_IN, ACME_OUT = "dspex.tenant.acme.requests", "dspex.tenant.acme.responses"


# --- admission -------------------------------------------------------------------------


def test_tenant_comes_from_the_topic_and_overwrites_what_the_sender_claimed() -> None:
    sent = request(reply_topic="dspex.tenant.bob.responses", metadata={"dspex.tenant": "bob"})
    tenant, admitted = admit(sent, ACME_IN, PREFIX)
    assert tenant == "acme"
    assert admitted["reply_topic"] == ACME_OUT
    assert admitted["metadata"] == {"dspex.tenant": "acme"}


@pytest.mark.parametrize("named", [None, "dspex.responses", "app.replies", ACME_OUT])
def test_a_tenant_request_is_answered_on_its_own_topic_whatever_it_names(
    named: str | None,
) -> None:
    _, admitted = admit(request(reply_topic=named), ACME_IN, PREFIX)
    assert admitted["reply_topic"] == ACME_OUT


def test_shared_topic_requests_lose_a_claimed_tenant() -> None:
    sent = request(metadata={"dspex.tenant": "acme", "team": "x"})
    tenant, admitted = admit(sent, "dspex.requests", PREFIX)
    assert tenant is None and admitted["metadata"] == {"team": "x"}


def test_shared_topic_request_may_not_name_a_tenant_topic() -> None:
    with pytest.raises(InvalidRequest) as caught:
        admit(request(reply_topic=ACME_OUT), "dspex.requests", PREFIX)
    assert caught.value.field == "reply_topic" and "acme" in caught.value.reason


def test_only_request_topics_make_a_tenant() -> None:
    assert tenant_of_topic(ACME_IN, PREFIX) == "acme"
    assert tenant_of_topic(ACME_OUT, PREFIX) is None
    assert tenant_of_topic("dspex.requests", PREFIX) is None
    assert tenant_of_topic("other.tenant.acme.requests", PREFIX) is None


# --- the router's handler --------------------------------------------------------------

SETTINGS = Settings(tenants=TenantsSettings(limits={"acme": TenantLimits(requests_per_s=1)}))
SERDE = make_serde(SETTINGS)


def handler(clock: list[float]) -> RouterHandler:
    return RouterHandler(
        SETTINGS,
        SERDE,
        programs=ProgramCatalog(),
        routing=RoutingCatalog(),
        resolver=FakeResolver(),
        cache=ResultCache(),
        clock=lambda: NOW_MS / 1000,
        quotas=Quotas(SETTINGS.tenants, clock=lambda: clock[0]),
    )


def consumed(topic: str, record: dict[str, Any]) -> Consumed:
    return Consumed(topic, 0, 7, b"key", SERDE.encode("Request", record, topic=topic), (), NOW_MS)


def decode(value: bytes) -> dict[str, Any]:
    return SERDE.decode(value, topic="t").record


def test_router_forwards_a_tenant_request_stamped_and_replying_on_its_topic() -> None:
    sent = request(reply_topic="dspex.tenant.bob.responses", metadata={"dspex.tenant": "bob"})
    out = handler([0.0]).handle_request(consumed(ACME_IN, sent))
    assert [o.topic for o in out] == ["dspex.pool.general"]
    forwarded = decode(out[0].value)
    assert forwarded["reply_topic"] == ACME_OUT
    assert forwarded["metadata"]["dspex.tenant"] == "acme"


def test_router_answers_a_bad_tenant_request_on_the_tenant_topic() -> None:
    out = handler([0.0]).handle_request(consumed(ACME_IN, request(inputs={})))
    assert [o.topic for o in out] == [ACME_OUT, "dspex.dlq"]


def test_router_refuses_a_shared_request_naming_a_tenant_topic_on_the_shared_topic() -> None:
    out = handler([0.0]).handle_request(consumed("dspex.requests", request(reply_topic=ACME_OUT)))
    assert [o.topic for o in out] == ["dspex.responses", "dspex.dlq"]
    response = decode(out[0].value)
    assert response["error"]["field"] == "reply_topic"


def test_over_the_rate_a_tenant_gets_quota_exceeded_and_others_are_served() -> None:
    clock = [100.0]
    router = handler(clock)
    first = router.handle_request(consumed(ACME_IN, request()))
    second = router.handle_request(consumed(ACME_IN, request()))
    other = router.handle_request(consumed("dspex.tenant.bob.requests", request()))
    shared = router.handle_request(consumed("dspex.requests", request()))
    assert [o.topic for o in first] == ["dspex.pool.general"]
    assert [o.topic for o in second] == [ACME_OUT]  # no dead letter: the request was fine
    answer = decode(second[0].value)
    assert (answer["status"], answer["final"]) == ("quota_exceeded", True)
    assert answer["error"]["error_class"] == "QuotaExceeded"
    assert answer["error"]["retryable"] is True and "requests_per_s" in answer["error"]["message"]
    assert [o.topic for o in other] == ["dspex.pool.general"]
    assert [o.topic for o in shared] == ["dspex.pool.general"]
    clock[0] += 1.0  # one second later the bucket has a token again
    assert [o.topic for o in router.handle_request(consumed(ACME_IN, request()))] == [
        "dspex.pool.general"
    ]
    assert router.quotas.refused == {("acme", "requests_per_s"): 1}


# --- limits ----------------------------------------------------------------------------


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3.0, tokens=3.0, at_s=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]


def usage_record(tenant: str | None, at_ms: int, tokens: int, kind: str = "execution") -> Any:
    return records.telemetry(
        kind=kind,
        emitted_at=datetime.fromtimestamp(at_ms / 1000, UTC),
        prompt_tokens=tokens,
        completion_tokens=1,
        success=True,
        tenant=tenant,
    )


def test_daily_usage_counts_a_tenants_executions_of_today_only() -> None:
    usage = DailyUsage()
    today = start_of_day_ms(NOW_MS)
    usage.apply("p", usage_record("acme", today - 1, 1000))  # yesterday
    usage.apply("p", usage_record("acme", today + 5, 9))
    usage.apply("p", usage_record("acme", today + 6, 99, kind="attempt"))
    usage.apply("p", usage_record(None, today + 7, 500))
    usage.apply("p", usage_record("bob", today + 8, 4))
    usage.apply("p", None)
    assert usage.today("acme", NOW_MS) == 10
    assert usage.today("bob", NOW_MS) == 5
    assert usage.today("acme", today + DAY_MS) == 0


def test_tokens_per_day_refuses_once_reached() -> None:
    tenants = TenantsSettings(default=TenantLimits(tokens_per_day=20))
    quotas = Quotas(tenants)
    today = start_of_day_ms(NOW_MS)
    quotas.check("acme", NOW_MS)
    quotas.usage.apply("p", usage_record("acme", today + 1, 19))
    with pytest.raises(QuotaExceeded) as caught:
        quotas.check("acme", NOW_MS)
    assert caught.value.limit == "tokens_per_day" and "20 tokens" in str(caught.value)
    quotas.check("bob", NOW_MS)
    assert tenants.per_day and not TenantsSettings().per_day


def test_a_tenants_own_limits_replace_the_default() -> None:
    tenants = TenantsSettings(
        default=TenantLimits(requests_per_s=1), limits={"big": TenantLimits()}
    )
    quotas = Quotas(tenants, clock=lambda: 0.0)
    for _ in range(50):
        quotas.check("big", NOW_MS)
    quotas.check("small", NOW_MS)
    with pytest.raises(QuotaExceeded):
        quotas.check("small", NOW_MS)


# --- stamping and settings -------------------------------------------------------------


def test_worker_records_carry_the_routed_tenant() -> None:
    at = datetime.fromtimestamp(NOW_MS / 1000, UTC)
    result = ExecutionResult("ok", at, at, at, usage=TokenUsage(3, 4, 7))
    routed = request(created_at=at, metadata={"dspex.tenant": "acme"})
    assert execution(routed, result, worker_id="w", pool="general")["tenant"] == "acme"
    assert telemetry(routed, result, worker_id="w", pool="general")["tenant"] == "acme"
    shared = request(created_at=at)
    assert execution(shared, result, worker_id="w", pool="general")["tenant"] is None


def test_tenants_have_cache_keys_of_their_own() -> None:
    program = {"program_id": None, "signature": "q -> a"}
    route = Route("general", "echo", "static")
    keys = {cache_key(program, {"q": "1"}, {}, route, t) for t in (None, "acme", "bob")}
    assert len(keys) == 3
    assert cache_key(program, {"q": "1"}, {}, route) == cache_key(program, {"q": "1"}, {}, route)


def test_settings_name_tenants_validly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPEX_TENANTS__CLIENT", "acme")
    assert load_settings().tenants.client == "acme"
    monkeypatch.setenv("DSPEX_TENANTS__CLIENT", "Not A Name")
    with pytest.raises(ConfigError, match=r"tenants\.client"):
        load_settings()
    with pytest.raises(ValueError, match="tenant name"):
        TenantsSettings(limits={"UPPER": TenantLimits()})


# --- the client ------------------------------------------------------------------------


def test_a_tenant_client_uses_its_own_topics() -> None:
    client = AsyncClient(Settings(), tenant="acme")
    assert (client.tenant, client.listen_topic, client.reply_topic) == ("acme", ACME_OUT, ACME_OUT)
    assert client.requests_topic == ACME_IN
    by_settings = AsyncClient(Settings(tenants=TenantsSettings(client="bob")))
    assert by_settings.listen_topic == "dspex.tenant.bob.responses"
    shared = AsyncClient(Settings())
    assert (shared.tenant, shared.listen_topic) == (None, "dspex.responses")


def test_a_tenant_client_refuses_another_reply_topic_or_a_bad_name() -> None:
    with pytest.raises(ConfigError, match=r"always come on dspex\.tenant\.acme\.responses"):
        AsyncClient(Settings(), tenant="acme", reply_topic="dspex.tenant.bob.responses")
    assert AsyncClient(Settings(), tenant="acme", reply_topic=ACME_OUT).reply_topic == ACME_OUT
    with pytest.raises(ConfigError, match="tenant name"):
        AsyncClient(Settings(), tenant="ACME")


class TenantRecordingClient:
    """Stands in for the client: records the tenant ``dspex submit`` asked for."""

    tenants: ClassVar[list[str | None]] = []

    def __init__(self, settings: object, *, tenant: str | None = None) -> None:
        self.tenants.append(tenant)

    def __enter__(self) -> TenantRecordingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, *args: object, **options: object) -> Any:
        return SimpleNamespace(outputs={"answer": "4"})


def test_dspex_submit_takes_a_tenant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(programs_cli, "Client", TenantRecordingClient)
    line = ["submit", "q -> a", "q=2+2", "--no-stream", "--tenant", "acme"]
    result = CliRunner().invoke(app, line)
    assert result.exit_code == 0, result.output
    assert TenantRecordingClient.tenants == ["acme"]


# --- sessions --------------------------------------------------------------------------


def test_tenant_sessions_are_scoped_and_shared_requests_cannot_join_them() -> None:
    _, admitted = admit(request(session_id="user-42"), ACME_IN, PREFIX)
    assert admitted["session_id"] == "tenant.acme/user-42"
    _, other = admit(request(session_id="user-42"), "dspex.tenant.bob.requests", PREFIX)
    assert other["session_id"] == "tenant.bob/user-42"
    _, shared = admit(request(session_id="user-42"), "dspex.requests", PREFIX)
    assert shared["session_id"] == "user-42"
    with pytest.raises(InvalidRequest) as caught:
        admit(request(session_id="tenant.acme/user-42"), "dspex.requests", PREFIX)
    assert caught.value.field == "session_id"


def test_a_refused_shared_request_is_answered_on_its_own_topic_unless_a_tenants() -> None:
    router = handler([0.0])
    own = request(session_id="tenant.acme/x", reply_topic="app.replies")
    assert [o.topic for o in router.handle_request(consumed("dspex.requests", own))] == [
        "app.replies",
        "dspex.dlq",
    ]
    both = request(session_id="tenant.acme/x", reply_topic=ACME_OUT)
    assert [o.topic for o in router.handle_request(consumed("dspex.requests", both))] == [
        "dspex.responses",
        "dspex.dlq",
    ]


def test_a_tenant_clients_session_handle_knows_its_stored_id() -> None:
    assert AsyncClient(Settings(), tenant="acme").session("s1").stored_id == "tenant.acme/s1"
    assert AsyncClient(Settings()).session("s1").stored_id == "s1"
