"""The papers' metrics of a stylised generator in one pass (the `headstyle eval` command's library side).

Inputs: renders of I identities x V cameras by the unedited (base) and the stylised generator, the
cameras, optionally the style prompt and DiffStyle360's reference set (headstyle.metrics.reference).
Each group below names the weights it used, or is skipped with a note saying what to provide:

- multiview (no weights): warp error between consecutive views from the generator's own depth and
  cameras (headstyle.metrics.consistency), for the stylised and the base generator;
- id_dlib (dlib's descriptor, shipped by face-recognition-models): mean descriptor distance of paired
  base/stylised views and the fraction under 0.6 (the same person);
- id_arcface (an IR-SE50 or iresnet file): mean cosine of paired ArcFace embeddings (LD, DiffStyle360);
- clip (a local CLIP folder): CLIP-I of stylised vs base views and vs their reference edits
  (DiffStyle360's "CLIP"), CLIP-T of stylised and base views with the prompt;
- fid (the FID Inception file): FID/KID of the stylised views against the reference set
  (DiffStyle360) and against the base views;
- depth_anything (a local Depth Anything folder): Delta D between stylised and base views;
- met3r: not available here (needs MASt3R/DUSt3R and FeatUp backbones); always reported as skipped.

Identity groups score only pairs where dlib finds a face in both views (the largest face); the counts
of views, faces found and pairs scored are reported, so back views are counted, not silently scored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from headstyle.distill.shaping import resize_to
from headstyle.export import image_grid, save_image, to_uint8
from headstyle.faces.perceptual import WeightsError
from headstyle.io import atomic_write_text, content_digest
from headstyle.metrics.arcface import ArcFace
from headstyle.metrics.clip_score import CLIPScorer, paired_cosine
from headstyle.metrics.consistency import multiview_consistency
from headstyle.metrics.depth_error import DepthAnything, delta_d
from headstyle.metrics.dlib_identity import SAME_PERSON_DISTANCE, DlibIdentity, descriptor_distance, largest_faces
from headstyle.metrics.fid import FIDInception, fid, inception_features, kid

# metric -> (better, meaning) for the Markdown table.
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "mv_warp_error": ("lower", "stylised: colour error of consecutive views warped by the generator's depth"),
    "mv_covisible": ("", "fraction of foreground co-visible between consecutive views"),
    "mv_warp_error_base": ("lower", "the same warp error of the base generator"),
    "id_dlib_distance": ("lower", "dlib descriptor distance, base vs stylised view (< 0.6 = same person)"),
    "id_dlib_match": ("higher", "fraction of face pairs under dlib's 0.6"),
    "id_arcface": ("higher", "ArcFace cosine, base vs stylised view"),
    "clip_i_base": ("", "CLIP image cosine, stylised vs base view"),
    "clip_i_ref": ("higher", "CLIP image cosine, stylised view vs its SD img2img reference (DiffStyle360)"),
    "clip_t": ("higher", "CLIP image-text cosine of stylised views with the prompt"),
    "clip_t_base": ("", "CLIP image-text cosine of base views with the prompt"),
    "fid_ref": ("lower", "FID, stylised views vs the SD img2img reference set (DiffStyle360)"),
    "kid_ref": ("lower", "KID (the MMD^2 itself; papers often print it x1000), stylised vs reference set"),
    "fid_base": ("", "FID, stylised vs base views"),
    "kid_base": ("", "KID, stylised vs base views"),
    "delta_d": ("lower", "Delta D: mean squared difference of normalised Depth Anything depths"),
}
MET3R_NOTE = ("MEt3R needs MASt3R/DUSt3R and FeatUp backbones, which headstyle does not load; "
              "the multiview group is the generator-depth consistency instead")  # fmt: skip


@dataclass
class Renders:
    """I identities x V cameras: image (I, V, 3, H, W) in [-1, 1], depth and mask (I, V, 1, h, w)."""

    image: Tensor
    depth: Tensor
    mask: Tensor

    def flat(self) -> Tensor:
        """The images as one (I * V, 3, H, W) batch, identity-major."""
        return self.image.flatten(0, 1)


@dataclass(frozen=True)
class WeightPaths:
    """The weights a user gives; None = absent (that group is skipped with a note)."""

    dlib: bool = True
    arcface: str | None = None
    clip: str | None = None
    inception: str | None = None
    depth_anything: str | None = None


def check_paths(paths: WeightPaths) -> None:
    """Given paths must exist (files for ArcFace/Inception, folders for CLIP/Depth Anything): a quick check
    before anything slow runs. Raises WeightsError naming the option."""
    for option, path, folder in (
        ("--arcface", paths.arcface, False), ("--inception", paths.inception, False),
        ("--clip", paths.clip, True), ("--depth-anything", paths.depth_anything, True),
    ):  # fmt: skip
        if path is None:
            continue
        ok = Path(path).is_dir() if folder else Path(path).is_file()
        if not ok:
            kind = "folder" if folder else "file"
            raise WeightsError(f"{option} {path}: no such {kind}; weights are read from local paths, nothing is "
                               "downloaded")  # fmt: skip


@dataclass
class Scorers:
    """The models an evaluation uses, what each read, and why absent ones are skipped."""

    dlib: DlibIdentity | None = None
    arcface: ArcFace | None = None
    clip: CLIPScorer | None = None
    inception: FIDInception | None = None
    depth: DepthAnything | None = None
    weights: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=lambda: {"met3r": MET3R_NOTE})


def _named(name: str, path: str | os.PathLike) -> dict[str, str]:
    return {"model": name, "path": str(Path(path).resolve()), "sha256": content_digest(path)}


def load_scorers(paths: WeightPaths, device: torch.device | str = "cpu") -> Scorers:
    """Load every scorer whose weights are given (WeightsError for a given file that is wrong); note the rest."""
    s = Scorers()
    s.weights["multiview"] = {"model": "none: the generator's own depth and cameras"}
    if paths.dlib:
        try:
            s.dlib = DlibIdentity()
            s.weights["id_dlib"] = _named(s.dlib.name, s.dlib.path)
        except FileNotFoundError as exc:
            s.skipped["id_dlib"] = str(exc)
    else:
        s.skipped["id_dlib"] = "switched off (--no-dlib)"
    if paths.arcface:
        s.arcface = ArcFace(paths.arcface, device)
        s.weights["id_arcface"] = _named(s.arcface.name, paths.arcface)
    else:
        s.skipped["id_arcface"] = ("no --arcface file: give model_ir_se50.pth (IR-SE50, pSp/TreB1eN) or an insightface "
                                   "arcface_torch backbone.pth (iresnet)")  # fmt: skip
    if paths.clip:
        s.clip = CLIPScorer(paths.clip, device)
        s.weights["clip"] = _named(s.clip.name, paths.clip)
    else:
        s.skipped["clip"] = ("no --clip folder: give a local transformers CLIP folder "
                             "(e.g. openai/clip-vit-large-patch14)")  # fmt: skip
    if paths.inception:
        s.inception = FIDInception.from_file(paths.inception).to(device)
        s.weights["fid"] = _named(s.inception.name, paths.inception) | {
            "resize": "uint8, TensorFlow-1 bilinear to 299 px (torch-fidelity's convention)"
        }
    else:
        s.skipped["fid"] = ("no --inception file: give pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                            "(= torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")  # fmt: skip
    if paths.depth_anything:
        s.depth = DepthAnything(paths.depth_anything, device)
        s.weights["depth_anything"] = _named(s.depth.name, paths.depth_anything)
    else:
        s.skipped["depth_anything"] = ("no --depth-anything folder: give a local transformers Depth Anything folder "
                                       "(e.g. depth-anything/Depth-Anything-V2-Small-hf)")  # fmt: skip
    return s


@dataclass
class EvalReport:
    """Metrics by group, the weights each group read, skipped groups with notes, counts and settings."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    weights: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"metrics": self.metrics, "weights": self.weights, "skipped": self.skipped, "counts": self.counts,
                "settings": self.settings}  # fmt: skip

    def markdown(self) -> str:
        lines = ["# headstyle eval", "", "| group | metric | value | better | meaning | weights |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        for group, values in self.metrics.items():
            w = self.weights.get(group, {})
            source = f"{w['model']} ({w['path']})" if "path" in w else w.get("model", "")
            for key, value in values.items():
                better, meaning = DESCRIPTIONS.get(key, ("", ""))
                lines.append(f"| {group} | {key} | {value:.4f} | {better} | {meaning} | {source} |")
        lines += ["", "Counts: " + ", ".join(f"{k} {v}" for k, v in self.counts.items())]
        if self.skipped:
            lines += ["", "Skipped:"] + [f"- {group}: {note}" for group, note in self.skipped.items()]
        return "\n".join(lines) + "\n"


def dlib_figures(base: Tensor, stylized: Tensor) -> dict[str, float]:
    """Mean descriptor distance of paired faces and the fraction under dlib's same-person threshold."""
    dist = descriptor_distance(base, stylized)
    match = (dist < SAME_PERSON_DISTANCE).double().mean()
    return {"id_dlib_distance": float(dist.mean()), "id_dlib_match": float(match)}


def arcface_figures(base: Tensor, stylized: Tensor) -> dict[str, float]:
    """Mean cosine of paired ArcFace embeddings."""
    return {"id_arcface": float(paired_cosine(base, stylized).mean())}


def score(
    base: Renders,
    stylized: Renders,
    cams: Tensor,
    scorers: Scorers,
    prompt: str | None = None,
    reference: Tensor | None = None,
    advance: Callable[[], None] = lambda: None,
) -> EvalReport:
    """Every metric the scorers allow (see the module docstring); ``reference`` (I * V, 3, S, S) pairs with
    the views identity-major. ``advance`` is called once per group scored (a progress bar)."""
    report = EvalReport(weights=dict(scorers.weights), skipped=dict(scorers.skipped))
    n = base.image.shape[0] * base.image.shape[1]
    report.counts["views"] = n
    if base.image.shape[1] >= 2:
        mv = multiview_consistency(stylized.image, stylized.depth, stylized.mask, cams)
        mv["mv_warp_error_base"] = multiview_consistency(base.image, base.depth, base.mask, cams)["mv_warp_error"]
        report.metrics["multiview"] = mv
    else:
        report.skipped["multiview"] = "needs at least 2 views per identity"
    advance()

    base_flat, styl_flat = base.flat(), stylized.flat()
    if scorers.dlib is not None or scorers.arcface is not None:
        base_u8, styl_u8 = to_uint8(base_flat), to_uint8(styl_flat)
        base_faces, styl_faces = largest_faces(base_u8), largest_faces(styl_u8)
        report.counts["faces_base"] = sum(f is not None for f in base_faces)
        report.counts["faces_stylized"] = sum(f is not None for f in styl_faces)
        both = [a is not None and b is not None for a, b in zip(base_faces, styl_faces, strict=True)]
        report.counts["face_pairs"] = sum(both)
        identity = {"id_dlib": (scorers.dlib, dlib_figures), "id_arcface": (scorers.arcface, arcface_figures)}
        for group, (scorer, figures) in identity.items():
            if scorer is None:
                continue
            if not any(both):
                report.skipped[group] = "no view has a detectable face in both the base and the stylised render"
                continue
            eb, found_b = scorer.embed(base_u8, base_faces)
            es, found_s = scorer.embed(styl_u8, styl_faces)
            ok = found_b & found_s
            report.metrics[group] = figures(eb[ok], es[ok])
    advance()

    if scorers.clip is not None:
        es, eb = scorers.clip.image_embeds(styl_flat), scorers.clip.image_embeds(base_flat)
        clip = {"clip_i_base": float(paired_cosine(es, eb).mean())}
        if reference is not None:
            clip["clip_i_ref"] = float(paired_cosine(es, scorers.clip.image_embeds(reference)).mean())
        if prompt:
            et = scorers.clip.text_embeds([prompt])
            clip["clip_t"] = float(paired_cosine(es, et).mean())
            clip["clip_t_base"] = float(paired_cosine(eb, et).mean())
        report.metrics["clip"] = clip
    advance()

    if scorers.inception is not None and n < 2:
        report.skipped["fid"] = "FID and KID need at least 2 views in each set"
    elif scorers.inception is not None:
        fs, fb = inception_features(scorers.inception, styl_flat), inception_features(scorers.inception, base_flat)
        values = {"fid_base": fid(fs, fb), "kid_base": kid(fs, fb)[0]}
        if reference is not None:
            fr = inception_features(scorers.inception, reference)
            values = {"fid_ref": fid(fs, fr), "kid_ref": kid(fs, fr)[0], **values}
        report.metrics["fid"] = values
    advance()

    if scorers.depth is not None:
        d = delta_d(scorers.depth.predict(styl_flat), scorers.depth.predict(base_flat))
        report.metrics["depth_anything"] = {"delta_d": float(d.mean())}
    advance()
    return report


SCORE_STEPS = 5  # the number of advance() calls of ``score``


def views_sheet(base: Renders, stylized: Renders, reference: Tensor | None = None) -> np.ndarray:
    """uint8 sheet: per identity a row of base views, a row of stylised views, and the reference edits."""
    i, v = stylized.image.shape[:2]
    size = stylized.image.shape[-1]
    rows = []
    for k in range(i):
        rows += [resize_to(base.image[k].float(), size), stylized.image[k].float()]
        if reference is not None:
            rows.append(resize_to(reference[k * v : (k + 1) * v].float(), size))
    return image_grid(torch.cat(rows), cols=v)


def write_report(report: EvalReport, sheet: np.ndarray, out: str | os.PathLike) -> list[Path]:
    """metrics.json, metrics.md and views.png in ``out``, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(report.to_json(), indent=1) + "\n")
    atomic_write_text(out / "metrics.md", report.markdown())
    return [out / "metrics.json", out / "metrics.md", save_image(sheet, out / "views.png")]

