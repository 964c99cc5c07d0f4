"""Every backend strategy on one workload, then the service under concurrent load.

    .venv/bin/python benchmarks/bench_backends.py [--device cpu] [--items 16] [--clients 1,8,32]

Part 1 scores the workload of `benchmarks.workload.workload` (SmolLM2, float32,
16 trajectories of 10-30 steps with 1-3 references, laid out as a GRPO batch: 4
questions x 4 rollouts) with each strategy, in one process, one after the
other: hf per-prefix, hf packed without and with shared-prefix reuse, vllm
without prefix reuse, vllm with prefix reuse, and vllm-remote through a real
vLLM server on loopback. Each hf figure is the best of 3 timed runs (1 run if it
takes over a minute; vLLM strategies run once, as their prefix cache stays warm) after a warm-up item; every strategy's
numbers are checked against hf packed (SPEC 8: 2e-3 across backends).

Part 2 starts `stepcredit serve` (hf packed) and sends one-item requests from
1, 8 and 32 concurrent clients (the same number of requests at each level, in
workload order, so concurrent clients send rollouts of the same question as a
trainer's reward workers do), reporting items/s, p50/p99 latency and every
non-200 answer. The same is repeated at 1 and 8 clients with 16 distinct questions
(no group structure), and on the groups with a second server that does not share
prefixes (STEPCREDIT_SHARE_MIN_TOKENS=0), to show where the batching gain comes from.
Levels are interleaved over 3 rounds; items/s is the median round.

Writes benchmarks/results/backends_<device>.json and backends_<device>.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from benchmarks.bench_strategies import minimum_tokens  # noqa: E402
from benchmarks.workload import workload  # noqa: E402
from stepcredit.config import Settings  # noqa: E402
from stepcredit.engine import Scorer  # noqa: E402
from stepcredit.models import ensure_default_model  # noqa: E402
from stepcredit.protocol import ScoreItem  # noqa: E402
from stepcredit.verify import VerifierPool  # noqa: E402

TOL = 2e-3
GRPO = "GRPO groups of 4"
DISTINCT = "distinct questions"
GRPO_PLAIN = "GRPO groups, no prefix sharing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not up after {seconds} s")


def start_vllm_server(model: Path, device: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--enable-prefix-caching", "--enable-scale-out", "--enable-prompt-tokens-details",
        "--max-model-len", "8192", "--disable-log-stats",
    ]  # fmt: skip
    if device == "cpu":
        cmd += ["--gpu-memory-utilization", "0.25", "--block-size", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/v1/models", proc, 900)
    return proc, url


def max_difference(a, b) -> float:
    worst = 0.0
    for ra, rb in zip(a.results, b.results):
        if ra.baseline_loglik is None:
            continue
        pairs = [(ra.baseline_loglik, rb.baseline_loglik), (ra.mig_reward, rb.mig_reward)]
        pairs += [(x.loglik, y.loglik) for x, y in zip(ra.steps, rb.steps)]
        worst = max(worst, *(abs(x - y) for x, y in pairs))
    return worst


async def strategies(args, model: Path, items: list[ScoreItem]) -> list[dict]:
    from stepcredit.backends.hf import HFBackend

    settings = Settings()
    verifier = VerifierPool(workers=2)
    verifier.start()
    server = None
    plans = [
        ("hf per-prefix", lambda: HFBackend(model, strategy="per-prefix", device=args.device)),
        ("hf packed, no sharing", lambda: HFBackend(model, strategy="packed", device=args.device, share_min_tokens=0)),
        ("hf packed", lambda: HFBackend(model, strategy="packed", device=args.device)),
    ]
    try:
        import vllm  # noqa: F401

        from stepcredit.backends.vllm_engine import VLLMBackend
        from stepcredit.backends.vllm_remote import VLLMRemoteBackend

        plans += [
            ("vllm no reuse", lambda: VLLMBackend(model, device=args.device, prefix_reuse=False)),
            ("vllm prefix reuse", lambda: VLLMBackend(model, device=args.device, prefix_reuse=True)),
            ("vllm-remote", lambda: VLLMRemoteBackend(model, [server_url()])),
        ]
    except ImportError:
        print("vllm is not installed: only the hf strategies run", file=sys.stderr)

    def server_url() -> str:
        nonlocal server
        server = start_vllm_server(model, args.device)
        return server[1]

    rows, reference = [], None
    try:
        for name, build in plans:
            if args.skip_per_prefix and name == "hf per-prefix":
                continue
            print(f"-- {name}", file=sys.stderr, flush=True)
            backend = build()
            scorer = Scorer(backend, settings, verifier=verifier)
            await backend.start()
            await scorer.score(items[:1])  # warm-up
            # vLLM keeps its prefix cache between runs: only its first (cold) run counts.
            repeats = args.repeats if name.startswith("hf") else 1
            runs, batch = [], None
            while not runs or (len(runs) < repeats and runs[0] < args.repeat_under):
                t0 = time.perf_counter()
                scored = await scorer.score(items)
                runs.append(time.perf_counter() - t0)
                assert all(r.status == "ok" for r in scored.results), [r.error for r in scored.results if r.error]
                batch = scored if runs[-1] == min(runs) else batch
            seconds = min(runs)
            if name == "hf packed":
                reference = batch
            rows.append(
                {
                    "strategy": name,
                    "seconds": seconds,
                    "runs_s": runs,
                    "items_per_s": len(items) / seconds,
                    "tokens_forwarded": batch.usage.tokens_forwarded,
                    "resubmissions": getattr(backend, "resubmissions", 0),
                    "_batch": batch,
                    **minimum_tokens(scorer, items),
                }
            )
            await backend.aclose()
    finally:
        verifier.close()
        if server is not None:
            server[0].terminate()
            server[0].wait(60)
    base = next((r for r in rows if r["strategy"] == "hf per-prefix"), None)
    for row in rows:
        batch = row.pop("_batch")
        row["tokens_vs_min"] = row["tokens_forwarded"] / row["min_tokens_per_reference_prefix"]
        row["tokens_vs_min_shared"] = row["tokens_forwarded"] / row["min_tokens_shared_prefix"]
        row["vs_hf_per_prefix"] = row["items_per_s"] / base["items_per_s"] if base else None
        row["max_abs_diff_vs_hf_packed"] = max_difference(batch, reference) if reference else None
    return rows


async def load(args, plans: list[tuple[str, list[ScoreItem], list[int], dict]]) -> list[dict]:
    """Each (workload, clients) level `args.rounds` times, levels interleaved within a
    round so that drift of a shared machine hits all of them alike; items/s is the
    median over rounds, latencies are pooled over rounds. Each plan's dict holds
    environment overrides for its server (plans with the same overrides share one)."""
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        urls = []  # per plan
        for _, _, _, overrides in plans:
            key = json.dumps(overrides, sort_keys=True)
            if key not in servers:
                port = free_port()
                env = {**os.environ, **overrides, "STEPCREDIT_PORT": str(port), "STEPCREDIT_DEVICE": args.device}
                proc = subprocess.Popen([str(Path(sys.executable).parent / "stepcredit"), "serve"], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                servers[key] = (proc, f"http://127.0.0.1:{port}")
                wait_http(f"{servers[key][1]}/ready", proc, 300)
            urls.append(servers[key][1])
        bodies = [[{"items": [item.model_dump(exclude_none=True)]} for item in items] for _, items, _, _ in plans]
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            for url, plan_bodies in zip(urls, bodies):
                await client.post(f"{url}/v1/score", json=plan_bodies[0])  # warm-up
            for round_ in range(args.rounds):
                for (label, _, levels, _), url, plan_bodies in zip(plans, urls, bodies):
                    for clients in levels:
                        run = await _load_level(client, f"{url}/v1/score", plan_bodies, clients, args.requests)
                        runs.setdefault((label, clients), []).append(run)
                        print(f"-- round {round_ + 1}, {label}, {clients} clients: {len(run['latencies']) / run['seconds']:.3f} items/s",
                              file=sys.stderr, flush=True)  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    rows = []
    for (label, clients), level in runs.items():
        latencies = sorted(x for run in level for x in run["latencies"])
        rates = [len(run["latencies"]) / run["seconds"] for run in level]
        rows.append(
            {
                "workload": label,
                "clients": clients,
                "rounds": len(level),
                "requests": len(latencies),
                "non_200": sum(run["non_200"] for run in level),
                "items_per_s": statistics.median(rates),
                "items_per_s_rounds": rates,
                "p50_s": statistics.median(latencies),
                "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            }
        )
    return rows


async def _load_level(client: httpx.AsyncClient, url: str, bodies: list[dict], clients: int, requests: int) -> dict:
    """`requests` one-item requests in workload order from `clients` concurrent clients."""
    latencies, statuses = [], []
    queue = list(range(requests))[::-1]

    async def worker():
        while queue:
            i = queue.pop()
            t0 = time.perf_counter()
            response = await client.post(url, json=bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t0)
            statuses.append(response.status_code)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return {"seconds": time.perf_counter() - t0, "latencies": latencies, "non_200": sum(s != 200 for s in statuses)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = report["strategies"]
    names = [r["strategy"] for r in rows]
    left.barh(names, [r["items_per_s"] for r in rows], color="#4c72b0")
    for y, r in enumerate(rows):
        left.text(r["items_per_s"], y, f" {r['items_per_s']:.3f} ({r['tokens_vs_min_shared']:.1f}x min tokens)", va="center", fontsize=8)
    left.set_xlabel("items/s (higher is better)")
    left.set_title(f"Strategies: {report['model']}, {report['device']}, {report['workload']['items']} trajectories")
    left.invert_yaxis()
    left.set_xlim(0, max(r["items_per_s"] for r in rows) * 1.6)
    all_load = report["service_load"]
    load_rows = [r for r in all_load if r.get("workload", GRPO) == GRPO]
    if load_rows:
        clients = [r["clients"] for r in load_rows]
        right.plot(clients, [r["items_per_s"] for r in load_rows], "o-", label=f"items/s ({GRPO})")
        for label, color in ((DISTINCT, "#8c8c8c"), (GRPO_PLAIN, "#55a868")):
            other = [r for r in all_load if r.get("workload") == label]
            if other:
                right.plot([r["clients"] for r in other], [r["items_per_s"] for r in other], "o:", color=color,
                           label=f"items/s ({label})")  # fmt: skip
        right.set_xscale("log", base=2)
        right.set_xticks(clients, [str(c) for c in clients])
        right.set_xlabel("concurrent clients")
        right.set_ylabel("items/s")
        right.set_ylim(bottom=0, top=max(r["items_per_s"] for r in all_load) * 1.4)
        twin = right.twinx()
        twin.plot(clients, [r["p50_s"] for r in load_rows], "s--", color="#dd8452", label=f"p50 latency ({GRPO})")
        twin.plot(clients, [r["p99_s"] for r in load_rows], "^--", color="#c44e52", label=f"p99 latency ({GRPO})")
        twin.set_ylabel("latency (s)")
        twin.set_ylim(bottom=0)
        right.set_title("Service end to end (hf packed, one item per request)")
        lines = right.get_lines() + twin.get_lines()
        right.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", default="1,8,32", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--requests", type=int, default=32, help="requests per load level and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every load level (median reported)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each fast strategy (best reported)")
    parser.add_argument("--repeat-under", type=float, default=60.0, help="repeat strategies whose run took less (s)")
    parser.add_argument("--skip-per-prefix", action="store_true", help="skip the slowest strategy")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--plot-only", type=Path, help="redraw the PNG from a results JSON and exit")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.plot_only.with_suffix(".png"))
        return

    model = ensure_default_model(Settings().cache_dir)
    items = [ScoreItem(**i) for i in workload(n=args.items, seed=args.seed)]
    distinct = [ScoreItem(**i) for i in workload(n=args.items, group=1, seed=args.seed)]
    report = {
        "benchmark": "backends",
        "model": "SmolLM2-135M-Instruct",
        "device": args.device,
        "dtype": "float32",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "workload": {"items": len(items), "seed": args.seed, "requests_per_load_level": args.requests, "load_rounds": args.rounds},
        "strategies": asyncio.run(strategies(args, model, items)),
        "service_load": [] if args.skip_load else asyncio.run(
            load(
                args,
                [
                    (GRPO, items, args.clients, {}),
                    (DISTINCT, distinct, [c for c in args.clients if c <= 8], {}),
                    (GRPO_PLAIN, items, [c for c in args.clients if c <= 8], {"STEPCREDIT_SHARE_MIN_TOKENS": "0"}),
                ],
            )
        ),
    }
    print(f"{'strategy':<22} {'items/s':>8} {'seconds':>8} {'tokens':>8} {'vs min*':>8} {'vs per-prefix':>13} {'max |Δ|':>9}")
    for r in report["strategies"]:
        ratio = f"{r['vs_hf_per_prefix']:.1f}x" if r["vs_hf_per_prefix"] else "-"
        diff = f"{r['max_abs_diff_vs_hf_packed']:.1e}" if r["max_abs_diff_vs_hf_packed"] is not None else "-"
        print(f"{r['strategy']:<22} {r['items_per_s']:8.3f} {r['seconds']:8.1f} {r['tokens_forwarded']:8d} {r['tokens_vs_min_shared']:8.2f} {ratio:>13} {diff:>9}")
    for r in report["service_load"]:
        print(f"{r['workload']:<20} {r['clients']:>3} clients: {r['items_per_s']:.3f} items/s, p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s, non-200: {r['non_200']}/{r['requests']}")
    results = ROOT / "benchmarks" / "results"
    (results / f"backends_{args.device}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, results / f"backends_{args.device}.png")
    print(f"wrote benchmarks/results/backends_{args.device}.json and .png")


if __name__ == "__main__":
    main()
