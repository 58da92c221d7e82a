"""Reading photos and finding faces: dlib's HOG frontal-face detector and its 68-landmark shape predictor.

The models ship in the PyPI package face-recognition-models; they are opened by path, because
importing that package needs pkg_resources (removed from recent setuptools). The detector runs on
the grey image with one upsampling, as PanoHead's dlib_kps.py does.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import ImageOps

from headstyle.input_files import read_image

LANDMARK_MODEL = "shape_predictor_68_face_landmarks.dat"
MODELS_PACKAGE = "face_recognition_models"
# dlib's detector sees faces of about 80 px and larger; one pyramid upsampling halves that.
DETECTOR_UPSAMPLE = 1


class PhotoError(ValueError):
    """A photo that cannot be used: unreadable, no face, a pose or size outside PanoHead's limits."""


@dataclass(frozen=True)
class Face:
    """One detected face: box (x0, y0, x1, y1) in pixels, detector score, landmarks (68, 2) as (x, y)."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> int:
        x0, y0, x1, y1 = self.box
        return max(0, x1 - x0) * max(0, y1 - y0)


def load_photo(path: str | os.PathLike) -> np.ndarray:
    """An RGB uint8 (H, W, 3) array from an image file, turned upright by its EXIF orientation."""
    image = read_image(path, PhotoError, "give a JPEG or PNG")
    return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def model_path(name: str) -> Path:
    """Path of a dlib model file inside the installed face-recognition-models package (not imported)."""
    spec = importlib.util.find_spec(MODELS_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "models" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found: install the dlib models with `pip install face-recognition-models`")


@cache
def _dlib_models() -> tuple[object, object]:
    import dlib

    return dlib.get_frontal_face_detector(), dlib.shape_predictor(str(model_path(LANDMARK_MODEL)))


def grey(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an RGB uint8 image (OpenCV's RGB2GRAY, as PanoHead's cv2 BGR2GRAY on BGR)."""
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def detect_faces(image: np.ndarray) -> list[Face]:
    """Faces in an RGB uint8 image, largest box first (ties: higher detector score first)."""
    import dlib

    detector, predictor = _dlib_models()
    g = grey(image)
    rects, scores, _ = detector.run(g, DETECTOR_UPSAMPLE, 0.0)
    faces = []
    for rect, score in zip(rects, scores, strict=True):
        shape = predictor(g, dlib.rectangle(rect.left(), rect.top(), rect.right(), rect.bottom()))
        landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        faces.append(Face((rect.left(), rect.top(), rect.right(), rect.bottom()), float(score), landmarks))
    return sorted(faces, key=lambda f: (-f.area, -f.score))
