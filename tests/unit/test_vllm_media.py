"""What both vLLM backends send for a probe with images (vllm_media.py), without a model.

Protected: each image's pads are collapsed to the one pad vLLM expands (sent expanded,
vLLM 0.32 turns N pads into 2N - 1, measured), and a pad run that is not an image's
exact size is refused rather than guessed; the content parts carry the data URI and the
digest as the uuid; vLLM's expansion must equal ours; the router does not count two
trajectories with the same text but other images as sharing a cached prefix."""

from __future__ import annotations

import pytest

from stepcredit.backends.base import BackendError
from stepcredit.backends.routing import common_prefix
from stepcredit.backends.vllm_media import check_expansion, collapse_images, content_parts, route_key
from stepcredit.probes import ProbeImage, ProbeMedia, TrajectoryProbes

PAD, START, END = 900, 901, 902


def image(digest: str) -> ProbeImage:
    return ProbeImage(f"data:image/png;base64,{digest}", None, digest, (1, 4, 4), None)


def test_each_images_pads_collapse_to_one():
    prompt = [1, 2, START, *[PAD] * 4, END, 3, START, *[PAD] * 6, END, 4, 5]
    assert collapse_images(prompt, PAD, [4, 6]) == [1, 2, START, PAD, END, 3, START, PAD, END, 4, 5]
    assert collapse_images([1, 2, 3], PAD, []) == [1, 2, 3]


@pytest.mark.parametrize(
    "prompt, sizes",
    [
        ([START, *[PAD] * 4, END, 7, PAD], [4]),  # a pad in the completion or a reference
        ([START, *[PAD] * 3, END], [4]),  # a run shorter than its image
        ([START, *[PAD] * 4, END], [4, 4]),  # an image without its placeholder
    ],
)
def test_a_pad_run_that_is_not_an_image_is_refused(prompt, sizes):
    with pytest.raises(BackendError, match="image pad runs"):
        collapse_images(prompt, PAD, sizes)


def test_content_parts_carry_the_data_uri_and_the_digest_as_uuid():
    media = ProbeMedia((image("a" * 64), image("b" * 64)))
    assert content_parts(media) == [
        {"type": "image_url", "url": "data:image/png;base64," + "a" * 64, "uuid": "a" * 64},
        {"type": "image_url", "url": "data:image/png;base64," + "b" * 64, "uuid": "b" * 64},
    ]


def test_an_expansion_other_than_ours_is_an_error():
    check_expansion(59, 59, "vLLM")
    with pytest.raises(BackendError, match="78-token prompt, the service's image processor to 59"):
        check_expansion(78, 59, "vLLM")


def test_the_router_sees_other_images_as_other_prefixes():
    trunk = [1, 2, START, *[PAD] * 4, END, 3, 4]

    def traj(*digests):
        media = ProbeMedia(tuple(image(d) for d in digests)) if digests else None
        return TrajectoryProbes(trunk, [trunk], [[5]], media)

    same_a, same_b, other = traj("a" * 64), traj("a" * 64), traj("c" * 64)
    assert common_prefix(route_key(same_a, PAD), route_key(same_b, PAD)) == len(trunk)
    # Shared up to the image, not past it (the prefix cache hashes the image in).
    assert common_prefix(route_key(same_a, PAD), route_key(other, PAD)) == 3
    assert route_key(traj(), PAD) == trunk and route_key(same_a, None) == trunk
