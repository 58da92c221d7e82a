"""The learned lab prior's training code, on the tiny config: data, losses, exact resume, the SD folder it writes."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from headstyle.cli import main
from headstyle.lab.prior import data as lab_data
from headstyle.lab.prior import models as lab_models
from headstyle.lab.prior import recipe
from headstyle.lab.prior import train as tp
from headstyle.lab.world import identities
from headstyle.lab.world.identities import LeakError, held_out_z
from headstyle.training import checkpointing

TINY = recipe.CONFIGS["tiny"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage of the tiny config, trained once for this module."""
    out = tmp_path_factory.mktemp("prior-run")
    tp.train_prior(out, TINY, progress=False)
    return out


def test_batches_are_the_lab_images(run: Path) -> None:
    """Single views are raw x2 bilinear with their Canny; grids tile four distinct raw views of one identity."""
    data = lab_data.load_data(run)
    assert data.raw.shape == (len(recipe.DOMAINS), TINY.identities * TINY.views, 3, TINY.resolution, TINY.resolution)
    batch = lab_data.sample_batch(data, 12, 0.5, torch.Generator().manual_seed(1))
    size = 2 * TINY.resolution
    assert batch.images.shape == batch.controls.shape == (12, 3, size, size)
    assert batch.grid.any() and (~batch.grid).any()
    raw = data.raw.float() / 127.5 - 1
    for k in range(12):
        d = int(batch.domains[k])
        if batch.grid[k]:
            h = size // 2
            tiles = [batch.images[k, :, i : i + h, j : j + h] for i in (0, h) for j in (0, h)]
            rows = [int(((raw[d] - t).abs().flatten(1).amax(1) == 0).nonzero()[0]) for t in tiles]
            assert len(set(rows)) == 4 and len({r // TINY.views for r in rows}) == 1
        else:
            views = lab_data.single_view(raw[d])
            i = next(i for i in range(len(views)) if torch.equal(batch.images[k], views[i]))
            # the Canny edges (0/1) of that view, as the trainer's canny control
            assert torch.equal(batch.controls[k], data.canny[d, i].float().expand(3, -1, -1))
    assert data.canny.amax() == 1 and data.canny.float().mean() > 0.01


def test_prior_identities_exclude_the_held_out_set() -> None:
    z = lab_data.prior_identities(TINY)
    assert torch.cdist(z, held_out_z(16)).min() > 1e-3
    with pytest.raises(LeakError):
        identities.check_disjoint(torch.cat([z, held_out_z(16)[3:4]]), held_out_z(16))


def test_prompt_dropout_and_phrasings() -> None:
    """Dropped prompts are "" (index 0); kept ones are phrasings of the sample's own domain."""
    table = recipe.prompt_table()
    domains = torch.arange(len(recipe.DOMAINS)).repeat(400)
    idx = lab_data.sample_prompts(domains, 0.15, torch.Generator().manual_seed(0))
    drop = idx == 0
    assert 0.12 < drop.float().mean() < 0.18
    for d, i in zip(domains[~drop].tolist(), idx[~drop].tolist(), strict=True):
        assert table[i] in recipe.PHRASINGS[recipe.DOMAINS[d]]


def _decreases(loss_fn, model, steps: int = 15, lr: float = 3e-3) -> tuple[float, float]:
    """Loss on one fixed batch (fixed noise: the generator is reset every step) before and after AdamW steps."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(steps):
        loss = loss_fn(torch.Generator().manual_seed(5))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss_fn(torch.Generator().manual_seed(5)).item()


def test_each_stage_loss_decreases_on_a_fixed_batch(run: Path) -> None:
    from diffusers import UNet2DConditionModel

    data = lab_data.load_data(run)
    batch = lab_data.sample_batch(data, 4, 0.5, torch.Generator().manual_seed(2))
    abar = lab_models.ddim_scheduler().alphas_cumprod.float()
    prompts = lab_data.sample_prompts(batch.domains, 0.0, torch.Generator())
    text = lab_models.embed_prompts(run / "model", recipe.prompt_table())[prompts]

    vae = lab_models.build_vae(TINY, 2 * TINY.resolution)
    before, after = _decreases(lambda g: lab_models.vae_loss(vae, batch.images, g, TINY.kl_weight), vae)
    assert after < 0.8 * before

    trained_vae = tp._load_vae(run)
    latents = lab_models.encode_latents(trained_vae, batch.images, torch.Generator().manual_seed(3))
    unet = lab_models.build_unet(TINY, latents.shape[-1])
    before, after = _decreases(lambda g: lab_models.eps_loss(unet, latents, text, abar, g), unet)
    assert after < 0.9 * before

    frozen = UNet2DConditionModel.from_pretrained(run / "model" / "unet").requires_grad_(False)
    net = lab_models.build_controlnet(TINY, frozen, "depth")

    def cn_loss(g: torch.Generator) -> torch.Tensor:
        def residuals(x_t, t):
            down, mid = net(x_t, t, encoder_hidden_states=text, controlnet_cond=batch.controls, return_dict=False)
            return list(down), mid

        return lab_models.eps_loss(frozen, latents, text, abar, g, residuals)

    before, after = _decreases(cn_loss, net)
    assert after < 0.95 * before
    assert all(not p.requires_grad for p in frozen.parameters())


def test_resume_is_bitwise_exact(tmp_path: Path, run: Path) -> None:
    """A stage interrupted after a checkpoint and resumed ends with the weights of an uninterrupted run."""
    data = lab_data.load_data(run)
    vae = tp._load_vae(run)
    text = lab_models.embed_prompts(run / "model", recipe.prompt_table())
    abar = lab_models.ddim_scheduler().alphas_cumprod.float()
    cfg = replace(TINY, checkpoint_seconds=0.0)

    def train(out: Path, stop_at: int | None) -> dict[str, torch.Tensor]:
        unet = lab_models.build_unet(cfg, 2 * cfg.resolution // 4)
        calls = []

        def loss_fn(gen: torch.Generator) -> torch.Tensor:
            calls.append(1)
            if stop_at is not None and len(calls) > stop_at:
                raise KeyboardInterrupt
            b = lab_data.sample_batch(data, 4, 0.5, gen)
            prompts = lab_data.sample_prompts(b.domains, 0.15, gen)
            return lab_models.eps_loss(unet, lab_models.encode_latents(vae, b.images, gen), text[prompts], abar, gen)

        tp.run_stage(out, "unet", unet, loss_fn, 6, 1e-3, cfg, False, seed=7)
        return unet.state_dict()

    straight = train(tmp_path / "a", None)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "b", 3)
    run = tp.stage_folder(tmp_path / "b", "unet")
    assert [c.name for c in checkpointing.list_checkpoints(run)] == ["iter_0000003"]
    resumed = train(tmp_path / "b", None)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    steps = [json.loads(ln)["iteration"] for ln in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


def test_output_loads_as_a_stable_diffusion_folder(run: Path) -> None:
    """DiffusersPrior.from_pretrained loads the folder with both ControlNets; latents have unit std as SD scales
    them; every prompt word is one token; the depth ControlNet changes eps on a grid."""
    from headstyle.priors.base import Control, NoiseQuery
    from headstyle.priors.diffusers_prior import DiffusersPrior

    model = run / "model"
    prior = DiffusersPrior.from_pretrained(
        model, vae=None, controlnets={n: model / f"controlnet-{n}" for n in recipe.CONTROLNETS}, device="cpu"
    )
    assert prior.image_size == 2 * TINY.resolution
    assert json.loads((model / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert prior.scheduler.config.beta_schedule == "scaled_linear" and prior.scheduler.config.beta_end == 0.012
    words = lab_models.prompt_words()
    ids = prior.tokenizer(words, add_special_tokens=False).input_ids
    assert all(len(i) == 1 for i in ids)

    data = lab_data.load_data(run)
    batch = lab_data.sample_batch(data, 32, 0.5, torch.Generator().manual_seed(4))
    with torch.no_grad():
        latents = prior.encode(batch.images, generator=torch.Generator().manual_seed(0))
        assert 0.6 < float(latents.std()) < 1.5
        x_t = prior.add_noise(latents[:2], torch.randn_like(latents[:2]), torch.tensor([500]))
        prompt = prior.embed_prompts(recipe.PHRASINGS["statue"][0])
        plain = prior.predict_noise([NoiseQuery(x_t, torch.tensor([500]), prompt)])[0][1]
        control = Control("depth", batch.controls[:2])
        with_depth = prior.predict_noise([NoiseQuery(x_t, torch.tensor([500]), prompt, control)])[0][1]
    assert torch.isfinite(with_depth).all()
    assert not torch.equal(plain, with_depth)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{tmp}/x", "--stage", "nope"], "--stage 'nope' is unknown"),
        (["--out", "{run}", "--config", "tiny"], "pass --resume"),
        (["--out", "{run}", "--config", "full", "--resume"], "another configuration"),
    ],
)
def test_cli_bad_input_exits_2(args, message, run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    monkeypatch.setattr(sys, "argv", ["headstyle", "lab", "train-prior", *args, "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "x").exists()


def test_decoder_finetune_keeps_the_encoder(run: Path) -> None:
    """The decoder stage changes the decoder only: the encoder (so every latent the UNet saw) is the VAE stage's."""
    newest = checkpointing.resolve_checkpoint(tp.stage_folder(run, "vae"))
    vae_stage = load_file(newest / "trainable.safetensors")
    final = tp._load_vae(run).state_dict()
    enc = [k for k in final if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in final if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec
    assert all(torch.equal(final[k], vae_stage[k]) for k in enc)
    assert any(not torch.equal(final[k], vae_stage[k]) for k in dec)
    assert [s for s in tp.read_stages(run) if s != "data"] == [*tp.STAGES[1:4], "controlnet-depth", "controlnet-canny"]


def test_text_encoder_trains_with_the_unet_when_asked(run: Path, tmp_path: Path) -> None:
    """train_text: the UNet stage updates the text encoder too and saves it; the ControlNet stage reads it."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    shutil.copytree(run / "data", out / "data")
    for sub in ("vae", "tokenizer", "text_encoder"):
        shutil.copytree(run / "model" / sub, out / "model" / sub)
    tp.stage_unet(out, replace(TINY, train_text=True), progress=False)
    before = load_file(run / "model" / "text_encoder" / "model.safetensors")
    after = load_file(out / "model" / "text_encoder" / "model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert tp.read_stages(out)["unet"]["parameters"] > tp.read_stages(run)["unet"]["parameters"]


@pytest.mark.parametrize("pooled", [False, True])
def test_pooled_prompt_reaches_the_unet_without_cross_attention(pooled: bool) -> None:
    """text_pool: with every cross-attention output zeroed the prompt still changes eps (it enters the timestep
    embedding of every ResNet block); without it, cross-attention is the prompt's only way in."""
    cfg = replace(TINY, text_pool=pooled)
    unet = lab_models.build_unet(cfg, 8).eval()
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
    gen = torch.Generator().manual_seed(0)
    x, prompts = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(2, 1, 77, cfg.text_width, generator=gen)
    with torch.no_grad():
        a, b = (unet(x, 10, encoder_hidden_states=p).sample for p in prompts)
    assert ((a - b).abs().amax() > 1e-4) if pooled else torch.equal(a, b)


def test_pooled_prompt_unet_and_controlnet_load_as_a_stable_diffusion_folder(run: Path, tmp_path: Path) -> None:
    """A text_pool run's UNet and ControlNet (which copies the pooled embedding) load through DiffusersPrior, and
    the prompt changes eps through them."""
    from headstyle.priors.base import Control, NoiseQuery
    from headstyle.priors.diffusers_prior import DiffusersPrior

    cfg = replace(TINY, text_pool=True)
    out = tmp_path / "run"
    shutil.copytree(run / "data", out / "data")
    for sub in ("vae", "tokenizer", "text_encoder"):
        shutil.copytree(run / "model" / sub, out / "model" / sub)
    tp.stage_unet(out, cfg, progress=False)
    tp.stage_controlnet(out, cfg, progress=False, name="depth")
    model = out / "model"
    prior = DiffusersPrior.from_pretrained(model, vae=None, controlnets={"depth": model / "controlnet-depth"})
    assert prior.unet.config.addition_embed_type == "text"
    assert prior.controlnets["depth"].config.addition_embed_type == "text"
    batch = lab_data.sample_batch(lab_data.load_data(out), 2, 1.0, torch.Generator().manual_seed(4))
    with torch.no_grad():
        latents = prior.encode(batch.images, generator=torch.Generator().manual_seed(0))
        x_t = prior.add_noise(latents, torch.randn_like(latents), torch.tensor([200]))
        t, control = torch.tensor([200]), Control("depth", batch.controls)
        eps = [prior.predict_noise([NoiseQuery(x_t, t, prior.embed_prompts(recipe.PHRASINGS[d][0]), control)])[0][1]
               for d in ("statue", "gold")]  # fmt: skip
    assert torch.isfinite(eps[0]).all() and not torch.equal(*eps)


def test_eps_errors_do_not_depend_on_the_prompts_order(run: Path) -> None:
    """The diffusion classifier's errors per prompt are the same whatever the order (and an odd prompt count,
    whose last prompt shares a UNet call with itself, counts it once)."""
    from headstyle.lab.prior import card as pc
    from headstyle.lab.prior.learned import learned_spec
    from headstyle.priors.loading import load_prior

    prior = load_prior(learned_spec(run / "model"), "cpu")
    images = lab_data.sample_batch(lab_data.load_data(run), 3, 0.0, torch.Generator().manual_seed(2)).images
    latents = pc.encode(prior, images)
    prompts = [recipe.PHRASINGS[d][0] for d in recipe.DOMAINS]
    forward = pc.eps_errors(prior, latents, prompts, (101, 281), seed=0, draws=2)
    backward = pc.eps_errors(prior, latents, prompts[::-1], (101, 281), seed=0, draws=2).flip(1)
    assert torch.allclose(forward, backward, rtol=1e-5, atol=1e-7)
