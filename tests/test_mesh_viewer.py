"""The textured GLB opened as a person would: in the viewer the app uses (Gradio's Model3D, the Babylon.js viewer),
in Debian's Chromium driven by Playwright, compared with the generator's own raw render at the viewer's camera.

The viewer looks at the centre of the model's bounding box from (alpha, beta, radius) = camera_position, with
Babylon's vertical field of view of 0.8 rad; that camera, as a PanoHead label, renders the generator. The viewer
lights the model (its default environment, PBR neutral tone mapping), so the comparison measures what a person
sees, shading included."""

from __future__ import annotations

import io
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from headstyle.cameras import cam2world_from_forward, camera_label
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import sample_z
from headstyle.mesh import MeshSettings, head_mesh, write_mesh
from mesh_views import render_mesh

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu"]
ARTEFACT = Path(os.environ.get("HEADSTYLE_MESH_SCREENSHOT", "/work/mesh-viewer-screenshot.png"))
FOV = 0.8  # Babylon's ArcRotateCamera default (vertical), which the viewer keeps
RADIUS = 2.7  # PanoHead's camera distance: the generator's ray interval covers the head from there
CROP, SIZE = 256, 128  # the canvas's central CROP x CROP pixels, averaged down to SIZE x SIZE
WHITE = 250  # a screenshot pixel brighter than this in every channel is the viewer's (white) background


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def viewer_camera(mesh: trimesh.Trimesh, canvas_height: int) -> torch.Tensor:
    """The PanoHead label (1, 25) of the viewer's camera at camera_position (90, 90, RADIUS) (in front, +z) as seen
    through the canvas's central CROP pixels."""
    target = torch.tensor(mesh.bounds.mean(axis=0), dtype=torch.float32)
    origin = target + torch.tensor([0.0, 0.0, RADIUS])
    focal = canvas_height / 2 / math.tan(FOV / 2) / CROP
    intrinsics = torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1.0]])
    return camera_label(cam2world_from_forward((target - origin)[None], origin[None]), intrinsics)


def shoot(paths: dict[str, Path], folder: Path) -> dict[str, np.ndarray]:
    """Screenshots (H, W, 3) of each GLB in a Model3D viewer of a small Gradio page, once the picture is still."""
    import gradio as gr
    from playwright.sync_api import sync_playwright

    with gr.Blocks() as page:
        for name, path in paths.items():
            gr.Model3D(value=str(path), camera_position=(90, 90, RADIUS), clear_color=(1, 1, 1, 1), height=480,
                       elem_id=name)  # fmt: skip
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(folder)])  # fmt: skip
    shots = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                pg = browser.new_page(viewport={"width": 800, "height": 1200})
                pg.goto(f"http://127.0.0.1:{port}/")
                for name in paths:
                    canvas = pg.locator(f"#{name} canvas")
                    canvas.wait_for(timeout=60_000)
                    canvas.scroll_into_view_if_needed()
                    shots[name] = still_picture(pg, canvas)
            finally:
                browser.close()
    finally:
        page.close()
    return shots


def still_picture(pg, canvas) -> np.ndarray:
    """The canvas once it shows a model and two screenshots half a second apart agree (the camera has settled)."""
    previous = None
    for _ in range(60):
        shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB"))
        h, w = shot.shape[:2]
        centre = shot[h // 2 - 40 : h // 2 + 40, w // 2 - 40 : w // 2 + 40]
        if previous is not None and (centre < WHITE).any() and np.array_equal(shot, previous):
            return shot
        previous = shot
        pg.wait_for_timeout(500)
    raise AssertionError("the viewer never showed a still picture of the model")


def central(shot: np.ndarray, k: int = CROP // SIZE) -> np.ndarray:
    """The canvas's central CROP x CROP pixels averaged over k x k blocks (float)."""
    h, w = shot.shape[:2]
    crop = shot[h // 2 - CROP // 2 : h // 2 + CROP // 2, w // 2 - CROP // 2 : w // 2 + CROP // 2].astype(np.float64)
    return crop.reshape(CROP // k, k, CROP // k, k, 3).mean(axis=(1, 3))


def test_textured_glb_in_the_app_viewer_matches_the_generator(tmp_path):
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    G = LabGenerator(resolution=64)
    ws = G.mapping(sample_z(1, 0), torch.zeros(1, 25))
    head = head_mesh(G.field_sampler(ws), G.box_warp,
                     MeshSettings(resolution=96, trim=0.0, faces=2000, texture=512))  # fmt: skip
    paths = {"textured": write_mesh(head.textured, tmp_path / "textured.glb"),
             "vertex": write_mesh(head.mesh, tmp_path / "vertex.glb")}  # fmt: skip
    shots = shoot(paths, tmp_path)

    c = viewer_camera(head.textured, shots["textured"].shape[0])
    with torch.no_grad():
        out = G.synthesis(ws, c, render_sr=False, neural_rendering_resolution=SIZE)
    raw = (out.image_raw[0] * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().astype(np.float64)
    _, covered = render_mesh(head.textured, c, SIZE)
    views = {name: central(shot) for name, shot in shots.items()}
    # The viewer's camera is the one computed: its silhouette is the mesh's projection, pixel for pixel of the
    # canvas (measured IoU 0.99).
    seen = (central(shots["textured"], 1) < WHITE).any(axis=-1)
    projected = render_mesh(head.textured, c, CROP, 1)[1] > 0.5
    assert (seen & projected).sum() / (seen | projected).sum() >= 0.97
    region = (covered > 0.999) & (out.mask[0, 0].numpy() > 0.99)
    errors = {name: np.abs(view - raw)[region].mean() for name, view in views.items()}
    picture = np.concatenate([raw, views["textured"], views["vertex"]], axis=1).clip(0, 255).astype(np.uint8)
    Image.fromarray(picture).resize((6 * SIZE, 2 * SIZE)).save(tmp_path / "generator_textured_vertex.png")
    if ARTEFACT.parent.is_dir() and os.access(ARTEFACT.parent, os.W_OK):
        shutil.copyfile(tmp_path / "generator_textured_vertex.png", ARTEFACT)
    # Mean error of 255 against the raw render: the textured GLB 9.5 (the same texture drawn unlit by
    # tests/mesh_views.py: 4.1, so about 5 is the viewer's lighting); the vertex-coloured GLB 24.3 (unlit: 3.7; trimesh
    # stores the sRGB bytes as glTF's linear COLOR_0, which a viewer shows brighter).
    assert errors["textured"] <= 13
    assert errors["textured"] < errors["vertex"] - 5
