"""The server's ``GET /metrics`` in Prometheus' text exposition format (version 0.0.4).

Counters and histograms the HTTP layer observes (requests by endpoint/model/status, time to first
token, inter-token latency) live here; the engine's own counts (running/waiting sequences, tokens,
adapters in the bank) are read from ``Engine.stats()`` at scrape time. Written by hand: a few dozen
lines do not justify a dependency on ``prometheus_client``. Names follow vLLM's with the
``deltatune:`` prefix, so dashboards built for vLLM need only the prefix changed.
"""
from __future__ import annotations

import bisect
import threading

PREFIX = "deltatune:"
# Seconds; vLLM's buckets for the same two histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

# Engine.stats() key -> (metric name, type, help)
ENGINE_METRICS = {
    "running": ("num_requests_running", "gauge", "Sequences in the running batch."),
    "waiting": ("num_requests_waiting", "gauge", "Requests waiting for a slot in the batch."),
    "adapters_ready": ("lora_adapters_ready", "gauge", "LoRA adapters in the ready (device) bank."),
    "adapters_cpu": ("lora_adapters_cpu", "gauge", "LoRA adapters kept in host memory."),
    "requests_total": ("engine_requests_total", "counter", "Requests submitted to the engine."),
    "requests_finished": ("engine_requests_finished_total", "counter", "Requests the engine finished."),
    "tokens_generated_total": ("generation_tokens_total", "counter", "Tokens generated."),
    "prompt_tokens_total": ("prompt_tokens_total", "counter", "Prompt tokens processed."),
}


class Histogram:
    """Cumulative-bucket histogram (Prometheus' ``_bucket``/``_sum``/``_count``)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """What the HTTP layer counts; :meth:`render` adds the engine's stats and formats everything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = {}  # (endpoint, model, status) -> count
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)

    def count_request(self, endpoint: str, model: str, status: int | str) -> None:
        """One HTTP request answered (``status``: HTTP code, or ``"aborted"`` for a dropped client)."""
        key = (endpoint, model, str(status))
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def observe_itl(self, seconds: float, tokens: int = 1) -> None:
        """A gap of ``seconds`` that brought ``tokens`` new tokens: ``tokens`` samples of the mean gap."""
        with self._lock:
            for _ in range(max(tokens, 1)):
                self.itl.observe(seconds / max(tokens, 1))

    def render(self, engine_stats: dict) -> str:
        """The full exposition text (ends with a newline)."""
        lines: list[str] = []
        for key, (name, kind, help_) in ENGINE_METRICS.items():
            if key in engine_stats:
                lines += [f"# HELP {PREFIX}{name} {help_}", f"# TYPE {PREFIX}{name} {kind}",
                          f"{PREFIX}{name} {engine_stats[key]}"]
        name = f"{PREFIX}http_requests_total"
        lines += [f"# HELP {name} HTTP requests answered, by endpoint, model and status.",
                  f"# TYPE {name} counter"]
        with self._lock:
            for (endpoint, model, status), n in sorted(self.requests.items()):
                lines.append(f'{name}{{endpoint="{_esc(endpoint)}",model="{_esc(model)}",'
                             f'status="{status}"}} {n}')
            for hist, short, help_ in ((self.ttft, "time_to_first_token_seconds",
                                        "Time from request arrival to its first token."),
                                       (self.itl, "inter_token_latency_seconds",
                                        "Time between consecutive tokens of a request.")):
                lines += [f"# HELP {PREFIX}{short} {help_}", f"# TYPE {PREFIX}{short} histogram",
                          *hist.lines(PREFIX + short)]
        return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_text(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of an exposition text (for tests and the benchmark)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values
