"""The policy's side of the loop with a vision-language policy (the tiny random Qwen2-VL):
image placeholders expanded to one pad per merged patch, images passed to generation
and to the training forward, multimodal rotary positions right under padding, and the
scene task's items sent to the service with their images."""

from __future__ import annotations

import pytest
import torch

from stepcredit_trainer.evaluate import score_rollouts
from stepcredit_trainer.rollout import load_policy
from stepcredit_trainer.scenes import SceneConfig, make_scene
from stepcredit_trainer.tasks import Problem

ARGS = {"system_prompt": "Think in <think></think>.", "response_prefix": "<think>\n", "max_new_tokens": 8,
        "temperature": 1.0, "top_p": 1.0}  # fmt: skip


def scene_problem(name: str, seed: int, config: SceneConfig | None = None) -> Problem:
    scene = make_scene(seed, 0, config)
    return Problem(name, scene.question, scene.answers, images=(scene.data_uri(),))


# Images of two sizes (48 and 16 merged patches) and a text problem: rows of three prompt lengths.
PROBLEMS = [
    scene_problem("large", 1),
    Problem("text", "What is 2 + 3?", ("5", "5.0")),
    scene_problem("small", 2, SceneConfig(width=112, height=112, max_objects=3)),
]


@pytest.fixture(scope="module")
def policy(tiny_vl_path):
    return load_policy(tiny_vl_path)


def sample(policy, problems=PROBLEMS, seed=0, **kw):
    torch.manual_seed(seed)
    return policy.sample(problems, **{**ARGS, "group_size": 2, **kw})


def test_a_vl_folder_loads_with_its_image_processor(policy, tiny_model_path):
    assert type(policy.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert type(policy.vision.processor).__name__ == "Qwen2VLImageProcessorPil"  # no torchvision needed
    assert policy.vision.image_token_id == policy.model.config.image_token_id
    assert load_policy(tiny_model_path).vision is None  # a causal LM stays one


def test_prompts_hold_one_placeholder_per_image_and_the_ids_one_pad_per_merged_patch(policy):
    rollouts = sample(policy)
    pad, vision = policy.vision.image_token_id, policy.vision
    expected = {"large": 224 * 168 // 28**2, "small": 112 * 112 // 28**2, "text": 0}
    for r in rollouts:
        n_images = len(r.problem.images)
        # What the service is sent: the template's placeholder once per image, unexpanded.
        assert r.prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == n_images
        assert r.prompt_ids.count(pad) == expected[r.problem.id]
        if n_images:
            t, h, w = r.images.grid_thw[0].tolist()
            assert t * h * w // vision.merge_size**2 == expected[r.problem.id]
            assert r.prompt_ids == policy.tokenizer(vision.expand(r.prompt, r.images))["input_ids"]
            assert r.prompt.index("<|vision_start|>") < r.prompt.index(r.problem.question)  # image first
        else:
            assert r.images is None and r.prompt_ids == policy.tokenizer(r.prompt)["input_ids"]


def alone(policy, r, temperature: float) -> torch.Tensor:
    """Log-probs of one rollout's completion from an unpadded forward with only its own image,
    positions left to the model (which derives Qwen2-VL's 3-D positions itself)."""
    ids = torch.tensor([r.prompt_ids + r.completion_ids])
    logits = policy.model(input_ids=ids, **policy.image_inputs([r], ids)).logits[0, len(r.prompt_ids) - 1 : -1]
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, torch.tensor(r.completion_ids)[:, None])[:, 0]


def test_token_logprobs_of_the_padded_mixed_batch_match_each_row_alone(policy):
    """Left padding, images of two sizes and a text row in one batch must not change any
    token's log-prob: the multimodal rotary positions skip the padding."""
    rollouts = sample(policy)
    input_ids, attention, completion, _, _ = policy.layout(rollouts)
    with torch.no_grad():
        batched = policy.token_logprobs(input_ids, attention, completion, 0.7, rollouts)
        for row, r in enumerate(rollouts):
            n = len(r.completion_ids)
            torch.testing.assert_close(batched[row, :n], alone(policy, r, 0.7), rtol=1e-4, atol=1e-4)
        # Micro-batches (train.py's row slices) see only their own rows' images.
        part = policy.token_logprobs(input_ids[3:], attention[3:], completion[3:], 0.7, rollouts[3:])
        torch.testing.assert_close(part, batched[3:], rtol=1e-4, atol=1e-4)


def test_generation_reads_the_image_at_the_right_positions(policy, monkeypatch):
    """The logits each sampled token was drawn from (batched, left-padded generation with
    a KV cache) equal the row's own forward pass: prefill and decode positions both right."""
    captured = {}
    generate = policy.model.generate

    def spy(**kwargs):
        out = generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        captured["logits"] = torch.stack(out.logits, 1)
        return out.sequences

    monkeypatch.setattr(policy.model, "generate", spy)
    rollouts = sample(policy, seed=1)
    with torch.no_grad():
        for row, r in enumerate(rollouts):
            ids = torch.tensor([r.prompt_ids + r.completion_ids])
            own = policy.model(input_ids=ids, **policy.image_inputs([r], ids)).logits[0]
            start, n = len(r.prompt_ids) + len(r.prefix_ids), len(r.sampled_ids)
            drawn_from = captured["logits"][row, :n]
            torch.testing.assert_close(drawn_from, own[start - 1 : start - 1 + n], rtol=1e-4, atol=1e-4)


def test_the_image_reaches_the_model(policy):
    """Same question and grid, another picture: other log-probs (pixel values are used)."""
    (r,) = sample(policy, problems=PROBLEMS[:1], group_size=1)
    other = scene_problem("other", 9)
    (swapped,) = sample(policy, problems=[other], group_size=1)
    assert swapped.images.grid_thw.tolist() == r.images.grid_thw.tolist()
    moved = type(r)(**{**vars(r), "images": swapped.images})
    with torch.no_grad():
        assert not torch.allclose(alone(policy, r, 1.0), alone(policy, moved, 1.0), atol=1e-4)


def test_vl_forward_needs_the_rows_rollouts(policy):
    rollouts = sample(policy, group_size=1)
    input_ids, attention, completion, _, _ = policy.layout(rollouts)
    with pytest.raises(ValueError, match="needs the rollouts"):
        policy.token_logprobs(input_ids, attention, completion, 1.0)


def test_a_rollout_that_lost_its_images_is_refused_not_continued_blind(policy):
    """Its prompt ids still hold the image pads: without pixel values the model would read
    them as plain tokens (validate's continuations did so before they carried the images)."""
    (r,) = sample(policy, problems=PROBLEMS[:1], group_size=1)
    blind = type(r)(**{**vars(r), "images": None})
    with pytest.raises(ValueError, match=r"large: 48 image pad tokens in its ids for images of 0"):
        policy.continue_from([blind], max_new_tokens=2, temperature=1.0, top_p=1.0)
    with pytest.raises(ValueError, match="image pad tokens"):
        alone(policy, blind, 1.0)


def test_vision_tokens_are_never_sampled_even_where_the_model_prefers_them(policy, monkeypatch):
    reserved = list(policy.vision.reserved_ids)
    assert len(reserved) == 4 and policy.vision.image_token_id in reserved
    head = policy.model.get_output_embeddings()
    forward = head.forward

    def favour_vision(hidden):
        logits = forward(hidden)
        logits[..., reserved] += 1e4
        return logits

    monkeypatch.setattr(head, "forward", favour_vision)
    for r in sample(policy, problems=PROBLEMS[:2], group_size=1, greedy=True, max_new_tokens=4):
        assert r.sampled_ids and not set(r.sampled_ids) & set(reserved), r.sampled_ids


def test_a_vl_policy_whose_tokenizer_lacks_a_vision_token_is_refused(tiny_vl_path, tmp_path):
    """The service refuses such a tokenizer; the policy would have sampled the missing token's text."""
    import shutil

    folder = shutil.copytree(tiny_vl_path, tmp_path / "no-video")
    for path in folder.glob("*.json"):
        path.write_text(path.read_text().replace("<|video_pad|>", "<|videopad|>"))
    with pytest.raises(ValueError, match=r"lacks the vision tokens \['<\|video_pad\|>'\]"):
        load_policy(folder)


def test_a_text_only_policy_refuses_a_problem_with_images(tiny_model_path):
    with pytest.raises(ValueError, match="text-only model"):
        load_policy(tiny_model_path).render(PROBLEMS[0], "")


def test_a_bad_data_uri_is_an_error_naming_the_problem(policy):
    bad = Problem("broken", "How many?", ("1",), images=("data:image/png;base64,bm90IGFuIGltYWdl",))
    with pytest.raises(ValueError, match="broken: image 0: undecodable image"):
        sample(policy, problems=[bad], group_size=1)
    remote = Problem("remote", "How many?", ("1",), images=("https://example.com/a.png",))
    with pytest.raises(ValueError, match="remote: image 0: not an inline base64 image data URI"):
        sample(policy, problems=[remote], group_size=1)


class Recorder:
    """A client that keeps what it is asked to score and fails the request (no service here)."""

    def score(self, items, options):
        from stepcredit_client import StepCreditError

        self.items = items
        raise StepCreditError("no service in this test")


def test_scene_items_go_to_the_service_with_their_images(policy):
    rollouts = sample(policy, group_size=1)
    client = Recorder()
    scored = score_rollouts(client, rollouts, {"format": "think_answer"})
    assert scored.results == [None] * 3 and "no service" in scored.request_error
    from stepcredit.config import Settings
    from stepcredit.media import item_images
    from stepcredit.protocol import ScoreItem
    from stepcredit_client import ScoreItem as ClientItem

    for item, r in zip(client.items, rollouts):
        assert item["prompt"] == r.prompt and item["completion_token_ids"] == r.completion_ids
        assert item.get("images", []) == list(r.problem.images)
        ClientItem.model_validate(item)  # the client sends it
        refs = item_images(ScoreItem.model_validate(item), Settings().limits(), "items[0]")  # the service takes it
        assert [ref.data_uri for ref in refs] == list(r.problem.images)
