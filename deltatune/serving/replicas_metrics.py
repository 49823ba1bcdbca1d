"""``/metrics`` of the replicated server: the engines' counters summed over the live replicas (under the
single-process names, so dashboards do not change), plus one series per replica: which adapters it
holds (and their version), how many times it loaded each (a first load, or again after an eviction),
its engine's file reads and host-to-ready promotions, and its own engine counters. Built from the
replicas' reports to the board (``replicas_worker``)."""
from __future__ import annotations

from deltatune.serving.metrics import PREFIX, _esc

# Engine.stats() keys shown per replica too.
PER_REPLICA = {"running": "num_requests_running", "waiting": "num_requests_waiting",
               "requests_finished": "engine_requests_finished_total", "tokens_generated_total": "generation_tokens_total"}


def aggregate(reports: list[dict]) -> dict:
    """``Engine.stats()`` summed over ``reports`` (numbers only)."""
    total: dict = {}
    for report in reports:
        for key, value in report["stats"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def _family(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> list[str]:
    full = f"{PREFIX}{name}"
    lines = [f"# HELP {full} {help_}", f"# TYPE {full} {kind}"]
    for labels, value in samples:
        inner = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
        lines.append(f"{full}{{{inner}}} {value}" if inner else f"{full} {value}")
    return lines


def render_replicas(reports: list[dict]) -> list[str]:
    """Prometheus lines (without the final newline) for the live replicas' ``reports``."""
    reports = sorted(reports, key=lambda r: r["replica"])
    lines = _family("replicas", "gauge", "Replicas that reported within the last few seconds.", [({}, len(reports))])
    lines += _family("replica_info", "gauge", "One per live replica: its id, process and torch threads.",
                     [({"replica": r["replica"], "pid": r["pid"], "threads": r["threads"]}, 1) for r in reports])
    lines += _family("replica_adapter_resident", "gauge", "Adapters a replica's engine holds, with their version.",
                     [({"replica": r["replica"], "adapter": a, "version": v}, 1)
                      for r in reports for a, v in sorted(r["resident"].items())])
    lines += _family("replica_adapter_loads_total", "counter",
                     "Loads of an adapter into a replica's engine (first use, or again after an eviction).",
                     [({"replica": r["replica"], "adapter": a}, n) for r in reports for a, n in sorted(r["loads"].items())])
    lines += _family("replica_adapter_reloads_total", "counter", "New versions loaded in place of a held one.",
                     [({"replica": r["replica"], "adapter": a}, n)
                      for r in reports for a, n in sorted(r["reloads"].items())])
    lines += _family("replica_adapter_load_seconds_total", "counter", "Time a replica spent loading adapters.",
                     [({"replica": r["replica"]}, r.get("load_seconds", 0.0)) for r in reports])
    lines += _family("replica_adapter_file_reads_total", "counter",
                     "Reads of adapter files by a replica's engine (loads, reloads, re-reads from disk).",
                     [({"replica": r["replica"]}, r.get("file_reads", 0)) for r in reports])
    lines += _family("replica_adapter_ready_swaps_total", "counter",
                     "Adapters a replica's engine made ready from host memory (no file read).",
                     [({"replica": r["replica"]}, r.get("ready_swaps", 0)) for r in reports])
    for key, name in PER_REPLICA.items():
        lines += _family(f"replica_{name}", "counter" if name.endswith("_total") else "gauge",
                         f"Engine.stats()[{key!r}] of each replica.",
                         [({"replica": r["replica"]}, r["stats"].get(key, 0)) for r in reports])
    return lines
