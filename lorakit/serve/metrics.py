"""The server's Prometheus metrics (``GET /metrics``), on a registry of its own per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Requests, errors, tokens, latencies and the scheduler's state, named as vLLM's where they mean the same."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("lorakit_errors", "requests answered with an error, by error type", ["type"],
                              registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "tokens generated", registry=r)
        self.time_to_first_token = Histogram("lorakit_time_to_first_token_seconds",
                                             "from a request's arrival to its first token", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.time_per_output_token = Histogram("lorakit_time_per_output_token_seconds",
                                               "between two tokens of one request", buckets=LATENCY_BUCKETS,
                                               registry=r)
        self.waiting = Gauge("lorakit_num_requests_waiting", "requests queued, not yet prefilled", registry=r)
        self.running = Gauge("lorakit_num_requests_running", "requests in the running batch", registry=r)
        self.running_adapters = Gauge("lorakit_running_adapters", "distinct adapters the running batch uses",
                                      registry=r)
        self.waiting_adapters = Gauge("lorakit_waiting_adapters", "distinct adapters the waiting requests ask for",
                                      registry=r)
        self.loaded_adapters = Gauge("lorakit_loaded_adapters", "adapters on the model now", registry=r)

    def observe_token(self, generation, now: float) -> None:
        """A token of ``generation`` was chosen at ``now`` (perf_counter seconds)."""
        self.generation_tokens.inc()
        if generation.last_token_at is None:
            self.time_to_first_token.observe(now - generation.submitted)
        else:
            self.time_per_output_token.observe(now - generation.last_token_at)

    def observe_state(self, engine) -> None:
        """The scheduler's queue, batch and adapters, between two steps."""
        waiting = list(engine.waiting)
        self.waiting.set(len(waiting))
        self.running.set(len(engine.running))
        self.running_adapters.set(len({g.adapter for g in engine.running if g.adapter is not None}))
        self.waiting_adapters.set(len({g.adapter for g in waiting if g.adapter is not None}))
        self.loaded_adapters.set(len(engine.adapters.resident))

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
