import json

import cv2
import numpy as np
import pytest
import torch

from headstyle.priors.controls import (
    MonocularDepth,
    canny,
    canny_control,
    depth_control,
    disparity_control,
    to_uint8,
)


def _scene(h: int, w: int, seed: int) -> np.ndarray:
    """A blurred, noisy picture of overlapping discs: edges in every direction, ties and weak gradients."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), rng.uniform(0, 255), np.float32)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(8):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, h / 3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255)
    img += rng.normal(0, 10, img.shape)
    img = cv2.GaussianBlur(img, (5, 5), 1.0)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(64, 64), (97, 131), (200, 160)])
def test_canny_equals_opencv_exactly(shape):
    scenes = np.stack([_scene(*shape, seed) for seed in range(6)])
    ours = canny(torch.from_numpy(scenes), 50, 250).numpy()
    for s, o in zip(scenes, ours, strict=True):
        ref = cv2.Canny(s, 50, 250) > 0
        assert ref.sum() > 20
        np.testing.assert_array_equal(o, ref)
    # other thresholds, including swapped ones (OpenCV sorts them)
    np.testing.assert_array_equal(
        canny(torch.from_numpy(scenes[:1]), 120, 30)[0].numpy(), cv2.Canny(scenes[0], 30, 120) > 0
    )


def test_canny_control_uses_the_red_channel_like_the_ld_script():
    g = torch.Generator().manual_seed(0)
    render = torch.from_numpy(np.stack([_scene(64, 64, s) for s in range(3)])).float()[None] / 127.5 - 1
    render = render + 0.01 * torch.randn(render.shape, generator=g)
    # script: np.clip((img + 1) * 127.5, 0, 255).astype(np.uint8)[0] of a float32 render
    ref_levels = np.clip((render[0].numpy() + 1) * 127.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(to_uint8(render[0]).numpy(), ref_levels)
    control = canny_control(render)
    assert control.shape == (1, 3, 64, 64) and control.dtype == torch.float32
    np.testing.assert_array_equal(control[0, 0].numpy() > 0, cv2.Canny(ref_levels[0], 50, 250) > 0)
    assert torch.equal(control[:, 0], control[:, 2])
    swapped = render.clone()
    swapped[:, 1:] = -swapped[:, 1:]
    assert torch.equal(canny_control(swapped), control)  # green/blue do not matter


def test_depth_control_near_is_white_normalised_per_image_and_affine_invariant():
    yy = torch.linspace(2.0, 3.0, 32)[:, None].expand(32, 32)
    depth = torch.stack([yy, 2 * yy + 1])[:, None]
    mask = torch.ones_like(depth)
    mask[..., :4] = 0
    c = depth_control(depth, mask)
    assert c.shape == (2, 3, 32, 32)
    torch.testing.assert_close(c[:, :, 0, 10], torch.ones(2, 3), rtol=0, atol=1e-5)  # nearest row white
    torch.testing.assert_close(c[:, :, -1, 10], torch.zeros(2, 3), rtol=0, atol=1e-5)  # farthest row black
    assert c[..., :4].eq(0).all()  # background black
    torch.testing.assert_close(
        c[0], c[1], rtol=0, atol=1e-5
    )  # per-image min-max: affine depth rescaling changes nothing
    clipped = depth_control(depth[:1], far=2.5)
    assert clipped[0, 0, -1, 10] < 1e-5 and clipped[0, 0, 20, 10] < 1e-5 and clipped[0, 0, 0, 10] > 1 - 1e-5
    d = disparity_control(torch.stack([yy, 3 * yy])[:, None])
    assert d.amin() == 0 and d.amax() > 1 - 1e-5
    torch.testing.assert_close(d[0], d[1], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_depth_folder(tmp_path_factory):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, patch_size=14,
        image_size=98, out_features=["stage1", "stage2", "stage3", "stage4"], reshape_hidden_states=False,
    )  # fmt: skip
    config = DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=8, head_hidden_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("depth-anything-tiny")
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    pre = {
        "image_processor_type": "DPTImageProcessor",
        "size": {"height": 98, "width": 98},
        "ensure_multiple_of": 14,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "keep_aspect_ratio": True,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


def test_monocular_depth_from_local_folder(tiny_depth_folder):
    est = MonocularDepth.from_pretrained(tiny_depth_folder)
    assert est.input_size == 98 and est.multiple_of == 14
    images = torch.rand(2, 3, 40, 56) * 2 - 1
    disp = est(images)
    assert disp.shape == (2, 1, 40, 56) and disp.dtype == torch.float32 and torch.isfinite(disp).all()
    # each image is processed independently of its batch mates
    torch.testing.assert_close(est(images[1:]), disp[1:], rtol=1e-4, atol=1e-5)
    control = disparity_control(disp)
    assert control.shape == (2, 3, 40, 56) and control.amin() == 0 and control.amax() <= 1


def test_depth_anything_resize_rule_is_lower_bound_multiple_of_14():
    """Depth Anything's reference transform (lower_bound, ensure_multiple_of=14), computed by hand."""
    est = MonocularDepth(torch.nn.Linear(1, 1))
    assert est._target_size(512, 512) == (518, 518)
    assert est._target_size(64, 48) == (686, 518)  # 518/48 = 10.79: 690.7 -> 686 (49 * 14)
    assert est._target_size(100, 333) == (518, 1722)  # 333 * 5.18 = 1724.9 -> 1722 (123 * 14)
    assert est._target_size(37, 41) == (518, 574)


def test_monocular_depth_missing_folder_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hf download depth-anything/Depth-Anything-V2-Base-hf"):
        MonocularDepth.from_pretrained(tmp_path / "missing")
