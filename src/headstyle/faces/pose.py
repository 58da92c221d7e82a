"""Head pose from 68 landmarks: a scaled-orthographic fit to a 3D mean face, 3DDFA_V2's angles and
PanoHead's camera label.

PanoHead estimates the pose with 3DDFA_V2 (a 3DMM regressed by a CNN, whose weights are not on the
package registries). 3DDFA's camera is scaled orthographic, x_img = s * R[:2] X + t with image y up;
here the same model is fitted by weighted least squares to the 68 dlib landmarks against MEAN_FACE_68,
an anthropometric mean face written for headstyle (millimetres, x to the subject's left, y up, z out
of the face, origin at the nose tip). So R, s and t have 3DDFA's meaning and the camera label is
built exactly as PanoHead's recrop_images.py builds it from 3DDFA's R; what differs is the landmark
model: a sparse 68-point template instead of the dense 3DMM, so the angles follow the landmarks
(the jaw contour slides with yaw; it is down-weighted) and are coarser than 3DDFA's. The figures
measured against 3DDFA's labels are in the README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# One side of the face (the subject's right, x < 0) and the midline, in mm; the other side mirrors it.
_HALF_FACE: dict[int, tuple[float, float, float]] = {
    # jaw contour, from beside the right eye down to the chin (8)
    0: (-70, 32, -88), 1: (-69, 16, -86), 2: (-67, 0, -82), 3: (-63, -16, -76), 4: (-56, -31, -66),
    5: (-46, -45, -53), 6: (-34, -56, -40), 7: (-18, -65, -29), 8: (0, -68, -25),
    # right eyebrow, outer to inner
    17: (-54, 42, -38), 18: (-45, 49, -27), 19: (-33, 52, -20), 20: (-21, 52, -16), 21: (-10, 49, -15),
    # nose bridge (27 nasion ... 30 tip) and the nostril base (31 right ... 33 subnasale)
    27: (0, 33, -19), 28: (0, 22, -13), 29: (0, 11, -6), 30: (0, 0, 0),
    31: (-14, -9, -14), 32: (-7, -11, -9), 33: (0, -12, -7),
    # right eye: 36 outer corner, 37-38 upper lid, 39 inner corner, 40-41 lower lid
    36: (-44, 33, -32), 37: (-36, 38, -25), 38: (-25, 38, -23), 39: (-16, 33, -23), 40: (-25, 29, -24),
    41: (-36, 29, -26),
    # outer lips: 48 right corner, 49-51 upper, 57-59 lower; inner lips 60-62, 66-67
    48: (-25, -33, -22), 49: (-15, -27, -13), 50: (-6, -25, -9), 51: (0, -26, -8), 57: (0, -46, -11),
    58: (-7, -45, -12), 59: (-16, -41, -16),
    60: (-21, -33, -20), 61: (-7, -31, -11), 62: (0, -31, -10), 66: (0, -35, -11), 67: (-7, -35, -12),
}  # fmt: skip

# The landmark each landmark becomes in the mirror image (iBUG 68-point numbering).
MIRROR_68 = np.array(
    [*range(16, -1, -1), *range(26, 16, -1), 27, 28, 29, 30, 35, 34, 33, 32, 31,
     45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
     54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65]
)  # fmt: skip


# The template is drawn upright; 3DDFA's 3DMM frame is tilted from it by this pitch (calibrated, see README).
TEMPLATE_PITCH_DEGREES = 10.0


def _mean_face() -> np.ndarray:
    face = np.full((68, 3), np.nan)
    for i, p in _HALF_FACE.items():
        face[i] = p
        face[MIRROR_68[i]] = (-p[0], p[1], p[2])
    a = math.radians(TEMPLATE_PITCH_DEGREES)
    return face @ np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


MEAN_FACE_68 = _mean_face()
# The jaw contour is a silhouette, not a fixed point on the head: it slides as the head turns.
LANDMARK_WEIGHTS = np.where(np.arange(68) <= 16, 0.3, 1.0)
# PanoHead re-centres its crop on a point inside the head (3DDFA's origin moved back by half the
# 3DMM's mean depth) and scales it so that a fixed length of the 3DMM spans the quad; these are that
# point and length for MEAN_FACE_68, calibrated on PanoHead's own cropped samples (see README).
HEAD_CENTRE_MM = (0.0, 4.0, -90.0)
QUAD_SPAN_MM = 221.0
# PanoHead's dataset.json constants (recrop_images.py eg3dcamparams).
CAMERA_RADIUS = 2.7
DATASET_FOCAL = 4.2647
# PanoHead's recrop_images.py skips images outside these (degrees; scale relative to the quad).
POSE_LIMITS_DEGREES = {"yaw": 90.0, "pitch": 80.0, "roll": 50.0}
SCALE_LIMITS = (0.7, 1.3)


@dataclass(frozen=True)
class WeakPerspective:
    """x_img (y up) = s * R[:2] @ X + t for template points X (mm): R (3, 3) rotation, s px/mm, t (2,)."""

    R: np.ndarray
    s: float
    t: np.ndarray

    def project(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) template points -> (N, 2) image points, y up."""
        return self.s * points @ self.R[:2].T + self.t


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def rotation_from_vector(omega: np.ndarray) -> np.ndarray:
    """Rodrigues: the rotation by |omega| radians about omega."""
    theta = float(np.linalg.norm(omega))
    if theta < 1e-12:
        return np.eye(3) + _skew(omega)
    k = _skew(omega / theta)
    return np.eye(3) + math.sin(theta) * k + (1 - math.cos(theta)) * k @ k


def fit_weak_perspective(
    points_2d: np.ndarray,
    template: np.ndarray = MEAN_FACE_68,
    weights: np.ndarray = LANDMARK_WEIGHTS,
    iterations: int = 30,
) -> WeakPerspective:
    """Weighted least-squares scaled-orthographic fit of image points (N, 2), y up, to template (N, 3).

    Starts from the affine least-squares camera projected onto s * (two orthonormal rows), then
    Gauss-Newton on (rotation increment, s, t) of sum_i w_i |s R[:2] X_i + t - x_i|^2.
    """
    x = np.asarray(points_2d, np.float64)
    X = np.asarray(template, np.float64)
    w = np.asarray(weights, np.float64)
    x_mean = (w[:, None] * x).sum(0) / w.sum()
    X_mean = (w[:, None] * X).sum(0) / w.sum()
    xc, Xc = x - x_mean, X - X_mean
    A = np.linalg.solve(Xc.T @ (w[:, None] * Xc), Xc.T @ (w[:, None] * xc)).T  # (2, 3) affine camera
    U, S, Vt = np.linalg.svd(A, full_matrices=False)
    rows = U @ Vt
    R = np.stack([rows[0], rows[1], np.cross(rows[0], rows[1])])
    s = float(S.mean())
    t = x_mean - s * R[:2] @ X_mean
    sw = np.sqrt(w)[:, None]
    for _ in range(iterations):
        RX = X @ R.T  # (N, 3)
        r = s * RX[:, :2] + t - x  # (N, 2)
        # d(s R exp([omega]x) X)/d omega = -s R [X]x; rows: the two image coordinates of each point.
        J_omega = -s * np.einsum("ij,njk->nik", R[:2], np.stack([_skew(p) for p in X]))  # (N, 2, 3)
        J = np.concatenate([J_omega, RX[:, :2, None], np.broadcast_to(np.eye(2), (len(X), 2, 2))], axis=2)
        Jw = (J * sw[:, :, None]).reshape(-1, 6)
        step, *_ = np.linalg.lstsq(Jw, -(r * sw).reshape(-1), rcond=None)
        R = R @ rotation_from_vector(step[:3])
        s += step[3]
        t = t + step[4:]
        if np.abs(step).max() < 1e-10:
            break
    return WeakPerspective(R, s, t)


def euler_from_rotation(R: np.ndarray) -> tuple[float, float, float]:
    """3DDFA_V2's matrix2angle: (yaw, pitch, roll) in radians.

    yaw = asin(R[2, 0]), pitch = atan2(R[2, 1], R[2, 2]), roll = atan2(R[1, 0], R[0, 0]) (gimbal lock
    at |R[2, 0]| > 0.998 handled as 3DDFA does). A positive yaw puts the camera at the subject's left
    (+x), as a positive yaw in headstyle.cameras does; a positive pitch puts it above the head, which
    headstyle.cameras calls a negative pitch.
    """
    if R[2, 0] > 0.998:
        return math.pi / 2, math.atan2(-R[0, 1], -R[0, 2]), 0.0
    if R[2, 0] < -0.998:
        return -math.pi / 2, math.atan2(R[0, 1], R[0, 2]), 0.0
    yaw = math.asin(R[2, 0])
    c = math.cos(yaw)
    return yaw, math.atan2(R[2, 1] / c, R[2, 2] / c), math.atan2(R[1, 0] / c, R[0, 0] / c)


def rotation_from_euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """The inverse of euler_from_rotation away from gimbal lock: Rz(roll) @ Ry(-yaw) @ Rx(pitch)."""
    cy, sy, cp, sp, cr, sr = (math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch),
                              math.cos(roll), math.sin(roll))  # fmt: skip
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    Ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def camera_label(R: np.ndarray, radius: float = CAMERA_RADIUS, focal: float = DATASET_FOCAL) -> np.ndarray:
    """PanoHead's 25-vector from a head rotation (recrop_images.py eg3dcamparams).

    world2cam = diag(1, -1, -1) (OpenCV) @ translate(0, 0, -radius) @ R; the label is
    [inverse(world2cam) flattened (16), intrinsics (focal, principal point 0.5) flattened (9)].
    """
    rot = np.eye(4)
    rot[:3, :3] = R
    shift = np.eye(4)
    shift[2, 3] = -radius
    world2cam = np.diag([1.0, -1.0, -1.0, 1.0]) @ shift @ rot
    intrinsics = np.array([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1.0]])
    return np.concatenate([np.linalg.inv(world2cam).reshape(16), intrinsics.reshape(9)]).astype(np.float32)
