"""Where the GPU waits in a torch.profiler chrome trace: the idle gaps between device activities
(kernels, copies, sets), each with the host op that launched the activity after it, and the
runtime calls that block the host (synchronisations, long launches).
    python scripts/trace_gaps.py TRACE.json[.gz] [--min-us 10] [--top 25]
Used by scripts/diag_e2e_step.py --trace; runs on a CPU on a fetched trace too.
"""
import argparse
import bisect
import collections
import gzip
import json
import sys
from typing import Dict, List


def load(path: str) -> List[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def analyse(events: List[dict], min_us: float = 10.0, top: int = 25) -> List[str]:
    """-> report lines."""
    dev = sorted((e for e in events if e.get("ph") == "X"
                  and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                 key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")]
    launch_of: Dict[int, dict] = {e["args"]["correlation"]: e for e in runtime
                                  if "correlation" in e.get("args", {})}
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"),
                 key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]

    def stack_at(ts: float, tid) -> str:
        """The cpu ops on thread ``tid`` that enclose ``ts``, outermost first (names cut)."""
        i = bisect.bisect_right(starts, ts)
        names = [e["name"][:48] for e in ops[max(0, i - 4000):i]
                 if e["tid"] == tid and e["ts"] <= ts <= e["ts"] + e["dur"]]
        return " > ".join(names[-3:]) or "(no op)"

    if not dev:
        return ["no device activity in the trace"]
    span = dev[-1]["ts"] + dev[-1]["dur"] - dev[0]["ts"]
    busy_end = dev[0]["ts"] + dev[0]["dur"]
    gaps = []
    for prev, nxt in zip(dev, dev[1:]):
        gap = nxt["ts"] - busy_end
        if gap >= min_us:
            launch = launch_of.get(nxt.get("args", {}).get("correlation"))
            host = "?"
            waited = None
            if launch is not None:
                # launch issued inside the gap: the device waited on the host
                waited = launch["ts"] > busy_end
                host = stack_at(launch["ts"], launch["tid"])
            gaps.append((gap, prev["name"][:60], nxt["name"][:60], host, waited, nxt["ts"]))
        busy_end = max(busy_end, nxt["ts"] + nxt["dur"])
    idle = sum(g[0] for g in gaps)
    lines = [f"device span {span / 1e3:.2f} ms, {len(dev)} activities; idle in gaps ≥ {min_us:g} µs: "
             f"{idle / 1e3:.2f} ms in {len(gaps)} gaps "
             f"({sum(g[0] for g in gaps if g[4]) / 1e3:.2f} ms where the next launch came after the "
             "device went idle)"]
    by_host = collections.Counter()
    for g in gaps:
        by_host[g[3]] += g[0]
    lines.append("idle by the host op that launched the next activity (ms):")
    for host, us in by_host.most_common(top):
        lines.append(f"  {us / 1e3:8.3f}  {host}")
    lines.append(f"the {top} longest gaps (µs, at ms from the first activity):")
    t0 = dev[0]["ts"]
    for gap, p, n, host, waited, ts in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {gap:8.1f} @ {(ts - t0) / 1e3:7.2f}  {'host' if waited else 'dev '}  "
                     f"{p} -> {n}  [{host}]")
    slow = collections.defaultdict(lambda: [0.0, 0])
    for e in runtime:
        slow[e["name"]][0] += e["dur"]
        slow[e["name"]][1] += 1
    lines.append("runtime calls by total host time (ms, calls):")
    for name, (us, n) in sorted(slow.items(), key=lambda kv: -kv[1][0])[:12]:
        lines.append(f"  {us / 1e3:8.3f} {n:6d}  {name}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("--min-us", type=float, default=10.0)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    print("\n".join(analyse(load(a.trace), a.min_us, a.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
