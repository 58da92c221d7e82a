"""PanoHead's dataset.json: {"labels": [[file name, [25 numbers]]]}, the camera label of each crop.

PanoHead's recrop_images.py writes the numbers as strings with six decimals; its dataset loader (and
this reader) accepts strings or numbers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from headstyle.input_files import MiB, read_json_object

# A whole recropped FFHQ-sized dataset's labels (25 six-decimal strings per image) is about 30 MB.
MAX_DATASET_JSON_BYTES = 256 * MiB


def dataset_json(labels: Iterable[tuple[str, np.ndarray]]) -> str:
    """The dataset.json text for (file name, 25-vector) pairs, formatted as PanoHead writes it."""
    entries = [[name, [format(float(v), ".6f") for v in np.asarray(c).reshape(25)]] for name, c in labels]
    return json.dumps({"labels": entries}, indent="\t") + "\n"


def read_camera(path: str | os.PathLike, image_name: str) -> np.ndarray:
    """The (25,) float32 label of ``image_name`` (matched by file name) in a dataset.json.

    Raises ValueError naming the file and the problem.
    """
    path = Path(path)
    data = read_json_object(path, ValueError, "give PanoHead's dataset.json", max_bytes=MAX_DATASET_JSON_BYTES)
    labels = data.get("labels")
    if not isinstance(labels, list) or not all(isinstance(e, list) and len(e) == 2 for e in labels):
        raise ValueError(f"{path}: not a PanoHead dataset.json (field 'labels' must be a list of [name, label] pairs)")
    table = {Path(str(name)).name: values for name, values in labels}
    name = Path(image_name).name
    if name not in table:
        raise ValueError(f"{path}: no label for {name!r} (labels: {', '.join(sorted(table)[:5])})")
    try:
        c = np.asarray([float(v) for v in table[name]], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: label of {name!r} is not 25 numbers ({exc})") from None
    if c.shape != (25,) or not np.isfinite(c).all():
        raise ValueError(f"{path}: label of {name!r} must be 25 finite numbers, got {c.shape}")
    return c
