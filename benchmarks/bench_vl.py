"""Vision-language scoring: items/s, tokens and image-encoding time, packed vs per-prefix.

    .venv/bin/python benchmarks/bench_vl.py [--shape small] [--device cpu] [--items 16]
    .venv/bin/python benchmarks/bench_vl.py --shape tiny --save /tmp/tiny-vl   # only build a model folder

Workload: `--items` CLEVR-like scenes (stepcredit_trainer.scenes, seed 0) as `messages`
items with an inline PNG, their worked solutions as completions (think/answer), the
answer's variants as references. The model is random-weight (speed does not depend on the
weights), built from a config:

* `tiny`: the tests' 2-layer Qwen2-VL (tests/conftest.py);
* `small`: SmolLM2-135M's text shape (30 layers, 576 wide) with a 4-block vision tower;
* `qwen2.5-vl-3b`: Qwen2.5-VL-3B's shape (for a GPU; bfloat16 there).

Each strategy scores the whole workload through the Scorer (images decoded and processed,
probes, backend, verification) as one batch; the figure is the best of `--repeats` runs
after a warm-up. Image encoding is the vision tower's time inside the backend
(`HFBackend.encode_s`); preparation (decode, image processor, tokenizing) is reported
apart. Prints a table and writes benchmarks/results/vl_<shape>_<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepcredit.backends.hf import HFBackend  # noqa: E402
from stepcredit.config import Settings  # noqa: E402
from stepcredit.engine import Scorer  # noqa: E402
from stepcredit.models import ensure_default_model  # noqa: E402
from stepcredit.protocol import ScoreItem  # noqa: E402
from stepcredit.verify import VerifierPool  # noqa: E402
from stepcredit_trainer.scenes import make_scenes  # noqa: E402

SHAPES = {
    "small": dict(
        text=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=64),
        vision=dict(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4),
    ),
    "qwen2.5-vl-3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, head_dim=128),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
    ),
}  # fmt: skip


def build(shape: str, folder: Path, smol: Path) -> Path:
    """A random-weight VL model of `shape` with SmolLM2's tokenizer and the vision tokens."""
    from tests.conftest import build_tiny_vl, vl_tokenizer

    if shape == "tiny":
        return build_tiny_vl(folder, smol)
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok, tokens = vl_tokenizer(smol)
    spec = SHAPES[shape]
    half = spec["text"]["head_dim"] // 2
    section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(spec["text"], vocab_size=len(tok), max_position_embeddings=32768, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    common = dict(text_config=text, tie_word_embeddings=True, **tokens)
    if shape == "qwen2.5-vl-3b":
        config = Qwen2_5_VLConfig(vision_config=dict(spec["vision"], patch_size=14, spatial_merge_size=2,
                                                     temporal_patch_size=2), **common)  # fmt: skip
        model = Qwen2_5_VLForConditionalGeneration(config)
    else:
        vision = dict(spec["vision"], hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)  # fmt: skip
        model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, **common))
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280).save_pretrained(folder)
    return folder


async def run(args: argparse.Namespace) -> dict:
    smol = ensure_default_model(Settings().cache_dir)
    scenes = make_scenes(0, args.items)
    items = [ScoreItem.model_validate(scene.item()) for scene in scenes]
    verifier = VerifierPool(workers=2)
    verifier.start()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.shape, Path(tmp), smol)
        try:
            for strategy in ("packed", "per-prefix"):
                backend = HFBackend(path, strategy=strategy, device=args.device, dtype=args.dtype)
                scorer = Scorer(backend, Settings(), verifier=verifier)
                await scorer.score(items[:1])  # warm-up
                best = None
                for _ in range(args.repeats):
                    encode_before, images_before = backend.encode_s, backend.images_encoded
                    t0 = time.perf_counter()
                    batch = await scorer.score(items)
                    seconds = time.perf_counter() - t0
                    bad = [r.error for r in batch.results if r.status != "ok"]
                    assert not bad, bad[:3]
                    if best is None or seconds < best["seconds"]:
                        best = {
                            "seconds": seconds,
                            "encode_s": backend.encode_s - encode_before,
                            "images_encoded": backend.images_encoded - images_before,
                            "prepare_s": batch.timings["prepare_s"],
                            "backend_s": batch.timings.get("backend_s"),
                            "tokens_forwarded": batch.usage.tokens_forwarded,
                            "forward_passes": batch.usage.forward_passes,
                            "probes": batch.usage.probes,
                        }
                prepared = scorer._prepare_all(items, None)
                image_tokens = sum(p.probes.trunk.count(backend.vision.image_token_id) for p in prepared)
                rows.append({
                    "strategy": strategy,
                    **best,
                    "items_per_s": len(items) / best["seconds"],
                    "tokens_per_s": best["tokens_forwarded"] / best["seconds"],
                    "encode_share": best["encode_s"] / best["seconds"],
                    "image_tokens_per_item": image_tokens / len(items),
                    "trunk_tokens_per_item": sum(len(p.probes.trunk) for p in prepared) / len(items),
                })  # fmt: skip
                backend.shutdown()
        finally:
            verifier.close()
    return {
        "shape": args.shape,
        "device": args.device,
        "dtype": args.dtype,
        "items": len(items),
        "image_size": list(scenes[0].image.size),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "small", "qwen2.5-vl-3b"], default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--save", type=Path, help="only build the --shape model into this folder (e.g. to serve it)")
    args = parser.parse_args()
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        print(f"wrote a random-weight {args.shape} VL model to {build(args.shape, args.save, ensure_default_model(Settings().cache_dir))}")
        return
    result = asyncio.run(run(args))
    print(f"{result['items']} scene items ({result['image_size'][0]}x{result['image_size'][1]} PNG), "
          f"{args.shape} random-weight VL model, {args.device} {args.dtype}, {result['machine']}")  # fmt: skip
    print(f"{'strategy':<11} {'items/s':>8} {'tokens':>8} {'img tok/item':>12} {'encode s':>9} {'share':>6} {'prep s':>7}")
    for row in result["rows"]:
        print(f"{row['strategy']:<11} {row['items_per_s']:>8.2f} {row['tokens_forwarded']:>8} "
              f"{row['image_tokens_per_item']:>12.0f} {row['encode_s']:>9.3f} {row['encode_share']:>6.1%} "
              f"{row['prepare_s']:>7.3f}")  # fmt: skip
    out = ROOT / "benchmarks" / "results" / f"vl_{args.shape}_{args.device.split(':')[0]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
