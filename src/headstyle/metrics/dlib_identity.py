"""Identity similarity with dlib's 128-D face descriptor: the offline default, no download needed.

dlib's ResNet face-recognition model (``dlib_face_recognition_resnet_model_v1.dat``, shipped by the
PyPI package face-recognition-models beside the detector and landmark models that headstyle.faces
already uses) maps a face, aligned by its 68 landmarks into a 150 px chip with 25% padding, to a
128-D descriptor. Two descriptors closer than 0.6 (Euclidean) belong to the same person: dlib's
operating point, 99.38% on LFW. This is not ArcFace; report it as dlib-ResNet identity distance.

Faces are found with headstyle.faces.detect (dlib's HOG detector, one upsampling); the largest face
of an image is described, and an image without a detectable face gets no descriptor.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from headstyle.faces.detect import Face, detect_faces, model_path

RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
SAME_PERSON_DISTANCE = 0.6
DESCRIPTOR_DIM = 128
CHIP_PADDING = 0.25


@cache
def _recognition_model(path: Path) -> object:
    import dlib

    return dlib.face_recognition_model_v1(str(path))


def _shape(face: Face) -> object:
    """The detector's box and 68 landmarks as the dlib object the recognition model reads."""
    import dlib

    points = [dlib.point(int(x), int(y)) for x, y in face.landmarks]  # dlib's own integer positions
    return dlib.full_object_detection(dlib.rectangle(*face.box), points)


class DlibIdentity:
    """128-D dlib face descriptors of RGB uint8 images; ``path`` is the model file it reads."""

    name = "dlib-resnet-v1"

    def __init__(self) -> None:
        self.path = model_path(RECOGNITION_MODEL)

    def embed(self, images: np.ndarray, faces: list[Face | None]) -> tuple[Tensor, Tensor]:
        """(N, H, W, 3) uint8 and each image's face (None: none found) -> descriptors (N, 128) float64
        (zeros where no face) and found (N,) bool."""
        model = _recognition_model(self.path)
        out = torch.zeros(len(images), DESCRIPTOR_DIM, dtype=torch.float64)
        for i, (image, face) in enumerate(zip(images, faces, strict=True)):
            if face is not None:
                descriptor = model.compute_face_descriptor(np.ascontiguousarray(image), _shape(face), 0, CHIP_PADDING)
                out[i] = torch.tensor(list(descriptor), dtype=torch.float64)
        return out, torch.tensor([f is not None for f in faces], dtype=torch.bool)


def largest_faces(images: np.ndarray) -> list[Face | None]:
    """The largest detectable face of each (H, W, 3) uint8 image (headstyle.faces.detect), or None."""
    return [next(iter(detect_faces(np.ascontiguousarray(image))), None) for image in images]


def descriptor_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance between paired descriptors (..., 128) -> (...,); < 0.6 is the same person."""
    return (a.double() - b.double()).norm(dim=-1)
