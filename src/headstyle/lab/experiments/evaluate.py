"""Scoring a stylised lab generator against the ground truth, on held-out identities at fixed cameras.

``evaluate`` renders I held-out identities at V cameras spread over 360 degrees with three
generators: the stylised one (pred), the untouched one (before) and the ground-truth oracle of
the style (truth, same identities); a reference set of the style's ground truth on OTHER
identities gives the style statistics. It returns the headstyle.metrics figures:

- identity (vs truth of the SAME identity): depth_error, silhouette_iou, rgb_error,
  id_accuracy_geometry, id_accuracy_appearance;
- stylisation (vs the style's reference set, identity-free): style_fd, style_fd_before, stylisation;
- diversity (pred vs before): diversity_rgb, diversity_depth (1.0 = no collapse), and the ground
  truth's own ratios (truth_diversity_rgb, truth_diversity_depth), the value a perfect stylisation has;
- multi-view consistency of pred: mv_warp_error, mv_covisible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from headstyle.cameras import cameras
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.heads import sample_z
from headstyle.lab.world.identities import held_out_z
from headstyle.metrics.consistency import multiview_consistency
from headstyle.metrics.diversity import diversity
from headstyle.metrics.identity import identity_preservation
from headstyle.metrics.style import stylisation_score

REFERENCE_SEED = 3_000
EVAL_PITCH = math.radians(10)


@dataclass
class Views:
    """Renders of I identities x V cameras: image (I, V, 3, H, W), depth and mask (I, V, 1, h, w)."""

    image: Tensor
    depth: Tensor
    mask: Tensor


def eval_cameras(views: int = 8, pitch: float = EVAL_PITCH) -> Tensor:
    """(V, 25) cameras evenly spaced over 360 degrees of yaw, starting at the front."""
    yaw = torch.arange(views, dtype=torch.float32) * (2 * math.pi / views)
    yaw = torch.remainder(yaw + math.pi, 2 * math.pi) - math.pi
    return cameras(yaw, torch.full_like(yaw, pitch))


@torch.no_grad()
def render_views(G: LabGenerator, z: Tensor, cams: Tensor, truncation_psi: float = 0.75) -> Views:
    """Render every identity z (I, P) at every camera (V, 25) with the frozen mapping's truncation."""
    i, v = len(z), len(cams)
    ws = G.mapping(z.repeat_interleave(v, 0), cams.repeat(i, 1), truncation_psi)
    out = G.synthesis(ws, cams.repeat(i, 1), render_sr=True)
    return Views(
        out.image.reshape(i, v, *out.image.shape[1:]),
        out.depth.reshape(i, v, *out.depth.shape[1:]),
        out.mask.reshape(i, v, *out.mask.shape[1:]),
    )


def oracle(style: str | None, like: LabGenerator) -> LabGenerator:
    """The ground-truth generator of ``style`` at ``like``'s resolutions (no trainable weights)."""
    return LabGenerator(
        resolution=like.neural_rendering_resolution,
        sr_factor=like.superresolution.factor,
        num_ws=like.num_ws,
        style=style,
        rendering_kwargs=like.rendering_kwargs,
        residual=False,
    )


@dataclass
class EvalSet:
    """Everything that does not depend on the stylised generator, rendered once per style."""

    style: str
    z: Tensor
    cams: Tensor
    before: Views
    truth: Views
    reference: Views


def make_eval_set(style: str, like: LabGenerator, identities: int = 4, views: int = 8, reference: int = 4) -> EvalSet:
    """Held-out identities (lab.world.identities.held_out_z), their before/truth renders and a reference set."""
    z = held_out_z(identities)
    cams = eval_cameras(views)
    return EvalSet(
        style,
        z,
        cams,
        render_views(oracle(None, like), z, cams),
        render_views(oracle(style, like), z, cams),
        render_views(oracle(style, like), sample_z(reference, REFERENCE_SEED), cams),
    )


def score(pred: Views, ev: EvalSet) -> dict[str, float]:
    """All metrics of the module docstring for renders ``pred`` of ev.z at ev.cams."""
    t, b, r = ev.truth, ev.before, ev.reference
    out = identity_preservation(pred.image, pred.depth, pred.mask, t.image, t.depth, t.mask)
    out.update(stylisation_score((pred.image, pred.mask), (b.image, b.mask), (r.image, r.mask)))
    out.update(diversity(b.image, pred.image, b.depth, pred.depth))
    out.update({f"truth_{k}": v for k, v in diversity(b.image, t.image, b.depth, t.depth).items()})
    out.update(multiview_consistency(pred.image, pred.depth, pred.mask, ev.cams))
    return out


def evaluate(G: LabGenerator, ev: EvalSet) -> dict[str, float]:
    """Render ev's identities with G and score them."""
    return score(render_views(G, ev.z, ev.cams), ev)
