"""DSPex settings: one frozen model, built once at process start and passed down.

Sources, highest priority first: explicit arguments, ``DSPEX_*`` environment
variables (nested with ``__``, e.g. ``DSPEX_KAFKA__SECURITY_PROTOCOL``),
``KAFKA_BOOTSTRAP_SERVERS``, then an optional TOML settings file named by
``DSPEX_SETTINGS_FILE`` or passed to :func:`load_settings`. Nothing else in
DSPex reads ``os.environ``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dspex.streams.errors import ConfigError
from dspex.streams.programs import BUILTIN_MODULES, check_import_path
from dspex.streams.tenants import check_name

MAX_MESSAGE_BYTES = 1_048_588
"""The largest record (batch) DSPex sends or a DSPex topic takes: every catalog topic's
``max.message.bytes`` and every DSPex producer's librdkafka ``message.max.bytes``. One
number so they agree; it is Kafka's own default, so topics made before it was pinned
do not differ from the catalog."""
RECORD_ENVELOPE_BYTES = 16_384
"""Room a request's key, headers and batch framing take around its value: the router's
``max_request_bytes`` may be at most ``MAX_MESSAGE_BYTES`` minus this."""

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var)
    return Path(value) if value else None


def _xdg(var: str, fallback: str) -> Path:
    base = os.environ.get(var)
    return Path(base) if base else Path.home() / fallback


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """How to reach the cluster. ``bootstrap_servers=None`` means the local broker."""

    bootstrap_servers: str | None = None
    client_id: str = "dspex"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # the password read from this file when a client is made (a mounted secret), instead
    # of sasl_password; the file, not its content, is what `dspex settings` shows
    sasl_password_file: Path | None = None
    ssl_ca_location: Path | None = None
    ssl_certificate_location: Path | None = None
    ssl_key_location: Path | None = None
    ssl_key_password: SecretStr | None = None
    # Producers send at once (librdkafka's default waits 5 ms to batch): each hop of the
    # request path costs ~1.5 ms instead of ~8 ms here, and under load librdkafka still
    # batches what queues up while earlier requests are in flight.
    linger_ms: float = Field(default=0.0, ge=0.0, le=1000.0)
    # Records nobody waits on (a worker's Execution and Telemetry) are batched instead:
    # librdkafka sends one produce request per partition, and per request the broker
    # spends far more CPU than per record.
    audit_linger_ms: float = Field(default=20.0, ge=0.0, le=1000.0)

    @model_validator(mode="after")
    def _one_password(self) -> KafkaSettings:
        if self.sasl_password is not None and self.sasl_password_file is not None:
            raise ValueError("set kafka.sasl_password or kafka.sasl_password_file, not both")
        return self

    def password(self) -> SecretStr | None:
        """The SASL password: ``sasl_password``, else the content of ``sasl_password_file``."""
        if self.sasl_password_file is None:
            return self.sasl_password
        try:
            text = self.sasl_password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"kafka.sasl_password_file: cannot read it: {exc}") from exc
        return SecretStr(text.strip())

    def to_librdkafka(self, bootstrap_servers: str | None = None) -> dict[str, str]:
        """Dotted librdkafka keys for confluent-kafka clients (secrets revealed here only)."""
        servers = bootstrap_servers or self.bootstrap_servers
        if not servers:
            raise ConfigError("no bootstrap servers: set KAFKA_BOOTSTRAP_SERVERS or start a broker")
        conf = {
            "bootstrap.servers": servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        optional: dict[str, str | Path | SecretStr | None] = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.password(),
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password,
        }
        for key, value in optional.items():
            if isinstance(value, SecretStr):
                conf[key] = value.get_secret_value()
            elif value is not None:
                conf[key] = str(value)
        return conf


class SchemaRegistrySettings(_Section):
    """Confluent-compatible schema registry. No URL: Avro single-object encoding."""

    url: str | None = None
    basic_auth_user_info: SecretStr | None = None

    def to_client_conf(self) -> dict[str, str]:
        """Configuration for confluent-kafka's ``SchemaRegistryClient``."""
        if not self.url:
            raise ConfigError("schema_registry.url is not set")
        conf = {"url": self.url}
        if self.basic_auth_user_info is not None:
            conf["basic.auth.user.info"] = self.basic_auth_user_info.get_secret_value()
        return conf


class TopicSettings(_Section):
    """Topic naming and sizing; per-topic defaults live in the catalog (streams/topics.py)."""

    prefix: str = "dspex."
    # None: from the cluster's size when topics are created (3 from three brokers, else 1)
    replication_factor: int | None = Field(default=None, ge=1)
    # None: 2 when a topic has 3 or more replicas, else 1
    min_insync_replicas: int | None = Field(default=None, ge=1)
    partitions: dict[str, int] = Field(default_factory=dict)

    @field_validator("partitions")
    @classmethod
    def _positive(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {name: n for name, n in value.items() if n < 1}
        if bad:
            raise ValueError(f"partition counts must be >= 1, got {bad}")
        return value

    @model_validator(mode="after")
    def _isr_within_replicas(self) -> TopicSettings:
        factor, isr = self.replication_factor, self.min_insync_replicas
        if factor is not None and isr is not None and isr > factor:
            raise ValueError(f"min_insync_replicas {isr} > replication_factor {factor}")
        return self


class PoolSettings(_Section):
    """One worker pool (a consumer group): processes and in-flight requests per process.

    ``max_processes`` lets ``dspex up`` follow the learning agent's pool sizing
    hints between ``processes`` and it; unset (or equal) keeps the pool fixed.
    """

    processes: int = Field(default=1, ge=0)
    in_flight: int = Field(default=1, ge=1)
    max_processes: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> PoolSettings:
        if self.max_processes is not None and self.max_processes < self.processes:
            raise ValueError(
                f"max_processes={self.max_processes} is below processes={self.processes}"
            )
        return self

    @property
    def most(self) -> int:
        """The largest number of processes the pool may be scaled to."""
        return self.processes if self.max_processes is None else self.max_processes


class GeneralPoolSettings(PoolSettings):
    """General pool: many concurrent I/O-bound LM calls per process."""

    processes: int = Field(default=2, ge=0)
    in_flight: int = Field(default=32, ge=1)
    max_processes: int | None = Field(default=4, ge=0)


POOLS: tuple[str, ...] = ("general", "optimizer", "gpu")
"""The worker pools, in the design's order: the one place that names them."""


class PoolsSettings(_Section):
    """The three worker pools named in the design; a partial override keeps the other defaults."""

    general: GeneralPoolSettings = GeneralPoolSettings()
    optimizer: PoolSettings = PoolSettings()
    gpu: PoolSettings = PoolSettings()

    def items(self) -> list[tuple[str, PoolSettings]]:
        """(name, settings) of every pool (iterating the model would yield any other field)."""
        return [(name, getattr(self, name)) for name in POOLS]


class LMBackend(_Section):
    """One LM backend a variant can name.

    ``model`` is any LiteLLM model string (``openai/gpt-4o-mini``), or one of DSPex's own:
    ``dspex/echo`` (a deterministic *simulation* for tests and demos: each output field
    echoes the inputs) and ``dspex/llama-cpp`` (a local GGUF model, ``model_path``).
    """

    model: str
    api_base: str | None = None
    api_key: SecretStr | None = None
    model_path: Path | None = None
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=512, ge=1)

    @property
    def simulated(self) -> bool:
        """Whether this backend is one of DSPex's simulations (``dspex/echo``, ``dspex/sim``)."""
        return self.model == "dspex/echo" or self.model.partition("?")[0] == "dspex/sim"


def _default_backends() -> dict[str, LMBackend]:
    return {"echo": LMBackend(model="dspex/echo"), "local": LMBackend(model="dspex/llama-cpp")}


class LMSettings(_Section):
    """LM backends by variant name, and which variant each pool uses by default."""

    backends: dict[str, LMBackend] = Field(default_factory=_default_backends)
    # Every pool answers with a real model unless configured otherwise: the local model
    # (``local``) until a LiteLLM backend is named. The ``echo`` simulation is opt-in.
    default_variant: str = "local"
    pool_variants: dict[str, str] = Field(default_factory=dict)

    @field_validator("backends")
    @classmethod
    def _keep_builtins(cls, value: dict[str, LMBackend]) -> dict[str, LMBackend]:
        # Configuring one backend must not silently remove the built-in ones.
        return {**_default_backends(), **value}

    @model_validator(mode="after")
    def _variants_exist(self) -> LMSettings:
        named = {"default_variant": self.default_variant} | {
            f"pool_variants.{pool}": v for pool, v in self.pool_variants.items()
        }
        unknown = {where: v for where, v in named.items() if v not in self.backends}
        if unknown:
            raise ValueError(f"unknown variants {unknown}; backends: {sorted(self.backends)}")
        return self

    def variant_for_pool(self, pool: str) -> str:
        """The static default variant for ``pool`` (before any routing table exists)."""
        return self.pool_variants.get(pool, self.default_variant)


class RouterSettings(_Section):
    """The router agent: validation limits and the result cache."""

    # the router's own check on a Request's value; a bigger record never reaches a topic
    # (MAX_MESSAGE_BYTES), so the bound keeps this check the one that answers
    max_request_bytes: int = Field(
        default=1_000_000, ge=1024, le=MAX_MESSAGE_BYTES - RECORD_ENVELOPE_BYTES
    )
    cache_enabled: bool = True
    cache_max_entries: int = Field(default=100_000, ge=1)
    """Result-cache entries each router keeps in memory (least recently used dropped)."""
    default_pool: Literal["general", "optimizer", "gpu"] = "general"
    batch_processing: bool = True
    """Route each fetch's requests together: decide each, produce all, await the broker once
    (fewer tasks per request; a request waits for its fetch's others). docs/benchmarks.md."""


class TenantLimits(_Section):
    """DSPex limits the router enforces on one tenant's requests; None: no such limit.

    ``requests_per_s`` is a token bucket per router instance holding ``burst`` requests
    (default: one second's worth, at least 1). ``tokens_per_day`` counts the tenant's
    execution Telemetry (prompt + completion tokens) since 00:00 UTC. A request over a
    limit is answered ``quota_exceeded`` (docs/tenants.md).
    """

    requests_per_s: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)

    @property
    def per_day(self) -> bool:
        """True when a daily limit is set."""
        return self.tokens_per_day is not None


class TenantsSettings(_Section):
    """Tenants (docs/tenants.md): the client's own tenant, and the limits routers enforce.

    ``limits.<name>`` replaces ``default`` for tenant ``name`` as a whole.
    ``refresh_s`` bounds how long a router takes to start serving a tenant topic created
    after it started (librdkafka's ``topic.metadata.refresh.interval.ms``).
    """

    client: str | None = None
    """The tenant this process's client sends as; None: the shared requests topic."""
    default: TenantLimits = Field(default_factory=TenantLimits)
    limits: dict[str, TenantLimits] = Field(default_factory=dict)
    refresh_s: float = Field(default=5.0, ge=0.1, le=300.0)

    @field_validator("client")
    @classmethod
    def _client_name(cls, value: str | None) -> str | None:
        return None if value is None else _tenant_name(value)

    @field_validator("limits")
    @classmethod
    def _limit_names(cls, value: dict[str, TenantLimits]) -> dict[str, TenantLimits]:
        for name in value:
            _tenant_name(name)
        return value

    def limits_for(self, tenant: str) -> TenantLimits:
        """The limits of ``tenant``: its own entry, else the default."""
        return self.limits.get(tenant, self.default)

    @property
    def per_day(self) -> bool:
        """True when any tenant (or the default) has a daily limit."""
        return self.default.per_day or any(lim.per_day for lim in self.limits.values())


def _tenant_name(name: str) -> str:
    try:
        return check_name(name)
    except ConfigError as exc:  # pydantic reports a ValueError with the field's path
        raise ValueError(str(exc)) from None


class SessionSettings(_Section):
    """Sessions (docs/sessions.md): history caps, TTL, the worker's hot sessions, sticky routing."""

    ttl_s: float = Field(default=86_400.0, gt=0)
    """A session expires this long after its last turn; its next turn starts afresh."""
    max_turns: int = Field(default=50, ge=1)
    """Turns kept in a session's history (the oldest are dropped first)."""
    max_history_bytes: int = Field(default=65_536, ge=256)
    """JSON bytes of the kept turns' inputs and outputs (the oldest are dropped first)."""
    cache_size: int = Field(default=10_000, ge=1)
    """Sessions a worker keeps in memory (least recently used dropped; re-read from the topic)."""
    sticky: dict[str, bool] = Field(default_factory=dict)
    """Per program id: pin a session to the variant of its first turn. Unlisted programs:
    on when their signature has a History input."""
    sweep_interval_s: float = Field(default=10.0, gt=0)
    """How often the sessions agent tombstones expired sessions."""


_PRESETS = {
    "quality": (1.0, 0.0, 0.0),
    "latency": (1.0, 1.0, 0.0),
    "cost": (1.0, 0.0, 1.0),
    "balanced": (1.0, 0.25, 0.25),
}


class Objective(_Section):
    """What a program's weights optimize: utility = q*log2(reward) - l*log2(latency) - c*log2(cost).

    ``reward`` is success times quality (quality 1 when absent). Preset weights
    per ``kind`` can be overridden. A variant whose p95 latency or mean cost
    breaks a constraint loses ``penalty`` (log2 units: 10 = 1024 times worse).
    """

    # latency (answers per second of a caller's time) by default: docs/learning.md, issue 20
    kind: Literal["quality", "latency", "cost", "balanced"] = "latency"
    quality_weight: float | None = Field(default=None, ge=0)
    latency_weight: float | None = Field(default=None, ge=0)
    cost_weight: float | None = Field(default=None, ge=0)
    max_p95_ms: float | None = Field(default=None, gt=0)
    max_cost_usd: float | None = Field(default=None, gt=0)
    penalty: float = Field(default=10.0, ge=0)

    def weights(self) -> tuple[float, float, float]:
        """(quality, latency, cost) weights after overrides."""
        q, lat, c = _PRESETS[self.kind]
        pick = (self.quality_weight, self.latency_weight, self.cost_weight)
        q, lat, c = (d if v is None else v for v, d in zip(pick, (q, lat, c), strict=True))
        return q, lat, c

    def label(self) -> str:
        """The table's ``objective`` field: the kind, or a weighted expression."""
        text: str = self.kind
        if self.weights() != _PRESETS[self.kind]:
            q, lat, c = self.weights()
            text = f"{self.kind}(quality={q:g},latency={lat:g},cost={c:g})"
        if self.max_p95_ms is not None:
            text += f"; p95<={self.max_p95_ms:g}ms"
        if self.max_cost_usd is not None:
            text += f"; cost<={self.max_cost_usd:g}usd"
        return text


class BanditConfig(_Section):
    """Knobs of the learner's statistics and decision (defaults suit ~1-100 requests/s)."""

    half_life_s: float = Field(default=300.0, gt=0)
    samples: int = Field(default=200, ge=10, le=10_000)
    min_weight: float = Field(default=0.05, gt=0, le=0.5)
    fast_window_events: int = Field(default=20, ge=2)
    min_fast_events: float = Field(default=5.0, ge=1)
    min_baseline_events: float = Field(default=20.0, ge=1)
    error_jump: float = Field(default=0.25, gt=0, le=1)
    error_ratio: float = Field(default=3.0, ge=1)
    latency_ratio: float = Field(default=3.0, gt=1)
    latency_jump_ms: float = Field(default=100.0, ge=0)
    p95_min_count: float = Field(default=10.0, ge=1)
    max_consumers: int = Field(default=16, ge=1)
    target_utilization: float = Field(default=0.7, gt=0, le=1)
    # exploration: a variant's floor decays from min_weight to min_floor as its evidence grows
    min_floor: float = Field(default=0.01, gt=0, le=0.5)
    confident_events: float = Field(default=10.0, gt=0)
    # change points (two-sided Page-Hinkley per variant): reward in [0, 1], log-latency
    change_reward_delta: float = Field(default=0.15, ge=0)
    change_reward_h: float = Field(default=4.0, gt=0)
    change_latency_delta: float = Field(default=0.4, ge=0)
    change_latency_h: float = Field(default=3.0, gt=0)
    # cooldown: failures in a row, or a worker's breaker open, take a variant out this long
    cooldown_failures: int = Field(default=3, ge=1)
    cooldown_s: float = Field(default=10.0, gt=0)
    # ... at least so many that the variant's own error rate gives them this probability
    cooldown_surprise: float = Field(default=1e-4, gt=0, lt=1)


class LearnerSettings(_Section):
    """The learning agent: statistics, objectives per program, candidates, publishing."""

    bandit: BanditConfig = Field(default_factory=BanditConfig)
    # program id -> objective; "*" applies to programs without their own
    objectives: dict[str, Objective] = Field(default_factory=lambda: {"*": Objective()})
    # variant name -> pool offered to every program besides the variants seen in its
    # telemetry and current table (each candidate keeps at least min_weight of traffic)
    candidates: dict[str, str] = Field(default_factory=dict)
    publish_interval_s: float = Field(default=1.0, gt=0)
    material_change: float = Field(default=0.05, gt=0, lt=1)
    # republish unchanged weights this often (while data arrives) so learned_from stays fresh
    refresh_interval_s: float = Field(default=10.0, gt=0)
    # how often `dspex up` resizes its pools to the newest tables' pool_hints
    hints_check_s: float = Field(default=15.0, gt=0)
    seed: int | None = None

    def objective_for(self, program_id: str) -> Objective:
        """The program's objective, else the ``*`` default."""
        return self.objectives.get(program_id) or self.objectives.get("*") or Objective()


class MetricsSettings(_Section):
    """The metrics agent: tumbling windows over telemetry and its Prometheus exporter."""

    window_s: float = Field(default=60.0, gt=0)
    # how long after a window's end late telemetry is still counted in it
    grace_s: float = Field(default=5.0, ge=0)
    # latencies kept per window and series for exact percentiles (reservoir beyond that)
    max_samples: int = Field(default=10_000, ge=10)
    prometheus_port: int = Field(default=9464, ge=0, le=65535)  # 0 = no exporter
    bind_host: str = "127.0.0.1"
    routing_weights: bool = True  # follow the routing topic for dspex_routing_weight
    # how often each pool worker sends a health sample (in-flight, breakers, memory)
    worker_health_interval_s: float = Field(default=10.0, gt=0)


class DashboardSettings(_Section):
    """The web dashboard (``dspex dashboard``; ``dspex up`` starts one)."""

    port: int = Field(default=9465, ge=0, le=65535)  # taken: a free one is used; 0 = any
    bind_host: str = "127.0.0.1"
    # how far back the charts reach (metric windows, dead letters)
    history_s: float = Field(default=900.0, gt=0, le=86_400)


class ReliabilitySettings(_Section):
    """LM fault handling in the workers: retries with backoff, circuit breakers, fallbacks.

    ``retry_attempts`` counts LM calls per backend and request (the first one
    included); backoff is exponential from ``retry_base_s`` up to ``retry_max_s``
    with full jitter. A backend's breaker opens after ``breaker_fail_max``
    consecutive transient failures and lets a trial call through after
    ``breaker_reset_timeout_s``. ``fallbacks`` maps a variant to the variants to
    try next, before the pool's default variant.

    A request that still fails with a retryable error goes round again through
    the ``retry`` topic: ``retry_topic_attempts`` attempts in all (the first
    included; 1 turns the retry topic off), waiting ``retry_topic_backoff_s[n-1]``
    seconds before the nth retry (the last entry repeats).
    """

    retry_attempts: int = Field(default=3, ge=1, le=20)
    retry_base_s: float = Field(default=0.2, gt=0)
    retry_max_s: float = Field(default=5.0, gt=0)
    breaker_fail_max: int = Field(default=5, ge=1)
    breaker_reset_timeout_s: float = Field(default=30.0, gt=0)
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    # how soon a worker that died without leaving (kill -9) loses its partitions;
    # librdkafka's 45 s default would stall a dead worker's requests that long
    session_timeout_s: float = Field(default=10.0, ge=6.0, le=300.0)
    # `dspex up`: how long its processes may drain after SIGTERM before they are killed
    drain_timeout_s: float = Field(default=30.0, gt=0, le=600)
    retry_topic_attempts: int = Field(default=3, ge=1, le=20)
    # at most a minute: a router's rebalance and graceful stop wait for its pending retries
    retry_topic_backoff_s: tuple[Annotated[float, Field(ge=0.0, le=60.0)], ...] = Field(
        default=(1.0, 5.0), min_length=1, max_length=20
    )


class JobsSettings(_Section):
    """Optimizer jobs: the optimizer pool's job runners (``python -m dspex.agents jobs``).

    ``max_poll_interval_s`` is the runners' librdkafka ``max.poll.interval.ms``: a
    job may run far longer (the runner pauses its partitions and keeps polling),
    but it must be at least ``reliability.session_timeout_s``. ``compile_variant``
    is the LM backend DSPy's optimizer calls while compiling (None: the optimizer
    pool's variant); evaluations run on ``eval_pool`` through the router.
    """

    max_poll_interval_s: float = Field(default=300.0, ge=1.0, le=86_400.0)
    compile_variant: str | None = None
    eval_pool: Literal["general", "optimizer", "gpu"] = "general"
    eval_deadline_s: float = Field(default=120.0, gt=0)
    max_examples: int = Field(default=10_000, ge=1)
    max_trials: int = Field(default=64, ge=1)
    # a runner killed mid-commit leaves a transaction open this long, holding back
    # read-committed consumers of the partitions it wrote to: keep it short
    transaction_timeout_s: float = Field(default=15.0, ge=1.0, le=900.0)


class LocalBrokerSettings(_Section):
    """The local KRaft broker (or cluster) run from Kafka's jars when no cluster is configured.

    Node ``n`` of a cluster prefers ports ``port + 2(n-1)`` and ``controller_port + 2(n-1)``;
    ``heap`` is each node's.
    """

    kafka_version: str = "4.1.2"
    # 1: one broker+controller; 3 (or more): that many, each a broker and a controller voter
    nodes: int = Field(default=1, ge=1, le=9)
    port: int = Field(default=9092, ge=1, le=65535)
    controller_port: int = Field(default=9093, ge=1, le=65535)
    heap: str = "512m"
    cache_dir: Path = Field(default_factory=lambda: _xdg("XDG_CACHE_HOME", ".cache") / "dspex")
    data_dir: Path = Field(
        default_factory=lambda: _xdg("XDG_STATE_HOME", ".local/state") / "dspex" / "broker"
    )
    start_timeout_s: float = Field(default=90.0, gt=0)
    # One SASL_SSL listener (SCRAM-SHA-512, TLS from a local CA) and ACLs: see
    # dspex.streams.ops.security. A single node only; the plain broker stays the default.
    secure: bool = False
    # the secured broker's mTLS (SSL, client certificate required) listener
    mtls_port: int = Field(default=9094, ge=1, le=65535)
    # The JDK convention (mvn honours it too): $JAVA_HOME/bin/java when set, else java on PATH.
    java_home: Path | None = Field(default_factory=lambda: _env_path("JAVA_HOME"))


class Settings(BaseSettings):
    """Everything a DSPex process needs to know, in one frozen object."""

    model_config = SettingsConfigDict(
        env_prefix="DSPEX_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    schema_registry: SchemaRegistrySettings = Field(default_factory=SchemaRegistrySettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    pools: PoolsSettings = Field(default_factory=PoolsSettings)
    lm: LMSettings = Field(default_factory=LMSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    reliability: ReliabilitySettings = Field(default_factory=ReliabilitySettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    tenants: TenantsSettings = Field(default_factory=TenantsSettings)
    local_broker: LocalBrokerSettings = Field(default_factory=LocalBrokerSettings)
    # Deployed modules and tools (docs/modules.md): name -> "package.module:Attribute".
    # Only these paths are ever imported, by each worker at start; routers and clients
    # know the names only. A program names a module by its key in module_type.
    modules: dict[str, str] = Field(default_factory=dict)
    tools: dict[str, str] = Field(default_factory=dict)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    # spans as JSON lines appended here (docs/tracing.md); None: OTEL_* alone decide
    traces_file: Path | None = None

    @field_validator("modules", "tools")
    @classmethod
    def _import_paths(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        for name, path in value.items():
            check_import_path(name, path, str(info.field_name))
        if info.field_name == "modules":
            clash = sorted(set(value) & BUILTIN_MODULES)
            if clash:
                raise ValueError(f"modules.{clash[0]}: a built-in module type cannot be replaced")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _KafkaBootstrapEnv(settings_cls),
            TomlConfigSettingsSource(settings_cls),
        )


class _KafkaBootstrapEnv(PydanticBaseSettingsSource):
    """Honours the conventional ``KAFKA_BOOTSTRAP_SERVERS`` variable."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        return {"kafka": {"bootstrap_servers": servers}} if servers else {}


def load_settings(settings_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the process's settings; errors name the offending field and its source.

    ``settings_file`` (else ``DSPEX_SETTINGS_FILE``) is a TOML file with one table
    per section (``[kafka]``, ``[topics]``, ...); environment variables override it.
    """
    path = settings_file or _env_path("DSPEX_SETTINGS_FILE")
    cls: type[Settings] = Settings
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"settings file not found: {path}")
        config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})
        cls = type("Settings", (Settings,), {"model_config": config, "__doc__": Settings.__doc__})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
