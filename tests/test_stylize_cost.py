"""The per-iteration savings keep the maths: one tri-grid per identity for every camera (gradients through the
shared planes sum exactly as separate renders would), and a bf16 step stays close to the fp32 one."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.state import AcceleratorState

from headstyle import cameras
from headstyle.generator.checkpoint import load_generator
from headstyle.lab.world.generator import LabGenerator
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.stylize.config import StylizeConfig, apply_overrides
from headstyle.stylize.trainer import Stylizer


def _grads(G, loss) -> dict[str, torch.Tensor]:
    G.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in G.named_parameters() if p.grad is not None}


def _shared_and_separate(G, ws, cams, kw=lambda seed: {}):
    """The same K renders per identity (identity-major) once from one tri-grid per identity and once with the
    backbone per camera; a fixed random weighting of their raw images as the loss. The renders must agree
    (the folded grid_sample reads the same points; the backbone's batch size may change its rounding); returns
    both gradient dicts."""
    k = cams.shape[0] // ws.shape[0]
    weights = torch.randn(cams.shape[0], 3, 1, 1, generator=torch.Generator().manual_seed(7))
    out, images = [], []
    for shared in (True, False):
        planes = G.trigrid(ws) if shared else None
        r = G.synthesis(ws.repeat_interleave(k, 0), cams, render_sr=False, planes=planes, **kw(3))
        images.append(r.image_raw.detach())
        out.append(_grads(G, (r.image_raw * weights).mean()))
    assert torch.allclose(*images, rtol=1e-5, atol=1e-6)
    return out


def test_shared_trigrid_gradients_equal_separate_renders_panohead(parity_dir):
    G = load_generator(parity_dir)
    G.neural_rendering_resolution = 16
    G.rendering_kwargs.update(depth_resolution=6, depth_resolution_importance=6)
    G.requires_grad_(True)
    z = torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(0))
    ws = G.mapping(z, cameras.conditioning_camera().expand(2, -1))
    yaws = torch.tensor([0.3, -0.3, 2.0, 1.0, -2.5, 0.0])
    cams = cameras.cameras(yaws, torch.zeros(6))
    # The renderer's stratified and importance draws come from the same seeded stream in both paths.
    draws = lambda seed: {"generate_background": False, "generator": torch.Generator().manual_seed(seed)}  # noqa: E731
    shared, separate = _shared_and_separate(G, ws.detach(), cams, draws)
    assert shared.keys() == separate.keys() and any(k.startswith("backbone.synthesis") for k in shared)
    for name, g in shared.items():
        scale = separate[name].abs().max().clamp_min(1e-12)
        assert (g - separate[name]).abs().max() / scale < 1e-4, name


def test_shared_trigrid_gradients_equal_separate_renders_lab():
    G = LabGenerator(resolution=12, sr_factor=1, seed=0)
    G.rendering_kwargs["depth_resolution"] = 10
    with torch.no_grad():
        G.backbone.synthesis.fc1.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    ws = G.mapping(torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 25))
    cams = cameras.cameras(torch.tensor([0.0, 0.5, -1.0, 3.0]), torch.zeros(4))
    shared, separate = _shared_and_separate(G, ws, cams)
    assert set(shared) == {"backbone.synthesis.trigrid", "backbone.synthesis.fc0.weight", "backbone.synthesis.fc0.bias",
                           "backbone.synthesis.fc1.weight", "backbone.synthesis.fc1.bias"}  # fmt: skip
    for name, g in shared.items():
        assert torch.allclose(g, separate[name], rtol=1e-5, atol=1e-7), name


def test_planes_must_divide_the_cameras(parity_dir):
    G = load_generator(parity_dir)
    ws = G.mapping(torch.randn(3, G.z_dim), cameras.conditioning_camera().expand(3, -1))
    with pytest.raises(ValueError, match="pass K ws per tri-grid"):
        G.synthesis(ws, cameras.cameras(torch.zeros(3), torch.zeros(3)), render_sr=False, planes=G.trigrid(ws[:2]))


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state (its mixed precision included): start and leave it fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def _one_step(prior: DiffusersPrior, precision: str, tmp_path) -> dict[str, torch.Tensor]:
    cfg = apply_overrides(StylizeConfig(), [
        "prompt.prompt=a pixar face", "run.device=cpu", f"run.mixed_precision={precision}",
        f"run.out={tmp_path / precision}", "single.rank_weights=[1, 0.5, 0.25]", "optim.lr=1e-3",
        "model.prior_image_size=32",
    ])  # fmt: skip
    G = LabGenerator(resolution=16, sr_factor=2, seed=0)
    G.rendering_kwargs["depth_resolution"] = 12
    before = {n: p.detach().clone() for n, p in G.named_parameters()}
    AcceleratorState._reset_state(reset_partial_state=True)
    stylizer = Stylizer(cfg, G, prior)
    metrics = stylizer.step()
    assert metrics["skipped"] == 0 and math.isfinite(metrics["loss"])
    return {n: p.detach() - before[n] for n, p in G.named_parameters() if not torch.equal(p, before[n])}


def test_a_bf16_step_stays_close_to_fp32(tiny_sd, tmp_path, fresh_accelerate):
    """bf16 autocast on generator and prior, fp32 loss maths and optimizer: the Adam update of every trained
    tensor points the same way as in fp32 (cosine >= 0.95)."""
    prior = DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets={}, device="cpu")
    fp32, bf16 = _one_step(prior, "no", tmp_path), _one_step(prior, "bf16", tmp_path)
    assert fp32.keys() == bf16.keys() and fp32
    for name in fp32:
        cos = torch.nn.functional.cosine_similarity(fp32[name].flatten(), bf16[name].flatten(), dim=0)
        assert cos >= 0.95, (name, float(cos))
