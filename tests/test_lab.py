"""The synthetic head lab: identities, styles, the frozen/trainable generator split and the exemplar prior."""

import math

import pytest
import torch

from headstyle.cameras import cameras
from headstyle.generator.base import Generator
from headstyle.lab.prior.exemplar import GRID_CONTROL, build_lab_prior
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import STYLES, sample_z
from headstyle.lab.world.identities import HELD_OUT_SEED, LeakError, check_disjoint, held_out_z
from headstyle.priors.base import Control, NoiseQuery

RES = 16


def _render(G, z, yaw, pitch=0.0):
    c = cameras(torch.full((len(z),), yaw), torch.full((len(z),), pitch))
    with torch.no_grad():
        return G.synthesis(G.mapping(z, c, 0.75), c)


def test_every_identity_renders_front_and_back_with_a_mask():
    G = LabGenerator(resolution=RES, sr_factor=1, residual=False)
    assert isinstance(G, Generator)
    assert G.box_warp == G.rendering_kwargs["box_warp"] and G.img_resolution == G.neural_rendering_resolution == RES
    z = torch.cat([held_out_z(4), sample_z(4, 0), 3 * sample_z(2, 1)])  # includes extreme parameters
    front, back = _render(G, z, 0.0), _render(G, z, math.pi)
    for out in (front, back):
        area = (out.mask >= 0.5).float().mean((1, 2, 3))
        assert torch.all(area > 0.2) and torch.all(area < 0.95)
        assert torch.all((out.depth[out.mask >= 0.5] > 2.3) & (out.depth[out.mask >= 0.5] < 3.0))
    # Back of the head is hair, the front is a face: the two views differ for every identity.
    assert torch.all((front.image - back.image).abs().mean((1, 2, 3)) > 0.02)


def test_zero_initialised_residual_reproduces_the_frozen_render_exactly():
    z = sample_z(3, 5)
    trainable, frozen = LabGenerator(resolution=RES), LabGenerator(resolution=RES, residual=False)
    a, b = _render(trainable, z, 0.4, 0.1), _render(frozen, z, 0.4, 0.1)
    for name in ("image", "image_raw", "depth", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    params = trainable.trainable_parameters(("backbone.synthesis", "superresolution"), train_biases=False)
    chosen = [n for n, p in trainable.named_parameters() if any(p is q for q in params)]
    assert chosen == ["backbone.synthesis.trigrid", "backbone.synthesis.fc0.weight", "backbone.synthesis.fc1.weight"]
    with torch.no_grad():
        trainable.backbone.synthesis.fc1.weight.normal_(0, 0.1)
    assert (_render(trainable, z, 0.4, 0.1).image_raw - b.image_raw).abs().max() > 1e-2


def test_styles_transform_the_identity_and_toon_changes_geometry():
    z = held_out_z(2)
    plain = _render(LabGenerator(resolution=RES, residual=False), z, 0.3)
    for name in STYLES:
        styled = _render(LabGenerator(resolution=RES, residual=False, style=name), z, 0.3)
        assert (styled.image - plain.image).abs().mean() > 0.03, name
        geometry_changed = not torch.equal(styled.depth, plain.depth)
        assert geometry_changed == (name in ("toon", "zombie")), name


def test_prior_never_receives_held_out_identities():
    held = held_out_z(16)
    prior, data = build_lab_prior(styles=("statue",), identities=3, views=2, resolution=RES, held_out=held)
    assert torch.equal(prior.identities, data.z)
    assert torch.cdist(data.z, held).min() > 0.5
    # Every exemplar is a render of one of the prior identities: count them per domain.
    assert all(len(img) == 3 * 2 for img in data.raw.values())
    assert prior.single.exemplars.shape[0] == prior.tile.exemplars.shape[0] == 2 * 3 * 2
    with pytest.raises(LeakError, match="held-out"):
        build_lab_prior(styles=("statue",), identities=2, views=1, resolution=RES, seed=HELD_OUT_SEED)
    with pytest.raises(LeakError):
        check_disjoint(torch.cat([sample_z(2, 9), held[3:4]]), held)


def test_grid_branches_are_scored_tile_by_tile():
    prior, _ = build_lab_prior(styles=("gold",), identities=2, views=2, resolution=RES, sr_factor=2)
    embeds = prior.embed_prompts(STYLES["gold"].prompt)
    g = torch.Generator().manual_seed(0)
    tiles = [torch.randn(2, 3, RES, RES, generator=g) for _ in range(4)]
    grid = torch.cat([torch.cat(tiles[:2], -1), torch.cat(tiles[2:], -1)], -2)
    single = torch.randn(2, 3, 2 * RES, 2 * RES, generator=g)
    t = torch.tensor([101, 201])
    (su, sc), (gu, gc) = prior.predict_noise(
        [NoiseQuery(single, t, embeds), NoiseQuery(grid, t, embeds, Control(GRID_CONTROL, grid), layout="grid")]
    )
    ref_single = prior.single.predict_noise([NoiseQuery(single, t, embeds)])[0]
    assert torch.allclose(su, ref_single[0]) and torch.allclose(sc, ref_single[1])
    for k, (rows, cols) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        ref = prior.tile.predict_noise([NoiseQuery(tiles[k], t, embeds)])[0]
        sl = (..., slice(rows * RES, (rows + 1) * RES), slice(cols * RES, (cols + 1) * RES))
        assert torch.allclose(gu[sl], ref[0], atol=1e-6) and torch.allclose(gc[sl], ref[1], atol=1e-6)


def test_short_lab_training_moves_towards_the_ground_truth_style(tmp_path):
    """The unchanged trainer with the lab recipe (LD + mirror + grid + rank) on the lab generator and prior:
    after a few iterations the held-out identities are closer to their ground-truth stylised heads."""
    from headstyle.lab.experiments.bench import LabSettings, new_generator, train_variant
    from headstyle.lab.experiments.evaluate import evaluate, make_eval_set

    settings = LabSettings(iterations=8, lr=0.0005, resolution=RES, sr_factor=2)
    prior, _ = build_lab_prior(styles=("statue",), identities=3, views=8, resolution=RES, sr_factor=2)
    ev = make_eval_set("statue", new_generator(settings), identities=2, views=4, reference=2)
    before = evaluate(new_generator(settings), ev)
    G = train_variant("statue", "ld", prior, settings, tmp_path / "statue-ld", progress=False).G
    after = evaluate(G, ev)
    assert after["rgb_error"] < 0.96 * before["rgb_error"]
    assert after["stylisation"] > 0.3
    assert after["depth_error"] < 0.01  # a colour style: the geometry stays
    assert (tmp_path / "statue-ld" / "config.toml").is_file()


def test_lab_commands_reject_unknown_styles_and_objectives():
    import subprocess
    import sys

    for args in (["demo", "--style", "pixar"], ["lab", "bench", "--styles", "statue", "--objectives", "ld,nope"]):
        proc = subprocess.run([sys.executable, "-m", "headstyle", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "error:" in proc.stderr and ("pixar" in proc.stderr or "nope" in proc.stderr)


def test_demo_writes_its_report(tmp_path):
    """`headstyle demo`'s library side on a tiny budget: every promised file, complete and readable."""
    import json

    import imageio.v3 as iio

    from headstyle.lab.experiments.bench import LabSettings
    from headstyle.lab.experiments.demo import DEFINITIONS, run_demo

    settings = LabSettings(
        iterations=2, resolution=RES, prior_identities=2, prior_views=4, eval_identities=2, eval_views=3,
        prior="exemplar",
    )
    metrics = run_demo(tmp_path, "gold", settings, turntable_frames=3, progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["results"].keys() == {"untrained", "ld", "sds"} and saved["definitions"] == DEFINITIONS
    assert saved["results"]["untrained"]["rgb_error"] == metrics["results"]["untrained"]["rgb_error"] > 0
    for i in range(2):
        frames = iio.imread(tmp_path / "turntables" / f"identity_{i}.gif")
        assert frames.shape == (3, 2 * RES, 4 * 2 * RES, 3)  # before | LD | SDS | truth
    assert iio.imread(tmp_path / "views.png").shape[0] > 2 * 4 * 2 * RES
    page = (tmp_path / "summary.html").read_text()
    assert "turntables/identity_1.gif" in page and "SDS" in page
    assert (tmp_path / "summary.png").stat().st_size > 0
