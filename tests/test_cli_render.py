"""`headstyle render` on the parity fixture's generator: files, sizes, agreement with a direct library render."""

from __future__ import annotations

import math
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from headstyle import load_generator
from headstyle.cameras import cameras, conditioning_camera
from headstyle.cli import app, main

NRR, SAMPLES = 16, 6  # small raw renders keep the test fast; the weights are the fixture's
FAST = ["--neural-rendering-resolution", str(NRR), "--depth-samples", str(SAMPLES)]


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def G(parity_dir):
    return load_generator(
        parity_dir, neural_rendering_resolution=NRR,
        rendering_overrides={"depth_resolution": SAMPLES, "depth_resolution_importance": SAMPLES},
    )


@torch.no_grad()
def direct_render(G, seed: int, yaw_deg: float, pitch_deg: float, render_sr: bool) -> np.ndarray:
    """The library call the command should amount to, written out independently."""
    z = torch.from_numpy(np.random.RandomState(seed).randn(1, 512)).float()
    ws = G.mapping(z, conditioning_camera(), truncation_psi=0.7, truncation_cutoff=14)
    out = G.synthesis(ws, cameras(math.radians(yaw_deg), math.radians(pitch_deg)), noise_mode="const",
                      render_sr=render_sr, generator=torch.Generator().manual_seed(seed))
    img = out.image if render_sr else out.image_raw
    return (img[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def raw_run(parity_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("render")
    result = CliRunner().invoke(app, [
        "render", "--generator", str(parity_dir), "--seeds", "0,1", "--yaws", "-30,0", "--pitch", "10",
        "--turntable", "2", "--out", str(out), "--raw-only", "--depth", *FAST,
    ])
    assert result.exit_code == 0, result.output
    return out


def test_files_sizes_and_front_view(raw_run, G):
    names = sorted(p.name for p in raw_run.iterdir())
    for seed in ("seed0000", "seed0001"):
        for view in ("yaw-030_pitch+10", "yaw+000_pitch+10"):
            assert png(raw_run / f"{seed}_{view}.png").shape == (NRR, NRR, 3)
            assert np.asarray(Image.open(raw_run / f"{seed}_{view}_depth.png")).shape == (NRR, NRR)
        assert png(raw_run / f"{seed}_views.png").shape == (NRR + 4, 2 * NRR + 6, 3)
        assert iio.imread(raw_run / f"{seed}_turntable.gif", index=None).shape[:3] == (2, NRR, NRR)
        assert iio.imread(raw_run / f"{seed}_turntable.mp4", plugin="FFMPEG", index=None).shape == (2, NRR, NRR, 3)
    assert len(names) == 2 * (2 * 2 + 1 + 2) and not any(n.startswith(".") for n in names)

    front = png(raw_run / "seed0000_yaw+000_pitch+10.png")
    assert np.array_equal(front, direct_render(G, 0, 0.0, 10.0, render_sr=False))
    assert not np.array_equal(front, png(raw_run / "seed0001_yaw+000_pitch+10.png"))
    # The turntable starts at the front view with the same renderer seed.
    gif0 = iio.imread(raw_run / "seed0000_turntable.gif", index=0)[..., :3]
    assert np.abs(gif0.astype(int) - front).max() <= 8  # GIF palette quantisation only


def test_w_npz_renders_like_its_seed(raw_run, G, parity_dir, tmp_path):
    ws = G.mapping(torch.from_numpy(np.random.RandomState(0).randn(1, 512)).float(), conditioning_camera(), 0.7, 14)
    np.savez(tmp_path / "code.npz", w=ws.detach().numpy())
    result = CliRunner().invoke(app, ["render", "--generator", str(parity_dir), "--w-npz", str(tmp_path / "code.npz"),
                                      "--yaws", "0", "--pitch", "10", "--out", str(tmp_path / "o"), "--raw-only",
                                      *FAST])
    assert result.exit_code == 0, result.output
    # Code 0 of the file renders with renderer seed 0, like seed 0.
    assert np.array_equal(png(tmp_path / "o" / "code_yaw+000_pitch+10.png"),
                          png(raw_run / "seed0000_yaw+000_pitch+10.png"))


def test_super_resolved_view_matches_library(G, parity_dir, tmp_path):
    result = CliRunner().invoke(app, ["render", "--generator", str(parity_dir), "--seeds", "0", "--yaws", "0",
                                      "--pitch", "10", "--out", str(tmp_path), *FAST])
    assert result.exit_code == 0, result.output
    image = png(tmp_path / "seed0000_yaw+000_pitch+10.png")
    assert image.shape == (512, 512, 3)
    assert np.array_equal(image, direct_render(G, 0, 0.0, 10.0, render_sr=True))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--generator", "no/such/generator.pkl"], "no/such/generator.pkl: no such file"),
        (["--generator", "{parity}", "--w-npz", "{npz14}"], "has 14 ws but this generator takes 8"),
        (["--generator", "{parity}", "--seeds", "0", "--w-npz", "{npz14}"], "either --seeds or --w-npz"),
        (["--generator", "{parity}", "--yaws", "left,right"], "not an angle in degrees: 'left'"),
        (["--generator", "{parity}", "--seeds", "-1"], "--seeds must be integers"),
        (["--generator", "{parity}", "--yaws", "", "--turntable", "0"], "nothing to render"),
    ],
)
def test_bad_input_exits_2_with_message(args, message, parity_dir, tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "w14.npz", w=np.zeros((1, 14, 512), np.float32))
    args = [a.format(parity=parity_dir, npz14=tmp_path / "w14.npz") for a in args]
    monkeypatch.setattr(sys, "argv", ["headstyle", "render", *args, "--out", str(tmp_path / "out"), *FAST])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
