"""Prometheus metrics, one registry per app so tests can build many apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # `route` is the route template (`/v1/score`), or `unmatched` for any path no route
        # serves: labels from raw paths would let anyone grow /metrics without bound.
        self.requests = Counter(
            "stepcredit_requests", "HTTP requests by route template and status", ["route", "status"], registry=r
        )
        self.items = Counter("stepcredit_items", "Scored items by outcome status", ["status"], registry=r)
        self.item_errors = Counter("stepcredit_item_errors", "Per-item errors by code", ["code"], registry=r)
        self.request_latency = Histogram(
            "stepcredit_request_latency_seconds", "Latency of /v1/score", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.backend_latency = Histogram(
            "stepcredit_backend_latency_seconds",
            "Time in the likelihood backend per batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.probe_tokens = Counter(
            "stepcredit_probe_tokens", "Tokens forwarded through the model", registry=r
        )
        self.probes = Counter("stepcredit_probes", "Prefix probes run", registry=r)
        self.queue_depth = Gauge("stepcredit_queue_depth", "Trajectories waiting for the backend", registry=r)
        self.queued_tokens = Gauge(
            "stepcredit_queued_tokens", "Estimated probe tokens waiting for the backend (admission counts these)", registry=r
        )
        self.drain_rate = Gauge(
            "stepcredit_drain_rate_tokens_per_second",
            "Estimated tokens per second the backend drains, measured (Retry-After is computed from it)",
            registry=r,
        )
        self.ready = Gauge(
            "stepcredit_ready", "1 when the model is loaded and warmed and the service is not draining", registry=r
        )
        self.draining = Gauge("stepcredit_draining", "1 from SIGTERM until the process exits", registry=r)
        # reason: "timeout" (not whole within header_timeout_s) or "too_large".
        self.head_rejections = Counter(
            "stepcredit_head_rejections",
            "Connections closed because a request head did not arrive in time or was too large",
            ["reason"],
            registry=r,
        )
        # Outcomes are "ok" or a reload error code: a fixed, small set.
        self.reloads = Counter("stepcredit_reloads", "POST /v1/admin/reload by outcome", ["outcome"], registry=r)
        self.reload_latency = Histogram(
            "stepcredit_reload_seconds", "Duration of successful reloads", buckets=_LATENCY_BUCKETS, registry=r
        )
        # One series at a time: each reload replaces the labels of the last.
        self.model = Info("stepcredit_model", "The model that scores now", registry=r)

    def set_model(self, info) -> None:
        self.model.info({"name": info.name, "backend": info.backend, "revision": info.revision or ""})
