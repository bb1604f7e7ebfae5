"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

`ServerMetrics` keeps counters and histograms the HTTP layer updates per request (TTFT, TPOT, TTFP, generated
tokens, audio seconds, finished requests by reason); `render` adds the engine's gauges (queue depth, running
requests, compilations) read at scrape time.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
PREFIX = "omni_jax"


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: le buckets, +Inf, _sum, _count)."""

    def __init__(self, name: str, help_: str, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for le, n in zip((*map(_num, self.buckets), "+Inf"), self.counts):
            acc += n
            out.append(f'{self.name}_bucket{{le="{le}"}} {acc}')
        out += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]
        return out


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def _scalar(name: str, kind: str, help_: str, value, labels: dict | None = None) -> list[str]:
    lab = "" if not labels else "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{lab} {_num(value)}"]


class ServerMetrics:
    """Thread-safe request metrics of one server."""

    def __init__(self):
        self._lock = threading.Lock()
        p = PREFIX
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Request received to first text token.")
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds",
                              "Mean time between text tokens after the first, per request.", TOKEN_BUCKETS)
        self.ttfp = Histogram(f"{p}_time_to_first_audio_packet_seconds", "Request received to first audio chunk.")
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "Request received to its last event.")
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.audio_seconds = 0.0
        self.finished: dict[str, int] = {}
        self.rejected: dict[int, int] = {}

    def request_done(self, *, finish_reason: str, prompt_tokens: int, completion_tokens: int, audio_seconds: float,
                     ttft: float | None, tpot: float | None, ttfp: float | None, e2e: float) -> None:
        with self._lock:
            self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
            self.generated_tokens += completion_tokens
            self.prompt_tokens += prompt_tokens
            self.audio_seconds += audio_seconds
            for h, v in ((self.ttft, ttft), (self.tpot, tpot), (self.ttfp, ttfp), (self.e2e, e2e)):
                if v is not None:
                    h.observe(v)

    def request_rejected(self, status: int) -> None:
        with self._lock:
            self.rejected[status] = self.rejected.get(status, 0) + 1

    def render(self, *, queue_depth: int, running: int, compilations: int | None, ready: bool) -> str:
        p = PREFIX
        with self._lock:
            lines = _scalar(f"{p}_ready", "gauge", "1 once the model is loaded and warm.", int(ready))
            lines += _scalar(f"{p}_num_requests_waiting", "gauge", "Requests in the engine's queue.", queue_depth)
            lines += _scalar(f"{p}_num_requests_running", "gauge", "Requests holding a decode slot.", running)
            if compilations is not None:
                lines += _scalar(f"{p}_compilations_total", "counter", "XLA compilations the engine has triggered.",
                                 compilations)
            lines += _scalar(f"{p}_generation_tokens_total", "counter", "Text tokens generated.",
                             self.generated_tokens)
            lines += _scalar(f"{p}_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens)
            lines += _scalar(f"{p}_audio_seconds_total", "counter", "Seconds of speech generated.",
                             float(self.audio_seconds))
            name = f"{p}_requests_finished_total"
            lines += [f"# HELP {name} Finished requests by finish reason.", f"# TYPE {name} counter"]
            lines += [f'{name}{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())]
            name = f"{p}_requests_rejected_total"
            lines += [f"# HELP {name} Requests answered with an error status before reaching the engine.",
                      f"# TYPE {name} counter"]
            lines += [f'{name}{{status="{k}"}} {v}' for k, v in sorted(self.rejected.items())]
            for h in (self.ttft, self.tpot, self.ttfp, self.e2e):
                lines += h.lines()
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """{"name{labels}": value} of a Prometheus text page (comments skipped): for tests and the load generator."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
