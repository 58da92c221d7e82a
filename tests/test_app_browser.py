"""`headstyle app` in a real browser: the page served on a free loopback port, driven by Playwright in Debian's
Chromium (`make test` installs it). The lab flow end to end (train a style, generate with it, the turntable
plays, the mesh downloads), a refused input shown in the page, and skimage's astronaut through the photo tab
on the parity-fixture PanoHead. Screenshots are kept as artefacts."""

from __future__ import annotations

import io
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from conftest import stylised_parity_generator

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu"]
# Where the screenshots are copied for a person to look at (skipped when that folder is not writable).
ARTEFACT = Path(os.environ.get("HEADSTYLE_APP_SCREENSHOT", "/work/app-screenshot.png"))
TIMEOUT_MS = 120_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(parity_dir, tmp_path):
    """The app on 127.0.0.1 with the parity fixture as base, a perturbed copy as its one style, a small lab."""

    from headstyle.app.config import load_app_config
    from headstyle.app.page import launch
    from headstyle.generator.checkpoint import save_generator

    save_generator(stylised_parity_generator(parity_dir), tmp_path / "astro.safetensors")
    cfg = load_app_config(None, [
        f"models.generator={parity_dir}", f"styles.astro={tmp_path / 'astro.safetensors'}",
        "photo.steps=4", "photo.raw=true", "photo.w_avg_samples=200",
        "render.neural_rendering_resolution=16", "render.depth_samples=6", "render.raw=true",
        "render.turntable_frames=6", "render.mesh_resolution=24",
        "lab.prior=exemplar", "lab.prior_identities=2", "lab.prior_views=4", "lab.turntable_frames=8",
        "lab.mesh_resolution=48",
        f"server.workdir={tmp_path / 'work'}",
    ])  # fmt: skip
    port = free_port()
    page, jobs = launch(cfg, "127.0.0.1", port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", tmp_path
    finally:
        jobs.close()
        page.close()


def _download(pg, files_id: str, name: str) -> bytes:
    """The bytes behind the download link named ``name`` in a file list, fetched as the browser would."""
    link = pg.locator(f"#{files_id} a[download='{name}']")
    response = pg.request.get(link.get_attribute("href"))
    assert response.ok, response.status
    return response.body()


def _video_plays(pg, selector: str) -> None:
    pg.wait_for_function(f"() => {{ const v = document.querySelector('{selector} video'); "
                         "return v && v.readyState >= 2 && v.videoWidth > 0; }", timeout=TIMEOUT_MS)  # fmt: skip


def _mesh_shown(pg, selector: str, name: str, fetched: list[str]) -> None:
    """The GLB viewer has its canvas and has fetched the mesh; in view (it draws only when visible), a moment for
    it to draw before a screenshot."""
    pg.wait_for_selector(f"{selector} canvas")
    pg.locator(selector).scroll_into_view_if_needed()
    for _ in range(60):
        if any(url.endswith(name) for url in fetched):
            break
        pg.wait_for_timeout(500)
    pg.wait_for_timeout(2000)


def _keep(path: Path, name: str) -> None:
    target = ARTEFACT.with_name(name)
    if target.parent.is_dir() and os.access(target.parent, os.W_OK):
        shutil.copyfile(path, target)


def test_the_page_in_chromium(served):
    from playwright.sync_api import sync_playwright

    url, tmp_path = served
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(TIMEOUT_MS)
            fetched: list[str] = []
            pg.on("response", lambda response: fetched.append(response.url))
            pg.goto(url)
            availability = pg.inner_text("#availability")
            assert "Photo: ready" in availability
            assert "Style image: unavailable: set models.prior" in availability
            assert pg.get_by_role("tab", name="Style image").first.is_disabled()

            # The lab: train a style for two iterations, then generate with it.
            pg.get_by_role("tab", name="The lab").click()
            pg.get_by_role("tab", name="Train a style").nth(1).click()
            pg.fill("#lab-train-iterations input", "2")
            pg.fill("#lab-train-name textarea", "statue-browser")
            pg.click("#lab-train-start")
            pg.wait_for_function("() => document.querySelector('#lab-train-status').innerText.includes('finished')")
            assert "2 / 2 iterations" in pg.inner_text("#lab-train-status")
            pg.wait_for_selector("#lab-train-preview img")

            pg.get_by_role("tab", name="Generate").nth(1).click()
            pg.fill("#lab-gen-seeds textarea", "x")
            pg.click("#lab-gen-run")
            pg.wait_for_selector("#lab-gen-status .hs-error")
            assert "seeds 'x'" in pg.inner_text("#lab-gen-status")
            pg.fill("#lab-gen-seeds textarea", "0, 5")
            pg.click("#lab-gen-style input")
            pg.click("ul[role=listbox] li:has-text('statue-browser')")  # the trained style joined the list
            pg.click("#lab-gen-run")
            pg.wait_for_selector("#lab-gen-sheet img")
            _video_plays(pg, "#lab-gen-video")
            assert _download(pg, "lab-gen-files", "seed0000_pair.glb")[:4] == b"glTF"
            _mesh_shown(pg, "#lab-gen-mesh", "seed0000_pair.glb", fetched)
            pg.screenshot(path=tmp_path / "app-lab.png", full_page=True)
            _keep(tmp_path / "app-lab.png", "app-screenshot-lab.png")

            # A real photo through the photo tab.
            pg.get_by_role("tab", name="Photo → stylised head").click()
            pg.set_input_files("#photo-input input[type=file]", str(photo))
            pg.wait_for_selector("#photo-crop img")
            assert "yaw" in pg.inner_text("#photo-camera")
            pg.click("#photo-run")
            _video_plays(pg, "#photo-video")
            pg.wait_for_selector("#photo-views img")
            w = np.load(io.BytesIO(_download(pg, "photo-files", "projected_w.npz")))["w"]
            assert w.shape == (1, 8, 512) and np.isfinite(w).all()
            assert _download(pg, "photo-files", "stylised.glb")[:4] == b"glTF"
            _mesh_shown(pg, "#photo-mesh", "stylised.glb", fetched)
            pg.screenshot(path=tmp_path / "app-photo.png", full_page=True)
            _keep(tmp_path / "app-photo.png", ARTEFACT.name)
        finally:
            browser.close()
