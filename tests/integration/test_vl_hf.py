"""The hf backend on a vision-language model (a tiny random Qwen2-VL, conftest.py).

What is protected: likelihoods with an image equal the model's own forward pass (its own
vision tower and three-axis rotary positions) within SPEC tolerance, the packed tree gives
the per-prefix numbers, each trajectory's images are encoded once, two trajectories with
the same text but different images never share computed keys, and text-only items on a VL
model still score."""

from __future__ import annotations

import hashlib

import pytest
import torch
from PIL import Image, ImageDraw

from stepcredit.backends.hf import HFBackend
from stepcredit.probes import ProbeImage, ProbeMedia, TrajectoryProbes, text_probes

PACKED_TOL = 1e-4  # SPEC 8: packed and per-prefix of one backend, float32
MODEL_TOL = 2e-3  # SPEC 8: two implementations of the same model
COMPLETION = "<think>\nI see a red circle.\nI see a blue square.\nSo two shapes.\n</think>\n<answer>2</answer>"
CUTS = [8, 28, 49, 64]
PREFIX = "\n</think>\n<answer>"


def scene(color=(200, 0, 0), size=(150, 100)) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 60, 60), fill=color)
    draw.rectangle((80, 30, 130, 80), fill=(0, 0, 200))
    return image


@pytest.fixture(scope="module")
def backends(tiny_vl_path):
    made = {s: HFBackend(tiny_vl_path, strategy=s, device="cpu", share_min_tokens=4) for s in ("per-prefix", "packed")}
    yield made
    for backend in made.values():
        backend.shutdown()


def probes(backend, images, question="How many shapes?", completion=COMPLETION) -> TrajectoryProbes:
    vision = backend.vision
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    prompt = backend.tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], tokenize=False, add_generation_prompt=True
    )
    media = None
    if images:
        processed = vision.process(images)
        prompt = vision.place(prompt, [p.grid_thw for p in processed])
        media = ProbeMedia(
            tuple(
                ProbeImage("data:", im, hashlib.sha256(im.tobytes()).hexdigest(), p.grid_thw, p.pixel_values)
                for im, p in zip(images, processed, strict=True)
            )
        )
    return text_probes(backend.tokenizer, prompt, completion, CUTS, PREFIX, ["2", "two"], media=media)


def own_forward(backend, traj: TrajectoryProbes, images) -> list[list[float]]:
    """ℓ_k(v) from the model's own forward: pixel values in, its positions, its logits."""
    model, vision = backend.model, backend.vision
    extra = {}
    if images:
        processed = vision.process(images)
        extra = {
            "pixel_values": torch.cat([torch.as_tensor(p.pixel_values) for p in processed]),
            "image_grid_thw": torch.tensor([p.grid_thw for p in processed]),
        }
    rows = []
    for context in traj.contexts:
        row = []
        for ref in traj.references:
            ids = torch.tensor([context + ref])
            with torch.inference_mode():
                logits = model(input_ids=ids, mm_token_type_ids=(ids == vision.image_token_id).int(), **extra).logits
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            row.append(sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(ref)) / len(ref))
        rows.append(row)
    return rows


def close(a, b, tol) -> bool:
    return all(abs(x - y) <= tol for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def test_the_prompt_holds_one_pad_token_per_merged_patch(backends):
    backend = backends["per-prefix"]
    traj = probes(backend, [scene()])
    (grid,) = [image.grid_thw for image in traj.media.images]
    pads = traj.trunk.count(backend.vision.image_token_id)
    assert pads == grid[0] * grid[1] * grid[2] // 4 > 0


@pytest.mark.parametrize("strategy", ["per-prefix", "packed"])
def test_likelihoods_with_an_image_equal_the_models_own_forward(backends, strategy):
    backend = backends[strategy]
    images = [scene()]
    traj = probes(backend, images)
    (got,) = backend.compute([traj]).results
    assert close(got, own_forward(backend, traj, images), MODEL_TOL), strategy


def test_packed_equals_per_prefix_on_images_within_spec_tolerance(backends):
    trajs = [probes(backends["packed"], [scene()]), probes(backends["packed"], [scene((0, 150, 0)), scene(size=(90, 140))])]
    packed = backends["packed"].compute(trajs).results
    plain = backends["per-prefix"].compute(trajs).results
    for a, b in zip(packed, plain, strict=True):
        assert close(a, b, PACKED_TOL)


def test_the_image_changes_the_likelihoods(backends):
    """Otherwise the tests above would pass with the image ignored."""
    backend = backends["packed"]
    red, green = (backend.compute([probes(backend, [scene(c)])]).results[0] for c in ((200, 0, 0), (0, 150, 0)))
    assert not close(red, green, 1e-4)


def test_each_image_is_encoded_once_per_call_whatever_its_probes_and_sharers(backends):
    backend = backends["per-prefix"]
    before = backend.images_encoded
    trajs = [probes(backend, [scene(), scene((0, 150, 0))]), probes(backend, [scene()])]
    together = backend.compute(trajs).results
    # 4 probes x 2 references per trajectory, two trajectories showing the red scene:
    # 2 distinct images, encoded once each.
    assert backend.images_encoded - before == 2
    # Reusing the shared picture's embeddings changes no number.
    alone = backend.compute(trajs[1:]).results[0]
    assert close(together[1], alone, PACKED_TOL)


def test_same_text_different_images_never_share_a_prefix(backends):
    """Pad tokens are equal whatever image fills them: a shared prefix pass across
    images would give the second trajectory the first one's image."""
    backend = backends["packed"]
    red, green = probes(backend, [scene()]), probes(backend, [scene((0, 150, 0))])
    assert red.trunk == green.trunk  # same token ids
    together = backend.compute([red, green]).results
    alone = [backend.compute([t]).results[0] for t in (red, green)]
    for a, b in zip(together, alone, strict=True):
        assert close(a, b, PACKED_TOL)


def test_same_image_trajectories_may_share_the_prompt_pass(backends):
    backend = backends["packed"]
    first = probes(backend, [scene()])
    second = probes(backend, [scene()], completion=COMPLETION.replace("red circle", "round red"))
    out = backend.compute([first, second])
    alone = [backend.compute([t]).results[0] for t in (first, second)]
    for a, b in zip(out.results, alone, strict=True):
        assert close(a, b, PACKED_TOL)


@pytest.mark.parametrize("strategy", ["per-prefix", "packed"])
def test_text_only_items_on_a_vl_model_still_score(backends, strategy):
    backend = backends[strategy]
    traj = probes(backend, [])
    assert traj.media is None and backend.vision.image_token_id not in traj.trunk
    (got,) = backend.compute([traj]).results
    assert close(got, own_forward(backend, traj, []), MODEL_TOL)


def test_a_mixed_batch_of_text_and_image_trajectories_equals_each_alone(backends):
    backend = backends["packed"]
    trajs = [probes(backend, []), probes(backend, [scene()]), probes(backend, [])]
    together = backend.compute(trajs).results
    for traj, got in zip(trajs, together, strict=True):
        assert close(got, backend.compute([traj]).results[0], PACKED_TOL)


def test_images_on_a_text_only_backend_fail_that_trajectory(backends, tiny_model_path):
    text_backend = HFBackend(tiny_model_path, strategy="packed", device="cpu")
    try:
        traj = probes(backends["packed"], [scene()])
        plain = TrajectoryProbes([1, 2, 3], [[1, 2], [1, 2, 3]], [[5]])
        bad, good = text_backend.compute([traj, plain]).results
        assert isinstance(bad, Exception) and "takes no images" in str(bad)
        assert isinstance(good, list)
    finally:
        text_backend.shutdown()


@pytest.mark.parametrize("gone", [0, 1])
def test_a_live_sharer_keeps_its_image_when_the_other_is_abandoned(backends, gone):
    """The shared prompt pass may be computed from the abandoned trajectory's row: it
    must still carry the picture (it once fell back to bare pad embeddings: Δℓ 0.24)."""
    from stepcredit.backends.base import Abandoned

    backend = backends["packed"]
    trajs = [probes(backend, [scene()]), probes(backend, [scene()], completion=COMPLETION.replace("red circle", "round red"))]
    live = 1 - gone
    alone = backend.compute([trajs[live]]).results[0]
    abandoned = Abandoned()
    abandoned.add(range(gone, gone + 1))
    out = backend.compute(trajs, abandoned)
    assert isinstance(out.results[gone], Exception)
    assert close(out.results[live], alone, PACKED_TOL)


def test_qwen2_5_vl_with_several_images_equals_its_own_forward_packed_and_per_prefix(tmp_path_factory, smol_path):
    """Qwen2.5-VL: windowed vision attention, its own rope index; two images of different
    sizes, one in the system message."""
    from tests.conftest import build_tiny_vl

    path = build_tiny_vl(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), smol_path, family="qwen2_5_vl")
    made = [HFBackend(path, strategy=s, device="cpu") for s in ("per-prefix", "packed")]
    try:
        backend = made[0]
        assert backend.vision.model_type == "qwen2_5_vl"
        images = [scene(), scene((0, 150, 0), size=(90, 140))]
        vision = backend.vision
        processed = vision.process(images)
        prompt = backend.tokenizer.apply_chat_template(
            [{"role": "system", "content": [{"type": "image"}, {"type": "text", "text": "A reference picture."}]},
             {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]}],
            tokenize=False, add_generation_prompt=True,
        )  # fmt: skip
        prompt = vision.place(prompt, [p.grid_thw for p in processed])
        media = ProbeMedia(tuple(
            ProbeImage("data:", im, str(i), p.grid_thw, p.pixel_values) for i, (im, p) in enumerate(zip(images, processed))
        ))  # fmt: skip
        traj = text_probes(backend.tokenizer, prompt, COMPLETION, CUTS, PREFIX, ["2", "two"], media=media)
        truth = own_forward(backend, traj, images)
        for b in made:
            assert close(b.compute([traj]).results[0], truth, MODEL_TOL), b.strategy
        assert close(made[1].compute([traj]).results[0], made[0].compute([traj]).results[0], PACKED_TOL)
    finally:
        for b in made:
            b.shutdown()
