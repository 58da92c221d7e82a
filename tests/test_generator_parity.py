"""The generator reproduces PanoHead's outputs (fixtures/panohead_parity) and StyleGAN2's resampling numerics."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from headstyle.generator import TriPlaneGenerator
from headstyle.generator.layers import (
    conv2d_resample,
    downsample2d,
    modulated_conv2d,
    setup_filter,
    upfirdn2d,
    upsample2d,
)
from headstyle.generator.renderer import RenderDraws
from headstyle.generator.triplane import pad_ws

# The fixture README's suggested tolerances for an independent fp32 implementation.
ATOL = 1e-4
DEPTH_RTOL = 1e-4

SYNTHESIS_RUNS = {  # run -> (run whose ws it renders, run whose c it uses)
    "case0": ("case0", "case0"),
    "case1": ("case1", "case1"),
    "case2": ("case2", "case2"),
    "case0_mirror": ("case0", "case0_mirror"),
    "case1_mirror": ("case1", "case1_mirror"),
}


@pytest.fixture(scope="module")
def config(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def io(parity_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(parity_dir / "io.safetensors")


@pytest.fixture(scope="module")
def G(parity_dir: Path, config: dict) -> TriPlaneGenerator:
    reduced = config["reduced"]
    kwargs = {k: v for k, v in reduced["G_kwargs"].items() if k != "class_name"}
    G = TriPlaneGenerator(**kwargs, **reduced["common_kwargs"])
    G.load_state_dict(load_file(parity_dir / "params.safetensors"), strict=True)
    G.neural_rendering_resolution = reduced["neural_rendering_resolution"]
    return G.eval().requires_grad_(False)


def _draws(io: dict, run: str) -> RenderDraws:
    return RenderDraws(io[f"{run}.rand.stratified_jitter"], io[f"{run}.rand.importance_u"])


def _assert_close(got: torch.Tensor, want: torch.Tensor, name: str, atol: float = ATOL, rtol: float = 0.0) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    bound = atol + rtol * want.abs()
    assert bool((err <= bound).all()), f"{name}: max abs error {err.max().item():.3g} (atol {atol}, rtol {rtol})"


def _assert_depth_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= DEPTH_RTOL, f"{name}: max relative depth error {rel:.3g}"


class _Recorder:
    """Forward hooks that keep what the renderer returns and what torgb receives (the SR's feature input)."""

    def __init__(self, G: TriPlaneGenerator) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [
            G.renderer.register_forward_hook(self._renderer),
            G.torgb.register_forward_pre_hook(self._torgb),
        ]

    def _renderer(self, module, args, output) -> None:
        self.values["renderer.rgb_final"], self.values["renderer.depth_final"], self.values["renderer.weights_sum"] = (
            output
        )

    def _torgb(self, module, args) -> None:
        self.values["sr_in.feature_image"] = args[0]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# Mapping and camera offset


@pytest.mark.parametrize("case", ["case0", "case1", "case2"])
def test_mapping_and_delta_c_match_panohead(G: TriPlaneGenerator, io: dict, config: dict, case: str) -> None:
    z, c = io[f"{case}.z"], io[f"{case}.c"]
    psi, cutoff = config["forward"]["mapping"]["truncation_psi"], config["forward"]["mapping"]["truncation_cutoff"]
    _assert_close(G.mapping(z, c, truncation_psi=psi, truncation_cutoff=cutoff), io[f"{case}.ws"], "ws")
    _assert_close(G.mapping(z, c, truncation_psi=1.0), io[f"{case}.ws_psi1"], "ws_psi1")
    c_new, delta_c = G.apply_delta_c(z, c, truncation_psi=psi, truncation_cutoff=cutoff)
    _assert_close(delta_c, io[f"{case}.delta_c"], "delta_c", atol=1e-6)
    _assert_close(c_new, io[f"{case}.c_with_delta"], "c_with_delta", atol=1e-6)
    untouched = [i for i in range(25) if i not in (3, 7, 11)]
    assert torch.equal(c_new[:, untouched], c[:, untouched])


# ---------------------------------------------------------------------------------------------
# Synthesis: tri-grid, renderer, background, raw image, depth, mask (every run)


def _check_raw_outputs(G: TriPlaneGenerator, io: dict, run: str, out, recorded: dict) -> None:
    planes = out.planes.reshape(1, -1, *out.planes.shape[-2:])
    if f"{run}.planes" in io:
        _assert_close(planes, io[f"{run}.planes"], "planes")
    elif f"{run}.planes_s3" in io:
        _assert_close(planes[..., ::3, ::3], io[f"{run}.planes_s3"], "planes_s3")
    _assert_close(recorded["renderer.rgb_final"], io[f"{run}.renderer.rgb_final"], "renderer.rgb_final")
    _assert_close(recorded["renderer.weights_sum"], io[f"{run}.renderer.weights_sum"], "renderer.weights_sum")
    _assert_depth_close(recorded["renderer.depth_final"], io[f"{run}.renderer.depth_final"], "renderer.depth_final")
    _assert_close(recorded["sr_in.feature_image"], io[f"{run}.sr_in.feature_image"], "sr_in.feature_image")
    _assert_close(out.image_raw, io[f"{run}.out.image_raw"], "image_raw")
    _assert_close(out.image_raw, io[f"{run}.sr_in.rgb"], "sr_in.rgb")
    _assert_depth_close(out.depth, io[f"{run}.out.image_depth"], "image_depth")
    _assert_close(out.mask, io[f"{run}.out.image_mask"], "image_mask")


@pytest.mark.parametrize("run", list(SYNTHESIS_RUNS))
def test_raw_render_matches_panohead(G: TriPlaneGenerator, io: dict, run: str) -> None:
    ws_run, c_run = SYNTHESIS_RUNS[run]
    ws = io[f"{ws_run}.ws"]
    recorder = _Recorder(G)
    try:
        out = G.synthesis(ws, io[f"{c_run}.c"], noise_mode="const", render_sr=False, draws=_draws(io, run))
    finally:
        recorder.close()
    assert out.image is None
    assert out.planes.shape == (1, 3, 96, 32, 32)
    _check_raw_outputs(G, io, run, out, recorder.values)
    bcg = G.background(ws, G.neural_rendering_resolution, noise_mode="const")
    _assert_close(bcg, io[f"{run}.bcg_resized"], "bcg_resized")


def test_forward_composes_mapping_delta_c_and_synthesis(G: TriPlaneGenerator, io: dict, config: dict) -> None:
    fwd = config["forward"]["mapping"]
    recorder = _Recorder(G)
    try:
        out = G(io["case0.z"], io["case0.c"], truncation_psi=fwd["truncation_psi"],
                truncation_cutoff=fwd["truncation_cutoff"], noise_mode="const", render_sr=False,
                draws=_draws(io, "case0_forward"))
    finally:
        recorder.close()
    _check_raw_outputs(G, io, "case0_forward", out, recorder.values)
    # The offset camera matters: rendering at the plain camera gives other rays.
    plain = G.synthesis(io["case0.ws"], io["case0.c"], render_sr=False, draws=_draws(io, "case0_forward"))
    assert (plain.depth - out.depth).abs().max() > 1e-3


def test_global_seed_replays_panohead_draws(G: TriPlaneGenerator, io: dict, config: dict) -> None:
    """Without injected draws the renderer draws from the global RNG in the original's order."""
    seed = config["forward"]["synthesis_seeds"]["case1"]
    torch.manual_seed(seed)
    out = G.synthesis(io["case1.ws"], io["case1.c"], noise_mode="const", render_sr=False)
    _assert_close(out.image_raw, io["case1.out.image_raw"], "image_raw")
    _assert_depth_close(out.depth, io["case1.out.image_depth"], "image_depth")
    _assert_close(out.mask, io["case1.out.image_mask"], "image_mask")


# ---------------------------------------------------------------------------------------------
# Super-resolution and the final image


def test_superresolution_input_resize_matches_panohead(G: TriPlaneGenerator, io: dict) -> None:
    rgb_128, feature_128 = G.superresolution.resize_inputs(io["case0.sr_in.rgb"], io["case0.sr_in.feature_image"])
    assert feature_128.shape == (1, 32, 128, 128)
    _assert_close(rgb_128, io["case0.sr.rgb_128"], "sr.rgb_128")


@pytest.mark.parametrize("run", ["case0", "case1_mirror"])
def test_final_image_matches_panohead(G: TriPlaneGenerator, io: dict, run: str) -> None:
    """End to end with the 8x SR; case1_mirror is the informative mirrored camera (a yaw -0.6 view)."""
    ws_run, c_run = SYNTHESIS_RUNS[run]
    seen = {}
    sr = G.superresolution
    handles = [
        sr.block0.register_forward_hook(lambda module, args, output: seen.update(block0_img=output[1])),
        sr.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True),
    ]
    try:
        out = G.synthesis(io[f"{ws_run}.ws"], io[f"{c_run}.c"], noise_mode="const", draws=_draws(io, run))
    finally:
        for handle in handles:
            handle.remove()
    # The SR ignores the caller's noise mode and uses rendering_kwargs['superresolution_noise_mode'].
    assert seen["noise_mode"] == G.rendering_kwargs["superresolution_noise_mode"] == "none"
    assert out.image.shape == (1, 3, 512, 512)
    if f"{run}.sr.block0_img" in io:
        _assert_close(seen["block0_img"], io[f"{run}.sr.block0_img"], "sr.block0_img", rtol=1e-4)
    if f"{run}.out.image" in io:
        _assert_close(out.image, io[f"{run}.out.image"], "image", rtol=1e-4)
    else:
        _assert_close(out.image[..., ::3, ::3], io[f"{run}.out.image_s3"], "image_s3", rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Invariants: determinism, noise modes, fused vs unfused modulation, ws padding, parameter selection


def test_fixed_generator_seed_renders_identically(G: TriPlaneGenerator, io: dict) -> None:
    ws, c = io["case1.ws"], io["case1.c"]

    def render(seed: int):
        return G.synthesis(ws, c, noise_mode="random", render_sr=False, generator=torch.Generator().manual_seed(seed))

    a, b, other = render(7), render(7), render(8)
    assert torch.equal(a.image_raw, b.image_raw) and torch.equal(a.depth, b.depth) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.image_raw, other.image_raw)


def test_without_background_equals_a_zero_background(
    G: TriPlaneGenerator, io: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, c = io["case1.ws"], io["case1.c"]

    def render(**kwargs):
        return G.synthesis(ws, c, render_sr=False, draws=_draws(io, "case1"), **kwargs)

    with_bcg, without = render(), render(generate_background=False)
    assert torch.equal(with_bcg.mask, without.mask) and torch.equal(with_bcg.depth, without.depth)
    assert (with_bcg.image_raw - without.image_raw).abs().max() > 1e-3
    monkeypatch.setattr(G, "background", lambda ws, size, **_: torch.zeros(ws.shape[0], 32, size, size))
    assert torch.equal(render().image_raw, without.image_raw)


def test_noise_modes_agree_when_noise_strength_is_zero(G: TriPlaneGenerator, io: dict) -> None:
    ws, c, draws = io["case0.ws"], io["case0.c"], _draws(io, "case0")
    const = G.synthesis(ws, c, noise_mode="const", render_sr=False, draws=draws).image_raw
    none = G.synthesis(ws, c, noise_mode="none", render_sr=False, draws=draws).image_raw
    assert (const - none).abs().max() > 1e-3  # the fixture's noise strengths are non-zero

    silent = copy.deepcopy(G)
    for name, p in silent.named_parameters():
        if name.endswith("noise_strength"):
            p.zero_()
    outs = [silent.synthesis(ws, c, noise_mode=mode, render_sr=False, draws=draws, generator=torch.Generator())
            for mode in ("const", "random", "none")]
    for out in outs[1:]:
        assert torch.equal(out.image_raw, outs[0].image_raw)
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(ws, c, noise_mode="fixed", render_sr=False, draws=draws)


def test_training_mode_unfused_modconv_matches_inference(G: TriPlaneGenerator, io: dict) -> None:
    """fused_modconv='inference_only': grouped conv in eval, scaled activations in train; same maths."""
    ws, c, draws = io["case2.ws"], io["case2.c"], _draws(io, "case2")
    fused = G.synthesis(ws, c, render_sr=False, draws=draws)
    unfused_G = copy.deepcopy(G).train()
    unfused = unfused_G.synthesis(ws, c, render_sr=False, draws=draws)
    _assert_close(unfused.planes, fused.planes, "planes", atol=1e-5)
    _assert_close(unfused.image_raw, fused.image_raw, "image_raw", atol=1e-5)


def test_batched_render_matches_single_renders(G: TriPlaneGenerator, io: dict) -> None:
    """Per-sample modulation (grouped conv over the batch) keeps the samples independent."""
    runs = ["case0", "case1"]
    ws = torch.cat([io[f"{r}.ws"] for r in runs])
    c = torch.cat([io[f"{r}.c"] for r in runs])
    draws = RenderDraws(torch.cat([_draws(io, r).stratified_jitter for r in runs]),
                        torch.cat([_draws(io, r).importance_u for r in runs]))
    batched = G.synthesis(ws, c, render_sr=False, draws=draws)
    for i, run in enumerate(runs):
        # Depth is clamped to the range of the whole batch (as in PanoHead), so compare the rest.
        _assert_close(batched.image_raw[i : i + 1], io[f"{run}.out.image_raw"], f"{run} image_raw")
        _assert_close(batched.mask[i : i + 1], io[f"{run}.out.image_mask"], f"{run} image_mask")


def test_background_ws_repeat_the_last_w() -> None:
    ws = torch.arange(8.0).reshape(1, 8, 1).expand(2, 8, 4)
    padded = pad_ws(ws, 12)
    assert padded.shape == (2, 12, 4)
    assert torch.equal(padded[:, :8], ws)
    assert torch.equal(padded[:, 8:], ws[:, 7:8].expand(2, 4, 4))
    assert torch.equal(pad_ws(padded, 5), padded[:, :5])


def test_trainable_parameters_select_ld_weights(G: TriPlaneGenerator) -> None:
    params = G.trainable_parameters()
    names = {id(p): n for n, p in G.named_parameters()}
    selected = [names[id(p)] for p in params]
    assert selected and all(n.startswith(("backbone.synthesis.", "superresolution.")) for n in selected)
    assert not any(n.endswith(".bias") for n in selected)
    assert "backbone.synthesis.b4.conv1.noise_strength" in selected
    assert "backbone.synthesis.b4.conv1.affine.weight" in selected
    expected = [n for n, _ in G.named_parameters()
                if n.startswith(("backbone.synthesis.", "superresolution.")) and not n.endswith(".bias")]
    assert selected == expected
    with_bias = {names[id(p)] for p in G.trainable_parameters(("decoder",), train_biases=True)}
    assert with_bias == {"decoder.net.0.weight", "decoder.net.0.bias", "decoder.net.2.weight", "decoder.net.2.bias"}
    with pytest.raises(ValueError, match="unknown modules"):
        G.trainable_parameters(("backbone.synthesis.b999",))


# ---------------------------------------------------------------------------------------------
# Resampling numerics against scipy and the direct definition


def test_upsample2d_and_downsample2d_match_scipy_upfirdn() -> None:
    taps = np.array([1.0, 3.0, 3.0, 1.0]) / 8
    f = setup_filter().double()
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 8))
    xt = torch.from_numpy(x)
    # scipy's full-length output, cropped so that output pixel i sits at the input centre i / 2.
    up = scipy.signal.upfirdn(2 * taps, scipy.signal.upfirdn(2 * taps, x, up=2, axis=-1), up=2, axis=-2)
    np.testing.assert_allclose(upsample2d(xt, f).numpy(), up[..., 1:13, 1:17], atol=1e-12)
    full = scipy.signal.upfirdn(taps, scipy.signal.upfirdn(taps, x, axis=-1), axis=-2)
    np.testing.assert_allclose(downsample2d(xt, f).numpy(), full[..., 2:8:2, 2:10:2], atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_upsampling_conv_equals_upsample_then_convolve(groups: int) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(6, 4 // groups, 3, 3, generator=gen, dtype=torch.float64)
    f = setup_filter().double()
    got = conv2d_resample(x, w, f=f, up=2, padding=1, groups=groups, flip_weight=False)
    # Definition: zero-insert, pad, FIR-filter (gain 4), then a true convolution with w.
    want = F.conv2d(upfirdn2d(x, f, up=2, padding=(3, 2, 3, 2), gain=4), w.flip([2, 3]), groups=groups)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("up", [1, 2])
def test_fused_and_unfused_modulated_conv_agree(up: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    styles = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    noise = torch.randn(2, 1, 6 * up, 6 * up, generator=gen, dtype=torch.float64)
    f = setup_filter().double()
    kwargs = {"up": up, "padding": 1, "resample_filter": f, "flip_weight": up == 1, "noise": noise}
    fused = modulated_conv2d(x, weight, styles, fused_modconv=True, **kwargs)
    unfused = modulated_conv2d(x, weight, styles, fused_modconv=False, **kwargs)
    torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-12)
    if up == 1:
        # Definition (StyleGAN2 eq. 1-3): w'_oik = s_i w_oik / sqrt(sum_ik (s_i w_oik)^2 + 1e-8), per sample.
        modulated = weight[None] * styles[:, None, :, None, None]
        demodulated = modulated * (modulated.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()[..., None, None, None]
        want = torch.cat([F.conv2d(x[n : n + 1], demodulated[n], padding=1) for n in range(2)]) + noise
        torch.testing.assert_close(fused, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_modulated_conv_is_prenormalised(fused: bool) -> None:
    """fp16 activations (the SR on CUDA): weights and styles are pre-scaled so that the products cannot overflow,
    and demodulation removes the scale again."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 8, 8, generator=gen)
    weight = torch.randn(4, 8, 3, 3, generator=gen) * 1000
    styles = torch.randn(2, 8, generator=gen) * 100  # unscaled, the unfused conv reaches ~1e6 > 65504
    kwargs = {"up": 2, "padding": 1, "resample_filter": setup_filter(), "flip_weight": False, "fused_modconv": fused}
    want = modulated_conv2d(x, weight, styles, **kwargs)
    got = modulated_conv2d(x.half(), weight, styles, **kwargs)
    assert got.dtype == torch.float16 and bool(got.isfinite().all())
    _assert_close(got.float(), want, "fp16 modconv", atol=5e-3, rtol=5e-3)
