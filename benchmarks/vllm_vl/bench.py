"""VL scoring, hf against in-process vLLM: agreement, tokens computed, the prefix cache's share.

    .venv/bin/python benchmarks/bench_vl.py --shape tiny --save /tmp/tiny-vl
    PYTHONPATH=benchmarks/vllm_vl .venv/bin/python benchmarks/vllm_vl/bench.py /tmp/tiny-vl

On a machine whose vLLM loads Qwen2-VL (torchvision installed), leave PYTHONPATH out; on
this project's CPU machines the diagnostic `sitecustomize.py` beside this file is needed
(BENCHMARKS.md says what it changes). Prints the figures and writes
benchmarks/results/vl_vllm_cpu.json.
"""

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.e2e.vl_probes import scene, vl_probes

def batch(tok, vision):
    out = []
    for g in range(2):  # two GRPO groups: one image and question each, 4 completions of 5..8 steps
        for c in range(4):
            out.append(vl_probes(tok, vision, [scene(10 + g, (224, 168))], steps=5 + c, question=f"How many shapes? (group {g})"))
    return out

def prompt_tokens(trajs):
    return sum(len(c) + len(r) for t in trajs for c in t.contexts for r in t.references)

async def timed(backend, trajs, reps=3):
    best = None
    for _ in range(reps):
        t0 = time.perf_counter(); out = await backend.loglikelihoods(trajs); dt = time.perf_counter() - t0
        assert not any(isinstance(r, Exception) for r in out.results), out.results
        best = dt if best is None else min(best, dt)
    return best, out

async def main():
    from stepcredit.backends.hf import HFBackend
    from stepcredit.backends.vllm_engine import VLLMBackend
    path = sys.argv[1]
    res = {}
    hf = HFBackend(path, strategy="per-prefix", device="cpu")
    trajs = batch(hf.tokenizer, hf.vision)
    texts = [vl_probes(hf.tokenizer, hf.vision, [], steps=5 + c, question=f"How many shapes? (group {g})") for g in range(2) for c in range(4)]
    total, total_text = prompt_tokens(trajs), prompt_tokens(texts)
    probes = sum(len(t.contexts) * len(t.references) for t in trajs)
    pads = trajs[0].trunk.count(hf.vision.image_token_id)
    print(f"batch: {len(trajs)} trajectories, {probes} probe requests, {total} prompt tokens ({pads} image pads per prompt)")
    dt, ref = await timed(hf, trajs); res["hf per-prefix"] = (dt, ref.tokens_forwarded, hf.encode_s)
    hf.shutdown()
    hp = HFBackend(path, strategy="packed", device="cpu")
    dt, out = await timed(hp, trajs); res["hf packed"] = (dt, out.tokens_forwarded, hp.encode_s)
    hp.shutdown()
    for reuse in (True, False):
        v = VLLMBackend(path, device="cpu", prefix_reuse=reuse)
        await v.loglikelihoods([vl_probes(v.tokenizer, v.vision, [scene(99)], steps=2)])  # warm-up, another image
        dt, out = await timed(v, trajs, reps=1)
        diff = max(abs(a - b) for x, y in zip(out.results, ref.results) for ra, rb in zip(x, y) for a, b in zip(ra, rb))
        res[f"vllm {'prefix-reuse' if reuse else 'no-reuse'}"] = (dt, out.tokens_forwarded, None)
        print(f"vllm reuse={reuse}: max |vllm - hf per-prefix| = {diff:.1e}; computed {out.tokens_forwarded}/{total}, cached share {1 - out.tokens_forwarded/total:.3f}")
        if reuse:
            dt2, out2 = await timed(v, texts, reps=1)
            print(f"vllm reuse, same batch without images: computed {out2.tokens_forwarded}/{total_text}, cached share {1 - out2.tokens_forwarded/total_text:.3f}, {dt2:.2f} s")
        v.shutdown()
    import json

    out_path = Path(__file__).resolve().parents[1] / "results" / "vl_vllm_cpu.json"
    rows = [{"backend": name, "seconds": dt, "items_per_s": len(trajs) / dt, "tokens_computed": tok,
             "prompt_tokens": total} for name, (dt, tok, _) in res.items()]  # fmt: skip
    out_path.write_text(json.dumps({"trajectories": len(trajs), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out_path}")
    for name, (dt, tok, enc) in res.items():
        print(f"{name:22s} {dt:6.2f} s  {len(trajs)/dt:5.2f} items/s  tokens computed {tok}" + (f"  image encoding {enc:.2f} s total" if enc is not None else ""))

if __name__ == "__main__":
    asyncio.run(main())
