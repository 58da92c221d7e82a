"""Seeds: one reproducible stream per (run seed, process), and the global RNGs third-party code draws from."""

from __future__ import annotations

import random

import numpy as np
import torch


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible 63-bit seed per (run seed, process rank)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed the global RNGs the generator's renderer and libraries draw from (per process)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global stream third-party code draws from)
    torch.manual_seed(seed)
