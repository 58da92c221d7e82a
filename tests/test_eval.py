"""The papers' metrics (headstyle.metrics: fid, arcface, dlib_identity, clip_score, depth_error, reference) on
known answers: closed forms, a reference implementation where one installs offline (torch-fidelity's FID
Inception, diffusers' img2img pipeline, CLIPModel's own logits), real photos (skimage's astronaut, matplotlib's
Grace Hopper) and invariants for backbones without an offline reference (ArcFace)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from headstyle.faces.perceptual import WeightsError
from headstyle.metrics import arcface as A
from headstyle.metrics.fid import FIDInception, fid, inception_features, kid, polynomial_mmd2, resize_bilinear_tf1


def hopper() -> np.ndarray:
    """Grace Hopper's portrait, shipped with matplotlib (a different real face than the astronaut)."""
    from matplotlib import cbook

    return np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB"))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """512 px RGB portraits: the astronaut, her mirror image, and Grace Hopper (her 512 x 600 photo squeezed)."""
    astronaut = data.astronaut()
    other = np.asarray(Image.fromarray(hopper()).resize((512, 512), Image.LANCZOS))
    return {"astronaut": astronaut, "mirror": np.ascontiguousarray(astronaut[:, ::-1]), "hopper": other}


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# FID / KID


def test_tf1_resize_samples_at_i_times_in_over_out():
    """TensorFlow 1's bilinear resize of a ramp 0..n-1 gives min(i * n / size, n - 1): no half-pixel offset."""
    n, size = 7, 12
    ramp = torch.arange(n, dtype=torch.float32).reshape(1, 1, 1, n).expand(1, 1, n, n)
    out = resize_bilinear_tf1(ramp, size)
    expected = torch.clamp(torch.arange(size) * n / size, max=n - 1)
    torch.testing.assert_close(out[0, 0, 0], expected.float())
    torch.testing.assert_close(out[0, 0, :, 3], out[0, 0, :, 3].mean().expand(size))  # constant along y


def _torch_fidelity_inception():
    """torch-fidelity's FeatureExtractorInceptionV3 without running its package __init__ (which imports
    torchvision, not installable here); the Makefile installs torch-fidelity without dependencies."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed (make install adds it without dependencies)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    saved = {k: v for k, v in sys.modules.items() if k == "torch_fidelity" or k.startswith("torch_fidelity.")}
    sys.modules["torch_fidelity"] = package
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    finally:
        for k in [k for k in sys.modules if k == "torch_fidelity" or k.startswith("torch_fidelity.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return FeatureExtractorInceptionV3, interpolate_bilinear_2d_like_tensorflow1x


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> str:
    """Random but well-formed FID Inception weights in pytorch-fid's layout (with its 1008-way fc)."""
    torch.manual_seed(0)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    state = dict(net.state_dict()) | {"fc.weight": 0.01 * torch.randn(1008, 2048), "fc.bias": torch.zeros(1008)}
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(state, path)
    return str(path)


def test_fid_inception_matches_torch_fidelity_and_identical_sets_score_zero(inception_file, photos):
    reference_cls, reference_resize = _torch_fidelity_inception()
    ours = FIDInception.from_file(inception_file)
    theirs = reference_cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=inception_file)
    u8 = torch.from_numpy(np.stack([np.asarray(Image.fromarray(photos[k]).resize((96, 80))) for k in ("astronaut",
                                                                                                    "hopper")]))
    u8 = u8.permute(0, 3, 1, 2).contiguous()
    torch.testing.assert_close(resize_bilinear_tf1(u8.float(), 299),
                               reference_resize(u8.float(), size=(299, 299), align_corners=False), rtol=0, atol=0)
    feats = ours(u8)
    torch.testing.assert_close(feats, theirs(u8)[0], rtol=1e-5, atol=1e-6)
    # Images in [-1, 1] are quantised back to the same uint8: the same features, and FID 0 for identical sets.
    again = inception_features(ours, u8.float() / 127.5 - 1)
    torch.testing.assert_close(again, feats, rtol=0, atol=0)
    other = inception_features(ours, torch.flip(u8.float() / 127.5 - 1, dims=[-2]))
    assert fid(feats, again) < 1e-6 * fid(feats, other)


def test_fid_inception_refuses_other_files(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not the FID Inception"):
        FIDInception.from_file(tmp_path / "other.pth")


def test_fid_through_the_gram_matrix_equals_the_covariance_formula():
    from headstyle.metrics.style import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 64, generator=g, dtype=torch.float64)
    b = 0.7 * torch.randn(30, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g,
                                                                                   dtype=torch.float64) + 0.3
    assert fid(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-6)  # 20 images < 64 dimensions: Gram route
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)


def test_kid_closed_forms():
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3: a two-point case by hand (d = 1 and, duplicated, d = 2),
    and the population value for U(-1, 1) vs U(-1, 1) + mu from the kernel's feature map (1, v3 a, v3 a^2, a^3)."""
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [2.0]])
    # k(0,1) + k(1,2) - (k(0,1) + k(0,2) + k(1,1) + k(1,2)) / 2 = 1 + 27 - 37 / 2
    assert polynomial_mmd2(x, y) == pytest.approx(9.5)
    assert polynomial_mmd2(x.repeat(1, 2), y.repeat(1, 2)) == pytest.approx(9.5)
    g = torch.Generator().manual_seed(0)
    mu = 0.5
    u = torch.rand(2000, 1, generator=g, dtype=torch.float64) * 2 - 1
    v = torch.rand(2000, 1, generator=g, dtype=torch.float64) * 2 - 1
    population = 3 * mu**2 + 3 * mu**4 + (mu**3 + mu) ** 2
    mean, std = kid(u, v + mu, subsets=10, subset_size=1000)
    assert mean == pytest.approx(population, rel=0.2)
    assert std > 0
    assert abs(kid(u, v, subsets=10, subset_size=1000)[0]) < 0.02 * population


# ---------------------------------------------------------------------------------------------
# Identity: dlib and ArcFace


def test_dlib_same_person_under_threshold_different_person_over(photos):
    from headstyle.metrics.dlib_identity import SAME_PERSON_DISTANCE, DlibIdentity, descriptor_distance, largest_faces

    images = np.stack(list(photos.values()))
    faces = largest_faces(images)
    assert all(f is not None for f in faces)
    desc, found = DlibIdentity().embed(images, faces)
    assert found.all()
    astronaut, mirror, other = desc
    assert descriptor_distance(astronaut, mirror) < SAME_PERSON_DISTANCE
    assert descriptor_distance(astronaut, other) > SAME_PERSON_DISTANCE
    # A view without a face is reported as not found, not scored.
    blank = np.full((1, 256, 256, 3), 128, np.uint8)
    assert largest_faces(blank) == [None]
    assert not DlibIdentity().embed(blank, [None])[1].any()
    # Paired (astronaut with its mirror, Hopper with hers) vs permuted pairing.
    mirrors = np.ascontiguousarray(images[[1, 0, 2]][:, :, ::-1])  # mirror, astronaut, mirrored Hopper
    desc_m, _ = DlibIdentity().embed(mirrors, largest_faces(mirrors))
    paired = descriptor_distance(desc[[0, 2]], desc_m[[1, 2]]).mean()
    permuted = descriptor_distance(desc[[0, 2]], desc_m[[2, 1]]).mean()
    assert paired < permuted


def test_similarity_transform_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -4.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    np.testing.assert_allclose(A.similarity_transform(src, dst), np.hstack([scale * rot, shift[:, None]]), atol=1e-9)


# Tensor names and shapes of the published files, from the reference code's module structure
# (pSp's model_irse.py / helpers.py; insightface arcface_torch's iresnet.py).
IR_SE50_KEYS = {
    "input_layer.0.weight": (64, 3, 3, 3), "input_layer.1.running_var": (64,), "input_layer.2.weight": (64,),
    "body.0.res_layer.1.weight": (64, 64, 3, 3), "body.0.res_layer.5.fc1.weight": (4, 64, 1, 1),
    "body.3.shortcut_layer.0.weight": (128, 64, 1, 1), "body.3.shortcut_layer.1.weight": (128,),
    "body.23.res_layer.5.fc2.weight": (512, 32, 1, 1), "output_layer.0.weight": (512,),
    "output_layer.3.weight": (512, 25088), "output_layer.4.running_mean": (512,),
}  # fmt: skip
IRESNET50_KEYS = {
    "conv1.weight": (64, 3, 3, 3), "prelu.weight": (64,), "layer1.0.downsample.0.weight": (64, 64, 1, 1),
    "layer2.0.downsample.1.running_var": (128,), "layer3.13.conv2.weight": (256, 256, 3, 3),
    "layer4.2.bn3.weight": (512,), "bn2.weight": (512,), "fc.weight": (512, 25088), "features.running_var": (512,),
}  # fmt: skip


def test_arcface_backbones_have_the_published_layouts():
    with torch.device("meta"):
        ir_se50, iresnet50, ir_se100, iresnet100 = A.IRSE(50), A.IResNet(50), A.IRSE(100), A.IResNet(100)
    for net, keys in ((ir_se50, IR_SE50_KEYS), (iresnet50, IRESNET50_KEYS)):
        state = net.state_dict()
        assert {k: tuple(state[k].shape) for k in keys} == keys
    assert "body.0.shortcut_layer.0.weight" not in ir_se50.state_dict()  # same width: a subsampling shortcut
    assert "layer1.1.downsample.0.weight" not in iresnet50.state_dict()
    assert [A.architecture(n.state_dict()) for n in (ir_se50, iresnet50, ir_se100, iresnet100)] == [
        ("ir_se", 50), ("iresnet", 50), ("ir_se", 100), ("iresnet", 100)]  # fmt: skip
    with pytest.raises(WeightsError, match="not an ArcFace backbone"):
        A.architecture({"conv.weight": torch.zeros(1)})


@pytest.fixture(scope="module")
def ir_se50_file(tmp_path_factory) -> str:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("arcface") / "model_ir_se50.pth"
    torch.save(A.IRSE(50).state_dict(), path)
    return str(path)


def test_arcface_ir_se50_file_embeds_aligned_faces(ir_se50_file, photos):
    """No pure-PyTorch reference installs offline: invariants of the loaded file's network instead."""
    from headstyle.metrics.dlib_identity import largest_faces

    model = A.ArcFace(ir_se50_file)
    assert model.name == "ir_se50"
    images = np.stack(list(photos.values()))
    faces = largest_faces(images)
    # FFHQ alignment: the eyes land on the same rows of the crop, mirrored faces mirror their crops.
    crops = [A.ffhq_crop(im, f) for im, f in zip(images, faces, strict=True)]
    assert np.abs(crops[0][:, ::-1].astype(float) - crops[1]).mean() < 12
    emb, found = model.embed(images, faces)
    assert found.all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    inputs = torch.stack([model.crop(im, f) for im, f in zip(images, faces, strict=True)])
    torch.testing.assert_close(model.embed_crops(inputs[:1]), emb[:1], atol=1e-5, rtol=0)  # batch independent
    # Identical images score 1; a slightly noisy copy pairs with its own image better than with the others.
    noisy = (inputs + 0.03 * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    emb_noisy = model.embed_crops(noisy)
    cos = emb @ emb_noisy.T
    assert cos.diagonal().mean() > cos[[0, 1, 2], [1, 2, 0]].mean()


def test_suite_pairs_views_by_identity_and_a_permutation_scores_worse(ir_se50_file, photos):
    """score() on 2 identities x 1 view: base = (astronaut, Hopper), stylised = their mirror images, then permuted."""
    from headstyle.metrics.dlib_identity import DlibIdentity
    from headstyle.metrics.suite import Renders, Scorers, score

    base = torch.cat([to_tensor(photos["astronaut"]), to_tensor(photos["hopper"])])
    mirrored = base.flip(-1)
    zeros = torch.zeros(2, 1, 1, 8, 8)
    scorers = Scorers(dlib=DlibIdentity(), arcface=A.ArcFace(ir_se50_file))
    cams = torch.zeros(1, 25)
    paired = score(Renders(base[:, None], zeros, zeros), Renders(mirrored[:, None], zeros, zeros), cams, scorers)
    swapped = score(Renders(base[:, None], zeros, zeros), Renders(mirrored[[1, 0], None], zeros, zeros), cams, scorers)
    assert paired.counts == {"views": 2, "faces_base": 2, "faces_stylized": 2, "face_pairs": 2}
    assert paired.metrics["id_dlib"]["id_dlib_match"] == 1.0 and swapped.metrics["id_dlib"]["id_dlib_match"] == 0.0
    assert paired.metrics["id_dlib"]["id_dlib_distance"] < swapped.metrics["id_dlib"]["id_dlib_distance"]
    assert paired.metrics["id_arcface"]["id_arcface"] > swapped.metrics["id_arcface"]["id_arcface"]
    assert "multiview" in paired.skipped and "fid" not in paired.metrics  # one view; no Inception given


def test_arcface_five_points_land_on_the_template(photos):
    from headstyle.faces.detect import detect_faces

    face = detect_faces(photos["astronaut"])[0]
    mat = A.similarity_transform(A.five_points(face.landmarks), A.ARCFACE_TEMPLATE)
    mapped = A.five_points(face.landmarks) @ mat[:, :2].T + mat[:, 2]
    # Pixels of the 112 px crop: eyes within 3.5, nose and (smiling) mouth corners within 6.
    assert np.abs(mapped - A.ARCFACE_TEMPLATE)[:2].max() < 3.5
    assert np.abs(mapped - A.ARCFACE_TEMPLATE).max() < 6.0
    assert A.arcface_crop(photos["astronaut"], face).shape == (112, 112, 3)


# ---------------------------------------------------------------------------------------------
# CLIP and Depth Anything (tiny random models saved and loaded through from_pretrained: conftest.py)


def test_clip_similarities_are_clip_models_own_cosines(clip_dir, photos):
    from headstyle.metrics.clip_score import CLIPScorer, paired_cosine

    scorer = CLIPScorer(clip_dir)
    images = torch.cat([to_tensor(p) for p in photos.values()])
    emb = scorer.image_embeds(images)
    torch.testing.assert_close(paired_cosine(emb, emb), torch.ones(3))
    text = scorer.text_embeds(["a portrait of a statue"])
    # CLIPModel's logits_per_image / logit_scale is the same cosine (the reference computation).
    pixels = scorer.processor(images=[Image.fromarray(p) for p in photos.values()], return_tensors="pt")["pixel_values"]
    tokens = scorer.tokenizer(["a portrait of a statue"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    torch.testing.assert_close(paired_cosine(emb, text), out.logits_per_image[:, 0] / scorer.model.logit_scale.exp(),
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    # A permuted pairing of noisy copies scores lower than the true pairing.
    noisy = scorer.image_embeds((images + 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0)))
                                .clamp(-1, 1))  # fmt: skip
    assert paired_cosine(emb, noisy).mean() > paired_cosine(emb, noisy[[1, 2, 0]]).mean()


def test_delta_d_closed_forms_and_depth_anything(depth_dir, photos):
    from headstyle.metrics.depth_error import DepthAnything, delta_d

    w = 9
    ramp = torch.linspace(0, 1, w).expand(4, w)
    # n(ramp) - n(reversed ramp) = 2x - 1: mean (2x - 1)^2 over x = k / (w - 1) is (w + 1) / (3 (w - 1)).
    assert float(delta_d(ramp, ramp.flip(-1))) == pytest.approx((w + 1) / (3 * (w - 1)))
    assert float(delta_d(ramp, 3 * ramp + 2)) == pytest.approx(0.0, abs=1e-12)  # scale and shift are free
    model = DepthAnything(depth_dir)
    images = torch.cat([to_tensor(np.asarray(Image.fromarray(p).resize((48, 40)))) for p in photos.values()])
    depth = model.predict(images)
    assert depth.shape == (3, 40, 48) and torch.isfinite(depth).all()
    torch.testing.assert_close(delta_d(depth, model.predict(images)), torch.zeros(3, dtype=torch.float64))
    assert (delta_d(depth, depth.flip(-1)) > 0).all()


# ---------------------------------------------------------------------------------------------
# DiffStyle360's reference set


def test_reference_img2img_matches_diffusers_pipeline_and_is_cached(tiny_sd, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    from headstyle.export import to_uint8
    from headstyle.metrics.reference import ReferenceSettings, img2img, model_fingerprint, reference_key, reference_set
    from headstyle.priors.diffusers_prior import DiffusersPrior

    prior = DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets={}, device="cpu",
                                           latent_sample="mean")  # fmt: skip
    settings = ReferenceSettings("portrait of a statue")
    image = to_tensor(np.asarray(Image.fromarray(data.astronaut()).resize((64, 64))))
    ours = img2img(prior, image, settings, torch.Generator().manual_seed(settings.seed))
    # The reference: diffusers' own img2img pipeline from the same latents (strength 25/50) and noise.
    pipe = StableDiffusionImg2ImgPipeline(vae=prior.vae, text_encoder=prior.text_encoder, tokenizer=prior.tokenizer,
                                          unet=prior.unet, scheduler=prior.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    noise = torch.Generator().manual_seed(settings.seed)
    theirs = pipe(settings.prompt, image=prior.encode(image), strength=0.5, num_inference_steps=50,
                  guidance_scale=7.5, generator=noise, output_type="pt").images  # fmt: skip
    torch.testing.assert_close((ours + 1) / 2, theirs, atol=2e-4, rtol=0)

    fingerprint = model_fingerprint(tiny_sd.model, None)
    first, folder, cached = reference_set(image, settings, lambda: prior, fingerprint, tmp_path)
    assert not cached and sorted(p.name for p in folder.iterdir()) == ["ref_0000.png", "reference.json"]
    torch.testing.assert_close(first, ours, atol=1 / 127.5, rtol=0)  # the cache holds the edit as uint8 PNG

    def no_model():
        raise AssertionError("a cache hit must not load the diffusion model")

    again, folder_again, cached = reference_set(image, settings, no_model, fingerprint, tmp_path)
    assert cached and folder_again == folder
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    # Anything the edits depend on changes the key: the prompt, the views' pixels, the model.
    u8 = to_uint8(image)
    key = reference_key(u8, settings, fingerprint)
    assert reference_key(u8, ReferenceSettings("portrait of a zombie"), fingerprint) != key
    assert reference_key(to_uint8(image.flip(-1)), settings, fingerprint) != key
    assert reference_key(u8, settings, model_fingerprint(tiny_sd.vae, None)) != key


# ---------------------------------------------------------------------------------------------
# `headstyle eval` end to end


def test_eval_command_on_identical_generators_gives_the_known_answers(
    parity_dir, clip_dir, depth_dir, inception_file, tiny_sd, tmp_path
):
    """Base = stylised (the parity fixture twice): CLIP-I 1, FID 0, Delta D 0, equal warp errors; the fixture's
    random heads have no detectable face, which is counted and noted, not scored."""
    import json

    from typer.testing import CliRunner

    from headstyle.cli import app

    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "eval", "--base", str(parity_dir), "--stylized", str(parity_dir), "--out", str(out), "--identities", "1",
        "--views", "-20,20", "--raw-only", "--neural-rendering-resolution", "16", "--depth-samples", "6",
        "--prompt", "portrait of a statue", "--clip", str(clip_dir), "--inception", inception_file,
        "--depth-anything", str(depth_dir), "--prior", str(tiny_sd.model), "--vae", "", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    m = report["metrics"]
    assert m["multiview"]["mv_warp_error"] == m["multiview"]["mv_warp_error_base"]
    assert m["clip"]["clip_i_base"] == pytest.approx(1.0, abs=1e-6)
    assert m["clip"]["clip_t"] == pytest.approx(m["clip"]["clip_t_base"], abs=1e-6)
    assert m["fid"]["fid_base"] < 1e-6 * m["fid"]["fid_ref"]
    assert m["depth_anything"]["delta_d"] == pytest.approx(0.0, abs=1e-12)
    assert report["counts"] == {"views": 2, "faces_base": 0, "faces_stylized": 0, "face_pairs": 0}
    assert "no view has a detectable face" in report["skipped"]["id_dlib"]
    assert {"id_arcface", "met3r"} <= set(report["skipped"])
    for group in ("clip", "fid", "depth_anything", "id_dlib"):
        assert len(report["weights"][group]["sha256"]) == 64
    assert report["weights"]["reference"]["cached"] == "false"
    assert sorted(p.name for p in (out / "reference").iterdir()) == [Path(report["weights"]["reference"]["path"]).name]
    # One identity: rows base, stylised, reference; two 16 px views with 2 px padding.
    assert Image.open(out / "views.png").size == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2)
    assert "| fid | fid_ref |" in (out / "metrics.md").read_text()
