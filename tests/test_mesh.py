"""Mesh export: closed forms, the lab head against its renders, PanoHead's numbers, files and the CLI."""

from __future__ import annotations

import math
import sys

import mrcfile
import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file
from typer.testing import CliRunner

from headstyle import load_generator
from headstyle.cameras import cameras
from headstyle.cli import app, main
from headstyle.generator.checkpoint import save_generator
from headstyle.generator.latents import latents_from_seeds
from headstyle.generator.renderer import crop_mask, ray_march
from headstyle.geometry import project
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import sample_z
from headstyle.mesh import (
    EmptySurfaceError,
    MeshSettings,
    extraction_cube,
    head_mesh,
    largest_component,
    sample_volume,
    side_by_side,
    smooth,
    write_mesh,
    write_mrc,
)
from headstyle.mesh.files import panohead_mrc_array


def analytic(sigma_fn):
    """A FieldSampler from a density function of the points; colour = the point itself (varies per vertex)."""

    def sample(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sigma_fn(points), points.clamp(-1, 1)

    return sample


def sphere(radius: float, centre=(0.0, 0.0, 0.0), slope: float = 100.0):
    """Raw density crossing PanoHead's level 10 at |p - centre| = radius (linear in the distance)."""
    return lambda p: 10 + slope * (radius - (p - p.new_tensor(centre)).norm(dim=-1))


def mesh_of(sigma_fn, resolution: int, trim: float = 0.0, **settings) -> trimesh.Trimesh:
    return head_mesh(analytic(sigma_fn), 1.0, MeshSettings(resolution=resolution, trim=trim, **settings)).mesh


# --- closed forms ---------------------------------------------------------------------------------


def test_sphere_area_and_volume_within_the_chord_bound():
    r, res = 0.3, 64
    m = mesh_of(sphere(r), res)
    h = 1.0 / (res - 1)
    # Vertices lie on the sphere, so faces are chords: each cuts at most a sagitta (edge <= h sqrt 3)^2 / 8r
    # inside, a relative loss of area and volume of at most 9/8 (h / r)^2 (0.32% here; measured 0.09%, 0.17%).
    bound = 9 / 8 * (h / r) ** 2
    assert m.is_watertight and m.is_winding_consistent
    assert -bound <= m.volume / (4 / 3 * math.pi * r**3) - 1 <= 1e-4  # positive volume: faces point outwards
    assert -bound <= m.area / (4 * math.pi * r**2) - 1 <= 1e-4
    assert np.allclose(np.linalg.norm(m.vertices, axis=1), r, atol=0.1 * h)


def test_box_area_and_volume_within_the_edge_chamfer_bound():
    half = torch.tensor([0.3, 0.2, 0.25])
    res = 64
    m = mesh_of(lambda p: 10 - 100 * (p.abs() - half).amax(-1), res)
    h = 1.0 / (res - 1)
    edges = 4 * 2 * float(half.sum())
    area = 8 * float(half[0] * half[1] + half[1] * half[2] + half[0] * half[2])
    volume = 8 * float(half.prod())
    # Faces are exact planes; marching cubes cuts each edge with a chamfer at most one voxel wide, which
    # removes at most (2 - sqrt 2) h of area and h^2 / 2 of volume per unit edge (measured: 1.6% and 0.15%).
    assert m.is_watertight
    assert -(2 - math.sqrt(2)) * h * edges <= m.area - area <= 1e-6
    assert -h * h / 2 * edges <= m.volume - volume <= 1e-6
    assert np.allclose(m.bounds, [-half.numpy(), half.numpy()], atol=1e-5)


def test_panohead_trim_cuts_and_closes_a_surface_that_leaves_the_cube():
    res = 64
    m = mesh_of(sphere(0.45), res, trim=30 / 256)  # gen_samples: int(30 * 64 / 256) = 7 voxels per face
    inner = 0.5 - 7 / (res - 1)
    assert m.is_watertight
    # The surface runs between the last kept and the first trimmed voxel on all six faces.
    assert np.all(np.abs(m.bounds) > inner) and np.all(np.abs(m.bounds) < inner + 1 / (res - 1))


def test_volume_is_panohead_lattice_and_skips_the_trimmed_shell():
    calls = []

    def sigma_fn(p):
        calls.append(p.shape[1])
        return p[..., 0] + 2 * p[..., 1] + 4 * p[..., 2]

    cube = extraction_cube(32, 0.8, 30 / 256)
    vol = sample_volume(analytic(sigma_fn), cube, batch_size=1000)
    x = -0.4 + np.arange(32) * 0.8 / 31  # create_samples: origin -L/2, voxel L / (N - 1), both faces
    t, n = cube.trim, cube.inner
    expected = x[:, None, None] + 2 * x[None, :, None] + 4 * x[None, None, :]
    assert t == 3 and sum(calls) == n**3 and max(calls) == 1000
    assert np.allclose(vol.sigma[t : t + n, t : t + n, t : t + n], expected[t : t + n, t : t + n, t : t + n], atol=1e-5)
    assert np.all(vol.sigma[:t] == -1000) and np.all(vol.sigma[:, -t:] == -1000) and np.all(vol.sigma[..., :t] == -1000)


def test_no_surface_at_the_level_names_the_density_range():
    with pytest.raises(EmptySurfaceError, match=r"no surface at level 10: .*spans \[-4.33, 4.33\]"):
        mesh_of(lambda p: 10 * p[..., 0], 16)


def test_largest_component_drops_the_floater():
    def two(p):
        return torch.maximum(sphere(0.2, (-0.15, 0, 0))(p), sphere(0.05, (0.3, 0, 0))(p))

    both = mesh_of(two, 48, largest_component=False)
    kept = largest_component(both.copy())
    assert len(both.split(only_watertight=False)) == 2
    assert kept.is_watertight and kept.bounds[1, 0] < 0.1
    assert kept.volume == pytest.approx(4 / 3 * math.pi * 0.2**3, rel=0.01)


def test_taubin_smoothing_flattens_bumps_and_keeps_volume():
    def bumpy(p):
        # Bumps of 5 voxels' wavelength on a sphere of radius 0.3.
        bumps = 0.01 * torch.sin(80 * p[..., 0]) * torch.sin(80 * p[..., 1]) * torch.sin(80 * p[..., 2])
        return 10 + 100 * (0.3 + bumps - p.norm(dim=-1))

    m = mesh_of(bumpy, 64)
    s = smooth(m.copy(), 20)
    radii = [np.linalg.norm(x.vertices, axis=1) for x in (m, s)]
    assert radii[1].std() < 0.7 * radii[0].std()  # measured 0.51
    assert radii[1].mean() == pytest.approx(0.3, rel=1e-3)  # no shrinking (plain Laplacian smoothing would)
    assert s.volume == pytest.approx(m.volume, rel=5e-3)  # measured 0.12%
    assert s.is_watertight


# --- the lab head ---------------------------------------------------------------------------------

LAB_RES = 64  # raw render resolution


@pytest.fixture(scope="module")
def lab():
    G = LabGenerator(resolution=LAB_RES)
    ws = G.mapping(sample_z(1, 0), torch.zeros(1, 25))
    # The lab's head fills its 0.8 box (the nose reaches z = 0.36): trim only the closing voxel.
    head = head_mesh(G.field_sampler(ws), G.box_warp, MeshSettings(resolution=96, trim=0.0))
    return G, ws, head.mesh


def test_lab_head_is_watertight_inside_the_render_box(lab):
    G, _, m = lab
    half = G.box_warp / 2
    assert m.is_watertight and m.volume > 0
    assert np.all(m.bounds[0] > -half) and np.all(m.bounds[1] < half)
    # A head, not a blob: about 0.49 wide, taller than deep (measured 0.488 x 0.74 x 0.58).
    size = m.bounds[1] - m.bounds[0]
    assert 0.35 < size[0] < 0.6 and size[1] > size[2] > size[0]


@pytest.mark.parametrize("yaw", [0.0, 0.7, math.pi / 2, math.pi])
def test_lab_silhouette_matches_the_rendered_mask(lab, yaw):
    G, ws, m = lab
    c = cameras(yaw, 0.1)
    with torch.no_grad():
        mask = G.synthesis(ws, c, render_sr=False).mask[0, 0].numpy() > 0.5
    points = trimesh.sample.sample_surface(m, 200_000, seed=0)[0]  # ~10 points per pixel footprint
    pix, _, valid = project(torch.from_numpy(points).float()[None], c, LAB_RES, LAB_RES)
    silhouette = np.zeros(LAB_RES * LAB_RES, bool)
    silhouette[pix[0][valid[0]].numpy()] = True
    silhouette = silhouette.reshape(LAB_RES, LAB_RES)
    iou = (silhouette & mask).sum() / (silhouette | mask).sum()
    assert iou >= 0.97  # measured 0.991-0.993 at yaws 0, 0.7, pi/2, pi


def test_lab_front_vertex_colours_match_the_raw_render(lab):
    G, ws, m = lab
    c = cameras(0.0, 0.1)
    with torch.no_grad():
        out = G.synthesis(ws, c, render_sr=False)
    v = torch.from_numpy(np.asarray(m.vertices)).float()
    pix, _, valid = project(v[None], c, LAB_RES, LAB_RES)
    pix, valid = pix[0], valid[0]
    origin = c[0, :16].reshape(4, 4)[:3, 3]
    view = torch.nn.functional.normalize(v - origin, dim=-1)
    facing = (torch.tensor(m.vertex_normals, dtype=torch.float32) * view).sum(-1) < -0.5
    depth = out.depth[0, 0].reshape(-1)[pix]
    # Visible: facing the camera, at the rendered depth (within one ray sample, 0.023), inside the opaque mask.
    at_depth = ((v - origin).norm(dim=-1) - depth).abs() < 0.02
    visible = valid & facing & at_depth & (out.mask[0, 0].reshape(-1)[pix] > 0.99)
    raw = (out.image_raw[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).reshape(-1, 3)
    colours = torch.from_numpy(np.asarray(m.visual.vertex_colors)[:, :3].astype(np.int64))
    diff = (colours[visible] - raw[pix[visible]].long()).abs().float()
    assert visible.sum() > 500
    # A vertex is a point, a pixel the composite over its footprint: measured mean 4.2, 90th percentile 10 (of 255).
    assert diff.mean() <= 7 and diff.quantile(0.9) <= 16


# --- PanoHead's numbers ---------------------------------------------------------------------------


def test_panohead_field_sampler_reproduces_the_original_density_and_raw_colour(parity_dir):
    G = load_generator(parity_dir)
    io = load_file(parity_dir / "io.safetensors")
    o, d = io["case0.ray_origins"], io["case0.ray_directions"]
    depths = torch.cat([io["case0.depths_coarse"], io["case0.depths_fine"]], dim=2)
    points = (o.unsqueeze(-2) + depths * d.unsqueeze(-2)).reshape(1, -1, 3)
    with torch.no_grad():
        sigma, rgb = G.field_sampler(io["case0.ws"])(points)
    precrop = torch.cat([io["case0.sigma_coarse_precrop"].reshape(1, 1024, 12),
                         io["case0.sigma_fine_precrop"].reshape(1, 1024, 12)], dim=2).reshape(1, -1)
    cropped = crop_mask(points, 0.1, 1.0)[..., 0]
    assert cropped.any() and torch.all(sigma[cropped] == -1e3)
    assert torch.allclose(sigma[~cropped], precrop[~cropped], atol=5e-4)  # the fixture README's tolerance

    # Composite the sampler's colours with the renderer's weights: the raw image is torgb of the composited
    # features plus (1 - weight sum) * background, and torgb is affine, so the two must differ by exactly
    # (1 - w) * torgb(background).
    order = torch.sort(depths, dim=2).indices

    def by_depth(x: torch.Tensor) -> torch.Tensor:
        return torch.gather(x.reshape(1, 1024, 24, -1), 2, order.expand(-1, -1, -1, x.shape[-1]))

    composite, _, weights = ray_march(by_depth(rgb), by_depth(sigma.unsqueeze(-1)), by_depth(depths),
                                      G.rendering_kwargs)
    w = weights.sum(2).permute(0, 2, 1).reshape(1, 1, 32, 32)
    with torch.no_grad():
        bcg_rgb = G.torgb(io["case0.bcg_resized"], io["case0.ws"][:, -1], fused_modconv=False)
    expected = io["case0.out.image_raw"] - (1 - w) * bcg_rgb
    assert torch.allclose(composite.permute(0, 2, 1).reshape(1, 3, 32, 32), expected, atol=1e-4)


# --- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["ply", "obj", "glb"])
def test_mesh_files_reopen_with_the_same_vertices_and_colours(lab, tmp_path, suffix):
    _, _, m = lab
    path = write_mesh(m, tmp_path / f"head.{suffix}")
    back = trimesh.load(path, force="mesh", process=False)
    assert len(back.vertices) == len(m.vertices) and len(back.faces) == len(m.faces)
    assert np.allclose(back.vertices, m.vertices, atol=1e-6)
    assert np.array_equal(back.visual.vertex_colors, m.visual.vertex_colors)
    assert back.is_watertight
    assert [p.name for p in tmp_path.iterdir()] == [f"head.{suffix}"]


def test_mrc_is_panohead_layout(tmp_path):
    cube = extraction_cube(24, 1.0)
    vol = sample_volume(analytic(lambda p: p[..., 0] + 10 * p[..., 1] + 100 * p[..., 2]), cube)
    with mrcfile.open(write_mrc(vol, tmp_path / "head.mrc")) as mrc:
        data = np.array(mrc.data)
    assert data.dtype == np.float32 and data.shape == (24, 24, 24)
    assert np.array_equal(data, panohead_mrc_array(vol))
    # gen_samples: sigmas[x, y, z] flipped along x, so data[0] is the largest x (the last kept lattice row).
    i, j, k = 24 - 1 - cube.trim, 10, 12
    x = -0.5 + np.array([i, j, k]) / 23
    assert data[24 - 1 - i, j, k] == pytest.approx(x[0] + 10 * x[1] + 100 * x[2], abs=1e-4)


def test_writes_are_atomic(lab, tmp_path, monkeypatch):
    _, _, m = lab
    target = tmp_path / "head.glb"
    target.write_bytes(b"previous")

    def fail_half_way(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(type(target), "write_bytes", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_mesh(m, target)
    monkeypatch.undo()
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["head.glb"]


def test_side_by_side_shifts_the_second_head_and_keeps_colours(lab):
    _, _, m = lab
    pair = side_by_side(m, m, 0.8)
    n = len(m.vertices)
    assert np.allclose(pair.vertices[n:], m.vertices + np.array([0.8, 0, 0]))
    assert np.array_equal(pair.visual.vertex_colors[n:], m.visual.vertex_colors)


# --- the command line -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_generators(parity_dir, tmp_path_factory):
    """The parity fixture's generator with its density x3 (its own never reaches PanoHead's level 10: max 8.4),
    and a 'stylised' copy whose raw colours are brighter (torgb bias + 0.5): same shape, other colours."""
    folder = tmp_path_factory.mktemp("dense")
    G = load_generator(parity_dir)
    with torch.no_grad():
        last = G.decoder.net[2]
        last.weight[0] *= 3
        last.bias[0] *= 3
        base, _ = save_generator(G, folder / "base.safetensors")
        G.torgb.bias += 0.5
        stylised, _ = save_generator(G, folder / "stylised.safetensors")
    return base, stylised


RES = 40


def test_mesh_command_writes_every_format_and_the_pair(dense_generators, tmp_path):
    base, stylised = dense_generators
    result = CliRunner().invoke(app, ["mesh", "--generator", str(base), "--stylized", str(stylised), "--seeds", "0",
                                      "--format", "all", "--resolution", str(RES), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    names = {p.name for p in tmp_path.iterdir()}
    heads = {f"seed0000_{k}.{ext}" for k in ("base", "stylized") for ext in ("glb", "ply", "obj", "mrc")}
    assert names == heads | {f"seed0000_pair.{ext}" for ext in ("glb", "ply", "obj")}

    G = load_generator(base)
    ws = latents_from_seeds(G, [0])[0].ws
    expected = head_mesh(G.field_sampler(ws), 1.0, MeshSettings(resolution=RES))
    meshes = {}
    for name in names - {n for n in names if n.endswith(".mrc")}:
        meshes[name] = trimesh.load(tmp_path / name, force="mesh", process=False)
    for ext in ("glb", "ply", "obj"):
        b, s, pair = (meshes[f"seed0000_{k}.{ext}"] for k in ("base", "stylized", "pair"))
        assert np.allclose(b.vertices, expected.mesh.vertices, atol=1e-6)
        assert np.array_equal(b.visual.vertex_colors, expected.mesh.visual.vertex_colors)
        assert np.allclose(s.vertices, b.vertices, atol=1e-6)  # the stylised copy only changed colours
        assert (s.visual.vertex_colors[:, :3].astype(int) >= b.visual.vertex_colors[:, :3]).all()
        assert (s.visual.vertex_colors != b.visual.vertex_colors).any()
        assert np.allclose(pair.vertices[len(b.vertices):], s.vertices + np.array([1.0, 0, 0]), atol=1e-6)
    with mrcfile.open(tmp_path / "seed0000_base.mrc") as mrc:
        assert np.array_equal(mrc.data, panohead_mrc_array(expected.volume))


def test_render_writes_meshes_beside_the_views(dense_generators, tmp_path):
    base, _ = dense_generators
    result = CliRunner().invoke(app, ["render", "--generator", str(base), "--seeds", "1", "--yaws", "0", "--raw-only",
                                      "--neural-rendering-resolution", "16", "--depth-samples", "6",
                                      "--mesh", "ply", "--mesh-resolution", str(RES), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    G = load_generator(base)
    expected = head_mesh(G.field_sampler(latents_from_seeds(G, [1])[0].ws), 1.0, MeshSettings(resolution=RES)).mesh
    m = trimesh.load(tmp_path / "seed0001.ply", process=False)
    assert (tmp_path / "seed0001_yaw+000_pitch+00.png").is_file()
    assert np.allclose(m.vertices, expected.vertices, atol=1e-6) and m.is_watertight


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mesh", "--generator", "no/such/generator.pkl"], "no/such/generator.pkl: no such file"),
        (["mesh", "--generator", "{parity}", "--resolution", "4"], "--resolution must be between 8 and 1024"),
        (["mesh", "--generator", "{parity}", "--resolution", "5000"], "--resolution must be between 8 and 1024"),
        (["mesh", "--generator", "{parity}", "--format", "stl"], "unknown mesh format stl"),
        (["mesh", "--generator", "{parity}", "--trim", "0.6"], "--trim: trim 0.6 leaves nothing"),
        (["mesh", "--generator", "{parity}", "--w-npz", "missing.npz"], "--w-npz missing.npz: no such file"),
        (["mesh", "--generator", "{parity}", "--stylized", "no/such.pth"], "no/such.pth: no such file"),
        (["mesh", "--generator", "{parity}", "--resolution", "16"], "no surface at level 10"),
        (["render", "--generator", "{parity}", "--mesh", "fbx"], "--mesh: unknown mesh format fbx"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, parity_dir, tmp_path, monkeypatch, capsys):
    args = [a.format(parity=parity_dir) for a in args]
    monkeypatch.setattr(sys, "argv", ["headstyle", *args, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
