"""``dspex up`` follows the learning agent's pool sizing hints.

The learning agent puts ``pool_hints`` (recommended consumers per pool, by
Little's law over the load it sees) into every RoutingTable it publishes.
:class:`HintFollower` reads the compacted ``routing`` topic from the start in a
thread (no consumer group: it wants every table) and keeps the hints of the most
recent table; :func:`desired_processes` clamps them to each pool's
``processes`` .. ``max_processes``; ``dspex up`` applies the result to its
supervisor. Kubernetes users get the same hints from Prometheus
(``dspex_pool_recommended_consumers``) through KEDA (``deploy/k8s/``).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from dspex.streams import kafka
from dspex.streams.errors import SerdeError
from dspex.streams.serde import make_serde
from dspex.streams.settings import POOLS, PoolsSettings, Settings
from dspex.streams.topics import Topics

logger = logging.getLogger(__name__)


def desired_processes(hints: Mapping[str, int], pools: PoolsSettings) -> dict[str, int]:
    """Processes per pool: the hint clamped to [processes, max_processes], else processes."""
    desired = {}
    for pool in POOLS:
        config = getattr(pools, pool)
        hint = hints.get(pool)
        if hint is None or isinstance(hint, bool) or not isinstance(hint, int):
            desired[pool] = config.processes
        else:
            desired[pool] = min(max(hint, config.processes), config.most)
    return desired


def scalable(pools: PoolsSettings) -> bool:
    """True when some pool may grow beyond its fixed size."""
    return any(getattr(pools, pool).most > getattr(pools, pool).processes for pool in POOLS)


class HintFollower:
    """Reads every RoutingTable and keeps the pool hints of the most recent one."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._topic = Topics(settings.topics).name("routing")
        self._serde = make_serde(settings)
        self._lock = threading.Lock()
        self._hints: dict[str, int] = {}
        self._newest: float = float("-inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-hints", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def hints(self) -> dict[str, int]:
        """The latest table's hints (empty until a table with hints was read)."""
        with self._lock:
            return dict(self._hints)

    def take(self, record: Mapping[str, Any]) -> None:
        """Keep ``record``'s hints when it is the newest table seen."""
        created = record.get("created_at")
        stamp = created.timestamp() if isinstance(created, datetime) else float(created or 0)
        hints = {str(k): int(v) for k, v in (record.get("pool_hints") or {}).items()}
        with self._lock:
            if hints and stamp >= self._newest:
                self._newest, self._hints = stamp, hints

    def _run(self) -> None:
        consumer = kafka.consumer(self._settings, f"dspex-hints-{uuid.uuid4().hex}")
        try:
            metadata = consumer.list_topics(self._topic, timeout=10).topics[self._topic]
            consumer.assign(
                [TopicPartition(self._topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
            )
            while not self._stop.is_set():
                message = consumer.poll(0.5)
                if message is None or message.error() or message.value() is None:
                    continue
                try:
                    decoded = self._serde.decode(
                        bytes(message.value() or b""), topic=self._topic, expect="RoutingTable"
                    )
                except SerdeError as exc:
                    logger.warning(
                        "unreadable routing table partition=%s offset=%s: %s",
                        message.partition(),
                        message.offset(),
                        exc,
                    )
                    continue
                self.take(decoded.record)
        except Exception:
            logger.exception("pool hint follower stopped; pools keep their current size")
        finally:
            consumer.close()
