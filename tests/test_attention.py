"""Style Fusion Attention processors, reference banks and install/uninstall on a tiny real UNet."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from headstyle.attention.banks import write_bank
from headstyle.attention.install import install_style_fusion
from headstyle.attention.layers import self_attention_layers
from headstyle.attention.processors import StyleFusionState, adain, fuse_keys_values
from headstyle.testing import CROSS_ATTENTION_DIM

LATENT_HW = (16, 12)  # non-square, so each layer's token grid must be recovered with the right aspect


@pytest.fixture(scope="module")
def unet(tiny_sd) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_sd.model / "unet").eval()


def _latents(seed: int, n: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, *LATENT_HW, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def context() -> torch.Tensor:
    return torch.randn(1, 5, CROSS_ATTENTION_DIM, generator=torch.Generator().manual_seed(99))


T = torch.tensor([500])


def _eps(unet, x, context, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, T.expand(x.shape[0]), encoder_hidden_states=context.expand(x.shape[0], -1, -1), **kwargs).sample


def test_layer_sets_cover_every_self_attention_layer(unet):
    every = self_attention_layers(unet, "all")
    decoder = self_attention_layers(unet, "decoder")
    # 2 down + 1 mid + 2 * 2 up transformer blocks (up blocks have layers_per_block + 1), one attn1 each
    assert len(every) == 7 and len(decoder) == 4
    assert set(decoder) <= set(every) and all(name.startswith("up_blocks.") for name in decoder)
    assert all(not attn.is_cross_attention for attn in every.values())


def test_empty_banks_equal_stock_attention_and_uninstall_is_exact(unet, context):
    x = _latents(1, 2)
    stock = _eps(unet, x, context)
    originals = {name: attn.processor for name, attn in self_attention_layers(unet).items()}
    with install_style_fusion(unet, StyleFusionState(tau=1.0)):
        fused = _eps(unet, x, context)
    torch.testing.assert_close(fused, stock, atol=1e-5, rtol=0)
    assert torch.equal(_eps(unet, x, context), stock)
    assert all(attn.processor is originals[name] for name, attn in self_attention_layers(unet).items())


def test_decoder_install_leaves_encoder_processors_alone(unet):
    before = {name: attn.processor for name, attn in self_attention_layers(unet).items()}
    fusion = install_style_fusion(unet, where="decoder")
    after = {name: attn.processor for name, attn in self_attention_layers(unet).items()}
    changed = {name for name in before if after[name] is not before[name]}
    fusion.uninstall()
    assert changed == set(fusion.layer_names) == set(self_attention_layers(unet, "decoder"))
    assert all(attn.processor is before[name] for name, attn in self_attention_layers(unet).items())


@pytest.mark.parametrize("pairing", ["paper", "matched"])
def test_self_reference_banks_leave_the_output_unchanged(unet, context, pairing):
    """Attending to an exact copy of one's own keys/values does not change softmax attention:
    banks written on the same x_t at the same t make [K_l, K_hat, K_s] three copies of K_l
    (AdaIN(K, K) = K) at every layer, so the UNet output equals the stock output. This checks that
    banks hold the post-norm inputs of the matching layer and that the main W_K, W_V project them."""
    x = _latents(2)
    stock = _eps(unet, x, context)
    state = StyleFusionState(tau=1.0, pairing=pairing)
    with install_style_fusion(unet, state) as fusion:
        bank = write_bank(unet, x, T, context, fusion.layer_names)
        state.set_banks(bank, [])
        content_only = _eps(unet, x, context)
        state.set_banks(bank, [bank])
        both = _eps(unet, x, context)
        # a two-image content bank (front and back views in the paper): here two more copies
        state.set_banks(write_bank(unet, torch.cat([x, x]), T, context, fusion.layer_names), [])
        two_images = _eps(unet, x, context)
    torch.testing.assert_close(content_only, stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(two_images, stock, atol=1e-5, rtol=0)
    torch.testing.assert_close(both, stock, atol=1e-4, rtol=0)
    assert not torch.allclose(_eps(unet, _latents(3), context), stock, atol=1e-3)


def test_adain_gives_the_style_statistics_over_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 6, generator=g) * 3.0 + 2.0
    y = torch.randn(2, 25, 6, generator=g) * torch.linspace(0.5, 4.0, 6) - torch.linspace(-3, 3, 6)
    out = adain(x, y)
    torch.testing.assert_close(out.mean(dim=1), y.mean(dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=1, unbiased=False), y.std(dim=1, unbiased=False), atol=1e-4, rtol=1e-5)
    # the token pattern is x's: per channel, out is an increasing affine map of x
    torch.testing.assert_close(torch.corrcoef(torch.stack([out[0, :, 0], x[0, :, 0]]))[0, 1], torch.tensor(1.0))
    k_l, k_c, k_s = (torch.randn(1, n, 6, generator=g) * s for n, s in ((9, 1.0), (12, 0.3), (12, 5.0)))
    fused = fuse_keys_values(k_l, k_l, (k_c, k_c), (k_s, k_s), tau=1.05)
    k_hat = fused.key[:, fused.segments["fused"]]
    torch.testing.assert_close(k_hat.mean(dim=1), k_s.mean(dim=1), atol=1e-5, rtol=0)
    # eps in both sigmas: relative std error eps / (2 var(K_c)) = 6e-5 here
    torch.testing.assert_close(k_hat.std(dim=1, unbiased=False), k_s.std(dim=1, unbiased=False), atol=0, rtol=2e-4)
    torch.testing.assert_close(fused.key[:, fused.segments["style"]], 1.05 * k_s)


def test_increasing_tau_increases_attention_mass_on_style_tokens():
    """dM/dtau = M (1 - M) E_softmax[s_style]: the style mass grows with tau when the style logits are
    positive, which non-negative features and projections guarantee here."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k):
            linear.weight.abs_()
    g = torch.Generator().manual_seed(1)
    f_l, f_c, f_s = (torch.rand(1, n, 8, generator=g) for n in (20, 16, 16))
    with torch.no_grad():
        q = attn.to_q(f_l)
        kv = {name: (attn.to_k(f), attn.to_v(f)) for name, f in (("l", f_l), ("c", f_c), ("s", f_s))}
    masses = []
    for tau in (1.0, 1.02, 1.05, 1.07, 1.1, 1.5, 2.0):
        fused = fuse_keys_values(*kv["l"], kv["c"], kv["s"], tau=tau)
        probs = torch.softmax(q @ fused.key.transpose(-1, -2) * attn.scale, dim=-1)
        masses.append(probs[..., fused.segments["style"]].sum(-1).mean().item())
    assert all(b > a for a, b in itertools.pairwise(masses)), masses


def _content_and_styles(unet, context, names):
    content = write_bank(unet, _latents(10), T, context, names)
    style1 = write_bank(unet, _latents(11), T, context, names)
    style2 = write_bank(unet, _latents(12), T, context, names)
    return content, style1, style2


@pytest.mark.parametrize("pairing", ["paper", "matched"])
def test_mask_zero_is_the_content_path_and_mask_one_is_unmasked(unet, context, pairing):
    x = _latents(4)
    state = StyleFusionState(tau=1.05, pairing=pairing)
    with install_style_fusion(unet, state) as fusion:
        content, style, _ = _content_and_styles(unet, context, fusion.layer_names)
        state.set_banks(content, [])
        content_path = _eps(unet, x, context)
        state.set_banks(content, [style])
        unmasked = _eps(unet, x, context)
        image_hw = (4 * LATENT_HW[0], 4 * LATENT_HW[1])
        state.style_mask = torch.zeros(image_hw)
        zero = _eps(unet, x, context)
        state.style_mask = torch.ones(image_hw)
        one = _eps(unet, x, context)
        half = torch.zeros(image_hw)
        half[: image_hw[0] // 2] = 1.0
        state.style_mask = half
        partial = _eps(unet, x, context)
    assert torch.equal(zero, content_path)
    assert torch.equal(one, unmasked)
    assert (unmasked - content_path).abs().max() > 1e-3
    assert (partial - unmasked).abs().max() > 1e-4 and (partial - content_path).abs().max() > 1e-4


def test_alpha_endpoints_reproduce_single_styles(unet, context):
    x = _latents(5)
    state = StyleFusionState(tau=1.05)
    with install_style_fusion(unet, state) as fusion:
        content, style1, style2 = _content_and_styles(unet, context, fusion.layer_names)
        single = []
        for style in (style1, style2):
            state.set_banks(content, [style])
            single.append(_eps(unet, x, context))
        state.set_banks(content, [style1, style2])
        state.alpha = 0.0
        alpha0 = _eps(unet, x, context)
        state.alpha = 1.0
        alpha1 = _eps(unet, x, context)
        state.alpha = 0.5
        blend = _eps(unet, x, context)
        # the same settings as named processor arguments through cross_attention_kwargs
        kwarg0 = _eps(unet, x, context, cross_attention_kwargs={"alpha": 0.0})
    assert torch.equal(alpha0, single[0])
    assert torch.equal(alpha1, single[1])
    assert torch.equal(kwarg0, single[0])
    assert min((blend - s).abs().max() for s in single) > 1e-4


def test_banks_group_images_and_samples(unet, context):
    names = list(self_attention_layers(unet))
    four = _latents(6, 4)
    bank = write_bank(unet, four, T, context, names, images_per_group=2)
    assert bank.groups == 2 and bank.num_images == 2
    single = write_bank(unet, four[2:3], T, context, names)
    for name in names:
        tokens = single.features[name].shape[1]
        torch.testing.assert_close(bank.features[name][1, :tokens], single.features[name][0], atol=1e-5, rtol=0)
    # per-sample content banks: sample i of a CFG-stacked batch [x_a, x_b, x_a, x_b] reads group i % 2
    x = torch.cat([four[0:1], four[2:3]] * 2)
    state = StyleFusionState(tau=1.0)
    with install_style_fusion(unet, state):
        state.set_banks(write_bank(unet, x[:2], T, context, names, images_per_group=1), [])
        grouped = _eps(unet, x, context)
    torch.testing.assert_close(grouped, _eps(unet, x, context), atol=1e-5, rtol=0)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="pairing"):
        StyleFusionState(pairing="swapped")
    with pytest.raises(ValueError, match="alpha"):
        StyleFusionState(alpha=1.5)
    k = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match="same number of images"):
        fuse_keys_values(k, k, (torch.randn(1, 16, 4),) * 2, (k, k), tau=1.05)
