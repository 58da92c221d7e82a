import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch

from headstyle.priors.analytic import sd_alphas_cumprod
from headstyle.priors.base import CondOnlyPrior, Control, NoiseQuery, ScorePrior, ddim_timesteps
from headstyle.priors.diffusers_prior import DEFAULT_MODEL, DiffusersPrior, PriorLoadError
from headstyle.priors.loading import PriorSpec, load_prior
from headstyle.testing import IMAGE_SIZE, LATENT_SIZE, build_tiny_sd


@pytest.fixture(scope="module")
def prior(tiny_sd) -> DiffusersPrior:
    return DiffusersPrior.from_pretrained(
        tiny_sd.model, vae=None, controlnets=tiny_sd.controlnets, latent_sample="mean"
    )


def _queries(prior: DiffusersPrior, seed: int = 0) -> list[NoiseQuery]:
    g = torch.Generator().manual_seed(seed)
    emb = prior.embed_prompts("portrait of a werewolf")
    other = prior.embed_prompts("pixar style face", "sketch")
    lat = (4, LATENT_SIZE, LATENT_SIZE)
    canny = Control("canny", (torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) > 0.8).float())
    depth = Control("depth", torch.rand(2, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g), scale=0.7)
    return [
        NoiseQuery(torch.randn(1, *lat, generator=g), torch.tensor([281]), emb, canny),
        NoiseQuery(torch.randn(2, *lat, generator=g), torch.tensor([21, 601]), other, depth),
        NoiseQuery(torch.randn(1, *lat, generator=g), torch.tensor([961]), emb),
    ]


def _reference_eps(prior: DiffusersPrior, b: NoiseQuery) -> tuple[torch.Tensor, torch.Tensor]:
    """One branch by hand through diffusers (the LD script's call pattern): ControlNet, then UNet with residuals."""
    n = b.x_t.shape[0]
    x = torch.cat([b.x_t, b.x_t])
    t = b.t.expand(n).repeat(2)
    text = torch.cat([b.prompt.uncond.expand(n, -1, -1), b.prompt.cond.expand(n, -1, -1)])
    kwargs = {}
    if b.control is not None:
        image = b.control.image.expand(n, 3, -1, -1)
        down, mid = prior.controlnets[b.control.name](
            x, t, encoder_hidden_states=text, controlnet_cond=torch.cat([image, image]),
            conditioning_scale=b.control.scale, return_dict=False,
        )  # fmt: skip
        kwargs = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    eps = prior.unet(x, t, encoder_hidden_states=text, **kwargs).sample
    return eps[:n], eps[n:]


def test_batched_multi_branch_call_equals_separate_calls(prior):
    assert isinstance(prior, ScorePrior)
    branches = _queries(prior)
    with torch.no_grad():
        batched = prior.predict_noise(branches)
        for b, (eu, ec) in zip(branches, batched, strict=True):
            assert eu.dtype == ec.dtype == torch.float32 and eu.shape == b.x_t.shape
            (su, sc), = prior.predict_noise([b])  # fmt: skip
            torch.testing.assert_close(eu, su, rtol=0, atol=1e-5)
            torch.testing.assert_close(ec, sc, rtol=0, atol=1e-5)
            ru, rc = _reference_eps(prior, b)
            torch.testing.assert_close(eu, ru, rtol=0, atol=1e-5)
            torch.testing.assert_close(ec, rc, rtol=0, atol=1e-5)
        # the controls matter (so the test above could fail) and the prompts matter
        (_, nc), = prior.predict_noise([NoiseQuery(branches[0].x_t, branches[0].t, branches[0].prompt)])  # fmt: skip
        assert (nc - batched[0][1]).abs().max() > 1e-2
        assert (batched[2][1] - batched[2][0]).abs().max() > 1e-3


def test_cond_only_call_equals_the_cond_half_of_the_full_call(prior):
    """predict_noise_cond (one UNet call over the cond rows, ControlNets included) gives predict_noise's eps_cond
    for every branch, and through Style Fusion Attention too (the SFA trainer's loss)."""
    from headstyle.attention.prior import StyleFusionPrior

    branches = _queries(prior)
    with torch.no_grad():
        full = prior.predict_noise(branches)
        cond = prior.predict_noise_cond(branches)
        for (_, ec), c, b in zip(full, cond, branches, strict=True):
            assert c.dtype == torch.float32 and c.shape == b.x_t.shape
            torch.testing.assert_close(c, ec, rtol=0, atol=1e-5)
        refs = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(3))
        fused = [StyleFusionPrior(prior, refs[1:], seed=5) for _ in range(2)]
        for sfa in fused:
            sfa.set_content(refs[:1])
        (_, ec), = fused[0].predict_noise(branches[:1])  # fmt: skip
        c = fused[1].predict_noise_cond(branches[:1])[0]
    torch.testing.assert_close(c, ec, rtol=0, atol=1e-5)
    assert (c - cond[0]).abs().max() > 1e-3  # the banks matter


def test_uncond_and_cond_rows_are_not_swapped(prior):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, LATENT_SIZE, LATENT_SIZE, generator=g), torch.tensor([281, 41])
    with torch.no_grad():
        (eu, ec), = prior.predict_noise([NoiseQuery(x, t, prior.embed_prompts("joker face", "statue"))])  # fmt: skip
        (su, sc), = prior.predict_noise([NoiseQuery(x, t, prior.embed_prompts("statue", "joker face"))])  # fmt: skip
    torch.testing.assert_close(eu, sc, rtol=0, atol=1e-5)
    torch.testing.assert_close(ec, su, rtol=0, atol=1e-5)


def test_schedule_codec_and_prompt_cache_through_from_pretrained(prior, tiny_sd):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.testing.assert_close(prior.alphas_cumprod, sd_alphas_cumprod(), rtol=0, atol=0)
    assert torch.equal(prior.inference_timesteps(50), ddim_timesteps(1000, 50))
    assert prior.image_size == IMAGE_SIZE and prior.scaling_factor == 0.18215 and prior.latent_channels == 4

    images = (torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1).requires_grad_(True)
    lat = prior.encode(images)
    vae = AutoencoderKL.from_pretrained(tiny_sd.vae)
    with torch.no_grad():
        torch.testing.assert_close(lat, 0.18215 * vae.encode(images).latent_dist.mean, rtol=1e-5, atol=1e-6)
    lat.sum().backward()  # encode is differentiable w.r.t. the render
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert prior.decode(lat.detach()).shape == images.shape

    emb = prior.embed_prompts("portrait of a werewolf")
    assert prior.embed_prompts("portrait of a werewolf").cond is emb.cond  # cached, not re-encoded
    tok = CLIPTokenizer.from_pretrained(tiny_sd.model / "tokenizer")
    te = CLIPTextModel.from_pretrained(tiny_sd.model / "text_encoder")
    ids = tok(["portrait of a werewolf", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = te(ids)[0]
    torch.testing.assert_close(emb.cond[0], ref[0])
    torch.testing.assert_close(emb.uncond[0], ref[1])
    assert next(prior.text_encoder.parameters()).device.type == "cpu"


def test_separate_vae_folder_gives_the_same_latents(prior, tiny_sd):
    """The "noVAE model + separate VAE" path: a standalone AutoencoderKL folder replaces the model's vae/."""
    sep = DiffusersPrior.from_pretrained(tiny_sd.model, vae=tiny_sd.vae, controlnets={}, latent_sample="mean")
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(sep.encode(images), prior.encode(images))


def test_load_prior_loads_what_the_spec_names(prior, tiny_sd):
    """load_prior(PriorSpec, device) is from_pretrained of the spec, its vae read as the configs read it ("", the
    default: the model's own; "auto": the folder's own vae/; else a VAE folder), and it declares the whole seam."""
    spec = PriorSpec(tiny_sd.model, controlnets=tiny_sd.controlnets, dtype=torch.float32, latent_sample="mean")
    loaded = load_prior(spec, "cpu")
    assert isinstance(loaded, ScorePrior) and isinstance(loaded, CondOnlyPrior) and loaded.predicts_cond_only
    assert not loaded.takes_content and loaded.device == torch.device("cpu")
    assert loaded.control_names == {"canny", "depth"} and loaded.dtype == loaded.vae_dtype == torch.float32
    assert loaded.latent_sample == "mean" and next(loaded.text_encoder.parameters()).device.type == "cpu"
    queries = _queries(prior)
    images = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        for (eu, ec), (ru, rc) in zip(loaded.predict_noise(queries), prior.predict_noise(queries), strict=True):
            assert torch.equal(eu, ru) and torch.equal(ec, rc)
        latents = prior.encode(images)
        for vae in ("auto", tiny_sd.vae):
            other = load_prior(replace(spec, vae=vae, controlnets={}), "cpu")
            assert other.control_names == frozenset()
            torch.testing.assert_close(other.encode(images), latents)
    with pytest.raises(PriorLoadError, match="does not exist"):
        load_prior(PriorSpec(tiny_sd.model.parent / "nope"), "cpu")


def _recast(prior: DiffusersPrior, dtype: torch.dtype) -> DiffusersPrior:
    parts = (copy.deepcopy(prior.unet), copy.deepcopy(prior.vae), copy.deepcopy(prior.text_encoder))
    return DiffusersPrior(*parts, prior.tokenizer, prior.scheduler, copy.deepcopy(prior.controlnets), dtype=dtype)


def test_fp16_weights_keep_an_fp32_vae_and_return_float32(prior):
    half = _recast(prior, torch.float16)
    assert half.vae_dtype == torch.float32 and next(half.vae.parameters()).dtype == torch.float32
    assert next(half.unet.parameters()).dtype == torch.float16
    assert next(half.controlnets["canny"].parameters()).dtype == torch.float16
    b = _queries(prior)[0]
    with torch.no_grad():
        hb = NoiseQuery(b.x_t, b.t, half.embed_prompts("portrait of a werewolf"), b.control)
        (eu, ec), = half.predict_noise([hb])  # fmt: skip
        (_, rc), = prior.predict_noise([b])  # fmt: skip
        lat = half.encode(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert eu.dtype == ec.dtype == lat.dtype == torch.float32
    assert (ec - rc).abs().max() < 0.02 * rc.abs().max()
    bf16 = _recast(prior, torch.bfloat16)  # bf16 has fp32's range: its VAE may stay bf16
    assert bf16.vae_dtype == torch.bfloat16


def test_predict_noise_is_differentiable_for_objectives_that_need_it(prior):
    b = _queries(prior)[0]
    x = b.x_t.clone().requires_grad_(True)
    (eu, ec), = prior.predict_noise([NoiseQuery(x, b.t, b.prompt, b.control)])  # fmt: skip
    (ec - eu).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in prior.unet.parameters())


def test_clear_errors_for_missing_offline_and_wrong_models(tiny_sd, tmp_path):
    with pytest.raises(PriorLoadError, match="does not exist"):
        DiffusersPrior.from_pretrained(tmp_path / "nope", vae=None, controlnets={})
    with pytest.raises(PriorLoadError, match=r"HF_HUB_OFFLINE.*hf download SG161222/Realistic_Vision_V5\.1_noVAE"):
        DiffusersPrior.from_pretrained(DEFAULT_MODEL, vae=None, controlnets={})
    with pytest.raises(PriorLoadError, match=r"hf download stabilityai/sd-vae-ft-mse"):
        DiffusersPrior.from_pretrained(tiny_sd.model, vae="stabilityai/sd-vae-ft-mse")
    weights = next((tiny_sd.model / "unet").glob("*.safetensors"))
    with pytest.raises(PriorLoadError, match="is a file"):
        DiffusersPrior.from_pretrained(weights, vae=None, controlnets={})

    no_vae = tmp_path / "no-vae"
    shutil.copytree(tiny_sd.model, no_vae, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(PriorLoadError, match=r"missing vae/.*separate VAE"):
        DiffusersPrior.from_pretrained(no_vae, vae=None, controlnets={})

    inpaint = tmp_path / "inpaint"
    shutil.copytree(tiny_sd.model, inpaint)
    cfg = json.loads((inpaint / "unet" / "config.json").read_text())
    (inpaint / "unet" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text_time"}))
    with pytest.raises(PriorLoadError, match=r"not a Stable Diffusion 1\.x-family.*SDXL"):
        DiffusersPrior.from_pretrained(inpaint, vae=None, controlnets={})

    from diffusers import ControlNetModel

    foreign = ControlNetModel(
        block_out_channels=(8, 16, 16), layers_per_block=1, cross_attention_dim=32, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
        conditioning_embedding_out_channels=(8, 16, 16),
    )  # fmt: skip
    foreign.save_pretrained(tmp_path / "foreign-cn")
    with pytest.raises(PriorLoadError, match="'depth' was made for another base model"):
        DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets={"depth": tmp_path / "foreign-cn"})


def test_unknown_control_name_is_a_clear_error(prior):
    b = _queries(prior)[0]
    with pytest.raises(KeyError, match="no ControlNet named 'normal'"), torch.no_grad():
        prior.predict_noise([NoiseQuery(b.x_t, b.t, b.prompt, Control("normal", b.control.image))])


def test_tiny_models_are_deterministic_in_the_seed_and_reused(tiny_sd, tmp_path):
    from safetensors.torch import load_file

    again = build_tiny_sd(tiny_sd.model.parent.parent)  # same root and seed: reused, not rebuilt
    assert again == tiny_sd
    marker = tiny_sd.model.parent / "headstyle_tiny_sd.json"
    stamp = marker.stat().st_mtime_ns
    build_tiny_sd(tiny_sd.model.parent.parent)
    assert marker.stat().st_mtime_ns == stamp
    fresh = build_tiny_sd(tmp_path)
    for rel in ["tiny-sd/unet", "tiny-sd/text_encoder", "controlnet-depth"]:
        a = load_file(next((tiny_sd.model.parent / rel).glob("*.safetensors")))
        b = load_file(next((fresh.model.parent / rel).glob("*.safetensors")))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    canny = load_file(next(tiny_sd.controlnets["canny"].glob("*.safetensors")))
    depth = load_file(next(tiny_sd.controlnets["depth"].glob("*.safetensors")))
    assert not torch.equal(canny["controlnet_mid_block.weight"], depth["controlnet_mid_block.weight"])
    assert (tiny_sd.model / "model_index.json").is_file() and (tiny_sd.model / "tokenizer" / "merges.txt").is_file()
