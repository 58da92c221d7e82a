import os
from pathlib import Path

import pytest
import torch

# The suite's models are tiny: intra-op threads only add synchronisation, which on 2 busy cores
# measured up to 80x slower (the exact-resume test: 100 s with 2 threads, 1.2 s with 1).
# Subprocesses (CLI, accelerate launch) inherit the variable; this process is set explicitly below.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

def stylised_parity_generator(parity_dir: Path) -> torch.nn.Module:
    """A stand-in 'stylised' generator: the parity fixture with every float weight perturbed by 0.2 std (seed 0)."""
    from headstyle.generator.checkpoint import load_generator

    styled = load_generator(parity_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, v in styled.state_dict().items():
            if v.is_floating_point() and v.numel() > 1 and "resample_filter" not in name:
                v.add_(0.2 * v.std() * torch.randn(v.shape, generator=gen))
    return styled


SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PARITY = SHARED / "fixtures" / "panohead_parity"


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory):
    """Tiny real SD-1.5-layout models (UNet, VAE, CLIP, canny/depth ControlNets) saved once per session."""
    from headstyle.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.getbasetemp() / "tiny_sd")


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not PARITY.is_dir():
        raise FileNotFoundError(f"{PARITY} is missing: CI and developers keep ../shared beside the checkout")
    return PARITY
