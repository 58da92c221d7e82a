"""Style masks from the lab world's own region labels (headstyle.lab.world.heads.region_masks) and their effect on
Style Fusion Attention: per-image masks of the content and style banks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from typer.testing import CliRunner

from headstyle.attention.banks import write_bank
from headstyle.attention.install import install_style_fusion
from headstyle.attention.processors import StyleFusionState, fuse_keys_values, mask_tokens
from headstyle.cameras import cameras
from headstyle.cli import UserError, app
from headstyle.lab.experiments.sfa_ablation import REGION_FLOOR, world_masks
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import REGIONS, params_from_z, region_masks, region_select, sample_z
from headstyle.sfa.dataset import REFERENCE_YAWS
from headstyle.testing import CROSS_ATTENTION_DIM

RES = 32
PSI = 0.75


def _masks(z: torch.Tensor, yaws: list[float], style: str | None = None, pitch: float = 0.15) -> torch.Tensor:
    yaw = torch.tensor(yaws)
    c = cameras(yaw, torch.full_like(yaw, pitch))
    rk = LabGenerator(resolution=RES, residual=False).rendering_kwargs
    return region_masks(params_from_z(PSI * z), c, RES, rk, style)


def _index(*names: str) -> list[int]:
    return [REGIONS.index(n) for n in names]


def test_region_masks_partition_the_foreground():
    """Region weights sum to 1 at every sample and are composited with the colour's weights, so the masks sum
    over regions to the render's foreground mask; a front view shows every region, a back view no face."""
    z = sample_z(3, 11)
    yaws = [0.0, 2.0, math.pi]
    masks = _masks(z, yaws)
    yaw = torch.tensor(yaws)
    c = cameras(yaw, torch.full_like(yaw, 0.15))
    G = LabGenerator(resolution=RES, sr_factor=1, residual=False)
    foreground = G.synthesis(G.mapping(z, c, PSI), c).mask[:, 0]
    assert masks.shape == (3, len(REGIONS), RES, RES)
    assert masks.min() >= 0 and masks.max() <= 1 + 1e-6
    torch.testing.assert_close(masks.sum(1), foreground, atol=1e-5, rtol=0)
    assert foreground.sum() > 100  # the heads fill a good part of the views
    assert (masks[0].amax((-2, -1)) > 0.03).all(), masks[0].amax((-2, -1))  # eyes and brows are a pixel wide at 32 px
    assert masks[2, _index("sclera", "iris", "lips")].max() < 0.01
    assert masks[2, _index("hair")].sum() > masks[0, _index("hair")].sum()


def test_a_style_geometry_edit_moves_the_region_masks():
    """The toon style enlarges the eyes 1.45x (world.STYLES): its eye regions cover more pixels of the same
    identity's front view, in proportion to the eyes' area."""
    z = sample_z(1, 4)
    plain, toon = _masks(z, [0.0]), _masks(z, [0.0], "toon")
    eyes = _index("sclera", "iris")
    ratio = toon[0, eyes].sum() / plain[0, eyes].sum()
    assert 1.45**2 * 0.7 < ratio < 1.45**2 * 1.3, ratio
    torch.testing.assert_close(toon.sum(1), toon.sum(1).clamp(0, 1))


def test_a_mirror_camera_gives_the_mirrored_masks():
    """The world is left-right symmetric for every identity (paired eyes, ears and brows at +-x, hair and
    lights' colour play no part in the regions), so yaw -a renders the mirror image of yaw a's masks."""
    z = sample_z(2, 21)
    for i in range(2):
        left, right = _masks(z[i : i + 1].repeat(2, 1), [0.7, -0.7])
        torch.testing.assert_close(right, left.flip(-1), atol=1e-4, rtol=0)  # float rounding of the cameras
        assert (left - left.flip(-1)).abs().max() > 0.3  # a view at yaw 0.7 is not symmetric itself


# ------------------------------------------------------------------------------------------------ the fusion


def _reference_masks(regions: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image masks (2, h, w) of a content identity's front/back views and a toon exemplar's."""
    ref = cameras(torch.tensor(REFERENCE_YAWS), torch.zeros(len(REFERENCE_YAWS)))
    return world_masks(sample_z(1, 30), ref, regions)[0], world_masks(sample_z(1, 31), ref, regions, "toon")[0]


def test_region_masks_select_the_bank_tokens_of_their_own_image():
    """Token-level known answer: content tokens outside the region keep K_c, V_c exactly (the content path),
    inside they are lerp(content, fused, m); the style segment holds exactly the region's tokens of each
    image, tau m K_s. The lips are absent from the back views, so no token of image 2 takes part."""
    mask_c, mask_s = _reference_masks(("lips",))
    assert mask_c.shape == (2, RES, RES) and mask_c.max() <= 1 and mask_c[mask_c > 0].min() >= REGION_FLOOR
    assert mask_c[1].max() == 0 and mask_s[1].max() == 0 and mask_c[0].sum() > 3 and mask_s[0].sum() > 1
    grid, n = (8, 8), 64
    tc, ts = mask_tokens(mask_c, grid, 2), mask_tokens(mask_s, grid, 2)
    g = torch.Generator().manual_seed(0)
    k_l, v_l = (torch.randn(1, 10, 6, generator=g) for _ in range(2))
    k_c, v_c, k_s, v_s = (torch.randn(1, 2 * n, 6, generator=g) for _ in range(4))
    for pairing in ("paper", "matched"):
        plain = fuse_keys_values(k_l, v_l, (k_c, v_c), (k_s, v_s), 1.05, pairing)
        masked = fuse_keys_values(k_l, v_l, (k_c, v_c), (k_s, v_s), 1.05, pairing, tc, ts)
        fused_k, fused_v = masked.key[0, masked.segments["fused"]], masked.value[0, masked.segments["fused"]]
        outside = tc == 0
        assert torch.equal(fused_k[outside], k_c[0, outside]) and torch.equal(fused_v[outside], v_c[0, outside])
        k_hat = plain.key[0, plain.segments["fused"]]
        m = tc.unsqueeze(-1)
        torch.testing.assert_close(fused_k, k_c[0] + m * (k_hat - k_c[0]), atol=1e-6, rtol=0)
        keep = ts > 0
        assert keep.nonzero().max() < n  # only image 1's (the front's) tokens
        style_k = masked.key[0, masked.segments["style"]]
        torch.testing.assert_close(style_k, (1.05 * k_s[0] * ts.unsqueeze(-1))[keep], atol=1e-7, rtol=0)
        style_values = v_c if pairing == "paper" else v_s
        assert torch.equal(masked.value[0, masked.segments["style"]], style_values[0, keep])


@pytest.fixture(scope="module")
def unet(tiny_sd) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_sd.model / "unet").eval()


def test_region_masks_in_the_unet(unet):
    """Through every fusion layer of a tiny real UNet: masks of a region that no bank image shows give the
    content path bitwise; a per-image stack of one mask equals that mask shared; the lips of the front views
    change the output, and a content mask of its own differs from reusing the style mask."""
    g = torch.Generator().manual_seed(3)
    x, content, style = (torch.randn(n, 4, 8, 8, generator=g) for n in (1, 2, 2))
    context = torch.randn(1, 5, CROSS_ATTENTION_DIM, generator=g)
    t = torch.tensor([500])

    def eps() -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=context).sample

    lips_c, lips_s = _reference_masks(("lips",))
    back_only = torch.zeros_like(lips_c)
    back_only[1] = 1.0
    state = StyleFusionState(tau=1.05)
    with install_style_fusion(unet, state) as fusion:
        bank_c = write_bank(unet, content, t, context, fusion.layer_names)
        bank_s = write_bank(unet, style, t, context, fusion.layer_names)
        state.set_banks(bank_c, [])
        content_path = eps()
        state.set_banks(bank_c, [bank_s])
        # lips of the back views only: the back views show none, so nothing is stylised
        state.style_mask, state.content_mask = lips_s * back_only, lips_c * back_only
        absent = eps()
        state.style_mask, state.content_mask = lips_s, lips_c
        own = eps()
        state.content_mask = None
        shared_with_style = eps()
        state.style_mask = torch.stack([lips_s[0], lips_s[0]])
        stacked = eps()
        state.style_mask = lips_s[0]
        shared = eps()
    assert torch.equal(absent, content_path)
    assert torch.equal(stacked, shared)
    assert (own - content_path).abs().max() > 1e-4
    assert (own - shared_with_style).abs().max() > 1e-6
    with pytest.raises(ValueError, match="3 per-image masks for a bank of 2 images"):
        mask_tokens(torch.zeros(3, 4, 4), (2, 2), 2)


# ------------------------------------------------------------------------------------------------ the ablation


def test_masked_ablation_scores_and_settings(tiny_sd, tmp_path):
    """outside_distance is 0 for the input itself and positive for the ground truth (the style changes the
    outside of the hair too); an unknown region is one line naming the known ones."""
    from headstyle.lab.experiments.evaluate import make_eval_set
    from headstyle.lab.experiments.sfa_ablation import AblationSettings, lab_like, scores

    ev = make_eval_set("gold", lab_like(), identities=2, views=2)
    inside = world_masks(ev.z, ev.cams, ("hair",))
    assert inside.shape == (2, 2, RES, RES) and 0 < inside.mean() < 1
    before, truth = scores(ev.before, ev, inside), scores(ev.truth, ev, inside)
    assert before["outside_distance"] == 0 and truth["outside_distance"] > 0.01
    assert "outside_distance" not in scores(ev.before, ev)
    assert AblationSettings(prior="", mask_regions=("hair", "brow")).mask_regions == ("hair", "brow")
    with pytest.raises(ValueError, match="unknown lab regions \\['horns'\\]; choose from skin, hair"):
        AblationSettings(prior="", mask_regions=("hair", "horns"))
    result = CliRunner().invoke(app, ["lab", "sfa-ablation", "--prior", str(tiny_sd.model), "--mask-regions",
                                      "hair,horns", "--out", str(tmp_path / "out")])  # fmt: skip
    assert isinstance(result.exception, UserError)  # one line, exit 2 under main()
    assert "unknown lab regions ['horns']" in str(result.exception) and not (tmp_path / "out").exists()


def test_region_select_is_the_union():
    masks = _masks(sample_z(1, 8), [0.4])
    hair_brow = region_select(masks, ("hair", "brow"))
    torch.testing.assert_close(hair_brow, (masks[:, 1] + masks[:, 4]).clamp(0, 1))
    torch.testing.assert_close(region_select(masks, REGIONS), masks.sum(1).clamp(0, 1))


# ------------------------------------------------------------------------------------------------ the face parser


def _random_parser(seed: int = 0):
    """A randomly initialised BiSeNet with random batch-norm statistics (no weights ship or download)."""
    from headstyle.faces.parser import BiSeNet

    torch.manual_seed(seed)
    net = BiSeNet()
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, a=1, generator=g)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net


# Names and shapes of face-parsing.PyTorch's model.py / resnet.py (BiSeNet(n_classes=19)): 191 tensors.
PUBLISHED = {
    "cp.resnet.conv1.weight": (64, 3, 7, 7),
    "cp.resnet.layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "cp.resnet.layer4.1.bn2.running_var": (512,),
    "cp.arm32.conv.conv.weight": (128, 512, 3, 3),
    "cp.arm16.conv_atten.weight": (128, 128, 1, 1),
    "cp.conv_avg.conv.weight": (128, 512, 1, 1),
    "ffm.convblk.conv.weight": (256, 256, 1, 1),
    "ffm.conv1.weight": (64, 256, 1, 1),
    "ffm.conv2.weight": (256, 64, 1, 1),
    "conv_out.conv.conv.weight": (256, 256, 3, 3),
    "conv_out.conv_out.weight": (19, 256, 1, 1),
    "conv_out16.conv.conv.weight": (64, 128, 3, 3),
    "conv_out32.conv_out.weight": (19, 64, 1, 1),
}


def test_parser_has_the_published_layout_and_round_trips_its_checkpoint(tmp_path):
    """A random BiSeNet saved as train.py saves it (torch.save(net.state_dict())), in the legacy pickle format
    of 2019's 79999_iter.pth, without batch-norm counters, or as .safetensors, loads to the same outputs."""
    from safetensors.torch import save_file

    from headstyle.faces.parser import CLASSES, BiSeNet, parse

    net = _random_parser()
    state = net.state_dict()
    assert len(state) == 191 and {k: tuple(state[k].shape) for k in PUBLISHED} == PUBLISHED
    x = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected = parse(net, x, size=64)
    assert expected.shape == (1, len(CLASSES), 48, 40)
    torch.testing.assert_close(expected.sum(1), torch.ones(1, 48, 40))
    torch.save(state, tmp_path / "79999_iter.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    bare = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(bare, tmp_path / "bare.pth")
    save_file(bare, str(tmp_path / "parser.safetensors"))
    for name in ("79999_iter.pth", "legacy.pth", "bare.pth", "parser.safetensors"):
        assert torch.equal(parse(BiSeNet.from_file(tmp_path / name), x, size=64), expected), name
    other = parse(_random_parser(1), x, size=64)
    assert (other - expected).abs().max() > 1e-3


def test_parser_refuses_wrong_files_in_one_line(tmp_path):
    from headstyle.faces.parser import BiSeNet
    from headstyle.faces.perceptual import WeightsError

    state = _random_parser().state_dict()
    cases = {}
    torch.save({k: v for k, v in state.items() if k != "ffm.conv1.weight"}, tmp_path / "missing.pth")
    cases["missing.pth"] = "missing keys: ffm.conv1.weight"
    torch.save({**state, "conv_out.conv_out.weight": torch.zeros(18, 256, 1, 1)}, tmp_path / "classes.pth")
    cases["classes.pth"] = "shape mismatch (file vs model): conv_out.conv_out.weight"
    torch.save({"model": state}, tmp_path / "nested.pth")
    cases["nested.pth"] = "not a state dict"
    (tmp_path / "text.pth").write_text("not weights")
    cases["text.pth"] = "refused by the weights-only reader (Unsupported operand"
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    torch.save({"cp.resnet.conv1.weight": Payload()}, tmp_path / "code.pth")
    cases["code.pth"] = "exec was not an allowed global by default); nothing of it was executed"
    cases["absent.pth"] = "no such file"
    (tmp_path / "text.safetensors").write_text("not weights")
    cases["text.safetensors"] = "not a readable safetensors file"
    for name, message in cases.items():
        with pytest.raises(WeightsError) as err:
            BiSeNet.from_file(tmp_path / name)
        assert message in str(err.value) and "\n" not in str(err.value), (name, str(err.value))
    assert not marker.exists()


def test_parser_regions_are_unions_of_classes():
    """Known answer: a probability map whose most likely class is known at each pixel."""
    from headstyle.faces.parser import CLASSES, region_masks

    labels = torch.tensor([[CLASSES.index(c) for c in ("hair", "skin", "nose", "l_eye")],
                           [CLASSES.index(c) for c in ("u_lip", "mouth", "background", "r_brow")]])  # fmt: skip
    probs = 0.6 * F.one_hot(labels, len(CLASSES)).permute(2, 0, 1)[None].float() + 0.4 / len(CLASSES)
    assert torch.equal(region_masks(probs, ("hair",))[0], torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    assert torch.equal(region_masks(probs, ("skin", "eyes"))[0], torch.tensor([[0.0, 1, 1, 1], [0, 0, 0, 0]]))
    assert torch.equal(region_masks(probs, ("lips", "brows"))[0], torch.tensor([[0.0, 0, 0, 0], [1, 0, 0, 1]]))
    assert torch.equal(region_masks(probs, ("mouth",))[0], torch.tensor([[0.0, 0, 0, 0], [1, 1, 0, 0]]))
    soft = region_masks(probs, ("hair", "nose"), hard=False)[0]
    torch.testing.assert_close(soft, probs[0, CLASSES.index("hair")] + probs[0, CLASSES.index("nose")])
    with pytest.raises(ValueError, match="unknown face regions \\['horns'\\]"):
        region_masks(probs, ("hair", "horns"))


def _constant_parser(path, cls: str) -> str:
    """A parser checkpoint that labels every pixel ``cls``: the output head's features are a constant 10
    (batch norm weight 0, bias 10, then ReLU) and only ``cls``'s logit reads them."""
    from headstyle.faces.parser import CLASSES

    state = _random_parser().state_dict()
    state["conv_out.conv.bn.weight"] = torch.zeros(256)
    state["conv_out.conv.bn.bias"] = torch.full((256,), 10.0)
    head = torch.zeros(len(CLASSES), 256, 1, 1)
    head[CLASSES.index(cls)] = 1.0
    state["conv_out.conv_out.weight"] = head
    torch.save(state, path)
    return str(path)


def test_style_views_masks_views_by_their_parsed_regions(tiny_sd, parity_dir, tmp_path):
    """Known answers through `style-views --mask-parser`: a parser that sees hair everywhere makes the hair mask
    all ones, which equals the unmasked run bitwise; one that sees skin everywhere leaves no hair to stylise
    (a different result); each view's parsed mask is written beside it. Bad parser input is one line."""
    from PIL import Image

    style = tmp_path / "style.png"
    Image.fromarray((np.mgrid[0:48, 0:48][1] // 6 % 2 * 255).astype(np.uint8)).convert("RGB").save(style)
    base = [
        "style-views", "--generator", str(parity_dir), "--prior", str(tiny_sd.model), "--controlnet-depth", "",
        "--style-image", str(style), "--seeds", "0", "--yaws", "30", "--steps", "4", "--strength", "0.5",
        "--device", "cpu", "--raw-only", "--neural-rendering-resolution", "16", "--depth-samples", "6",
        "--content", "view",
    ]  # fmt: skip
    view = "seed0000_yaw+030_pitch+00"
    runs = {}
    for name, extra in (
        ("plain", []),
        ("hair", ["--mask-parser", _constant_parser(tmp_path / "hair.pth", "hair"), "--mask-regions", "hair"]),
        ("skin", ["--mask-parser", _constant_parser(tmp_path / "skin.pth", "skin"), "--mask-regions", "hair"]),
    ):
        result = CliRunner().invoke(app, [*base, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        runs[name] = np.asarray(Image.open(tmp_path / name / f"{view}.png"))
    assert np.array_equal(runs["hair"], runs["plain"])
    assert np.abs(runs["skin"].astype(int) - runs["plain"].astype(int)).max() > 0
    assert (np.asarray(Image.open(tmp_path / "hair" / f"{view}_mask.png")) == 255).all()
    assert (np.asarray(Image.open(tmp_path / "skin" / f"{view}_mask.png")) == 0).all()
    # front_back content: the parser masks the head's front and back renders, written side by side
    hair = ["--mask-parser", str(tmp_path / "hair.pth"), "--mask-regions", "hair", "--content", "front_back"]
    result = CliRunner().invoke(app, [*base, *hair, "--out", str(tmp_path / "front_back")])
    assert result.exit_code == 0, result.output
    sheet = np.asarray(Image.open(tmp_path / "front_back" / "seed0000_content_mask.png"))
    assert sheet.shape[:2] == (64, 2 * 64) and (sheet == 255).all()
    for extra, message in (
        (["--mask-parser", str(tmp_path / "hair.pth")], "give both style.parser and style.regions"),
        (["--mask-parser", str(tmp_path / "hair.pth"), "--mask-regions", "horns"], "unknown face regions ['horns']"),
        (["--mask-parser", str(style), "--mask-regions", "hair"], "refused by the weights-only reader"),
    ):
        result = CliRunner().invoke(app, [*base, *extra, "--out", str(tmp_path / "bad")])
        assert isinstance(result.exception, UserError) and message in str(result.exception), result.output
        assert not (tmp_path / "bad").exists()
