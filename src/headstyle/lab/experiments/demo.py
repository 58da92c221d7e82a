"""`headstyle demo`: the whole method on a CPU in minutes, against ground truth.

Stylises the lab generator to one style with the paper's recipe (LD + mirror + grid + rank
re-weighting) and, for the same budget and seed, with SDS, both through the unchanged trainer and
the lab's prior (the learned lab prior through DiffusersPrior by default; headstyle.lab.prior.learned);
then writes to ``out``:

- ``turntables/identity_K.gif``: for 4 held-out identities, a turn around the head with four
  panels: before | LD (paper recipe) | SDS | ground truth;
- ``views.png``: per identity, rows before / LD / SDS / ground truth at yaw -90, -30, 0, 30, 90, 180;
- ``metrics.json``: every figure of headstyle.lab.experiments.evaluate for untrained, LD and SDS, with definitions;
- ``summary.html`` and ``summary.png``: a one-page comparison (table + views).
"""

from __future__ import annotations

import html
import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from headstyle import export
from headstyle.cameras import cameras, turntable_cameras
from headstyle.io import atomic_write_text
from headstyle.lab.experiments import evaluate as lab_eval
from headstyle.lab.experiments.bench import (
    COLUMNS,
    RUN_FIGURES,
    SHORT_MARK,
    LabSettings,
    budget_note,
    new_generator,
    short_of_budget,
    train_variant,
)
from headstyle.lab.prior.learned import LabPriorSpec, resolve_prior
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import STYLES
from headstyle.training.lock import folder_lock

SHEET_YAWS_DEGREES = (-90, -30, 0, 30, 90, 180)
PANELS = ("before", "LD (paper recipe)", "SDS", "ground truth")
# The demo's files that compare its runs.
COMPARISONS = ("metrics.json", "summary.html", "summary.png")
DEFINITIONS = {
    "rgb_error": "mean |pred - truth| / 2 over the union of masks, vs the ground-truth stylised head of the SAME "
    "identity (colour in [0, 1]; 0 is perfect)",
    "depth_error": "mean |depth_pred - depth_truth| where both masks >= 0.5 (world units; 0 is perfect)",
    "silhouette_iou": "IoU of the masks thresholded at 0.5 (1 is perfect)",
    "id_accuracy_geometry": "fraction of identities whose nearest ground truth by depth is their own (1 is perfect)",
    "id_accuracy_appearance": "fraction of identities whose nearest ground truth by colour is their own",
    "style_fd": "Frechet distance of pooled per-pixel colour+texture features to the style's ground truth on "
    "other identities (identity-free; 0 is perfect)",
    "stylisation": "1 - style_fd / style_fd_before (1 = the style's statistics, 0 = unchanged)",
    "diversity_rgb": "mean pairwise colour distance between identities after / before (1.0 = no collapse)",
    "diversity_depth": "the same with depth maps",
    "truth_diversity_rgb": "diversity_rgb of the ground truth itself (what a perfect stylisation scores)",
    "mv_warp_error": "photometric error of consecutive views warped with rendered depth, co-visible pixels only",
    "mv_covisible": "fraction of the target view's foreground that is co-visible",
    "zero_grad_share": "share of training iterations whose objective gradient at the rendered images was exactly zero "
    "(or non-finite): iterations in which the prior gave the renders no direction",
    "nonfinite_grad_share": "share of training iterations whose objective gradient had non-finite entries",
    "iterations_run": "training iterations run (a stopping rule may end a run early)",
}


@torch.no_grad()
def _frames(G: LabGenerator, z: Tensor, cams: Tensor) -> Tensor:
    return lab_eval.render_views(G, z[None], cams).image[0]


def _summary_png(
    rows: list[tuple[str, dict[str, float]]], sheet: np.ndarray, row_labels: list[str], title: str, path: Path
) -> None:
    """A one-page PNG: title, the metrics table (one fixed-width cell per column) and the view sheet,
    each of its rows labelled."""
    table = [["", *(h for _, h, _ in COLUMNS[:-1])]]
    table += [[name, *(format(m[k], f) for k, _, f in COLUMNS[:-1])] for name, m in rows]
    line_h, first_w, cell_w = 14, 130, 80
    text_h = line_h * (len(table) + 3)
    width = max(first_w + sheet.shape[1], first_w + cell_w * (len(table[0]) - 1) + 20)
    page = Image.new("RGB", (width, text_h + sheet.shape[0]), "white")
    draw = ImageDraw.Draw(page)
    draw.text((10, 6), title, fill="black")
    for i, row in enumerate(table):
        y = 6 + (i + 2) * line_h
        draw.text((10, y), row[0], fill="black")
        for j, cell in enumerate(row[1:]):
            draw.text((10 + first_w + j * cell_w, y), cell, fill="black")
    row_h = sheet.shape[0] / len(row_labels)
    for r, label in enumerate(row_labels):
        draw.text((10, text_h + int((r + 0.5) * row_h) - line_h // 2), label, fill="black")
    page.paste(Image.fromarray(sheet), (first_w, text_h))
    export.save_image(np.asarray(page), path)


def _summary_html(rows: list[tuple[str, dict[str, float]]], title: str, meta: dict, path: Path) -> None:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{format(m[k], f) if k in m else ''}</td>" for k, _, f in COLUMNS)
        + "</tr>"
        for name, m in rows
    )
    defs = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in DEFINITIONS.items())
    gifs = "".join(f'<img src="turntables/identity_{i}.gif" alt="identity {i}">' for i in range(meta["identities"]))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}} td,th{{padding:2px 8px;text-align:right}}
img{{image-rendering:pixelated;margin:2px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(meta["note"])}</p>
<table><tr><th></th>{head}</tr>{body}</table>
<h2>Turntables ({" | ".join(PANELS)})</h2>{gifs}
<h2>Views (rows per identity: {" / ".join(PANELS)})</h2><img src="views.png" alt="views" style="width:100%">
<h2>Definitions</h2><ul>{defs}</ul>
</body></html>
"""
    atomic_write_text(path, page)


def run_demo(
    out: Path,
    style: str = "statue",
    settings: LabSettings | None = None,
    turntable_frames: int = 16,
    progress: bool = True,
    prior_spec: LabPriorSpec | None = None,
    resume: bool = False,
) -> dict:
    """Run the demo (module docstring) on ``prior_spec`` (settings.prior resolved when None) and return the
    metrics dict also written to metrics.json. With ``resume`` each run continues from its checkpoint in ``out``
    (a finished one only reloads). A SIGINT/SIGTERM checkpoints the run in progress and raises Interrupted
    before anything that compares the runs is written."""
    if style not in STYLES:
        raise ValueError(f"unknown lab style {style!r}; choose from {', '.join(STYLES)}")
    settings = settings or LabSettings()
    with folder_lock(out):  # one demo per folder: a second is refused before it writes anything
        return _run_demo(out, style, settings, turntable_frames, progress, prior_spec, resume)


def _run_demo(
    out: Path, style: str, settings: LabSettings, turntable_frames: int, progress: bool,
    prior_spec: LabPriorSpec | None, resume: bool,
) -> dict:  # fmt: skip
    start = time.perf_counter()
    for name in COMPARISONS:  # written again at the end; until then no page compares runs the folder may not hold
        (out / name).unlink(missing_ok=True)
    spec = prior_spec or resolve_prior(settings.prior)
    prior, profile = spec.load(settings.resolution, settings.sr_factor, settings.prior_identities,
                               settings.prior_views, progress=progress)  # fmt: skip
    before = new_generator(settings).eval()
    ev = lab_eval.make_eval_set(style, before, settings.eval_identities, settings.eval_views)
    truth = lab_eval.oracle(style, before)
    trained: dict[str, LabGenerator] = {}
    results = {"untrained": {**lab_eval.evaluate(before, ev), **dict.fromkeys(RUN_FIGURES, 0.0)}}
    for variant in ("ld", "sds"):
        run = train_variant(style, variant, prior, settings, out / "runs" / f"{style}-{variant}", progress, profile,
                            resume)
        trained[variant] = run.G
        results[variant] = {**lab_eval.evaluate(run.G, ev), **run.figures}

    generators = (before, trained["ld"], trained["sds"], truth)
    tt_cams = turntable_cameras(turntable_frames, pitch=lab_eval.EVAL_PITCH)
    for i, z in enumerate(ev.z):
        panels = [_frames(G, z, tt_cams) for G in generators]
        export.save_video(torch.cat(panels, dim=-1), out / "turntables" / f"identity_{i}.gif", fps=8)
    yaws = torch.tensor([math.radians(y) for y in SHEET_YAWS_DEGREES])
    sheet_cams = cameras(yaws, torch.full_like(yaws, lab_eval.EVAL_PITCH))
    tiles = [_frames(G, z, sheet_cams) for z in ev.z for G in generators]
    sheet = export.image_grid(torch.cat(tiles), cols=len(SHEET_YAWS_DEGREES))
    export.save_image(sheet, out / "views.png")

    wall = time.perf_counter() - start
    title = f"headstyle lab demo: '{style}' ({settings.iterations} iterations each, seed {settings.seed})"
    best = {
        key: min(("LD", "SDS"), key=lambda v: sign * results[v.lower()][key])
        for key, sign in (("rgb_error", 1), ("stylisation", -1), ("diversity_rgb", -1))
    }
    note = (
        f"LD = the paper's recipe (LD + mirror + grid + rank re-weighting); SDS = the same trainer with "
        f"objective.name=sds (DreamFusion weighting 1 - abar_t), same budget and seed, prior {profile.name} "
        f"({spec.name}). "
        f"{settings.eval_identities} held-out identities x {settings.eval_views} cameras over 360 degrees. "
        f"Closer to the ground truth: {best['rgb_error']}; more stylised: {best['stylisation']}; "
        f"less collapse: {best['diversity_rgb']}. Wall time {wall:.0f} s."
    )
    short = [v for v in ("ld", "sds") if short_of_budget({"variant": v, **results[v]}, settings.iterations)]
    if short:
        note += " " + budget_note(settings.iterations)
    metrics = {
        "style": style,
        "prompt": STYLES[style].prompt,
        "settings": settings.__dict__,
        "prior": spec.name,
        "wall_seconds": wall,
        "cpu_seconds": time.process_time(),
        # ru_maxrss is in KiB on Linux.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": results,
        "definitions": DEFINITIONS,
        "note": note,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    rows = [("untrained", results["untrained"])]
    rows += [(name + (f" {SHORT_MARK}" if v in short else ""), results[v])
             for v, name in (("ld", "LD (paper recipe)"), ("sds", "SDS"))]  # fmt: skip
    _summary_html(rows, title, {"note": note, "identities": len(ev.z)}, out / "summary.html")
    row_labels = [f"{i}: {panel}" for i in range(len(ev.z)) for panel in PANELS]
    _summary_png(rows, sheet, row_labels, title, out / "summary.png")
    return metrics
