"""PanoHead camera conventions: look-at poses, intrinsics, the 25-vector label and mirroring.

A camera label ``c`` is ``[cam2world (4x4, row-major, 16 values), intrinsics (3x3, 9 values)]``
with OpenCV axes (x right, y down, z forward) and normalised intrinsics (cx = cy = 0.5).
"yaw" and "pitch" are offsets from pi/2 as in PanoHead's scripts: yaw 0 faces the front,
yaw +-pi the back of the head, and a positive pitch moves the camera downwards (-y).

Two look-at points: ``PIVOT`` (0, 0, 0.2), the checkpoint's ``avg_camera_pivot`` (EG3D's FFHQ value,
which PanoHead's rendering kwargs carry), the default of every function here; and ``LD_PIVOT`` (0, 0, 0),
where every camera of the LD scripts (train_LD.py, infer_LD.py) looks, as do PanoHead's gen_samples.py,
projector.py and gen_videos.py --cfg Head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

RADIUS = 2.7
PIVOT = (0.0, 0.0, 0.2)
LD_PIVOT = (0.0, 0.0, 0.0)
FOV_DEGREES = 18.837
# Yaw 0, pitch 0.2: the camera the LD script conditions the mapping network on.
COND_YAW, COND_PITCH = 0.0, 0.2
# Flattened cam2world entries whose sign flips under the mirror x -> -x (same pitch, -yaw).
MIRROR_INDICES = (1, 2, 3, 4, 8)


def _normalize(v: Tensor) -> Tensor:
    return v / torch.norm(v, dim=-1, keepdim=True)


def intrinsics_from_fov(fov_degrees: float = FOV_DEGREES) -> Tensor:
    """Normalised 3x3 intrinsics, with the constants (3.14159, 1.414) of PanoHead's FOV_to_intrinsics."""
    focal = float(1.0 / (math.tan(fov_degrees * 3.14159 / 360.0) * 1.414))
    return torch.tensor([[focal, 0.0, 0.5], [0.0, focal, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float32)


def cam2world_from_forward(forward: Tensor, origin: Tensor) -> Tensor:
    """(N, 4, 4) cam2world with columns (right, up, forward, origin), up pointing image-down (OpenCV)."""
    forward = _normalize(forward)
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=forward.dtype, device=forward.device).expand_as(forward)
    right = -_normalize(torch.cross(world_up, forward, dim=-1))
    up = _normalize(torch.cross(forward, right, dim=-1))
    pose = torch.eye(4, dtype=forward.dtype, device=forward.device).repeat(forward.shape[0], 1, 1)
    pose[:, :3, :3] = torch.stack((right, up, forward), dim=-1)
    pose[:, :3, 3] = origin
    return pose


def look_at_pose(
    yaw: Tensor | float,
    pitch: Tensor | float,
    radius: float = RADIUS,
    lookat: Sequence[float] = PIVOT,
) -> Tensor:
    """PanoHead's LookAtPoseSampler at horizontal = pi/2 + yaw, vertical = pi/2 + pitch, zero stddev.

    The camera origin lies on a sphere of ``radius`` around the world origin (not around the
    look-at point) and looks at ``lookat``; the polar angle is phi = arccos(1 - 2 v / pi).
    """
    yaw_t = torch.as_tensor(yaw, dtype=torch.float32).reshape(-1)
    pitch_t = torch.as_tensor(pitch, dtype=torch.float32).reshape(-1)
    yaw_t, pitch_t = torch.broadcast_tensors(yaw_t, pitch_t)
    theta = (math.pi / 2 + yaw_t).unsqueeze(-1)
    v = torch.clamp((math.pi / 2 + pitch_t).unsqueeze(-1), 1e-5, math.pi - 1e-5) / math.pi
    phi = torch.arccos(1 - 2 * v)
    origin = torch.cat(
        [
            radius * torch.sin(phi) * torch.cos(math.pi - theta),
            radius * torch.cos(phi),
            radius * torch.sin(phi) * torch.sin(math.pi - theta),
        ],
        dim=-1,
    )
    target = torch.tensor(lookat, dtype=torch.float32)
    return cam2world_from_forward(target - origin, origin)


def camera_label(cam2world: Tensor, intrinsics: Tensor | None = None) -> Tensor:
    """The 25-vector c = [cam2world.flatten(), intrinsics.flatten()] for each camera."""
    intr = intrinsics_from_fov() if intrinsics is None else intrinsics
    n = cam2world.shape[0]
    intr = intr.to(cam2world).reshape(-1, 9).expand(n, 9)
    return torch.cat([cam2world.reshape(n, 16), intr], dim=1)


def cameras(yaw: Tensor | float, pitch: Tensor | float, lookat: Sequence[float] = PIVOT) -> Tensor:
    """(N, 25) camera labels for broadcast yaws and pitches (radians), looking at ``lookat``."""
    return camera_label(look_at_pose(yaw, pitch, lookat=lookat))


def conditioning_camera(batch: int = 1) -> Tensor:
    """The mapping network's conditioning label (yaw 0, pitch 0.2), repeated ``batch`` times."""
    return cameras(COND_YAW, COND_PITCH).expand(batch, 25).clone()


def mirror(c: Tensor) -> Tensor:
    """Mirror camera (x -> -x): same pitch, negated yaw. An involution on labels."""
    out = c.clone()
    out[..., list(MIRROR_INDICES)] = -out[..., list(MIRROR_INDICES)]
    return out


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def sample_front_cameras(
    n: int,
    generator: torch.Generator | None = None,
    yaw_range: float = math.pi / 3,
    pitch_range: float = math.pi / 6,
    lookat: Sequence[float] = PIVOT,
) -> tuple[Tensor, Tensor, Tensor]:
    """Single-view cameras of the LD script: yaw ~ U[-pi/3, pi/3], pitch ~ U[-pi/6, pi/6], looking at ``lookat``.

    Returns (c, yaw, pitch).
    """
    yaw = _uniform(n, -yaw_range, yaw_range, generator)
    pitch = _uniform(n, -pitch_range, pitch_range, generator)
    return cameras(yaw, pitch, lookat=lookat), yaw, pitch


def sample_360_cameras(
    n: int,
    generator: torch.Generator | None = None,
    pitch_range: float = math.pi / 6,
    lookat: Sequence[float] = PIVOT,
) -> tuple[Tensor, Tensor, Tensor]:
    """360-degree cameras (the grid's views): yaw ~ U[-pi, pi], pitch ~ U[-pi/6, pi/6]."""
    return sample_front_cameras(n, generator, yaw_range=math.pi, pitch_range=pitch_range, lookat=lookat)


def turntable_cameras(frames: int, pitch: float = 0.0, lookat: Sequence[float] = PIVOT) -> Tensor:
    """(frames, 25) cameras evenly spaced over a full turn, starting at the front (yaw 0)."""
    yaw = torch.arange(frames, dtype=torch.float32) * (2 * math.pi / frames)
    yaw = torch.remainder(yaw + math.pi, 2 * math.pi) - math.pi
    return cameras(yaw, torch.full_like(yaw, pitch), lookat=lookat)


def parse_angles_degrees(text: str) -> list[float]:
    """'-90,-30,0' -> radians. Raises ValueError naming the bad item (not a number, not finite, beyond +-360)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            degrees = float(item)
        except ValueError:
            degrees = math.nan
        if not (math.isfinite(degrees) and abs(degrees) <= 360):
            raise ValueError(f"not an angle in degrees: {item!r} (expected numbers within [-360, 360], e.g. -90,0,90)")
        out.append(math.radians(degrees))
    return out
