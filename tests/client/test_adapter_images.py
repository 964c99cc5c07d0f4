"""The adapters with images, given exactly the shapes their trainers pass.

TRL: TRL's own `prepare_multimodal_messages` builds the prompts and the keyword
arguments follow `GRPOTrainer._calculate_rewards` (TRL 1.16, same on main). verl:
its real `RLHFDataset` reads a parquet file with an image column, its `collate_fn`
makes the `DataProto`, and its real `RewardLoopWorker` loads and runs our manager.
slime (not installable here): `Sample.multimodal_inputs` and the prompt as
slime/utils/data.py builds them. OpenRLHF passes no image to `reward_func`.

First what each adapter sends (httpx.MockTransport records the request), then the
same calls scored by the live service on the tiny random Qwen2-VL; those need the
service's image support (issue 12) and fail without it.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from stepcredit_client import AsyncClient, Client, ClientConfig, Retry, image_data_uri
from stepcredit_client.adapters.trl import StepCreditReward
from tests.conftest import VISION_TOKENS, VL_CHAT_TEMPLATE

from .test_client_unit import echo

QUESTION = "How many red squares are there?"
ANSWER = "<think>\nI see one red square.\nSo the count is 1.\n</think>\n<answer>1</answer>"
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
FAST = Retry(max_attempts=2, backoff_s=0.001, max_backoff_s=0.01)


def scene(n_red: int, size=(56, 56)) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    for k in range(n_red):
        image.paste((220, 20, 20), (4 + 16 * k, 4, 14 + 16 * k, 14))
    return image


def file_bytes(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def pixels_of(uri: str) -> bytes:
    head, _, data = uri.partition(",")
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").tobytes()


class Recorder:
    """The service as a MockTransport: records each request's JSON, answers ok results."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.items.extend(json.loads(request.content)["items"])
        return echo(request)

    def client(self) -> Client:
        return Client("http://svc", config=ClientConfig(retry=FAST), transport=httpx.MockTransport(self))

    def async_client(self) -> AsyncClient:
        return AsyncClient("http://svc", config=ClientConfig(retry=FAST), transport=httpx.MockTransport(self))


@pytest.fixture(scope="module")
def vl_tokenizer(smol_path):
    """A Qwen2-VL-style policy tokenizer: SmolLM2's plus the vision tokens and the template
    that writes one placeholder per image part (the tiny VL scorer's own)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_path)
    tok.add_tokens(VISION_TOKENS, special_tokens=True)
    tok.chat_template = VL_CHAT_TEMPLATE
    return tok


# ------------------------------------------------------------------------ TRL

trl = pytest.importorskip("trl", reason="trl is in the `test` extra")


def trl_reward_call(reward, rows: list[dict], completions: list):
    """What GRPOTrainer does between sampling and the reward function (TRL 1.16 and main,
    trl/trainer/grpo_trainer.py `_generate_and_score_completions`, `_calculate_rewards`)."""
    from trl.data_utils import prepare_multimodal_messages

    if "images" in rows[0]:
        images = [row.get("images") for row in rows]
    elif "image" in rows[0]:
        images = [[row.get("image")] if row.get("image") is not None else None for row in rows]
    else:
        images = None
    prompts = [row["prompt"] for row in rows]
    if images is not None:
        prompts = [prepare_multimodal_messages(p, images=i) for p, i in zip(prompts, images, strict=True)]
    keys = [key for key in rows[0] if key not in ["prompt", "completion", "completion_ids"]]
    reward_kwargs = {key: [row[key] for row in rows] for key in keys}
    reward_kwargs.update(trainer_state=None, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
    return reward(prompts=prompts, completions=completions, completion_ids=[[1, 2]] * len(rows), **reward_kwargs)


def conversational(text=ANSWER):
    return [{"role": "assistant", "content": text}]


def test_trl_image_column_reaches_the_service_as_an_inline_part_where_trl_put_it():
    recorder = Recorder()
    red1, red2 = scene(1), scene(2)
    rows = [
        {"prompt": [{"role": "user", "content": QUESTION}], "image": red1, "answer": "1"},
        {"prompt": [{"role": "user", "content": QUESTION}], "image": red2, "answer": "2"},
        {"prompt": [{"role": "user", "content": "What is 2+3?"}], "image": None, "answer": "5"},  # text row
    ]
    rewards = trl_reward_call(StepCreditReward(client=recorder.client()), rows, [conversational()] * 3)
    assert len(rewards) == 3 and all(r is not None for r in rewards)
    sent = recorder.items
    for item, image in zip(sent[:2], (red1, red2)):
        (message,) = item["messages"]
        image_part, text_part = message["content"]  # TRL puts the image before the question
        assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
        assert pixels_of(image_part["image_url"]["url"]) == image.tobytes()
        assert text_part == {"type": "text", "text": QUESTION} and "images" not in item  # sent once, in its part
    assert sent[2]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "What is 2+3?"}]}]


def test_trl_images_column_fills_the_datasets_own_placeholders_in_order():
    recorder = Recorder()
    one, two = scene(1), scene(2)
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Left:"}, {"type": "image"},
                                           {"type": "text", "text": "Right:"}, {"type": "image"},
                                           {"type": "text", "text": "Which has more red squares?"}]}]  # fmt: skip
    rows = [{"prompt": prompt, "images": [one, two], "answer": "right"}]
    trl_reward_call(StepCreditReward(client=recorder.client()), rows, [conversational()])
    content = recorder.items[0]["messages"][0]["content"]
    assert [part["type"] for part in content] == ["text", "image_url", "text", "image_url", "text"]
    assert pixels_of(content[1]["image_url"]["url"]) == one.tobytes()
    assert pixels_of(content[3]["image_url"]["url"]) == two.tobytes()


def test_trl_with_the_policy_template_sends_the_rendered_prompt_and_its_images(vl_tokenizer):
    recorder = Recorder()
    rows = [{"prompt": [{"role": "user", "content": QUESTION}], "image": scene(1), "answer": "1"}]
    reward = StepCreditReward(client=recorder.client(), policy_tokenizer=vl_tokenizer)
    trl_reward_call(reward, rows, [conversational()])
    (item,) = recorder.items
    assert item["prompt"].count(PLACEHOLDER) == 1 and item["prompt"].index(PLACEHOLDER) < item["prompt"].index(QUESTION)
    assert item["prompt"].endswith("<|im_start|>assistant\n") and "messages" not in item
    assert len(item["images"]) == 1 and pixels_of(item["images"][0]) == scene(1).tobytes()


def test_trl_refuses_a_completion_that_holds_an_image():
    # A tool may answer with an image (TRL's multimodal tools); the completion is scored as text.
    rows = [{"prompt": [{"role": "user", "content": QUESTION}], "image": scene(1), "answer": "1"}]
    completion = conversational() + [{"role": "tool", "content": [{"type": "image", "image": scene(2)}]}]
    with pytest.raises(ValueError, match="completion holding images"):
        trl_reward_call(StepCreditReward(client=Recorder().client()), rows, [completion])


# ----------------------------------------------------------------------- verl

verl = pytest.importorskip("verl", reason="verl is installed --no-deps by scripts/dev.py")


def verl_dataset(tmp_path, rows: list[dict]):
    """verl's RLHFDataset over a parquet file whose `images` column holds the image files
    (datasets' Image feature, undecoded: {"bytes", "path"}), as verl's recipes write it."""
    import datasets
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    table = datasets.Dataset.from_dict({key: [row[key] for row in rows] for key in rows[0]})
    table = table.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    path = tmp_path / "vl.parquet"
    table.to_parquet(path)
    config = OmegaConf.create({"filter_overlong_prompts": False, "cache_dir": str(tmp_path / "cache")})
    # The processor is only asserted present before the prompt's <image> marks become parts.
    return RLHFDataset([str(path)], tokenizer=None, config=config, processor=object())


def verl_batch(dataset, policy, image_processor, responses: list[str], p_len=160, r_len=64):
    """The rollout's tensors beside the dataset's non-tensor fields: the prompt as the
    policy's processor tokenizes it (each image's pad expanded to grid/merge² tokens),
    left-padded; the response right-padded."""
    from verl import DataProto
    from verl.utils.dataset.rl_dataset import collate_fn

    rows = [dataset[i] for i in range(len(dataset))]
    prompts, resps, masks = [], [], []
    for row, text in zip(rows, responses, strict=True):
        rendered = policy.apply_chat_template(row["raw_prompt"], add_generation_prompt=True, tokenize=False)
        images = [part["image"] for m in row["raw_prompt"] if isinstance(m["content"], list)
                  for part in m["content"] if part["type"] == "image"]  # fmt: skip
        pieces = rendered.split(PLACEHOLDER)
        assert len(pieces) == len(images) + 1
        for image, piece in zip(images, pieces[1:]):
            t, h, w = (int(x) for x in image_processor(images=[image.convert("RGB")])["image_grid_thw"][0])
            pieces[0] += "<|vision_start|>" + "<|image_pad|>" * (t * h * w // 4) + "<|vision_end|>" + piece
        ids = policy(pieces[0], add_special_tokens=False)["input_ids"]
        out = policy(text, add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
        assert len(ids) <= p_len and len(out) <= r_len
        pad = policy.pad_token_id
        prompts.append([pad] * (p_len - len(ids)) + ids)
        resps.append(out + [pad] * (r_len - len(out)))
        masks.append([0] * (p_len - len(ids)) + [1] * (len(ids) + len(out)) + [0] * (r_len - len(out)))
    data = DataProto.from_single_dict(collate_fn(rows))
    data.batch["prompts"] = torch.tensor(prompts)
    data.batch["responses"] = torch.tensor(resps)
    data.batch["attention_mask"] = torch.tensor(masks)
    return data


def verl_config(policy_dir, url):
    from .test_adapter_verl import config  # imports verl: only the verl tests pay for it

    return config(policy_dir, url, reward_kwargs={"max_attempts": 2})


VERL_ROWS = [
    {"data_source": "scenes", "prompt": [{"role": "user", "content": "<image>" + QUESTION}],
     "images": [{"bytes": file_bytes(scene(1)), "path": None}],
     "reward_model": {"ground_truth": "1", "style": "rule"}, "extra_info": {"index": 0}},
    {"data_source": "scenes", "prompt": [{"role": "user", "content": "Left <image>, right <image>. Which has more?"}],
     "images": [{"bytes": file_bytes(scene(1)), "path": None}, {"bytes": file_bytes(scene(2), "PNG"), "path": None}],
     "reward_model": {"ground_truth": "right", "style": "rule"}, "extra_info": {"index": 1}},
]  # fmt: skip


@pytest.fixture(scope="module")
def vl_policy_dir(tmp_path_factory, vl_tokenizer, tiny_vl_path):
    from transformers import AutoImageProcessor

    path = tmp_path_factory.mktemp("vl-policy")
    vl_tokenizer.save_pretrained(path)
    return path, AutoImageProcessor.from_pretrained(tiny_vl_path)


async def test_verl_manager_sends_the_raw_prompt_images_and_one_placeholder_each(
    tmp_path, vl_policy_dir, vl_tokenizer, monkeypatch
):
    import stepcredit_client.adapters.verl_manager as manager_module
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    policy_dir, image_processor = vl_policy_dir
    data = verl_batch(verl_dataset(tmp_path, VERL_ROWS), vl_tokenizer, image_processor, [ANSWER, ANSWER])
    assert "<|image_pad|><|image_pad|>" in vl_tokenizer.decode(data.batch["prompts"][0])  # expanded, as verl has it
    recorder = Recorder()
    monkeypatch.setattr(manager_module, "client_for_loop", lambda settings: recorder.async_client())

    worker = RewardLoopWorker(verl_config(policy_dir, "http://svc"))
    outputs = await worker.compute_score_batch(data)
    rm_scores = worker.reward_manager.assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    assert rm_scores.shape == data.batch["responses"].shape

    first, second = recorder.items
    assert first["prompt"].count("<|image_pad|>") == 1 and first["prompt"].count(PLACEHOLDER) == 1
    assert second["prompt"].count(PLACEHOLDER) == 2
    assert first["prompt"] == vl_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    # The dataset's files go as they are (JPEG stays JPEG), in prompt order.
    assert [uri.split(";")[0] for uri in second["images"]] == ["data:image/jpeg", "data:image/png"]
    assert base64.b64decode(first["images"][0].partition(",")[2]) == VERL_ROWS[0]["images"][0]["bytes"]
    assert [base64.b64decode(u.partition(",")[2]) for u in second["images"]] == [
        image["bytes"] for image in VERL_ROWS[1]["images"]
    ]


async def test_verl_compute_score_takes_images_from_extra_info(monkeypatch):
    import stepcredit_client.adapters.verl as verl_adapter

    recorder = Recorder()
    monkeypatch.setattr(verl_adapter, "client_for_loop", lambda settings: recorder.async_client())
    jpeg = file_bytes(scene(1))
    await verl_adapter.compute_score(
        "scenes", ANSWER, np.array(["1"], dtype=object),
        {"prompt": f"<|im_start|>user\n<image>{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
         "images": np.array([{"bytes": jpeg, "path": None}], dtype=object)},
    )  # fmt: skip
    await verl_adapter.compute_score(
        "scenes", ANSWER, "1",
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
         "images": [jpeg]},
    )  # fmt: skip
    with_prompt, with_messages = recorder.items
    assert with_prompt["images"] == [image_data_uri(jpeg)] and with_prompt["images"][0].startswith("data:image/jpeg")
    assert with_messages["messages"][0]["content"][0] == {"type": "image_url", "image_url": {"url": image_data_uri(jpeg)}}


# ---------------------------------------------------------------------- slime


class SlimeSample:
    """The fields of slime/utils/types.py `Sample` a reward function reads, images included."""

    def __init__(self, prompt, response, label, multimodal_inputs=None):
        self.prompt, self.response, self.label = prompt, response, label
        self.multimodal_inputs = multimodal_inputs
        self.metadata: dict = {}


async def test_slime_sends_the_images_slime_loaded(monkeypatch, vl_tokenizer, tmp_path):
    import stepcredit_client.adapters.slime as slime_adapter

    recorder = Recorder()
    monkeypatch.setattr(slime_adapter, "client_for_loop", lambda settings: recorder.async_client())
    path = tmp_path / "scene.png"
    scene(2).save(path)
    # slime/utils/data.py _build_messages with --multimodal-keys '{"image": "images"}': "<image>" -> a part.
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": QUESTION}]}]
    loaded = {"images": [scene(2)], "videos": None}  # processing_utils.process_vision_info
    rendered = vl_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    await slime_adapter.reward_func(None, SlimeSample(rendered, ANSWER, "2", loaded))
    await slime_adapter.reward_func(None, SlimeSample(messages, ANSWER, "2", loaded))  # no chat template applied
    await slime_adapter.reward_func(None, SlimeSample(messages, ANSWER, "2"))  # no processor: the part's own file
    as_prompt, as_messages, from_file = recorder.items
    assert as_prompt["prompt"] == rendered and PLACEHOLDER in rendered
    assert len(as_prompt["images"]) == 1 and pixels_of(as_prompt["images"][0]) == scene(2).tobytes()
    assert as_messages["messages"][0]["content"][0]["image_url"]["url"] == as_prompt["images"][0]
    assert from_file["messages"][0]["content"][0]["image_url"]["url"] == image_data_uri(path)
    with pytest.raises(ValueError, match="videos"):
        await slime_adapter.reward_func(None, SlimeSample(rendered, ANSWER, "2", {"images": None, "videos": [[]]}))


# -------------------------------------------------------------------- OpenRLHF


def test_openrlhf_refuses_an_image_prompt_it_cannot_see(vl_tokenizer):
    from stepcredit_client.adapters.openrlhf import reward_func

    # openrlhf/datasets/prompts_dataset.py: "<image>" becomes {"type": "image"}, then the chat template.
    prompt = vl_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="passes no image to reward_func"):
        reward_func([prompt + ANSWER], [prompt], ["1"], url="http://127.0.0.1:9")


# ------------------------------------------------- against the live VL service
# These need the service to take images (issue 12's service side).


def test_trl_rewards_with_images_are_the_services_scores(live_vl_server):
    rows = [
        {"prompt": [{"role": "user", "content": QUESTION}], "image": scene(1), "answer": "1"},
        {"prompt": [{"role": "user", "content": QUESTION}], "image": scene(3), "answer": "1"},
    ]
    recorder_reward = StepCreditReward(live_vl_server.url, references_column="answer")
    rewards = trl_reward_call(recorder_reward, rows, [conversational(), conversational()])
    assert all(r is not None for r in rewards)
    with Client(live_vl_server.url) as client:
        direct = client.score([
            {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_data_uri(row["image"])}},
                {"type": "text", "text": QUESTION}]}], "completion": ANSWER, "references": ["1"]}
            for row in rows
        ]).results  # fmt: skip
    assert rewards == pytest.approx([r.outcome_reward + r.mig_reward for r in direct], abs=1e-4)
    assert rewards[0] != pytest.approx(rewards[1], abs=1e-6)  # the image changes the scorer's likelihoods


async def test_verl_manager_scores_images_through_the_live_service(tmp_path, vl_policy_dir, vl_tokenizer, live_vl_server):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    policy_dir, image_processor = vl_policy_dir
    data = verl_batch(verl_dataset(tmp_path, VERL_ROWS[:1]), vl_tokenizer, image_processor, [ANSWER])
    worker = RewardLoopWorker(verl_config(policy_dir, live_vl_server.url))
    outputs = await worker.compute_score_batch(data)
    rm_scores = worker.reward_manager.assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    prompt = vl_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    with Client(live_vl_server.url) as client:
        (result,) = client.score([{"prompt": prompt, "completion": ANSWER, "references": ["1"],
                                   "images": [image_data_uri(VERL_ROWS[0]["images"][0]["bytes"])]}]).results  # fmt: skip
    assert result.ok and rm_scores[0].sum().item() == pytest.approx(result.outcome_reward + result.mig_reward, abs=1e-4)
