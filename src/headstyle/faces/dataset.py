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


def dataset_json(labels: Iterable[tuple[str, np.ndarray]]) -> str:
    """The dataset.json text for (file name, 25-vector) pairs, formatted as PanoHead writes it."""
    entries = [[name, [format(float(v), ".6f") for v in np.asarray(c).reshape(25)]] for name, c in labels]
    return json.dumps({"labels": entries}, indent="\t") + "\n"


def read_camera(path: str | os.PathLike, image_name: str) -> np.ndarray:
    """The (25,) float32 label of ``image_name`` (matched by file name) in a dataset.json.

    Raises ValueError naming the file and the problem.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        labels = data["labels"]
        table = {Path(str(name)).name: values for name, values in labels}
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a PanoHead dataset.json ({type(exc).__name__}: {exc})") from None
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
