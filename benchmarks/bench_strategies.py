"""packed vs per-prefix on SmolLM2: items/s and tokens forwarded against the minimum.

    .venv/bin/python benchmarks/bench_strategies.py [--device cpu] [--dtype float32] [--items 16]

Workload: `benchmarks.workload.workload` (think_answer trajectories of 10-30
steps, 1-3 reference variants, fixed seed). Each strategy scores the whole
workload through the Scorer (structure, probes, backend, verification) as
one batch; the figure is the best of `--repeats` runs after one warm-up.
Prints a table and writes benchmarks/results/strategies_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.workload import workload  # noqa: E402
from stepcredit.backends.hf import HFBackend  # noqa: E402
from stepcredit.backends.packing import common_prefix as _common_prefix  # noqa: E402
from stepcredit.config import Settings  # noqa: E402
from stepcredit.engine import Scorer  # noqa: E402
from stepcredit.models import ensure_default_model  # noqa: E402
from stepcredit.protocol import ScoreItem  # noqa: E402
from stepcredit.verify import VerifierPool  # noqa: E402


def minimum_tokens(scorer: Scorer, items: list[ScoreItem]) -> dict[str, int]:
    """L + (K+1)·Σ_v (P + A_v), and with the probe prefix shared across variants L + (K+1)·(P + Σ_v A_v)."""
    per_reference = shared = 0
    for p in scorer._prepare_all(items, None):
        probes = p.probes
        prefix = sum(len(c) - _common_prefix(c, probes.trunk) for c in probes.contexts)
        refs = sum(len(r) for r in probes.references)
        n_refs, n_probes = len(probes.references), len(probes.contexts)
        per_reference += len(probes.trunk) + n_refs * prefix + n_probes * refs
        shared += len(probes.trunk) + prefix + n_probes * refs
    return {"min_tokens_per_reference_prefix": per_reference, "min_tokens_shared_prefix": shared}


async def run(args: argparse.Namespace) -> dict:
    model = ensure_default_model(Settings().cache_dir)
    items = [ScoreItem(**i) for i in workload(n=args.items, seed=args.seed)]
    verifier = VerifierPool(workers=2)
    verifier.start()
    settings = Settings()
    rows = []
    try:
        for strategy, repeats in (("packed", args.repeats), ("per-prefix", args.per_prefix_repeats)):
            backend = HFBackend(model, strategy=strategy, device=args.device, dtype=args.dtype)
            scorer = Scorer(backend, settings, verifier=verifier)
            await scorer.score(items[:1])  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                batch = await scorer.score(items)
                times.append(time.perf_counter() - t0)
            assert all(r.status == "ok" for r in batch.results)
            best = min(times)
            row = {
                "strategy": strategy,
                "seconds": best,
                "items_per_s": len(items) / best,
                "tokens_forwarded": batch.usage.tokens_forwarded,
                "forward_passes": batch.usage.forward_passes,
                "tokens_per_s": batch.usage.tokens_forwarded / best,
                **minimum_tokens(scorer, items),
            }
            row["tokens_vs_min"] = row["tokens_forwarded"] / row["min_tokens_per_reference_prefix"]
            row["tokens_vs_min_shared"] = row["tokens_forwarded"] / row["min_tokens_shared_prefix"]
            rows.append(row)
            backend.shutdown()
    finally:
        verifier.close()
    packed, per_prefix = rows
    steps = [len(r.steps) for r in batch.results]
    return {
        "benchmark": "strategies",
        "model": "SmolLM2-135M-Instruct",
        "device": args.device,
        "dtype": args.dtype,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()},
        "workload": {"items": len(items), "steps_min": min(steps), "steps_max": max(steps), "probes": batch.usage.probes, "reference_probes": batch.usage.reference_probes, "seed": args.seed},
        "rows": rows,
        "speedup_items_per_s": packed["items_per_s"] / per_prefix["items_per_s"],
        "token_reduction": per_prefix["tokens_forwarded"] / packed["tokens_forwarded"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-prefix-repeats", type=int, default=1)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    w = report["workload"]
    print(f"SmolLM2-135M-Instruct {args.dtype} on {args.device}: {w['items']} trajectories, {w['steps_min']}-{w['steps_max']} steps, {w['reference_probes']} (probe, reference) pairs")
    print(f"{'strategy':<11} {'items/s':>8} {'seconds':>8} {'tokens':>9} {'vs min':>7} {'vs min*':>8} {'passes':>7}")
    for r in report["rows"]:
        print(f"{r['strategy']:<11} {r['items_per_s']:8.3f} {r['seconds']:8.1f} {r['tokens_forwarded']:9d} {r['tokens_vs_min']:7.2f} {r['tokens_vs_min_shared']:8.2f} {r['forward_passes']:7d}")
    print(f"packed / per-prefix: {report['speedup_items_per_s']:.1f}x items/s, {report['token_reduction']:.1f}x fewer tokens")
    print("vs min: against L + (K+1)·Σ_v(P + A_v); vs min*: against L + (K+1)·(P + Σ_v A_v) (probe prefix shared across variants)")
    out = ROOT / "benchmarks" / "results" / f"strategies_{args.device.replace(':', '')}_{args.dtype}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
