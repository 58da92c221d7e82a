"""The web app's parts without a browser: its config and model checks, the job queue, and the handlers on
the lab, the parity-fixture PanoHead and the tiny SD models."""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import replace

import imageio.v3 as iio
import numpy as np
import pytest
import trimesh
from PIL import Image
from skimage import data

from conftest import stylised_parity_generator
from headstyle.app import handlers, training
from headstyle.app.config import AppConfig, load_app_config, tab_reasons, with_workdir
from headstyle.app.jobs import AppError, JobQueue, Stopped, run_in_folder
from headstyle.app.models import Lab
from headstyle.cameras import cameras
from headstyle.export import render_view, to_uint8
from headstyle.generator.latents import Latent, latents_from_npz, latents_from_seeds
from headstyle.settings import ConfigError

# Small enough for a busy 2-core machine: a 2-identity prior, few frames, coarse meshes.
# The exemplar prior: these tests drive the app's jobs, not the learned prior (tests/test_learned_prior.py).
LAB = ["lab.prior=exemplar", "lab.prior_identities=2", "lab.prior_views=4", "lab.turntable_frames=4",
       "lab.mesh_resolution=40"]


@pytest.fixture
def cfg(tmp_path) -> AppConfig:
    return with_workdir(load_app_config(None, LAB), str(tmp_path / "work"))


# ---------------------------------------------------------------------------------------------- config


def test_config_file_overrides_and_the_reasons_each_tab_gives(tmp_path, parity_dir):
    path = tmp_path / "app.toml"
    path.write_text(f'[models]\ngenerator = "{parity_dir}"\n\n[styles]\nold = "{tmp_path}/gone.pth"\n'
                    "\n[photo]\nsteps = 40\n")  # fmt: skip
    cfg = load_app_config(path, ["render.mesh_resolution=64"])
    assert (cfg.photo.steps, cfg.render.mesh_resolution, cfg.styles) == (40, 64, {"old": f"{tmp_path}/gone.pth"})
    reasons = tab_reasons(cfg, cfg.styles)
    # The only style is missing: photo and generate say which; SD-based tabs name the setting to fill in.
    assert "styles.old" in reasons["photo"] and "gone.pth does not exist" in reasons["photo"]
    assert reasons["style_image"] == reasons["train"] == "set models.prior (an SD 1.5-family diffusers folder) in " \
        "the app config"
    (tmp_path / "gone.pth").write_bytes(b"")
    assert tab_reasons(cfg, cfg.styles)["generate"] is None
    # A hub id never downloaded is not offered (the app works offline).
    cfg = load_app_config(None, [f"models.generator={parity_dir}", "models.prior=nobody/not-cached-model"])
    assert "nobody/not-cached-model is neither a local path nor in the Hugging Face cache" in \
        tab_reasons(cfg, {})["train"]  # fmt: skip
    assert "models.generator" in tab_reasons(AppConfig(), {})["photo"]
    with pytest.raises(ConfigError, match=r"render\.pich"):
        load_app_config(None, ["render.pich=3"])
    with pytest.raises(ConfigError, match="mesh_resolution"):
        load_app_config(None, ["render.mesh_resolution=4"])


# ---------------------------------------------------------------------------------------------- jobs


def test_jobs_run_one_at_a_time_in_order_and_report_failures():
    jobs = JobQueue()
    spans: list[tuple[str, float, float]] = []
    release = threading.Event()

    def work(name: str, error: Exception | None = None):
        def run(job):
            start = time.perf_counter()
            job.report(0.5, f"{name} half way")
            if name == "first":
                release.wait(10)
            spans.append((name, start, time.perf_counter()))
            if error is not None:
                raise error
            return name

        return run

    try:
        first = jobs.submit("first", work("first"))
        second = jobs.submit("second", work("second", AppError("seeds 'x': give integers")))
        third = jobs.submit("third", work("third", ValueError("boom")))
        skipped = jobs.submit("skipped", work("skipped"))
        skipped.request_stop()
        while first.state().status != "running":
            time.sleep(0.01)
        assert (second.state().queued_ahead, third.state().queued_ahead) == (1, 2)
        assert first.state().text == "first half way"
        release.set()
        for job in (first, second, third, skipped):
            assert job.wait(10)
    finally:
        jobs.close()
    assert [s[0] for s in spans] == ["first", "second", "third"]
    assert all(a[2] <= b[1] for a, b in itertools.pairwise(spans))  # never two at once
    assert (first.state().status, first.state().result, first.state().fraction) == ("done", "first", 1.0)
    assert (second.state().status, second.state().error) == ("failed", "seeds 'x': give integers")
    assert (third.state().status, third.state().error) == ("failed", "ValueError: boom")
    assert skipped.state().status == "stopped"


def test_a_failed_job_leaves_no_folder_and_a_finished_one_points_into_its_own(tmp_path):
    def half_then_fail(out):
        (out / "half.png").write_bytes(b"x")
        raise AppError("no face found")

    with pytest.raises(AppError):
        run_in_folder(tmp_path / "job1", half_then_fail)
    assert list(tmp_path.iterdir()) == []

    def write(out):
        (out / "sub").mkdir()
        (out / "sub" / "a.txt").write_text("a")
        return handlers.StyleResult([out / "sub" / "a.txt"], [], [out / "sub" / "a.txt", tmp_path / "elsewhere"])

    result = run_in_folder(tmp_path / "job2", write)
    assert result.sheets == [tmp_path / "job2" / "sub" / "a.txt"] and result.sheets[0].read_text() == "a"
    assert result.files[1] == tmp_path / "elsewhere"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job2"]


def test_seed_lists():
    assert handlers.parse_seed_list(" 0, 7 ,42") == [0, 7, 42]
    for bad in ("", "x", "-1", "1,2,3,4,5,6,7,8,9", str(2**32)):
        with pytest.raises(AppError, match="seeds"):
            handlers.parse_seed_list(bad)


# ---------------------------------------------------------------------------------------------- handlers


def test_generate_on_the_lab_puts_base_and_style_side_by_side(cfg, tmp_path):
    lab = Lab(cfg)
    base, statue = lab.base(), lab.stylised("statue (ground truth)")
    render = replace(lab.render, yaws=(-90.0, 0.0, 90.0))
    steps = []
    result = handlers.generate(base, statue, [0, 3], 0.7, render, tmp_path, lambda f, t, p=None: steps.append(f))
    assert steps == sorted(steps) and 0 < steps[-1] <= 1
    # The sheet: per seed a row of base views over a row of stylised views, exactly the generators' renders.
    sheet = np.asarray(Image.open(result.sheet))
    size, pad = base.img_resolution, 2
    assert sheet.shape == (4 * size + 5 * pad, 3 * size + 4 * pad, 3)
    latents = latents_from_seeds(base, [0, 3], 0.7)
    for row, (G, latent) in enumerate([(base, latents[0]), (statue, latents[0]), (base, latents[1])]):
        for col, yaw in enumerate(render.yaws):
            want = to_uint8(render_view(G, latent, cameras(math.radians(yaw), math.radians(render.pitch))).image[0])
            y, x = pad + row * (size + pad), pad + col * (size + pad)
            np.testing.assert_array_equal(sheet[y : y + size, x : x + size], want)
    assert np.abs(sheet[pad : pad + size].astype(int) - sheet[2 * pad + size : 2 * pad + 2 * size]).mean() > 5
    # The turntable: 4 frames, a row per seed, base | stylised in each.
    assert result.turntable[0].suffix == ".mp4"
    frames = iio.imread(result.turntable[-1], index=None)
    assert frames.shape[:3] == (render.turntable_frames, 2 * size, 2 * size)
    # The meshes: the first seed's pair first, the two heads one cube side apart, coloured per vertex.
    assert result.meshes[0].name == "seed0000_pair.glb"
    pair, alone = (trimesh.load(result.meshes[i], force="mesh") for i in (0, 1))
    assert alone.visual.kind == "vertex" and len(pair.vertices) > len(alone.vertices)
    assert pair.bounds[1, 0] - pair.bounds[0, 0] > base.box_warp


def test_the_app_downloads_take_the_mesh_face_budget_and_texture(cfg, tmp_path):
    """render.mesh_faces / mesh_texture reach the app's GLB downloads (decimated, UV-textured), and a budget
    the decimation cannot meet is refused when the config loads."""
    lab = Lab(cfg)
    base, statue = lab.base(), lab.stylised("statue (ground truth)")
    render = replace(lab.render, mesh_faces=400, mesh_texture=256)
    meshes, notes = handlers._meshes(base, statue, latents_from_seeds(base, [0], 0.7), render, tmp_path, pair=False)
    assert not notes
    head = trimesh.load(meshes[0], force="mesh")
    assert head.visual.kind == "texture" and head.visual.material.baseColorTexture.size == (256, 256)
    assert abs(len(head.faces) - 400) <= 20
    with pytest.raises(ConfigError, match="render: mesh_texture must be 0"):
        load_app_config(None, ["render.mesh_texture=300"])
    with pytest.raises(ConfigError, match="render: mesh_faces must be 0"):
        load_app_config(None, ["render.mesh_faces=10"])


@pytest.fixture(scope="module")
def fixture_models(parity_dir, tmp_path_factory):
    """The parity fixture as the base (fast render settings) and a perturbed copy as the 'stylised' one."""
    from headstyle.generator.checkpoint import save_generator

    folder = tmp_path_factory.mktemp("styles")
    save_generator(stylised_parity_generator(parity_dir), folder / "styled.safetensors")
    return parity_dir, folder / "styled.safetensors"


PHOTO = ["photo.steps=3", "photo.raw=true", "photo.w_avg_samples=200", "render.neural_rendering_resolution=16",
         "render.depth_samples=6", "render.raw=true", "render.turntable_frames=3", "render.mesh_resolution=24"]


def test_photo_to_head_on_the_parity_fixture(fixture_models, tmp_path):
    from headstyle.app.models import Models
    from headstyle.faces.perceptual import LaplacianL1

    base_path, styled_path = fixture_models
    cfg = load_app_config(None, [*PHOTO, f"models.generator={base_path}", f"styles.styled={styled_path}",
                                 f"server.workdir={tmp_path / 'work'}"])  # fmt: skip
    models = Models(cfg)
    assert models.reasons()["photo"] is None
    face = handlers.align(data.astronaut())
    assert face.crop.shape == (512, 512, 3)
    R = face.camera[:16].reshape(4, 4)[:3, :3]
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-5)
    assert abs(np.linalg.norm(face.camera[:16].reshape(4, 4)[:3, 3]) - 2.7) < 1e-3  # PanoHead's camera radius
    assert "yaw" in handlers.camera_summary(face)

    reports = []
    base, styled = models.base(projection=True), models.stylised("styled")
    assert base.rendering_kwargs["ray_start"] == 2.35 and styled.rendering_kwargs["ray_start"] == 2.25
    result = handlers.photo_to_head(face, base, styled, LaplacianL1(), cfg.photo, cfg.render, tmp_path,
                                    lambda f, t, p=None: reports.append((f, t, p)))  # fmt: skip
    fractions = [f for f, _, _ in reports]
    assert fractions == sorted(fractions) and "projecting: step 3 of 3" in [t for _, t, _ in reports]
    previews = [p for _, _, p in reports if p is not None]
    assert len(previews) == 3 and previews[0].shape == (16, 32, 3)  # photo | render, at the raw size
    # The W+ file is the code the views were rendered from.
    (latent,) = latents_from_npz(result.w_npz, styled.num_ws, styled.w_dim)
    assert latent.ws.shape == (1, 8, 512)
    front = render_view(styled, Latent("x", latent.ws, cfg.photo.seed), cameras(0.0, math.radians(10)), False)
    np.testing.assert_array_equal(np.asarray(Image.open(result.views[2])), to_uint8(front.image_raw[0]))
    assert result.views[0].name == "stylised_yaw-090_pitch+10.png" and len(result.views) == 5
    assert np.asarray(Image.open(result.sheet)).shape == (512, 3 * 512, 3)
    assert result.mesh is None or trimesh.load(result.mesh, force="mesh").visual.kind == "vertex"
    assert math.isfinite(result.psnr) and "fallback" in result.perceptual
    assert set(result.downloads) >= {result.w_npz, *result.views}


def test_a_photo_without_a_face_is_refused():
    with pytest.raises(AppError, match="no face found"):
        handlers.align(np.full((200, 200, 3), 90, np.uint8))


def test_mask_from_the_image_editor():
    head = np.full((8, 8, 3), 200, np.uint8)  # the head shown to paint on is not the mask
    painted = np.zeros((8, 8, 4), np.uint8)
    painted[:, 4:, 3] = 255  # the right half painted
    mask = handlers.mask_from_editor({"background": head, "layers": [painted]}, 8)
    np.testing.assert_array_equal(mask.numpy(), np.repeat([[0.0] * 4 + [1.0] * 4], 8, axis=0))
    # At the prior's size: resampled, still 0 on the left edge and 1 on the right.
    small = handlers.mask_from_editor({"background": head, "layers": [painted]}, 4).numpy()
    assert (small[:, 0] == 0).all() and (small[:, -1] == 1).all()
    for nothing in (None, {"background": head, "layers": []}, {"background": head, "layers": [painted * 0]}):
        assert handlers.mask_from_editor(nothing, 8) is None


def test_style_views_on_tiny_sd_are_seeded_and_read_the_style(cfg, tiny_sd, tmp_path):
    from headstyle.priors.diffusers_prior import DiffusersPrior

    lab = Lab(cfg)
    prior = DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets={"depth": tiny_sd.controlnets["depth"]},
                                           latent_sample="mean")  # fmt: skip
    render = replace(lab.render, yaws=(0.0, 90.0))
    style = np.asarray(Image.fromarray(data.astronaut()).resize((64, 64)))
    other = np.asarray(Image.fromarray(data.coffee()).resize((64, 64)))

    def run(picture, out):
        return handlers.style_views(lab.base(), prior, [0], 0.7, picture, None, None, 1.05, 0.5, 0.5, 4, render, out)

    first, again, coffee = run(style, tmp_path / "a"), run(style, tmp_path / "b"), run(other, tmp_path / "c")
    sheets = [np.asarray(Image.open(r.sheets[0])).astype(int) for r in (first, again, coffee)]
    assert sheets[0].shape == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2, 3)  # renders over stylised views
    np.testing.assert_array_equal(sheets[0], sheets[1])
    lower = slice(64 + 4, 2 * 64 + 4)
    # The tiny SD's weights are random, so a style moves pixels only a little; but another one moves them.
    assert (sheets[0][lower] != sheets[2][lower]).any()
    # The upper row is the lab's renders themselves (64 px, the prior's size): the content of the views.
    latent = latents_from_seeds(lab.base(), [0], 0.7)[0]
    for col, yaw in enumerate(render.yaws):
        c = cameras(math.radians(yaw), math.radians(render.pitch))
        want = to_uint8(render_view(lab.base(), latent, c).image[0])
        np.testing.assert_array_equal(sheets[2][2:66, 2 + col * 66 : 66 + col * 66], want)
    assert (tmp_path / "a" / "style.png").is_file() and first.turntable


# ---------------------------------------------------------------------------------------------- training


def test_run_names_and_a_torn_log_line(tmp_path):
    assert training.run_name("  my werewolf / v2 ") == "my-werewolf-v2"
    with pytest.raises(AppError):
        training.run_name("///")
    (tmp_path / "log.jsonl").write_text('{"iteration": 1, "loss": 2.0}\n{"iteration": 2, "loss": 1.5}\n{"iter')
    (tmp_path / "config.toml").write_text("[run]\niterations = 10\n")
    status = training.read_run(tmp_path)
    assert (status.iteration, status.total, status.loss, status.generator) == (2, 10, 1.5, None)


def test_a_run_of_the_configured_models_is_a_checked_stylize_config(cfg, tmp_path, parity_dir):
    cfg = load_app_config(None, [f"models.generator={parity_dir}", "models.prior=/models/sd",
                                 "models.depth_controlnet=/models/depth"])  # fmt: skip
    spec = training.models_spec(cfg, tmp_path / "wolf", 12, preset="werewolf")
    c = spec.config
    assert (c["model"]["generator"], c["model"]["prior"], c["model"]["canny_controlnet"]) == (
        str(parity_dir), "/models/sd", "")
    assert (c["prompt"]["prompt"], c["run"]["iterations"], c["run"]["out"]) == (
        "Portrait of a werewolf", 12, str(tmp_path / "wolf"))
    upload = tmp_path / "upload.PNG"
    Image.fromarray(data.coffee()).save(upload, format="PNG")
    picture = training.models_spec(cfg, tmp_path / "pic", 5, style_image=str(upload)).config
    # SDS with the picture (LD cancels a fused style), read from the run's own copy of it.
    assert (picture["objective"]["name"], picture["style"]["image"]) == ("sds", str(tmp_path / "pic" / "style.png"))
    assert (tmp_path / "pic" / "style.png").read_bytes() == upload.read_bytes()
    with pytest.raises(AppError, match="no target"):
        training.models_spec(cfg, tmp_path / "x", 5)


def test_a_lab_style_trains_in_a_child_stops_resumes_and_joins_the_style_list(cfg):
    lab = Lab(cfg)
    run_dir = lab.styles_dir / "statue-1"
    process = training.TrainProcess(training.lab_spec(cfg.lab, "statue", 50, run_dir))
    deadline = time.monotonic() + 120
    while training.read_run(run_dir).iteration < 1 and process.alive and time.monotonic() < deadline:
        time.sleep(0.2)
    process.stop()
    state, iteration, _ = process.outcome()
    assert state == "stopped" and 1 <= iteration < 50
    stopped = training.read_run(run_dir)
    assert stopped.checkpoints >= 1 and stopped.generator is None and "statue-1" not in lab.styles()
    with pytest.raises(AppError, match="exists"):
        training.lab_spec(cfg.lab, "statue", 5, run_dir)
    with pytest.raises(AppError, match=f"at iteration {iteration}"):
        training.resume_spec(run_dir, iteration, cfg.lab)
    # Resumed here (the trainer runs in this process's main thread) up to one more iteration.
    state, reached, generator = training.train(training.resume_spec(run_dir, iteration + 1, cfg.lab))
    assert (state, reached) == ("done", iteration + 1) and generator.endswith("generator.safetensors")
    assert next(iter(lab.styles())) == "statue-1"
    latent = latents_from_seeds(lab.base(), [5], 0.7)[0]
    c = cameras(0.3, 0.1)
    trained, untrained = (render_view(G, latent, c).image for G in (lab.stylised("statue-1"), lab.base()))
    assert (trained - untrained).abs().mean() > 1e-4


def test_stopped_is_reported_not_failed():
    jobs = JobQueue()
    try:
        job = jobs.submit("stops", lambda job: (_ for _ in ()).throw(Stopped("run-1 stopped at iteration 3")))
        job.wait(5)
    finally:
        jobs.close()
    assert (job.state().status, job.state().text, job.state().error) == ("stopped", "run-1 stopped at iteration 3", "")
