"""The synthetic head world: procedural identities, their 3D fields, and ground-truth styles.

An identity is a vector of interpretable parameters (``PARAMS``) obtained from a latent
z ~ N(0, I) through the normal CDF (so every z is a valid head). ``head_field`` maps the
parameters and world points to a raw density (PanoHead's pre-activation sigma, which the ray
marcher turns into density by softplus(sigma - 1)) and a shaded colour in [0, 1].

Geometry is a smooth union of ellipsoids (cranium, jaw, neck, nose, eyes, ears, brows, lips,
a hair shell above a hairline that drops towards the back): complete at 360 degrees.
Coordinates follow PanoHead: y up, the face looks towards +z, the head sits at the origin
(cameras at radius 2.7 look at (0, 0, 0.2)). Shading is Lambertian with a light fixed in the
head's frame, so a head looks the same from every camera (a multi-view consistent field).

A style is a transform of an identity's field: a geometry edit of the parameters and an
appearance edit of the albedo per region. For any z, ``head_field(params, x, style)`` is the
ground-truth stylised head that metrics compare against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from headstyle.generator.renderer import ray_march, ray_sampler

# (name, low, high): value = low + (high - low) * Phi(z).
PARAMS: tuple[tuple[str, float, float], ...] = (
    ("head_width", 0.85, 1.15),
    ("head_length", 0.88, 1.12),
    ("head_height", 0.88, 1.12),
    ("jaw_width", 0.8, 1.2),
    ("chin_length", 0.8, 1.25),
    ("nose_length", 0.7, 1.35),
    ("nose_width", 0.7, 1.4),
    ("eye_size", 0.75, 1.3),
    ("eye_spacing", 0.85, 1.15),
    ("ear_size", 0.7, 1.4),
    ("brow_height", -0.012, 0.012),
    ("hairline", 0.03, 0.12),
    ("hair_volume", 0.004, 0.05),
    ("hair_length", 0.0, 1.0),
    ("skin_tone", 0.0, 1.0),
    ("hair_colour", 0.0, 1.0),
)
PARAM_INDEX = {name: i for i, (name, _, _) in enumerate(PARAMS)}
NUM_PARAMS = len(PARAMS)

# Colour regions, in the order of ``Field.regions``' last axis.
REGIONS = ("skin", "hair", "sclera", "iris", "brow", "lips")
# Palettes interpolated by skin_tone / hair_colour in [0, 1].
SKIN_PALETTE = ((0.96, 0.80, 0.69), (0.87, 0.67, 0.52), (0.70, 0.49, 0.34), (0.42, 0.27, 0.18))
HAIR_PALETTE = ((0.93, 0.80, 0.52), (0.62, 0.38, 0.18), (0.55, 0.22, 0.10), (0.25, 0.16, 0.10), (0.06, 0.05, 0.05))
# Lambert lights fixed in the head's frame: (direction, strength); a key light and a back fill.
LIGHTS = (((0.45, 0.55, 0.70), 0.55), ((-0.3, 0.4, -0.8), 0.25))
AMBIENT = 0.35
# The procedural head is built in "head units" and scaled by this factor into world units.
HEAD_SCALE = 1.3
# Colour is evaluated where the signed distance (world units) is below this.
SHADING_BAND = 0.05
# Density of the inside of the head (per unit length) and the width of its surface transition.
DENSITY = 150.0
SURFACE_WIDTH = 0.01
SMOOTH_UNION = 0.012
COLOUR_TEMPERATURE = 0.006


def params_from_z(z: Tensor) -> Tensor:
    """Identity parameters (N, P) from latents z (N, P) through the normal CDF."""
    if z.shape[-1] != NUM_PARAMS:
        raise ValueError(f"z has {z.shape[-1]} entries, the lab's identities have {NUM_PARAMS}")
    u = 0.5 * (1.0 + torch.erf(z.float() / math.sqrt(2.0)))
    low = torch.tensor([p[1] for p in PARAMS], device=z.device)
    high = torch.tensor([p[2] for p in PARAMS], device=z.device)
    return low + (high - low) * u


def sample_z(n: int, seed: int) -> Tensor:
    """n identity latents z ~ N(0, I) from a seed (identities are named by their seed)."""
    return torch.randn(n, NUM_PARAMS, generator=torch.Generator().manual_seed(seed))


def _palette(table: tuple[tuple[float, float, float], ...], u: Tensor) -> Tensor:
    """Piecewise-linear colour ramp: (N,) in [0, 1] -> (N, 3)."""
    colours = torch.tensor(table, device=u.device)
    pos = u.clamp(0, 1) * (len(table) - 1)
    i0 = pos.floor().long().clamp(max=len(table) - 2)
    frac = (pos - i0).unsqueeze(-1)
    return colours[i0] * (1 - frac) + colours[i0 + 1] * frac


@dataclass
class Primitives:
    """The ellipsoids of a batch of heads: centres and radii (N, K, 3), region of each (K,)."""

    centre: Tensor
    radii: Tensor


# Primitive order; the colour region each one paints.
PRIMITIVES = (
    ("cranium", "skin"),
    ("jaw", "skin"),
    ("neck", "skin"),
    ("nose", "skin"),
    ("eye_l", "sclera"),
    ("eye_r", "sclera"),
    ("ear_l", "skin"),
    ("ear_r", "skin"),
    ("brow_l", "brow"),
    ("brow_r", "brow"),
    ("lips", "lips"),
    ("hair", "hair"),
)
EYE_PRIMITIVES = (4, 5)
HAIR_PRIMITIVE = 11


def primitives(params: Tensor) -> Primitives:
    """Ellipsoid centres and radii from identity parameters (N, P)."""
    g = {name: params[:, i] for name, i in PARAM_INDEX.items()}
    n = params.shape[0]
    one = torch.ones(n, device=params.device)

    def vec(x: Tensor | float, y: Tensor | float, z: Tensor | float) -> Tensor:
        return torch.stack([x * one, y * one, z * one], dim=-1)

    hw, hl, hh = g["head_width"], g["head_length"], g["head_height"]
    eye_y = 0.025 + g["brow_height"] * 0.3
    eye_r = 0.022 * g["eye_size"]
    eye_x = 0.055 * g["eye_spacing"] * hw
    face_z = 0.16 * hl
    brow_y = eye_y + eye_r + 0.018 + g["brow_height"]
    mouth_y = -0.085 - 0.02 * (g["chin_length"] - 1)
    hair = g["hair_volume"]
    cranium_r = vec(0.145 * hw, 0.165 * hh, 0.175 * hl)
    centres = [
        vec(0.0, 0.035, -0.01),
        vec(0.0, -0.07 - 0.03 * (g["chin_length"] - 1), 0.03),
        vec(0.0, -0.26, -0.03),
        vec(0.0, -0.02 - 0.01 * (g["nose_length"] - 1), face_z + 0.005),
        vec(-eye_x, eye_y, face_z - 0.022 - 0.6 * (eye_r - 0.022)),
        vec(eye_x, eye_y, face_z - 0.022 - 0.6 * (eye_r - 0.022)),
        vec(-0.143 * hw, 0.0, -0.015),
        vec(0.143 * hw, 0.0, -0.015),
        vec(-0.05 * g["eye_spacing"] * hw, brow_y, face_z - 0.012),
        vec(0.05 * g["eye_spacing"] * hw, brow_y, face_z - 0.012),
        vec(0.0, mouth_y, face_z - 0.028),
        vec(0.0, 0.035 + 0.4 * hair, -0.01 - 0.3 * hair),
    ]
    radii = [
        cranium_r,
        vec(0.115 * g["jaw_width"] * hw, 0.085 * g["chin_length"], 0.12 * hl),
        vec(0.072, 0.16, 0.075),
        vec(0.018 * g["nose_width"], 0.042 * g["nose_length"], 0.03 + 0.006 * g["nose_length"]),
        vec(eye_r, eye_r, eye_r),
        vec(eye_r, eye_r, eye_r),
        vec(0.016, 0.042 * g["ear_size"], 0.028 * g["ear_size"]),
        vec(0.016, 0.042 * g["ear_size"], 0.028 * g["ear_size"]),
        vec(0.026, 0.007, 0.012),
        vec(0.026, 0.007, 0.012),
        vec(0.036, 0.011, 0.02),
        cranium_r + hair.unsqueeze(-1) + 0.006,
    ]
    return Primitives(torch.stack(centres, dim=1), torch.stack(radii, dim=1))


@dataclass
class Field:
    """The field at points: raw density sigma (N, M) (PanoHead pre-activation), colour (N, M, 3)
    in [0, 1] (shaded albedo), region weights (N, M, R) and the signed distance (N, M)."""

    sigma: Tensor
    rgb: Tensor
    regions: Tensor
    sdf: Tensor


def density_from_sdf(sdf: Tensor) -> Tensor:
    """PanoHead raw sigma whose activation softplus(sigma - 1) equals DENSITY * sigmoid(-sdf / width)."""
    density = (DENSITY * torch.sigmoid(-sdf / SURFACE_WIDTH)).clamp_min(1e-6)
    return 1.0 + density + torch.log(-torch.expm1(-density))


def value_noise(points: Tensor, seed: int = 0, octaves: int = 3) -> Tensor:
    """Deterministic smooth 3D texture in about [-1, 1]: sums of sinusoids at fixed random directions."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(points.shape[:-1], device=points.device)
    for octave in range(octaves):
        dirs = torch.nn.functional.normalize(torch.randn(4, 3, generator=gen), dim=-1).to(points.device)
        phase = (2 * math.pi * torch.rand(4, generator=gen)).to(points.device)
        freq = 40.0 * 2**octave
        out = out + (torch.sin(freq * points @ dirs.T + phase).sum(-1) / 4) / 2**octave
    return out / 1.75


def _hair_cut(params: Tensor, points: Tensor) -> Tensor:
    """Signed distance-like term, negative where hair may grow: above a hairline that drops at the back."""
    hairline = params[:, PARAM_INDEX["hairline"]].unsqueeze(-1)
    length = params[:, PARAM_INDEX["hair_length"]].unsqueeze(-1)
    back = torch.sigmoid((-points[..., 2] + 0.02) / 0.03)
    limit = hairline - back * (0.1 + 0.2 * length) - torch.sigmoid((points[..., 2] - 0.1) / 0.02) * 0.01
    return limit - points[..., 1]


@dataclass
class Appearance:
    """Colour ingredients at P shaded points, for styles: per-region albedo (P, R, 3), region
    weights (P, R), Lambert shade (P,) and positions in head units (P, 3)."""

    albedo: Tensor
    regions: Tensor
    shade: Tensor
    points: Tensor


def _base_albedo(params: Tensor) -> Tensor:
    """Per-region albedo (N, R, 3) of unstyled identities."""
    skin = _palette(SKIN_PALETTE, params[:, PARAM_INDEX["skin_tone"]])
    hair = _palette(HAIR_PALETTE, params[:, PARAM_INDEX["hair_colour"]])
    sclera = torch.tensor([0.95, 0.95, 0.93], device=params.device).expand_as(skin)
    iris = hair * 0.6 + torch.tensor([0.05, 0.12, 0.2], device=params.device)
    lips = skin * torch.tensor([0.95, 0.62, 0.62], device=params.device)
    return torch.stack([skin, hair, sclera, iris, hair * 0.75, lips], dim=1)


def unstyled_colour(app: Appearance) -> Tensor:
    """Shaded colour of the plain identity: sum over regions of weight * albedo, times the shade."""
    albedo = (app.regions.unsqueeze(-1) * app.albedo).sum(-2)
    return albedo * app.shade.unsqueeze(-1)


def _sdf_parts(params: Tensor, points: Tensor) -> tuple[Primitives, Tensor]:
    """Primitives and per-primitive distances (N, M, K) (hair cut applied) for points in head units (N, M, 3).

    Ellipsoid distance bound k0 (k0 - 1) / k1 with k0 = |q / r|, k1 = |q / r^2| (exact on spheres),
    accumulated one coordinate at a time to keep the (N, M, K) working set small.
    """
    prim = primitives(params)
    inv_r = prim.radii.reciprocal().unsqueeze(1)
    k0_sq = k1_sq = None
    for d in range(3):
        qr = (points[..., d : d + 1] - prim.centre[:, None, :, d]) * inv_r[..., d]
        k0_sq = qr.square() if k0_sq is None else k0_sq + qr.square()
        g = qr * inv_r[..., d]
        k1_sq = g.square() if k1_sq is None else k1_sq + g.square()
    k0 = k0_sq.sqrt()
    dist = k0 * (k0 - 1) * k1_sq.clamp_min(1e-12).rsqrt()
    dist[..., HAIR_PRIMITIVE] = torch.maximum(dist[..., HAIR_PRIMITIVE], _hair_cut(params, points))
    return prim, dist


def head_field(
    params: Tensor, points: Tensor, style: str | None = None, shading_band: float = SHADING_BAND
) -> Field:
    """Evaluate the (optionally stylised) head field of identities ``params`` (N, P) at world points (N, M, 3).

    Colour and regions are computed only within ``shading_band`` of the surface (elsewhere the
    density is below 1e-3 of the inside's and they are set to 0), which halves the cost of a render.
    """
    sty = STYLES[style] if style is not None else None
    if sty is not None:
        params = sty.geometry(params)
    local = points / HEAD_SCALE
    prim, dist = _sdf_parts(params, local)
    sdf = -SMOOTH_UNION * torch.logsumexp(-dist / SMOOTH_UNION, dim=-1) * HEAD_SCALE
    n, m = sdf.shape
    band = sdf < shading_band
    idx = band.nonzero(as_tuple=True)
    owner = torch.softmax(-dist[idx] / COLOUR_TEMPERATURE, dim=-1)
    # Normals: the owners' ellipsoid gradients q / r^2, blended by ownership.
    grad = (local[idx].unsqueeze(1) - prim.centre[idx[0]]) / prim.radii[idx[0]].square()
    grad = torch.nn.functional.normalize(grad, dim=-1)
    normal = torch.nn.functional.normalize((owner.unsqueeze(-1) * grad).sum(-2), dim=-1)
    shade = AMBIENT
    for direction, strength in LIGHTS:
        light = torch.nn.functional.normalize(torch.tensor(direction, device=points.device), dim=0)
        shade = shade + strength * (normal @ light).clamp_min(0)
    regions = owner @ _region_matrix(points.device)
    # Iris and pupil: caps of the eyeballs facing forward (+z).
    eyes = list(EYE_PRIMITIVES)
    eye_q = local[idx].unsqueeze(1) - prim.centre[idx[0]][:, eyes]
    eye_dir = eye_q[..., 2] / torch.linalg.vector_norm(eye_q, dim=-1).clamp_min(1e-6)
    iris = (torch.sigmoid((eye_dir - 0.8) / 0.03) * owner[:, eyes]).sum(-1)
    pupil = (torch.sigmoid((eye_dir - 0.94) / 0.01) * owner[:, eyes]).sum(-1)
    sclera_i, iris_i = REGIONS.index("sclera"), REGIONS.index("iris")
    regions[:, iris_i] = iris
    regions[:, sclera_i] = regions[:, sclera_i] - iris
    app = Appearance(_base_albedo(params)[idx[0]], regions, shade, local[idx])
    rgb = sty.appearance(app) if sty is not None else unstyled_colour(app)
    rgb = rgb * (1 - 0.85 * pupil.unsqueeze(-1) * (sty.keep_pupil if sty is not None else 1.0))
    rgb_full = torch.zeros(n, m, 3, device=points.device)
    rgb_full[idx] = rgb.clamp(0, 1)
    regions_full = torch.zeros(n, m, len(REGIONS), device=points.device)
    regions_full[idx] = regions
    return Field(density_from_sdf(sdf), rgb_full, regions_full, sdf)


def region_masks(
    params: Tensor, c: Tensor, resolution: int, rendering_kwargs: Mapping[str, Any], style: str | None = None
) -> Tensor:
    """Per-view masks of the colour regions (N, R, H, W) in [0, 1], R in ``REGIONS`` order.

    The region weights (N, M, R) of ``head_field`` are composited along each ray with the weights that
    composite the colour (the lab generator's rays and fixed sample depths, no residual field):
    mask_r = sum_i w_i r_i. Regions are evaluated at every sample (no shading band) and sum to 1 there,
    so the masks sum over R to the render's foreground mask sum_i w_i. ``style`` edits the geometry as
    the stylised world does (its regions keep their names).
    """
    if c.ndim != 2 or c.shape[1] != 25 or c.shape[0] != params.shape[0]:
        raise ValueError(f"c must be (N, 25) cameras, one per identity row of params, got {tuple(c.shape)}")
    rk = rendering_kwargs
    n, s = params.shape[0], rk["depth_resolution"]
    origins, dirs = ray_sampler(c[:, :16].reshape(-1, 4, 4), c[:, 16:].reshape(-1, 3, 3), resolution)
    depths = torch.linspace(rk["ray_start"], rk["ray_end"], s, device=c.device).reshape(1, 1, s, 1)
    depths = depths.expand(n, resolution * resolution, s, 1)
    points = (origins.unsqueeze(2) + depths * dirs.unsqueeze(2)).reshape(n, -1, 3)
    with torch.no_grad():
        field = head_field(params, points, style, shading_band=float("inf"))
    shape = (n, resolution * resolution, s)
    masks, _, _ = ray_march(field.regions.reshape(*shape, -1), field.sigma.reshape(*shape, 1), depths, rk)
    return masks.permute(0, 2, 1).reshape(n, len(REGIONS), resolution, resolution)


def check_regions(names: tuple[str, ...]) -> None:
    """Refuse an empty or unknown choice of regions, naming the known ones."""
    unknown = [name for name in names if name not in REGIONS]
    if unknown or not names:
        raise ValueError(f"unknown lab regions {unknown or '(none given)'}; choose from {', '.join(REGIONS)}")


def region_select(masks: Tensor, names: tuple[str, ...]) -> Tensor:
    """The union of named regions: the sum of their masks (..., H, W) from ``region_masks``' (..., R, H, W)."""
    check_regions(names)
    return masks[..., [REGIONS.index(name) for name in names], :, :].sum(-3).clamp(0, 1)


def _region_matrix(device: torch.device) -> Tensor:
    """(K, R) one-hot: which colour region each primitive paints."""
    out = torch.zeros(len(PRIMITIVES), len(REGIONS), device=device)
    for k, (_, region) in enumerate(PRIMITIVES):
        out[k, REGIONS.index(region)] = 1.0
    return out


def _luminance(rgb: Tensor) -> Tensor:
    return rgb @ torch.tensor([0.299, 0.587, 0.114], device=rgb.device)


def _scale_params(**factors: float) -> Callable[[Tensor], Tensor]:
    def edit(params: Tensor) -> Tensor:
        out = params.clone()
        for name, factor in factors.items():
            out[:, PARAM_INDEX[name]] = out[:, PARAM_INDEX[name]] * factor
        return out

    return edit


def _statue(app: Appearance) -> Tensor:
    stone = torch.tensor([0.66, 0.64, 0.6], device=app.points.device)
    texture = 0.88 + 0.12 * value_noise(app.points, seed=1)
    hair = app.regions[..., REGIONS.index("hair")] + app.regions[..., REGIONS.index("brow")]
    albedo = stone * (texture * (1 - 0.18 * hair)).unsqueeze(-1)
    return albedo * app.shade.unsqueeze(-1)


def _zombie(app: Appearance) -> Tensor:
    albedo = app.albedo.expand(*app.regions.shape, 3).clone()
    skin_lum = _luminance(albedo[..., 0, :]).unsqueeze(-1)
    green = torch.tensor([0.52, 0.64, 0.46], device=app.points.device)
    blotch = torch.sigmoid((value_noise(app.points, seed=2) - 0.35) / 0.08).unsqueeze(-1)
    rot = torch.tensor([0.45, 0.18, 0.16], device=app.points.device)
    albedo[..., 0, :] = (green * (0.6 + 0.5 * skin_lum)) * (1 - blotch) + rot * blotch
    albedo[..., 1, :] = 0.5 * albedo[..., 1, :] + 0.5 * _luminance(albedo[..., 1, :]).unsqueeze(-1) * 0.7
    albedo[..., 2, :] = torch.tensor([0.85, 0.8, 0.45], device=app.points.device)
    albedo[..., 3, :] = torch.tensor([0.9, 0.9, 0.85], device=app.points.device)
    albedo[..., 5, :] = torch.tensor([0.3, 0.15, 0.25], device=app.points.device)
    colour = (app.regions.unsqueeze(-1) * albedo).sum(-2)
    return colour * app.shade.unsqueeze(-1)


def _saturate(rgb: Tensor, amount: float) -> Tensor:
    lum = _luminance(rgb).unsqueeze(-1)
    return (lum + amount * (rgb - lum)).clamp(0, 1)


def _toon(app: Appearance) -> Tensor:
    albedo = _saturate(app.albedo.expand(*app.regions.shape, 3), 2.2)
    colour = (app.regions.unsqueeze(-1) * albedo).sum(-2)
    # Cel shading: two flat tones with a soft step.
    shade = 0.72 + 0.28 * torch.sigmoid((app.shade - 0.62) / 0.03)
    return colour * shade.unsqueeze(-1)


def _gold(app: Appearance) -> Tensor:
    gold = torch.tensor([1.0, 0.76, 0.26], device=app.points.device)
    lum = _luminance((app.regions.unsqueeze(-1) * app.albedo).sum(-2))
    shade = app.shade**2
    highlight = torch.sigmoid((app.shade - 0.93) / 0.02).unsqueeze(-1)
    base = gold * (0.55 + 0.45 * lum).unsqueeze(-1) * (0.25 + 0.9 * shade).unsqueeze(-1)
    return base + highlight * 0.35


@dataclass(frozen=True)
class Style:
    """A ground-truth style: a prompt, a geometry edit of identity parameters and an appearance
    edit of the per-region albedo; ``keep_pupil`` scales the pupil's darkening."""

    name: str
    prompt: str
    geometry: Callable[[Tensor], Tensor]
    appearance: Callable[[Appearance], Tensor]
    keep_pupil: float = 1.0


STYLES: dict[str, Style] = {
    "statue": Style("statue", "a marble statue of a head", _scale_params(), _statue, keep_pupil=0.0),
    "zombie": Style("zombie", "a zombie", _scale_params(eye_size=0.9), _zombie, keep_pupil=0.5),
    "toon": Style(
        "toon", "a cartoon character, flat colours, big eyes", _scale_params(eye_size=1.45, nose_length=0.8), _toon
    ),
    "gold": Style("gold", "a golden sculpture of a head", _scale_params(), _gold, keep_pupil=0.0),
}
UNSTYLED_PROMPT = "a photo of a head"


def style_prompt(style: str | None) -> str:
    """The text prompt naming a style (the unstyled domain for None)."""
    if style is None:
        return UNSTYLED_PROMPT
    if style not in STYLES:
        raise ValueError(f"unknown lab style {style!r}; choose from {', '.join(STYLES)}")
    return STYLES[style].prompt
