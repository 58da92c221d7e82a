"""StyleFusionPrior (the SFA score prior) and the `headstyle style-views` command on tiny real models."""

from __future__ import annotations

import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from headstyle.attention.config import StyleFusionConfig
from headstyle.attention.prior import StyleFusionPrior
from headstyle.cli import app, main
from headstyle.priors.base import NoiseQuery, ScorePrior
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.testing import LATENT_SIZE


@pytest.fixture(scope="module")
def prior(tiny_sd) -> DiffusersPrior:
    return DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets={}, latent_sample="mean")


def _x(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pairing", ["paper", "matched"])
def test_self_references_reproduce_the_wrapped_prior(prior, pairing):
    """Content and style references equal to x_t itself ("clean" references, same t, same text) make
    every fused layer attend to copies of its own keys: eps must equal the plain prior's, for a shared
    timestep and for per-sample timesteps with per-sample content groups ([uncond; cond] tiling)."""
    empty = prior.embed_prompts("")
    config = StyleFusionConfig(tau=1.0, pairing=pairing, reference="clean")
    x = _x(0, 1)
    sfa = StyleFusionPrior(prior, style_latents=x, config=config)
    assert isinstance(sfa, ScorePrior)
    sfa.set_content(x)
    shared = [NoiseQuery(x, torch.tensor([401]), empty)]
    with torch.no_grad():
        torch.testing.assert_close(sfa.predict_noise(shared)[0], prior.predict_noise(shared)[0], atol=1e-4, rtol=0)
        # per-sample t: sample i's content is its own x_t; a shared style would not be "self" here, so
        # compare the content-only fusion (no style bank) against the plain prior
        xs = _x(1, 3)
        branches = [NoiseQuery(xs[:2], torch.tensor([101, 601]), empty), NoiseQuery(xs[2:], torch.tensor([801]), empty)]
        sfa.styles = []
        sfa.set_content(xs, images_per_group=1)
        for got, want in zip(sfa.predict_noise(branches), prior.predict_noise(branches), strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # the prior's UNet is left with its own processors
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in prior.unet.attn_processors.values())


def test_style_changes_eps_and_tau_moves_it_further(prior):
    empty = prior.embed_prompts("")
    x, content, style = _x(2, 1), _x(3, 1), _x(4, 1) * 2.0
    branch = [NoiseQuery(x, torch.tensor([501]), empty)]
    eps = {}
    with torch.no_grad():
        plain = prior.predict_noise(branch)[0][1]
        for tau in (1.0, 1.05, 1.5):
            sfa = StyleFusionPrior(prior, style, config=StyleFusionConfig(tau=tau), seed=7)
            sfa.set_content(content)
            eps[tau] = sfa.predict_noise(branch)[0][1]
        again = StyleFusionPrior(prior, style, config=StyleFusionConfig(tau=1.05), seed=7)
        again.set_content(content)
        repeat = again.predict_noise(branch)[0][1]
    assert torch.equal(repeat, eps[1.05])  # the reference noise is seeded
    assert (eps[1.0] - plain).abs().max() > 1e-3
    assert 0 < (eps[1.05] - eps[1.0]).norm() < (eps[1.5] - eps[1.0]).norm()


def _write_png(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_style_views_cli_writes_views_sheet_and_turntable(tiny_sd, parity_dir, tmp_path):
    yy, xx = np.mgrid[0:48, 0:48]
    stripes = np.stack([(xx // 6 % 2) * 255, yy * 5, 255 - yy * 5], -1).astype(np.uint8)
    dots = np.stack([((xx - 24) ** 2 + (yy - 24) ** 2 < 200) * 255] * 3, -1).astype(np.uint8)
    mask = ((yy < 24) * 255).astype(np.uint8)
    out = tmp_path / "out"
    args = [
        "style-views", "--generator", str(parity_dir), "--prior", str(tiny_sd.model),
        "--controlnet-depth", str(tiny_sd.controlnets["depth"]),
        "--style-image", _write_png(tmp_path / "style.png", stripes),
        "--style-image-2", _write_png(tmp_path / "style2.png", dots), "--alpha", "0.3",
        "--mask", _write_png(tmp_path / "mask.png", mask), "--tau", "1.07",
        "--seeds", "0", "--yaws", "-30,0,30", "--steps", "4", "--strength", "0.5", "--out", str(out),
        "--device", "cpu", "--raw-only", "--neural-rendering-resolution", "16", "--depth-samples", "6",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    views = ["seed0000_yaw-030_pitch+00", "seed0000_yaw+000_pitch+00", "seed0000_yaw+030_pitch+00"]
    for view in views:
        styled = np.asarray(Image.open(out / f"{view}.png"))
        render = np.asarray(Image.open(out / f"{view}_render.png"))
        assert styled.shape == render.shape == (64, 64, 3)
        assert np.abs(styled.astype(int) - render.astype(int)).mean() > 1.0  # the denoising changed the view
    frames = iio.imread(out / "seed0000_style_turntable.gif", index=None)
    assert frames.shape[:3] == (3, 64, 64)
    # GIF frames are palette-quantised: each must be nearest to its own stylised view, in yaw order
    styled = [np.asarray(Image.open(out / f"{view}.png")).astype(float) for view in views]
    for i, frame in enumerate(frames[..., :3].astype(float)):
        errors = [np.abs(frame - s).mean() for s in styled]
        assert int(np.argmin(errors)) == i and errors[i] < 12.0, errors
    assert np.asarray(Image.open(out / "seed0000_style_views.png")).shape[0] > 2 * 64


def test_content_bank_is_the_heads_front_and_back_renders(tiny_sd, parity_dir, tmp_path, monkeypatch):
    """--content front_back (the default, DiffStyle360's pairing) writes every view's content bank from the
    head's front and back renders, encoded; --content view from the view itself. --style-image-back makes the
    style bank the style's front and back."""
    from headstyle.attention.config import REFERENCE_YAWS
    from headstyle.cameras import cameras
    from headstyle.cli.common import load_generator
    from headstyle.distill.shaping import resize_to
    from headstyle.export import render_view
    from headstyle.generator.latents import latents_from_seeds

    contents, styles = [], []
    set_content, init = StyleFusionPrior.set_content, StyleFusionPrior.__init__

    def record_content(self, latents, images_per_group=None):
        if latents is not None:
            contents.append(latents.clone())
        set_content(self, latents, images_per_group)

    def record_style(self, prior, style_latents, *args, **kwargs):
        styles.append(style_latents.clone())
        init(self, prior, style_latents, *args, **kwargs)

    monkeypatch.setattr(StyleFusionPrior, "set_content", record_content)
    monkeypatch.setattr(StyleFusionPrior, "__init__", record_style)
    yy, xx = np.mgrid[0:48, 0:48]
    front = _write_png(tmp_path / "front.png", np.stack([(xx // 6 % 2) * 255] * 3, -1).astype(np.uint8))
    back = _write_png(tmp_path / "back.png", np.stack([yy * 5] * 3, -1).astype(np.uint8))
    base = ["style-views", "--generator", str(parity_dir), "--prior", str(tiny_sd.model), "--vae", "",
            "--controlnet-depth", "", "--style-image", front, "--seeds", "0", "--yaws", "45", "--steps", "2",
            "--strength", "0.5", "--device", "cpu", "--raw-only", "--neural-rendering-resolution", "16",
            "--depth-samples", "6"]  # fmt: skip
    runs = {}
    for name, extra in (("front_back", ["--style-image-back", back]), ("view", ["--content", "view"])):
        result = CliRunner().invoke(app, [*base, *extra, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        runs[name] = np.asarray(Image.open(tmp_path / name / "seed0000_yaw+045_pitch+00.png")).astype(int)

    prior = DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets={}, latent_sample="mean")
    G = load_generator(str(parity_dir), torch.device("cpu"), None, 16, 6)
    latent = latents_from_seeds(G, [0], 0.7, 14)[0]

    def encoded(yaw: float) -> torch.Tensor:
        return prior.encode(resize_to(render_view(G, latent, cameras(yaw, 0.0), False).image_raw, prior.image_size))

    # batched and one-by-one encodes agree to float rounding
    torch.testing.assert_close(contents[0], torch.cat([encoded(yaw) for yaw in REFERENCE_YAWS]), rtol=0, atol=1e-5)
    torch.testing.assert_close(contents[1], encoded(np.radians(45.0)), rtol=0, atol=1e-5)
    assert (contents[0][0] - contents[0][1]).abs().max() > 1e-2  # front and back differ
    assert styles[0].shape[0] == 2 and styles[1].shape[0] == 1
    torch.testing.assert_close(styles[0][:1], styles[1], rtol=0, atol=1e-5)
    assert np.abs(runs["front_back"] - runs["view"]).max() > 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--alpha", "0.3"], "--alpha blends two styles"),
        (["--content", "side"], "content must be one of"),
        (["--style-image-back", "no/such/back.png"], "no/such/back.png: no such file"),
        (["--style-image-back", "STYLE", "--content", "view"], "--style-image-back goes with --content front_back"),
        (["--tau", "0"], "tau must be positive"),
        (["--strength", "0"], "strength must lie in (0, 1]"),
        (["--pairing", "swapped"], "pairing must be one of"),
        (["--mask", "no/such/mask.png"], "no/such/mask.png: no such file"),
    ],
)
def test_style_views_cli_rejects_bad_input(tmp_path, monkeypatch, capsys, extra, message):
    style = _write_png(tmp_path / "s.png", np.zeros((8, 8, 3), np.uint8))
    out = tmp_path / "o"
    argv = ["headstyle", "style-views", "--generator", str(tmp_path), "--style-image", style, "--out", str(out)]
    monkeypatch.setattr(sys, "argv", [*argv, *(style if a == "STYLE" else a for a in extra)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err, err
    assert not out.exists()
