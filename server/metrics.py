"""Prometheus metrics of the model cache, on an HTTP `/metrics` endpoint of the service.

The cache actor keeps the counters (it is where loads, evictions and lookups happen); the
service copies a snapshot of them on a timer, and a scrape reads the latest copy: a scrape
never waits on Ray, and a cache that cannot be reached leaves the last numbers in place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from server.deploy.specs import LOAD_SECONDS_BUCKETS, CacheSnapshot

logger = logging.getLogger(__name__)


class CacheMetrics(Collector):
    """A Prometheus collector over the latest snapshot of the model cache."""

    def __init__(self, fetch: Callable[[], Awaitable[CacheSnapshot]]) -> None:
        self._fetch = fetch
        self.latest: CacheSnapshot | None = None

    async def refresh_forever(self, interval_seconds: float) -> None:
        while True:
            try:
                self.latest = await self._fetch()
            except Exception as error:  # Ray unreachable: the dependency monitor says so
                logger.debug("no cache metrics this round: %r", error)
            await asyncio.sleep(interval_seconds)

    def collect(self) -> Iterator[Metric]:
        snapshot = self.latest
        if snapshot is None:
            return
        gauges = {
            name: GaugeMetricFamily(f"modelservice_object_store_{name}_bytes", help_text, labels=["node"])
            for name, help_text in (
                ("capacity", "Object-store capacity of the Ray node."),
                ("budget", "Share of the node's object store that deployed models may take."),
                ("resident", "Bytes of deployed (and loading) models on the node."),
                ("pinned", "Bytes on the node that cannot be evicted (pinned or loading)."),
            )
        }
        for node in snapshot.nodes:
            gauges["capacity"].add_metric([node.node_id], node.capacity_bytes)
            gauges["budget"].add_metric([node.node_id], node.budget_bytes)
            gauges["resident"].add_metric([node.node_id], node.used_bytes)
            gauges["pinned"].add_metric([node.node_id], node.pinned_bytes)
        yield from gauges.values()
        counters = snapshot.counters
        for name, help_text, label, values in (
            ("model_loads", "Finished model loads by outcome.", "outcome", counters.loads),
            ("model_evictions", "Models let go by reason (lru: room for another; idle_ttl).", "reason", counters.evictions),
            ("cache_lookups", "Plugin loads by result (hit: cached; miss: loaded on demand).", "result", counters.lookups),
        ):
            family = CounterMetricFamily(f"modelservice_{name}", help_text, labels=[label])
            for key, value in sorted(values.items()):
                family.add_metric([key], value)
            yield family
        yield CounterMetricFamily(
            "modelservice_admission_refusals", "Deploys refused for want of object-store memory.",
            value=counters.admission_refusals,
        )
        histogram = HistogramMetricFamily(
            "modelservice_model_load_stage_seconds", "Time a model load spent in each stage.", labels=["stage"]
        )
        for stage, times in sorted(counters.stage_seconds.items()):
            buckets = [(str(bound), count) for bound, count in zip(LOAD_SECONDS_BUCKETS, times.bucket_counts)]
            buckets.append(("+Inf", times.count))
            histogram.add_metric([stage], buckets, times.total_seconds)
        yield histogram


def serve_metrics(collector: CacheMetrics, host: str, port: int) -> tuple[Callable[[], None], int]:
    """Serves `/metrics` on host:port (0: a free port); returns a stop function and the port."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop, int(server.server_port)
