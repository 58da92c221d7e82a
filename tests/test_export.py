"""Export helpers: uint8 conversion, atomic writes, grids, depth maps, GIF/MP4, W+ npz codes."""

from __future__ import annotations

import tracemalloc

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from headstyle import load_generator
from headstyle.cameras import cameras
from headstyle.crafted import npz_declaring
from headstyle.export import (
    depth_to_uint8,
    ffmpeg_available,
    image_grid,
    render_view,
    save_grid,
    save_image,
    save_turntable,
    save_video,
    to_uint8,
)
from headstyle.generator.latents import CodeFileError, Latent, latents_from_npz, z_from_seed
from headstyle.io import atomic_dir, atomic_path


def test_to_uint8_matches_panohead_rounding():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 3.0, -7.0, float("nan")]).reshape(1, 1, 8).expand(3, 1, 8)
    got = to_uint8(x)
    assert got.shape == (1, 8, 3) and got.dtype == np.uint8
    # (x * 127.5 + 128) clamped to [0, 255] and truncated, as PanoHead's gen_samples.py; NaN -> mid-grey.
    assert got[0, :, 0].tolist() == [0, 0, 128, 191, 255, 255, 0, 128]
    batch = torch.rand(2, 3, 4, 5) * 2 - 1
    assert to_uint8(batch).shape == (2, 4, 5, 3)
    assert np.array_equal(to_uint8(batch)[1], to_uint8(batch[1]))
    with pytest.raises(ValueError, match="expected"):
        to_uint8(torch.zeros(4, 5))


def test_save_image_round_trip_and_no_leftovers(tmp_path):
    img = torch.rand(3, 6, 10) * 2 - 1
    path = save_image(img, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(path)), to_uint8(img))
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # umask permissions, not a private temp file


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_atomic_dir_moves_on_success_and_replaces_an_existing_folder(tmp_path):
    target = tmp_path / "out" / "model"
    with atomic_dir(target) as tmp:
        assert tmp.is_dir() and tmp.parent == target.parent and not target.exists()
        (tmp / "a.txt").write_text("first")
    assert [p.name for p in target.iterdir()] == ["a.txt"] and target.stat().st_mode & 0o777 == 0o755
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert [p.name for p in target.iterdir()] == ["b.txt"]  # replaced whole, nothing of the old one left
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_atomic_dir_leaves_nothing_on_error_and_keeps_the_old_folder(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "new") as tmp:
        (tmp / "half.txt").write_text("half-written")
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old"
    old.mkdir()
    (old / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(old) as tmp:
        (tmp / "b.txt").write_text("half-written")
        raise RuntimeError("crash while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and [p.name for p in old.iterdir()] == ["a.txt"]


def test_atomic_dir_keep_leaves_a_finished_folder_in_place(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "done").write_text("first writer")
        target.mkdir()  # another writer finishes meanwhile
        (target / "done").write_text("other writer")
    assert (target / "done").read_text() == "first writer"
    with atomic_dir(target, keep=lambda path: (path / "done").is_file()) as tmp:
        (tmp / "done").write_text("late writer")
    assert (target / "done").read_text() == "first writer" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_image_grid_layout(tmp_path):
    tiles = np.stack([np.full((2, 3, 3), 10 * (i + 1), np.uint8) for i in range(5)])
    sheet = image_grid(tiles, cols=3, pad=1, pad_value=255)
    assert sheet.shape == (2 * 2 + 3, 3 * 3 + 4, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        y, x = 1 + r * 3, 1 + c * 4
        assert (sheet[y : y + 2, x : x + 3] == 10 * (i + 1)).all()
    assert (sheet[4:6, 9:12] == 255).all()  # the empty 6th cell
    assert (sheet[0] == 255).all() and (sheet[:, 0] == 255).all()
    path = save_grid(torch.zeros(4, 3, 2, 2), tmp_path / "g.png", pad=0)
    assert np.asarray(Image.open(path)).shape == (4, 4, 3)  # cols default ceil(sqrt(4)) = 2


def test_depth_map_normalised_near_is_bright():
    depth = torch.tensor([[[[2.5, 2.6], [2.7, 9.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    grey = depth_to_uint8(depth, mask)
    assert grey.shape == (1, 2, 2) and grey.dtype == np.uint8
    assert grey[0].tolist() == [[255, 128], [0, 0]]  # near -> 255, far -> 0, background -> 0
    flat = depth_to_uint8(torch.full((1, 3, 3), 2.0))  # constant depth: no NaN, all "near"
    assert flat.shape == (3, 3) and (flat == 255).all()


def test_gif_round_trip(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = np.stack([np.broadcast_to(np.array(c, np.uint8), (8, 12, 3)) for c in colours])
    path = save_video(frames, tmp_path / "t.gif", fps=10)
    back = iio.imread(path, index=None)
    assert back.shape[:3] == (3, 8, 12)
    assert np.array_equal(back[..., :3], frames)
    with Image.open(path) as im:
        assert im.info["duration"] == 100 and im.info["loop"] == 0
    with pytest.raises(ValueError, match="suffix"):
        save_video(frames, tmp_path / "t.avi")


def test_mp4_and_turntable(tmp_path):
    assert ffmpeg_available(), "imageio-ffmpeg is a dependency: its ffmpeg binary must be found"
    frames = torch.linspace(-1, 1, 6).reshape(6, 1, 1, 1).expand(6, 3, 16, 16)
    paths = save_turntable(frames, tmp_path / "spin", fps=12)
    assert [p.name for p in paths] == ["spin.gif", "spin.mp4"]
    video = iio.imread(paths[1], plugin="FFMPEG", index=None)
    assert video.shape == (6, 16, 16, 3)
    means = video.reshape(6, -1).mean(1)
    assert np.all(np.diff(means) > 20)  # the grey ramp survives H.264 in order
    assert np.abs(means - to_uint8(frames).reshape(6, -1).mean(1)).max() < 8


def test_z_from_seed_is_numpy_randomstate():
    assert torch.equal(z_from_seed(3), torch.from_numpy(np.random.RandomState(3).randn(1, 512)).float())


def test_w_npz_codes(tmp_path):
    w = np.random.RandomState(0).randn(2, 8, 512).astype(np.float32)
    np.savez(tmp_path / "proj.npz", w=w)
    latents = latents_from_npz(tmp_path / "proj.npz", num_ws=8)
    assert [lt.name for lt in latents] == ["proj00", "proj01"]
    assert torch.equal(latents[1].ws, torch.from_numpy(w[1:2]))
    np.savez(tmp_path / "single.npz", w=w[:1, 0])  # one w -> every layer
    (single,) = latents_from_npz(tmp_path / "single.npz", num_ws=8)
    assert single.ws.shape == (1, 8, 512) and torch.equal(single.ws[0, 7], torch.from_numpy(w[0, 0]))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"w": np.zeros((1, 14, 512), np.float32)}, r"'w' has 14 ws but this generator takes 8"),
        ({"ws": np.zeros((1, 8, 512), np.float32)}, r"no array 'w' in the npz \(found: ws\)"),
        ({"w": np.zeros((1, 8, 256), np.float32)}, r"must be float \(N, 8, 512\)"),
        ({"w": np.full((1, 8, 512), np.nan, np.float32)}, "NaN, Inf or values beyond float32's range"),
        ({"w": np.full((1, 8, 512), 1e300)}, "NaN, Inf or values beyond float32's range"),  # finite only as float64
        ({"w": np.array([{"evil": 1}], dtype=object)}, "holds Python objects, which would need unpickling"),
        (None, r"found a bare \.npy array; save it with np\.savez"),
        # One W+ code saved without its batch axis: never read as 8 heads of one w each.
        ({"w": np.zeros((8, 512), np.float32)}, r"either one W\+ code without its batch axis or 8 single-w codes; "
                                                r"save one code as \(1, 8, 512\) .* or 8 codes as \(8, 1, 512\)"),
        ({"w": np.zeros((14, 512), np.float32)}, r"or 14 single-w codes"),
    ],
)
def test_w_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    if arrays is None:
        with open(path, "wb") as f:  # a .npy payload under an .npz name
            np.save(f, np.zeros((1, 8, 512), np.float32))
    else:
        np.savez(path, **arrays)
    with pytest.raises(CodeFileError, match=message) as err:
        latents_from_npz(path, num_ws=8)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("shape", "descr", "message"),
    [
        ((10**6, 14, 512), "<f4", r"declares shape \(1000000, 14, 512\) of float32 \(28672000000 bytes\), more than"),
        ((2**40,), "<f8", r"declares shape"),
        ((1, 8, 512), "|O", "holds Python objects"),
        ((1, 8, 512), "<f4", r"not a readable npz file \(ValueError: EOF"),  # declares more than it holds
    ],
)
def test_w_npz_header_is_checked_before_reading(tmp_path, shape, descr, message):
    """An npz is a zip of .npy files: its header may declare any size; nothing that large is allocated."""
    path = tmp_path / "bomb.npz"
    path.write_bytes(npz_declaring(shape, descr, data=b"\0" * 64))
    tracemalloc.start()
    try:
        with pytest.raises(CodeFileError, match=message):
            latents_from_npz(path, num_ws=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # numpy allocations are traced: far below what the header declares


def test_render_view_is_seeded_and_restores_rng(parity_dir):
    G = load_generator(parity_dir, neural_rendering_resolution=8,
                       rendering_overrides={"depth_resolution": 4, "depth_resolution_importance": 4})
    latent = Latent("x", torch.randn(1, G.num_ws, 512, generator=torch.Generator().manual_seed(5)) * 0.3, seed=7)
    c = cameras(0.4, 0.1)
    torch.manual_seed(123)
    a = render_view(G, latent, c, render_sr=False)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)  # the caller's RNG stream is untouched
    b = G.synthesis(latent.ws, c, render_sr=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.image_raw, b.image_raw) and torch.equal(a.depth, b.depth)
    other = render_view(G, Latent("y", latent.ws, seed=8), c, render_sr=False)
    assert not torch.equal(a.depth, other.depth)  # the seed drives the stratified jitter
