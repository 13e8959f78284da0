"""Tenant topic and principal names: one tenant's names never match another's."""

from __future__ import annotations

import re

import pytest

from dspex.streams import tenants
from dspex.streams.errors import ConfigError


def test_names_are_prefixed_by_the_tenant() -> None:
    assert tenants.request_topic("acme", "dspex.") == "dspex.tenant.acme.requests"
    assert tenants.response_topic("acme", "dspex.") == "dspex.tenant.acme.responses"
    assert tenants.principal("acme") == "User:dspex-tenant-acme"
    assert tenants.request_topic("acme", "dspex.").startswith(
        tenants.resource_prefix("acme", "dspex.")
    )


def test_tenant_of_reads_only_tenant_topics() -> None:
    assert tenants.tenant_of("dspex.tenant.acme.requests", "dspex.") == "acme"
    assert tenants.tenant_of("dspex.tenant.acme.responses", "dspex.") == "acme"
    assert tenants.tenant_of("dspex.requests", "dspex.") is None
    assert tenants.tenant_of("dspex.tenant.acme.other", "dspex.") is None
    assert tenants.tenant_of("dspex.tenant.Bad.requests", "dspex.") is None


def test_pattern_matches_request_topics_only() -> None:
    pattern = re.compile(tenants.request_topic_pattern("dspex."))
    assert pattern.match("dspex.tenant.acme.requests")
    assert not pattern.match("dspex.tenant.acme.responses")
    assert not pattern.match("dspex.requests")
    assert not pattern.match("xdspex.tenant.acme.requests")


@pytest.mark.parametrize("bad", ["", "Acme", "1acme", "a.b", "a_b", "x" * 32])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="tenant name"):
        tenants.check_name(bad)


def test_one_tenant_prefix_does_not_cover_another() -> None:
    # "acme" must not grant "acme-eu": the prefix ends with the separating dot.
    assert not tenants.request_topic("acme-eu", "dspex.").startswith(
        tenants.resource_prefix("acme", "dspex.")
    )
