"""Planning figures for a large replicated deployment (issue 28, "the paper part"): a discrete-event
simulation of the router, fed with the load cost and per-step cost that ``benchmarks/serve_scale.py``
measured (or given by flags).

The deployment: ``--replicas`` (64) engines, each keeping ``--slots`` (8) adapters loaded (Serve's
``max_num_models_per_replica``, which ``deltatune serve --replicas`` sets to ``max_loras +
max_cpu_loras``: 8 is the issue's "8 ready each" with no host tier), ``--adapters`` (10,000) adapters, requests
arriving as a Poisson process at ``--rate`` per second with adapters drawn from a Zipf law of
exponent s. Each request decodes ``--tokens`` tokens at ``step`` seconds per token.

Routers:

- ``affine``: Ray Serve's multiplexed routing as deployed by ``deltatune serve --replicas``: among the
  replicas that hold the adapter, the one with fewer requests in flight of two picked at random
  (power of two choices); when none holds it, or every holder has ``--max-ongoing`` requests in
  flight, two replicas at random and the less busy loads it (every replica is full in steady state,
  so "fewest models" ties). Each replica evicts its least recently used adapter.
- ``round-robin``: request k goes to replica k mod R, which loads the adapter on a miss (LRU).

A miss costs the request one load, and loads on one replica are serialised (Serve's multiplexer loads
one model at a time). A load also holds the engine's model lock, so it stalls every request decoding
on that replica while it lasts: the *added latency* of a request is its wait for the loader plus its
own load plus the other loads on its replica during its decode. Hit rate, loads per second, the share
of each engine's time spent loading (loads/s per replica x load cost: decoding stops meanwhile) and
the p50/p99 added latency are reported per router and Zipf exponent. Not modelled: the decode time
the loads take away (the simulated decode keeps its lone-request speed), prefill, batching.

    .venv/bin/python benchmarks/router_sim.py                    # reads benchmarks/results/serve_scale.json
    .venv/bin/python benchmarks/router_sim.py --load-cost 0.05 --step 0.02 --rate 400
"""
from __future__ import annotations

import argparse
import bisect
import heapq
import json
import random
import shlex
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


class Replica:
    """One engine: an LRU of ``slots`` adapters, a serial loader, and the ends of its requests in flight."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.lru: OrderedDict = OrderedDict()
        self.loader_free = 0.0
        self.loads: list[tuple[float, float]] = []    # (start, end) of each load, in order
        self.ends: list[float] = []                   # heap of the requests' end times

    def in_flight(self, now: float) -> int:
        while self.ends and self.ends[0] <= now:
            heapq.heappop(self.ends)
        return len(self.ends)


def zipf_sampler(n: int, s: float, rng: random.Random):
    """A function drawing adapter ranks 0..n-1 with P(k) proportional to 1 / (k+1)^s."""
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    total, cum = sum(weights), []
    acc = 0.0
    for w in weights:
        acc += w / total
        cum.append(acc)
    return lambda: min(bisect.bisect_left(cum, rng.random()), n - 1)


def simulate(router: str, args, s: float, seed: int = 0) -> dict:
    """Run ``args.requests`` requests through ``router``; the figures of one table row."""
    rng = random.Random(seed)
    draw = zipf_sampler(args.adapters, s, rng)
    replicas = [Replica(args.slots) for _ in range(args.replicas)]
    holders: dict[int, set] = defaultdict(set)
    service = args.tokens * args.step
    now, hits, records = 0.0, 0, []
    for k in range(args.requests):
        now += rng.expovariate(args.rate)
        adapter = draw()
        index = k % args.replicas if router == "round-robin" else _affine(replicas, holders[adapter], now, args, rng)
        replica = replicas[index]
        wait = 0.0
        if adapter in replica.lru:
            replica.lru.move_to_end(adapter)
            hits += 1
            own = None
        else:
            if len(replica.lru) >= replica.slots:
                old, _ = replica.lru.popitem(last=False)
                holders[old].discard(index)
            start = max(now, replica.loader_free)
            replica.loader_free = start + args.load_cost
            own = (start, replica.loader_free)
            replica.loads.append(own)
            replica.lru[adapter] = True
            holders[adapter].add(index)
            wait = replica.loader_free - now
        heapq.heappush(replica.ends, now + wait + service)
        records.append((index, now + wait, now + wait + service, wait, own))
    added = sorted(wait + _stalls(replicas[i].loads, begin, end, own) for i, begin, end, wait, own in records)
    loads = sum(len(r.loads) for r in replicas)
    pick = lambda q: added[min(len(added) - 1, int(q * len(added)))]  # noqa: E731
    return {"router": router, "zipf_s": s, "hit_rate": round(hits / args.requests, 4),
            "loads_per_s": round(loads / now, 2), "load_busy": round(loads / now / args.replicas * args.load_cost, 3),
            "added_p50_ms": round(1000 * pick(0.5), 2),
            "added_p99_ms": round(1000 * pick(0.99), 2), "added_mean_ms": round(1000 * sum(added) / len(added), 2)}


def _affine(replicas: list[Replica], holding: set, now: float, args, rng: random.Random) -> int:
    """Serve's multiplexed choice: a holder with room (the less busy of two), else the less busy of two at random."""
    free = [i for i in holding if replicas[i].in_flight(now) < args.max_ongoing]
    pool = free if free else range(len(replicas))
    a, b = rng.sample(list(pool), 2) if len(pool) > 1 else (next(iter(pool)),) * 2
    return a if replicas[a].in_flight(now) <= replicas[b].in_flight(now) else b


def _stalls(loads: list[tuple[float, float]], begin: float, end: float, own) -> float:
    """Seconds of other loads on this replica overlapping a decode from ``begin`` to ``end``."""
    total = 0.0
    i = max(0, bisect.bisect_right(loads, (begin, float("inf"))) - 1)  # loads are serial: earlier ones ended
    while i < len(loads) and loads[i][0] < end:
        start, stop = loads[i]
        if (start, stop) != own:
            total += max(0.0, min(stop, end) - max(start, begin))
        i += 1
    return total


def measured(path: Path) -> dict:
    """Load cost, per-step cost and one replica's request rate from serve_scale.json (empty if absent)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    row = data["rows"][0]
    return {"load_cost": data.get("load_cost_s"), "step": data.get("step_s"), "tokens": data["setup"]["new_tokens"],
            "replica_rate": row["requests_per_s"] / row["replicas"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--zipf", default="0.8,1.0,1.2", help="Zipf exponents, comma separated")
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--measured", default=str(RESULTS / "serve_scale.json"))
    ap.add_argument("--load-cost", type=float, default=None, help="seconds per adapter load (default: measured)")
    ap.add_argument("--step", type=float, default=None, help="seconds per decoded token (default: measured)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per request (default: measured run's)")
    ap.add_argument("--rate", type=float, default=None,
                    help="requests/s for the whole deployment (default: 70%% of replicas x one replica's measured rate)")
    ap.add_argument("--max-ongoing", type=int, default=32, help="Serve's max_ongoing_requests per replica (= --max-num-seqs)")
    ap.add_argument("--out", default=str(RESULTS / "router_sim.json"))
    args = ap.parse_args(argv)
    got = measured(Path(args.measured))
    args.load_cost = args.load_cost if args.load_cost is not None else got.get("load_cost") or 0.05
    args.step = args.step if args.step is not None else got.get("step") or 0.02
    args.tokens = args.tokens or got.get("tokens") or 16
    args.rate = args.rate or 0.7 * args.replicas * (got.get("replica_rate") or 10.0)
    rows = [simulate(router, args, float(s)) for s in args.zipf.split(",") for router in ("affine", "round-robin")]
    result = {"what": "router simulation: affine (Serve multiplexing, LRU per replica) vs round-robin (issue 28)",
              "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
              "inputs": {k: getattr(args, k) for k in ("replicas", "slots", "adapters", "requests", "load_cost", "step",
                                                        "tokens", "rate", "max_ongoing")},
              "inputs_from": args.measured if got else "flags/defaults", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.replicas} replicas x {args.slots} slots, {args.adapters} adapters, {args.rate:.0f} req/s, "
          f"load {args.load_cost * 1000:.1f} ms, step {args.step * 1000:.2f} ms x {args.tokens} tokens")
    print("| Zipf s | router | hit rate | loads/s | engine time loading | added p50 ms | added p99 ms |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['zipf_s']} | {r['router']} | {r['hit_rate']:.1%} | {r['loads_per_s']} | {r['load_busy']:.0%} | "
              f"{r['added_p50_ms']} | {r['added_p99_ms']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
