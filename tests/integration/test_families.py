"""Model families whose attention or head differs from Llama's: the hf backend either
gives the model's own numbers (its plain forward pass on each probe sequence alone,
eager attention) or refuses, never silently different numbers.

Tiny random models of each family are built from a config (head size 64) with
SmolLM2's tokenizer. Sequences run past the sliding window of the windowed ones, so
a tree mask that ignored the window would be caught, and several trajectories share
a prefix, so the shared-prefix pass is exercised too.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from stepcredit.backends.hf import HeadMismatchError, HFBackend, packing_rule
from stepcredit.probes import TrajectoryProbes

TOL = 1e-4
WINDOW = 48
COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, head_dim=64)


def _config(family: str, vocab: int):
    import transformers as tf

    base = dict(vocab_size=vocab, max_position_embeddings=512, **COMMON)
    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=1, **base)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=1, sliding_window=WINDOW, **base)
    if family == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, sliding_window=WINDOW, pad_token_id=0, **base)
    if family == "gemma2":
        return tf.Gemma2Config(
            num_key_value_heads=1, sliding_window=WINDOW, query_pre_attn_scalar=64,
            attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **base,
        )  # fmt: skip
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            num_key_value_heads=1, sliding_window=WINDOW, query_pre_attn_scalar=64,
            layer_types=["sliding_attention", "full_attention"], **base,
        )  # fmt: skip
    if family == "gpt-oss":
        # Attention sinks and no SDPA path: eager attention with an additive tree mask.
        return tf.GptOssConfig(
            num_key_value_heads=1, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"], **base,
        )  # fmt: skip
    if family == "granite":
        return tf.GraniteConfig(num_key_value_heads=1, logits_scaling=4.0, **base)
    if family == "cohere":
        return tf.CohereConfig(num_key_value_heads=1, logit_scale=0.25, **base)
    if family == "qwen2-dynamic-rope":
        # Dynamic NTK rescales every position once the longest one in a pass exceeds 64.
        return tf.Qwen2Config(
            num_key_value_heads=1, **{**base, "max_position_embeddings": 64},
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        )  # fmt: skip
    raise ValueError(family)


@pytest.fixture(scope="module")
def build(tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    made = {}

    def make(family: str):
        if family not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_config(family, len(tokenizer)))
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


def _trajectories(seed: int = 0) -> list[TrajectoryProbes]:
    """Four trajectories sharing a 24-token prompt: two short enough for a sliding window
    of 48 (so the tree mask and the shared prefix pass run on windowed models too), two
    longer (so per-prefix under the model's own window runs as well)."""
    rng = random.Random(seed)
    prompt = [rng.randrange(100, 40000) for _ in range(24)]
    prefix_tokens = [rng.randrange(100, 40000) for _ in range(3)]
    out = []
    for length in (8, 12, 70, 110):
        trunk = prompt + [rng.randrange(100, 40000) for _ in range(length)]
        cuts = sorted({len(prompt)} | {rng.randrange(len(prompt) + 1, len(trunk) + 1) for _ in range(4)} | {len(trunk)})
        refs = [[rng.randrange(100, 40000) for _ in range(n)] for n in (1, 4)]
        out.append(TrajectoryProbes(trunk=trunk, contexts=[trunk[:c] + prefix_tokens for c in cuts], references=refs))
    return out


@torch.inference_mode()
def _own_forward(path, trajectories) -> list[list[list[float]]]:
    """The model's plain forward pass on each (probe, reference) sequence alone."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    out = []
    for traj in trajectories:
        rows = []
        for ctx in traj.contexts:
            row = []
            for ref in traj.references:
                ids = torch.tensor([ctx + ref])
                # A fresh copy each time: dynamic NTK rotary embeddings keep state.
                model = copy.deepcopy(loaded)
                logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                picked = [logprobs[len(ctx) - 1 + i, token].item() for i, token in enumerate(ref)]
                row.append(sum(picked) / len(picked))
            rows.append(row)
        out.append(rows)
    return out


def _assert_close(got, want, what):
    for t, (a, b) in enumerate(zip(got, want, strict=True)):
        assert not isinstance(a, Exception), (what, t, a)
        for k, (ra, rb) in enumerate(zip(a, b, strict=True)):
            assert ra == pytest.approx(rb, abs=TOL), (what, t, k)


@pytest.mark.parametrize(
    "family,described",
    [
        ("llama", "packed"),
        ("mistral", f"packed (per-prefix beyond {WINDOW} tokens)"),
        ("phi3", f"packed (per-prefix beyond {WINDOW} tokens)"),
        ("gemma2", f"packed (per-prefix beyond {WINDOW} tokens)"),
        ("gemma3", f"packed (per-prefix beyond {WINDOW} tokens)"),
        ("gpt-oss", f"packed (per-prefix beyond {WINDOW} tokens)"),
        ("granite", "packed"),
        ("cohere", "packed"),
        ("qwen2-dynamic-rope", "per-prefix"),
    ],
)
def test_every_strategy_gives_the_models_own_likelihoods(build, family, described):
    path = build(family)
    trajectories = _trajectories()
    want = _own_forward(path, trajectories)
    for strategy, kwargs in (("packed", {"share_min_tokens": 8}), ("packed", {"share_min_tokens": 0}), ("per-prefix", {})):
        backend = HFBackend(path, device="cpu", dtype="float32", strategy=strategy, **kwargs)
        try:
            out = backend.compute(trajectories)
            if strategy == "packed":
                assert backend.info.strategy == described
                if described != "per-prefix":  # the short ones really ran under the tree mask
                    assert backend.rule.packs(trajectories[0]) and backend.rule.packs(trajectories[1])
        finally:
            backend.shutdown()
        _assert_close(out.results, want, f"{family} {strategy} {kwargs}")


def test_a_head_the_fast_path_does_not_reproduce_is_refused(build, monkeypatch):
    # Granite divides its logits by `logits_scaling`; a fast path that missed it
    # would give a flatter distribution. The start-up check must catch that.
    path = build("granite")
    monkeypatch.setattr(HFBackend, "_logits", lambda self, hidden: self._head(hidden).float())
    with pytest.raises(HeadMismatchError, match="refusing to load"):
        HFBackend(path, device="cpu", dtype="float32")


@pytest.mark.parametrize(
    "family,packed,window",
    [
        ("llama", True, None),
        ("mistral", True, WINDOW),
        ("qwen2-dynamic-rope", False, None),
    ],
)
def test_packing_rule_reads_the_config(family, packed, window, tokenizer):
    rule = packing_rule(_config(family, len(tokenizer)))
    assert (rule.packed, rule.window) == (packed, window)


def test_hybrid_and_linear_attention_families_never_pack(tokenizer):
    import transformers as tf

    configs = [
        tf.Qwen3NextConfig(vocab_size=1000, **COMMON),
        tf.FalconH1Config(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2),
        tf.JambaConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2),
        tf.Lfm2Config(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2),
    ]
    for config in configs:
        rule = packing_rule(config)
        assert not rule.packed and rule.reason, type(config).__name__


def test_gpt_oss_sliding_layers_bound_packing(tokenizer):
    import transformers as tf

    config = tf.GptOssConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, sliding_window=128)
    rule = packing_rule(config)
    assert rule.packed and rule.window == 128
