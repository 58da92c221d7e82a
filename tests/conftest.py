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


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel folder (save_pretrained: config, model.safetensors, tokenizer, image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from headstyle.priors.sd_folder import write_clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    vocab = write_clip_tokenizer(folder, ["portrait", "of", "a", "face", "statue"])
    torch.manual_seed(0)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def depth_dir(tmp_path_factory):
    """A tiny random Depth Anything folder (save_pretrained: config, model.safetensors, image processor)."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    folder = tmp_path_factory.mktemp("depth-anything")
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=28, patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], reassemble_hidden_size=32,
                                 fusion_hidden_size=16, head_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5])
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14,
                      do_pad=False).save_pretrained(folder)  # fmt: skip
    return folder
