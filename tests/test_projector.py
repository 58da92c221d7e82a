"""The projector: PanoHead's schedules (closed forms), LPIPS-VGG16 from a TorchScript archive or torchvision
weights (one distance, the direct formula), the Laplacian-L1 fallback (closed form), projection of a
known code of the parity-fixture generator (+ PTI), and `headstyle project` / `headstyle photo` end to end."""

from __future__ import annotations

import math
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data
from torch import nn
from typer.testing import CliRunner

from conftest import stylised_parity_generator
from headstyle import cameras, load_generator
from headstyle.cli import app
from headstyle.faces.perceptual import (
    LPIPSVGG16,
    LaplacianL1,
    WeightsError,
    load_perceptual,
    read_torchscript_tensors,
)
from headstyle.faces.projector import (
    ProjectConfig,
    PTIConfig,
    learning_rate,
    pivotal_tuning,
    project,
    w_noise_scale,
    w_statistics,
)

NRR, SAMPLES = 16, 6
FAST = ["--raw", "--neural-rendering-resolution", str(NRR), "--depth-samples", str(SAMPLES), "--w-avg-samples", "500"]
CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(4 / float((a - b).square().mean()))


# ---------------------------------------------------------------------------------------------
# Schedules


def test_learning_rate_ramp_and_w_noise_follow_panohead():
    cfg = ProjectConfig(steps=1000)
    assert learning_rate(0, cfg) == 0.0
    assert learning_rate(25, cfg) == pytest.approx(0.05)  # half way up the 5% linear ramp
    assert learning_rate(50, cfg) == pytest.approx(0.1) == learning_rate(750, cfg)
    assert learning_rate(875, cfg) == pytest.approx(0.05)  # half way down the 25% cosine ramp
    assert learning_rate(999, cfg) == pytest.approx(0.1 * (0.5 - 0.5 * math.cos(math.pi * 0.004)))
    assert w_noise_scale(0, cfg, 2.0) == pytest.approx(0.1)
    assert w_noise_scale(375, cfg, 2.0) == pytest.approx(0.1 * 0.25)
    assert w_noise_scale(750, cfg, 2.0) == 0.0 == w_noise_scale(900, cfg, 2.0)


# ---------------------------------------------------------------------------------------------
# Perceptual distances


@pytest.fixture(scope="module")
def vgg_weights():
    gen = torch.Generator().manual_seed(0)
    convs, in_ch = [], 3
    for ch in CHANNELS:
        convs.append((torch.randn(ch, in_ch, 3, 3, generator=gen) * (2 / (9 * in_ch)) ** 0.5,
                      0.01 * torch.randn(ch, generator=gen)))
        in_ch = ch
    lins = [torch.rand(ch, generator=gen) for ch in (64, 128, 256, 512, 512)]
    return convs, lins


def direct_lpips(convs, lins, x, y) -> torch.Tensor:
    """LPIPS written out as in the lpips package: per tap, unit-normalise channels, weight, spatial mean."""
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    hx, hy = ((x + 1) / 2 - mean) / std, ((y + 1) / 2 - mean) / std
    total, layers = torch.zeros(len(x)), iter(convs)
    for stage, lin in zip((2, 2, 3, 3, 3), lins, strict=True):
        for _ in range(stage):
            w, b = next(layers)
            hx, hy = F.relu(F.conv2d(hx, w, b, padding=1)), F.relu(F.conv2d(hy, w, b, padding=1))
        nx = hx / (hx.norm(dim=1, keepdim=True) + 1e-10)
        ny = hy / (hy.norm(dim=1, keepdim=True) + 1e-10)
        total = total + ((nx - ny) ** 2 * lin.reshape(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
        hx, hy = F.max_pool2d(hx, 2), F.max_pool2d(hy, 2)
    return total


class _Layers(nn.Module):
    def __init__(self, convs):
        super().__init__()
        for i, (w, b) in enumerate(convs, start=1):
            conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
            conv.load_state_dict({"weight": w, "bias": b})
            setattr(self, f"conv{i}", conv)

    def forward(self, x):
        for i in range(1, 14):
            x = getattr(self, f"conv{i}")(x)
        return x


class _NvidiaLike(nn.Module):
    """A module with vgg16.pt's attribute names (layers.convN, lpipsN), saved as TorchScript by tracing."""

    def __init__(self, convs, lins):
        super().__init__()
        self.layers = _Layers(convs)
        for i, lin in enumerate(lins):
            self.register_buffer(f"lpips{i}", lin.clone())

    def forward(self, x):
        return self.layers(x).sum() + sum(getattr(self, f"lpips{i}").sum() for i in range(5))


def test_lpips_from_torchscript_and_torchvision_weights_is_the_lpips_formula(vgg_weights, tmp_path):
    convs, lins = vgg_weights
    traced = torch.jit.trace(_NvidiaLike(convs, lins), torch.zeros(1, 3, 8, 8))
    traced.save(str(tmp_path / "vgg16.pt"))
    tv = {f"features.{i}.{k}": t for i, (w, b) in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28), convs,
                                                     strict=True) for k, t in (("weight", w), ("bias", b))}
    torch.save(tv, tmp_path / "vgg16_tv.pth")
    torch.save({f"lin{i}.model.1.weight": lin.reshape(1, -1, 1, 1) for i, lin in enumerate(lins)}, tmp_path / "vgg.pth")

    from_script = load_perceptual(tmp_path / "vgg16.pt")
    from_tv = load_perceptual(tmp_path / "vgg16_tv.pth", tmp_path / "vgg.pth")
    assert isinstance(from_script, LPIPSVGG16) and from_script.name == "lpips-vgg16"
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1 for _ in range(2))
    expected = direct_lpips(convs, lins, x, y)
    torch.testing.assert_close(from_script(x, y), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(from_tv(x, y), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(from_script(y, x), expected, rtol=1e-4, atol=1e-6)
    assert from_script(x, x).abs().max() < 1e-9
    with pytest.raises(WeightsError, match="needs --lpips-lin"):
        load_perceptual(tmp_path / "vgg16_tv.pth")


def test_torchscript_reader_refuses_foreign_globals_without_running_them(tmp_path):
    import os

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps(os.system, protocol=2))
        z.writestr("evil/code/__torch__.py", "")
    with pytest.raises(WeightsError, match=r"refused global (posix|nt)\.system"):
        read_torchscript_tensors(path)


def test_laplacian_l1_of_a_constant_shift_is_the_shift():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lap = LaplacianL1()
    torch.testing.assert_close(lap(x, x + 0.25), torch.full((2,), 0.25), rtol=1e-5, atol=1e-6)
    assert float(lap(x, x).abs().max()) == 0.0
    noisy = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert float(lap(x, noisy).min()) > 0.05
    assert "fallback" in lap.name


# ---------------------------------------------------------------------------------------------
# Projection of a known code (the parity fixture's real PanoHead architecture, raw renders)


@pytest.fixture(scope="module")
def G(parity_dir):
    return load_generator(parity_dir, neural_rendering_resolution=NRR,
                          rendering_overrides={"depth_resolution": SAMPLES, "depth_resolution_importance": SAMPLES})


@pytest.fixture(scope="module")
def known(G):
    """A target rendered from a known W+ code (truncation 0.7 toward w_avg) at a known camera."""
    w_avg, _ = w_statistics(G, 500)
    z = torch.from_numpy(np.random.RandomState(7).randn(1, 512)).float()
    w = w_avg + 0.7 * (G.mapping(z, cameras.conditioning_camera())[:, :1] - w_avg)
    ws = w.expand(1, G.num_ws, -1)
    c = cameras.cameras(0.3, -0.1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        target = G.synthesis(ws, c, render_sr=False).image_raw
    return ws, w_avg, c, target


@pytest.fixture(scope="module")
def projection(G, known):
    _, _, c, target = known
    return project(G, target, c, LaplacianL1(), ProjectConfig(steps=60, space="w", w_avg_samples=500, raw=True),
                   show_progress=False)


def test_projection_reaches_the_target_and_a_held_out_view(G, known, projection):
    ws, w_avg, c, target = known
    assert projection.ws.shape == (1, G.num_ws, 512)
    with torch.no_grad():
        start = G.synthesis(w_avg.expand(1, G.num_ws, -1), c, render_sr=False).image_raw
    assert psnr(start, target) < 10
    assert psnr(projection.image, target) > 17  # stated: 17 dB after 60 steps (w_avg: about 7 dB)
    # Another camera than the one fitted: the projected code renders the true head better than w_avg does.
    other = cameras.cameras(-0.4, 0.1)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        truth, proj, mean = (G.synthesis(v, other, render_sr=False).image_raw
                             for v in (ws, projection.ws, w_avg.expand(1, G.num_ws, -1)))
    assert psnr(proj, truth) > psnr(mean, truth) + 5
    assert projection.losses[-1]["loss"] < projection.losses[0]["loss"]


def test_pti_lowers_the_error_and_leaves_the_generator(G, known, projection):
    _, _, c, target = known
    before = {k: v.clone() for k, v in G.state_dict().items()}
    tuned, result = pivotal_tuning(G, target, projection.ws, c, LaplacianL1(), PTIConfig(steps=15), raw=True,
                                   show_progress=False)
    assert psnr(result.image, target) > psnr(projection.image, target) + 0.5
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.state_dict().items())


# ---------------------------------------------------------------------------------------------
# The commands


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("photo")
    Image.fromarray(data.astronaut()).save(d / "astronaut.png")
    return d


def test_project_command_writes_panohead_outputs_and_a_loadable_tuned_generator(parity_dir, photo_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["align", str(photo_dir / "astronaut.png"), "--out", str(tmp_path / "aligned")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "proj"
    result = runner.invoke(app, ["project", "--generator", str(parity_dir), "--image",
                                 str(tmp_path / "aligned" / "astronaut.png"), "--out", str(out), "--steps", "4",
                                 "--pti", "2", *FAST])
    assert result.exit_code == 0, result.output
    assert "laplacian-l1 (fallback" in result.output
    w = np.load(out / "projected_w.npz")["w"]
    assert w.shape == (1, 8, 512) and w.dtype == np.float32
    for name in ("target.png", "proj_w.png", "proj.png", "proj.mp4", "losses.json", "tuned_generator.json"):
        assert (out / name).is_file(), name
    assert np.asarray(Image.open(out / "proj.png")).shape == (NRR, NRR, 3)
    # The tuned generator reloads and renders the projection as proj.png shows it.
    tuned = load_generator(out / "tuned_generator.safetensors")
    assert tuned.rendering_kwargs["ray_start"] == 2.35  # PanoHead's projector setting travels with it


def test_photo_command_end_to_end(parity_dir, photo_dir, tmp_path):
    styled = stylised_parity_generator(parity_dir).state_dict()
    torch.save(styled, tmp_path / "stylized.pth")  # the LD authors' format: a bare state dict
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["photo", str(photo_dir / "astronaut.png"), "--generator", str(parity_dir),
                                      "--stylized", str(tmp_path / "stylized.pth"), "--out", str(out), "--steps", "3",
                                      "--turntable", "3", *FAST])
    assert result.exit_code == 0, result.output
    sheet = np.asarray(Image.open(out / "sheet.png"))
    assert sheet.shape == (512, 3 * 512, 3)
    assert np.array_equal(sheet[:, :512], np.asarray(Image.open(out / "astronaut.png")))
    for yaw in (-90, -30, 0, 30, 90):
        assert np.asarray(Image.open(out / f"stylized_yaw{yaw:+04d}_pitch+10.png")).shape == (NRR, NRR, 3)
    assert (out / "stylized_turntable.gif").is_file() and (out / "projected_w.npz").is_file()
    # The stylised panel is the stylised generator, not the base one, rendered with the projected code.
    assert np.abs(sheet[:, 512:1024].astype(int) - sheet[:, 1024:]).mean() > 2


def test_photo_without_a_face_fails_before_loading_models(parity_dir, tmp_path):
    from headstyle.cli import UserError

    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(tmp_path / "wall.png")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")  # never read: the photo fails first
    result = CliRunner().invoke(app, ["photo", str(tmp_path / "wall.png"), "--generator", str(parity_dir),
                                      "--stylized", str(tmp_path / "broken.pth"), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, UserError) and "no face found" in str(result.exception)
    assert not (tmp_path / "o").exists()
