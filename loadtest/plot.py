#!/usr/bin/env python3
"""Plots for BENCHMARKS.md from honua-loadtest JSON results (needs matplotlib).

    python3 loadtest/plot.py RESULT.json [MORE.json ...] --out docs/bench

Writes, for what the results contain:
  throughput-vs-workers.png  engine steps/s (and the raw cycle's jobs/s) by workers
  latency-cdf.png            dispatch and end-to-end latency CDFs, with the raw floor
  reclaim-cdf.png            kill -9 -> claimed again, per crash run
  limiter-rate.png           LLM requests per second at the provider vs the limit
  cluster-scale.png          `scale --partitions`: Redis CPU per step and per primary by P
Later files win when several results hold the same scenario.
"""

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def load(paths):
    merged = {"scale": [], "latency": [], "crash": [], "llm": None, "points": []}
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        for k in merged:
            if r.get(k):
                merged[k] = r[k]
        if r.get("llm"):
            merged["llm"] = r["llm"]
        if r.get("engine"):
            merged["engine"] = r["engine"]
            merged["baseline"] = r.get("baseline")
    return merged


def cdf_xy(dist):
    pts = dist.get("cdf") or []
    return [p[0] for p in pts], [p[1] * 100 for p in pts]


def throughput_vs_workers(r, out):
    pts = r["scale"]
    if not pts:
        return
    w = [p["workers"] for p in pts]
    eng = [p["engine"]["steps_per_sec"] for p in pts]
    raw = [p["raw"]["jobs_per_sec"] for p in pts]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(w, raw, "s--", color="grey", label="raw XADD+XREADGROUP+XACK (jobs/s)")
    ax.plot(w, eng, "o-", color="C0", label="engine, 3-step noop processes (steps/s)")
    for x, e, p in zip(w, eng, pts):
        ax.annotate(f"{e:,.0f}\n({p['ratio_to_raw']:.3f} of raw)", (x, e),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.plot(w, [x * 0.25 for x in raw], ":", color="C3", lw=0.8, label="target: 0.25 of raw")
    ax.set_yscale("log")
    lo, hi = min(eng) / 1.5, max(raw) * 1.5
    ticks = [t for t in (1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5) if lo <= t <= hi]
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(w)
    ax.set_xlabel("workers (1 scheduler)")
    ax.set_ylabel("per second (log scale)")
    ax.set_title("Throughput vs workers (2-core machine, Redis on the same box)")
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "throughput-vs-workers.png"), dpi=110)
    plt.close(fig)


def latency_cdf(r, out):
    runs = r["latency"]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), squeeze=False)
    for ax, l in zip(axes[0], runs):
        for key, label, style in [
            ("dispatch", "dispatch (enqueued → started)", "-"),
            ("end_to_end", "end to end per process", "-"),
            ("raw_delivery", "raw XADD → XREADGROUP", "--"),
        ]:
            d = l.get(key)
            if not d or not d.get("samples"):
                continue
            x, y = cdf_xy(d)
            ax.step(x, y, style, where="post",
                    label=f"{label}: p99 {d['p99_ms']:.2f} ms")
        target = {"1000 steps/s": ("dispatch target p99 < 2 ms", 2),
                  "50 processes/s": ("end-to-end target p99 < 8 ms", 8)}.get(l["label"])
        if target:
            ax.axvline(target[1], color="C3", ls=":", lw=0.9, label=target[0])
        p99s = [l[k]["p99_ms"] for k in ("dispatch", "end_to_end") if l.get(k)]
        ax.set_xlim(-0.2, max(p99s + [target[1] if target else 2]) * 1.5 + 1)
        ax.set_xlabel("latency, ms (engine figures in whole ms; tail beyond p99 clipped)")
        ax.set_ylabel("% of samples ≤ x")
        ax.set_ylim(0, 101)
        ax.set_title(f"Latency at {l['label']}")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latency-cdf.png"), dpi=110)
    plt.close(fig)


def reclaim_cdf(r, out):
    runs = [c for c in r["crash"] if c["reclaim"]["samples"]]
    if not runs:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, c in enumerate(runs):
        x, y = cdf_xy(c["reclaim"])
        x = [v / 1000 for v in x]
        ax.step(x, y, where="post", color=f"C{i}",
                label=f"{c['label']}: p99 {c['reclaim']['p99_ms'] / 1000:.2f} s "
                      f"({c['reclaimed_steps']} steps)")
        ax.axvline(c["reclaim_bound_ms"] / 1000, color=f"C{i}", ls=":", lw=0.8)
    ax.set_xlabel("kill -9 → step claimed again, s (dotted: lease + sweep)")
    ax.set_ylabel("% of reclaimed steps ≤ x")
    ax.set_ylim(0, 101)
    ax.set_title("Reclaim after kill -9")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reclaim-cdf.png"), dpi=110)
    plt.close(fig)


def limiter_rate(r, out):
    l = r.get("llm")
    if not l or not l.get("requests_per_second"):
        return
    per_s = l["requests_per_second"]
    limit = l["requests_per_minute"] / 60
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.step(range(len(per_s)), per_s, where="post", label="requests admitted by the provider, per second")
    ax.axhline(limit, color="C3", ls=":", lw=0.9, label=f"limit {l['requests_per_minute']:,}/min")
    ax.axhline(limit + l["burst_requests"], color="grey", ls="--", lw=0.8,
               label=f"limit + burst ({l['burst_requests']}) in one second")
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel("requests per second")
    ax.set_ylim(0, (limit + l["burst_requests"]) * 1.25)
    ax.set_title(f"Fleet-wide LLM limiter: {l['workers']} workers, offered "
                 f"{l['offered_requests_per_minute'] / l['requests_per_minute']:.1f}× the limit")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "limiter-rate.png"), dpi=110)
    plt.close(fig)


def cluster_scale(r, out):
    pts = r["points"]
    if not pts:
        return
    ps = [str(p["partitions"]) for p in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ps, [p["primaries_cpu_us_per_step"] for p in pts], "o-", label="primaries")
    a1.plot(ps, [p["net_primaries_cpu_us_per_step"] for p in pts], "s--",
            label="primaries, less the idle fleet")
    a1.plot(ps, [p["replicas_cpu_us_per_step"] for p in pts], "^:", label="replicas")
    a1.set_ylim(bottom=0)
    a1.set_xlabel("partitions")
    a1.set_ylabel("Redis CPU per step (µs)")
    a1.set_title("Redis CPU per step")
    a1.legend(fontsize=8, loc="lower right")
    a1.grid(alpha=0.3)
    n = max(len(p["primaries"]) for p in pts)
    width = 0.8 / n
    for i in range(n):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(pts))]
        busy = [p["primaries"][i]["busy"] * 100 if i < len(p["primaries"]) else 0 for p in pts]
        a2.bar(xs, busy, width, label=f"primary {i + 1}")
    for j, p in enumerate(pts):
        top = max(u["busy"] for u in p["primaries"]) * 100
        ratio = p["max_min_primary_cpu"]
        a2.annotate("max/min\n" + (f"{ratio:.2f}" if ratio < 10 else "(some idle)"), (j, top),
                    ha="center", va="bottom", fontsize=7)
    a2.set_xticks(range(len(pts)), ps)
    a2.set_xlabel("partitions")
    a2.set_ylabel("CPU busy (% of a core)")
    a2.set_title("Load per primary")
    a2.set_ylim(top=a2.get_ylim()[1] * 1.2)
    a2.legend(fontsize=8, loc="upper right")
    a2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cluster-scale.png"), dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default="docs/bench")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    r = load(a.results)
    throughput_vs_workers(r, a.out)
    latency_cdf(r, a.out)
    reclaim_cdf(r, a.out)
    limiter_rate(r, a.out)
    cluster_scale(r, a.out)


if __name__ == "__main__":
    main()
