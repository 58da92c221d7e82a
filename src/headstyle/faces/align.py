"""PanoHead's crop of a photo (3DDFA_V2_cropping/recrop_images.py), with the pose from headstyle.faces.pose.

1. An FFHQ quad from the eyes and mouth: centre c, half-side vectors x (right) and y (down).
2. The landmarks are mapped into the 512 px crop of that quad, where the head pose is fitted
   (PanoHead runs 3DDFA on that crop, so its rotation is relative to the quad's roll).
3. Re-centre the quad on the projected head centre and rescale it so that QUAD_SPAN_MM of the mean
   face spans it; skip faces whose scale is outside 0.7-1.3, whose centre leaves the crop, or whose
   pose exceeds |yaw| 90, |pitch| 80, |roll| 50 degrees.
4. The final crop: the quad onto 512 px with 10% above and 5% on either side (563 px), drawn at 2x
   with Lanczos and reflected borders, then area-averaged; where the reflection shows, blended with
   a blurred copy. It is then resized to 512 px with Lanczos, as PanoHead's projector loads it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from headstyle.faces.detect import Face, PhotoError
from headstyle.faces.pose import (
    HEAD_CENTRE_MM,
    POSE_LIMITS_DEGREES,
    QUAD_SPAN_MM,
    SCALE_LIMITS,
    WeakPerspective,
    camera_label,
    euler_from_rotation,
    fit_weak_perspective,
)

CROP_SIZE = 512
TOP_EXPAND, SIDE_EXPAND = 0.1, 0.05
UPSAMPLE = 2


@dataclass(frozen=True)
class Quad:
    """An oriented square in the photo: centre c, half-side vectors x (to the right) and y (downwards)."""

    c: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def corners(self) -> np.ndarray:
        """(4, 2) float32: top-left, bottom-left, bottom-right, top-right (PanoHead's order)."""
        c, x, y = self.c, self.x, self.y
        return np.stack([c - x - y, c - x + y, c + x + y, c + x - y]).astype(np.float32)


@dataclass(frozen=True)
class AlignedFace:
    """A face in PanoHead's convention: the 512 px crop (uint8 RGB), its 25-vector camera label, the
    head pose in the crop (3DDFA_V2's yaw, pitch, roll in degrees; the roll is what remains after the
    quad's own rotation), the final quad in the photo and the rescaling s."""

    crop: np.ndarray
    camera: np.ndarray
    yaw: float
    pitch: float
    roll: float
    quad: Quad
    scale: float
    face: Face

    @property
    def photo_roll(self) -> float:
        """The head's roll in the photo's frame (degrees, counter-clockwise on screen positive): the
        quad's rotation plus the residual roll of the pose fitted inside it."""
        return self.roll - math.degrees(math.atan2(self.quad.x[1], self.quad.x[0]))


def ffhq_quad(landmarks: np.ndarray) -> Quad:
    """The FFHQ crop square of 68 landmarks (recrop_images.py get_crop_bound, method 'ffhq')."""
    lm = np.asarray(landmarks, np.float64)
    eye_left, eye_right = lm[36:42].mean(0), lm[42:48].mean(0)
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_eye = eye_right - eye_left
    eye_avg = (eye_left + eye_right) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x = x / np.hypot(*x) * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    return Quad(eye_avg + eye_to_mouth * 0.1, x, y)


def quad_to_crop(quad: Quad, size: int = CROP_SIZE) -> np.ndarray:
    """The (2, 3) affine map taking the quad's corners to the corners of a size x size crop."""
    import cv2

    bound = np.array([[0, 0], [0, size - 1], [size - 1, size - 1]], dtype=np.float32)
    return cv2.getAffineTransform(quad.corners()[:3], bound)


def recentre(quad: Quad, pose: WeakPerspective, size: int = CROP_SIZE) -> tuple[Quad, float, np.ndarray]:
    """Move the quad onto the head centre and rescale it (recrop_images.py, one iteration).

    ``pose`` was fitted in the crop of ``quad`` with y up (y_up = -row). Returns the new quad, the
    scale factor s and the centre offset t in [-1, 1] crop units (x right, y up), as PanoHead's t3d.
    """
    u, v = pose.project(np.asarray(HEAD_CENTRE_MM)[None])[0] * [1.0, -1.0]
    half = 0.5 * (size - 1)
    t = np.array([(u - half) / half, -(v - half) / half])
    s = pose.s * QUAD_SPAN_MM / (size - 1)
    c = quad.c + quad.x * t[0] - quad.y * t[1]
    return Quad(c, quad.x * s, quad.y * s), float(s), t


def crop_final(image: np.ndarray, quad: Quad, size: int = CROP_SIZE) -> np.ndarray:
    """PanoHead's crop_final: the quad onto size px with top/side expansion, reflect padding, blurred borders.

    Returns the (int(size * 1.1), int(size * 1.1)) uint8 crop (563 px for 512).
    """
    import cv2

    crop_w = int(size * (1 + 2 * SIDE_EXPAND))
    crop_h = int(size * (1 + TOP_EXPAND))
    top, left, last = int(size * TOP_EXPAND), int(size * SIDE_EXPAND), size - 1
    bound = np.array([[left, top], [left, top + last], [left + last, top + last]], dtype=np.float32)
    mat = cv2.getAffineTransform(quad.corners()[:3], bound)
    big = cv2.warpAffine(np.ascontiguousarray(image), UPSAMPLE * mat, (crop_w * UPSAMPLE, crop_h * UPSAMPLE),
                         flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REFLECT)
    crop = cv2.resize(big, (crop_w, crop_h), interpolation=cv2.INTER_AREA)
    inside = cv2.warpAffine(np.full(image.shape[:2], 255, np.uint8), mat, (crop_w, crop_h))
    if inside.mean() < 255:
        # Blend towards a blurred copy where the crop left the photo (reflected content).
        mask_kernel = int(last * 0.02) * 2 + 1
        blur_kernel = int(last * 0.03) * 2 + 1
        mask = cv2.blur(inside.astype(np.float32), (mask_kernel, mask_kernel))[..., None] / 255.0
        blurred = cv2.blur(crop, (blur_kernel, blur_kernel))
        crop = (crop * mask + blurred * (1 - mask)).astype(np.uint8)
    return crop


def to_projector_size(crop: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The expanded crop at size x size with Lanczos, as PanoHead's projector resizes its target."""
    return np.array(Image.fromarray(crop).resize((size, size), Image.LANCZOS))


def check_pose(yaw: float, pitch: float, roll: float, scale: float, t: np.ndarray, what: str) -> None:
    """Raise PhotoError if PanoHead's recrop_images.py would skip this face (angles in degrees)."""
    for name, value in (("yaw", yaw), ("pitch", pitch), ("roll", roll)):
        if abs(value) > POSE_LIMITS_DEGREES[name]:
            raise PhotoError(
                f"{what}: head {name} {value:+.0f} degrees is outside PanoHead's limit of "
                f"+-{POSE_LIMITS_DEGREES[name]:.0f}; use a photo where the head faces the camera more"
            )
    if not SCALE_LIMITS[0] <= scale <= SCALE_LIMITS[1]:
        raise PhotoError(
            f"{what}: the head's size disagrees with its eye/mouth crop (scale {scale:.2f}, PanoHead keeps "
            f"{SCALE_LIMITS[0]}-{SCALE_LIMITS[1]}); the landmarks are probably wrong: use a clearer photo"
        )
    if np.abs(t).max() > 1:
        raise PhotoError(f"{what}: the head centre falls outside its crop; the landmarks are probably wrong")


def align_face(image: np.ndarray, face: Face, what: str = "photo") -> AlignedFace:
    """PanoHead's crop and camera label for one detected face of an RGB uint8 photo."""
    quad = ffhq_quad(face.landmarks)
    mat = quad_to_crop(quad)
    in_crop = face.landmarks @ mat[:, :2].T + mat[:, 2]
    pose = fit_weak_perspective(in_crop * [1.0, -1.0])
    yaw, pitch, roll = (math.degrees(a) for a in euler_from_rotation(pose.R))
    final, scale, t = recentre(quad, pose)
    check_pose(yaw, pitch, roll, scale, t, what)
    crop = to_projector_size(crop_final(image, final))
    return AlignedFace(crop, camera_label(pose.R), yaw, pitch, roll, final, scale, face)


def align_photo(
    image: np.ndarray, faces: list[Face], face_index: int | None = None, what: str = "photo"
) -> AlignedFace:
    """Align the largest face, or faces[face_index] (faces as detect_faces orders them: largest first)."""
    if not faces:
        raise PhotoError(f"{what}: no face found; use a photo with a face at least 40 px wide, seen from the front")
    index = 0 if face_index is None else face_index
    if not 0 <= index < len(faces):
        raise PhotoError(f"{what}: --face {face_index} is out of range: {len(faces)} face(s) found (0 = largest)")
    return align_face(image, faces[index], what)
