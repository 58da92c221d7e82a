"""DiffStyle360's Style Appearance Module (headstyle.sfa): the paired dataset, the module and its trainer.

Data come from the synthetic lab (its head world as the base generator, its ground-truth styles as the
stylised ones), the module and prior are the tiny real SD 1.5 models.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from headstyle.attention.prior import StyleFusionPrior
from headstyle.cli import UserError, app
from headstyle.export import to_uint8
from headstyle.generator.latents import z_from_seed
from headstyle.lab.world.generator import LabGenerator
from headstyle.lab.world.identities import held_out_z
from headstyle.priors.base import NoiseQuery
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.sfa.config import SFATrainConfig
from headstyle.sfa.dataset import (
    INDEX,
    DatasetError,
    DatasetSettings,
    LeakError,
    SFADataset,
    check_no_leak,
    write_dataset,
)
from headstyle.sfa.module import ModuleLoadError, StyleAppearanceModule
from headstyle.sfa.train import SFATrainer, encode_batch, held_out_loss

STYLES = ("statue", "gold")
SETTINGS = DatasetSettings(samples=4, views=4, truncation_psi=0.75)


def lab(style: str | None = None) -> LabGenerator:
    return LabGenerator(resolution=32, sr_factor=2, style=style, residual=False).eval()


def make(root: Path, settings: DatasetSettings = SETTINGS, styles=STYLES, held_out=None) -> SFADataset:
    held = held_out_z(8) if held_out is None else held_out
    sources = {"base": "lab", **{s: f"lab:{s}" for s in styles}}
    return write_dataset(root, lab(), {s: lab(s) for s in styles}, settings, held, sources, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> SFADataset:
    return make(tmp_path_factory.mktemp("sfa") / "data")


@pytest.fixture(scope="module")
def prior(tiny_sd) -> DiffusersPrior:
    return DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets={}, latent_sample="mean")


def config(dataset: SFADataset, out: Path, **train) -> SFATrainConfig:
    cfg = SFATrainConfig()
    cfg.data.path, cfg.data.held_out_per_style = str(dataset.root), 1
    cfg.run.out, cfg.run.checkpoint_every, cfg.run.validate_every = str(out), 1000, 1000
    cfg.train.views, cfg.train.lr = 4, 1e-3
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


# ------------------------------------------------------------------------------------------------- dataset


def test_dataset_round_trip_matches_fresh_renders(dataset):
    """Every image read back is the uint8 render of the generator it names, at the cameras it stores:
    the content from the base world, the targets from the style's truth of the SAME identity, the
    exemplar from the style's truth of ANOTHER identity."""
    assert [(r.style, r.sample) for r in dataset.records] == [(s, i) for s in STYLES for i in range(4)]
    assert dataset.styles == list(STYLES) and dataset.settings == SETTINGS
    s = dataset.load(5)  # gold, sample 1
    assert (s.record.style, s.record.sample) == ("gold", 1)
    content_seed, style_seed = SETTINGS.seeds(1)
    assert (s.record.content_seed, s.record.style_seed) == (content_seed, style_seed)
    z_c, z_s = z_from_seed(content_seed, 16), z_from_seed(style_seed, 16)
    assert torch.equal(s.z_content, z_c[0]) and torch.equal(s.z_style, z_s[0])
    assert torch.equal(s.cameras, SETTINGS.view_cameras(1))
    with torch.no_grad():
        for G, z, cams, stored in ((lab("gold"), z_c, s.cameras, s.targets), (lab(), z_c, s.cameras, s.views),
                                   (lab("gold"), z_s, s.reference_cameras, s.style),
                                   (lab(), z_c, s.reference_cameras, s.content)):  # fmt: skip
            out = G.synthesis(G.mapping(z, cams[:1], 0.75, 14).expand(len(cams), -1, -1), cams)
            np.testing.assert_array_equal(to_uint8(stored), to_uint8(out.image))
        truth = lab("gold").synthesis(lab().mapping(z_c, s.cameras[:1], 0.75, 14).expand(4, -1, -1), s.cameras)
    torch.testing.assert_close(s.depth, truth.depth, rtol=0, atol=0)
    # the style identity is another head, and the style changes the picture
    assert (to_uint8(s.style).astype(int) - to_uint8(s.content).astype(int)).any()
    assert not torch.equal(s.z_content, s.z_style)
    # the same sample of another style is the same head at the same cameras
    other = dataset.load(1)
    assert torch.equal(other.cameras, s.cameras) and torch.equal(other.views, s.views)


def test_dataset_resume_after_a_crash_and_growth(tmp_path):
    """A torn index line and a sample folder renamed without its index line are rewritten; --samples may grow;
    the result equals a straight write byte for byte."""
    small = DatasetSettings(samples=2, views=2, truncation_psi=0.75)
    grown = DatasetSettings(samples=3, views=2, truncation_psi=0.75)
    straight = make(tmp_path / "straight", grown, styles=("statue",))
    crashed = make(tmp_path / "crashed", small, styles=("statue",))
    # sample 1 lost its index line (crash after the rename), and a later append was torn
    index = crashed.root / INDEX
    lines = index.read_text().splitlines(keepends=True)
    index.write_text(lines[0] + '{"style": "statue", "sam')
    assert [r.sample for r in SFADataset(crashed.root).records] == [0]
    resumed = make(tmp_path / "crashed", grown, styles=("statue",))
    assert [r.sample for r in resumed.records] == [0, 1, 2]
    assert index.read_text() == (straight.root / INDEX).read_text()
    for name in ("00001/view_01_target.png", "00002/style_back.png", "00002/arrays.safetensors"):
        a, b = (d.root / "samples" / "statue" / name for d in (straight, resumed))
        assert a.read_bytes() == b.read_bytes(), name
    with pytest.raises(DatasetError, match="settings"):
        make(tmp_path / "crashed", DatasetSettings(samples=3, views=3, truncation_psi=0.75), styles=("statue",))
    with pytest.raises(DatasetError, match="styles"):
        make(tmp_path / "crashed", grown, styles=("gold",))


def test_leak_check_keeps_evaluation_identities_out(dataset, tmp_path):
    """The lab's held-out identities are in no pair; a dataset asked to contain an evaluation identity is
    refused before anything renders, and check_no_leak finds one in a written dataset."""
    check_no_leak(dataset, held_out_z(64))
    assert torch.equal(dataset.held_out(), held_out_z(8))
    content_seed, style_seed = SETTINGS.seeds(2)
    with pytest.raises(LeakError, match="sample 2: its style exemplar"):
        make(tmp_path / "leaky", held_out=torch.cat([held_out_z(2), z_from_seed(style_seed, 16)]))
    assert not (tmp_path / "leaky").exists()
    with pytest.raises(LeakError, match="statue sample 2: its content"):  # the first style to show it
        check_no_leak(dataset, torch.cat([held_out_z(3), z_from_seed(content_seed, 16)]))


def test_dataset_reader_refuses_bad_files(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset.root, copy)
    manifest = json.loads((copy / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DatasetError, match="version 99"):
        SFADataset(copy)
    (copy / "dataset.json").write_text(json.dumps(manifest))
    (copy / INDEX).write_text('{"style": "../../etc", "sample": 0, "content_seed": 1, "style_seed": 2}\n')
    with pytest.raises(DatasetError, match="bad style name"):
        SFADataset(copy)
    (copy / INDEX).write_text('{"style": "gold", "sample": 0, "content_seed": 100000, "style_seed": 100001}\n')
    Image.new("L", (64, 64)).save(copy / "samples" / "gold" / "00000" / "style_front.png")
    with pytest.raises(DatasetError, match="expected an RGB PNG"):
        SFADataset(copy).load(0)


# ---------------------------------------------------------------------------------------- module and training


def fused_eps(prior, batch, x: torch.Tensor, module: StyleAppearanceModule | None = None) -> tuple:
    """(eps_uncond, eps_cond) of SFA on ``batch``'s banks at t = 500, with ``module`` (None: untrained SFA)."""
    fused, content_unet, style_unet = (prior, None, None) if module is None else module.fusion(prior)
    sfa = StyleFusionPrior(fused, batch.style, content_unet=content_unet, style_unet=style_unet, seed=3)
    sfa.set_content(batch.content)
    with torch.no_grad():
        return sfa.predict_noise([NoiseQuery(x, torch.tensor([500]), prior.embed_prompts(""))])[0]


@pytest.mark.parametrize(("role", "lora_rank"), [("style", 0), ("shared", 0), ("style", 2)])
def test_zero_steps_equals_untrained_sfa_bitwise(dataset, prior, tmp_path, role, lora_rank):
    """A module trained for 0 iterations, saved and loaded, writes the very banks of the untrained SFA (the
    prior's own UNet), and its LoRA (up-projections at zero) leaves the main UNet's output as it was: eps is
    bitwise equal."""
    cfg = config(dataset, tmp_path / "run", iterations=0, role=role, lora_rank=lora_rank)
    result = SFATrainer(cfg, prior, dataset).train(progress=False)
    module = StyleAppearanceModule.load(result.module, prior.unet)
    assert (module.role, module.lora_rank) == (role, lora_rank)
    batch = encode_batch(prior, dataset.load(0), torch.arange(4))
    x = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(0))
    plain, trained = fused_eps(prior, batch, x), fused_eps(prior, batch, x, module)
    assert torch.equal(plain[0], trained[0]) and torch.equal(plain[1], trained[1])


def test_lora_trains_a_copy_of_the_main_unet_saves_in_diffusers_format_and_resumes_exactly(
    dataset, prior, tiny_sd, tmp_path
):
    """train.lora_rank: LoRA on a copy of the main UNet trains with the module (its up-projections leave zero),
    the prior's UNet neither moves nor gains an adapter; 2 + resumed 2 iterations equal 4 bitwise, AdamW state
    included; the saved module (diffusers' pytorch_lora_weights.safetensors) loads back to the same eps."""
    unet_before = {k: v.clone() for k, v in prior.unet.state_dict().items()}
    straight = SFATrainer(config(dataset, tmp_path / "a", iterations=4, views=2, lora_rank=2), prior, dataset)
    result = straight.train(progress=False)
    first = SFATrainer(config(dataset, tmp_path / "b", iterations=2, views=2, lora_rank=2), prior, dataset)
    first.train(progress=False)
    second = SFATrainer(config(dataset, tmp_path / "b", iterations=4, views=2, lora_rank=2), prior, dataset)
    second.train(resume=tmp_path / "b", progress=False)
    lora = [n for n in straight.param_names if ".lora_" in n]
    assert lora and all(n.startswith("main.") for n in lora) and len(straight.param_names) > len(lora)
    params = dict(straight.module.named_parameters())
    assert all(params[n].abs().max() > 0 for n in lora if ".lora_B." in n)
    for (name, a), b in zip(straight.module.named_parameters(), second.module.parameters(), strict=True):
        assert torch.equal(a, b), name
    a_state, b_state = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(a_state[k]["exp_avg_sq"], b_state[k]["exp_avg_sq"]) for k in a_state)
    assert prior.unet.state_dict().keys() == unet_before.keys()  # no adapter injected into the prior's UNet
    assert all(torch.equal(v, prior.unet.state_dict()[k]) for k, v in unet_before.items())
    assert (result.module / "main_lora" / "pytorch_lora_weights.safetensors").is_file()
    loaded = StyleAppearanceModule.load(result.module, prior.unet)
    batch = encode_batch(prior, dataset.load(0), torch.arange(4))
    x = torch.randn(batch.x0.shape, generator=torch.Generator().manual_seed(0))
    trained, back, plain = (fused_eps(prior, batch, x, m) for m in (straight.module.eval(), loaded, None))
    torch.testing.assert_close(back[1], trained[1], rtol=0, atol=1e-6)
    assert (back[1] - plain[1]).abs().max() > 1e-4
    # the file is an SD pipeline's LoRA: diffusers' load_lora_weights gives the module's main UNet
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd.model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(result.module / "main_lora"), weight_name="pytorch_lora_weights.safetensors")
    text = prior.embed_prompts("a statue").cond
    with torch.no_grad():
        want, got = (unet(x[:1], torch.tensor([500]), text).sample for unet in (loaded.main, pipe.unet))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_training_lowers_the_held_out_diffusion_loss(dataset, prior, tmp_path):
    """20 AdamW steps on the train samples lower the diffusion loss on the held-out samples (other
    identities, fixed views, timesteps and noise); the frozen content module and main UNet do not move."""
    cfg = config(dataset, tmp_path / "run", iterations=20)
    trainer = SFATrainer(cfg, prior, dataset)
    assert trainer.val_ids and not set(trainer.val_ids) & set(trainer.train_ids)
    val_identities = {dataset.records[i].content_seed for i in trainer.val_ids}
    assert not val_identities & {dataset.records[i].content_seed for i in trainer.train_ids}
    unet_before = {k: v.clone() for k, v in prior.unet.state_dict().items()}
    before = held_out_loss(prior, dataset, trainer.val_ids, cfg)
    result = trainer.train(progress=False)  # its val_loss: held_out_loss with the trained module
    assert result.val_loss is not None and result.val_loss < before - 0.01, (before, result.val_loss)  # 1.061 -> 1.029
    assert all(torch.equal(v, prior.unet.state_dict()[k]) for k, v in unet_before.items())
    # the module moved up to the last self-attention's input (the last bank entry); what lies after it gets no
    # gradient, and AdamW leaves it exactly as copied (no weight decay without a gradient)
    still = {n for n, p in trainer.module.named_parameters() if torch.equal(p, unet_before[n.removeprefix("unet.")])}
    last = "unet.up_blocks.2.attentions.1."
    assert {"unet.conv_out.weight", f"{last}transformer_blocks.0.ff.net.2.weight"} <= still
    assert all(n.startswith((last, "unet.conv_norm_out.", "unet.conv_out.")) for n in still)


def test_resume_is_exact(dataset, prior, tmp_path):
    """4 iterations straight == 2, a new process-like trainer resuming from the checkpoint, 2 more: bitwise."""
    straight = SFATrainer(config(dataset, tmp_path / "a", iterations=4, views=2), prior, dataset)
    straight.train(progress=False)
    first = SFATrainer(config(dataset, tmp_path / "b", iterations=2, views=2), prior, dataset)
    first.train(progress=False)
    second = SFATrainer(config(dataset, tmp_path / "b", iterations=4, views=2), prior, dataset)
    second.train(resume=tmp_path / "b", progress=False)
    for (name, a), b in zip(straight.module.named_parameters(), second.module.parameters(), strict=True):
        assert torch.equal(a, b), name
    a_state, b_state = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(a_state[k]["exp_avg_sq"], b_state[k]["exp_avg_sq"]) for k in a_state)
    logs = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in logs] == [2, 4]


def test_sigterm_checkpoints_and_the_resumed_run_equals_the_straight_one(dataset, prior, tmp_path):
    """sfa train interrupted in its second iteration: a checkpoint there and no module; resumed, it equals an
    uninterrupted run bitwise."""
    straight = SFATrainer(config(dataset, tmp_path / "a", iterations=4, views=2), prior, dataset)
    straight.train(progress=False)
    cut = SFATrainer(config(dataset, tmp_path / "b", iterations=4, views=2), prior, dataset)
    step = cut.step

    def step_then_sigterm():
        metrics = step()
        if cut.iteration == 1:  # the second iteration is running when the signal arrives
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    cut.step = step_then_sigterm
    first = cut.train(progress=False)
    assert first.interrupted and first.iteration == 2 and first.module is None
    assert first.checkpoint == tmp_path / "b" / "checkpoints" / "iter_0000002"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    resumed = SFATrainer(config(dataset, tmp_path / "b", iterations=4, views=2), prior, dataset)
    second = resumed.train(resume=tmp_path / "b", progress=False)
    assert not second.interrupted and second.module is not None
    for (name, a), b in zip(straight.module.named_parameters(), resumed.module.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_module_for_another_base_is_refused(dataset, prior, tmp_path):
    module = StyleAppearanceModule.from_unet(prior.unet)
    module.check_fits(prior.unet, "same")
    other = type(prior.unet)(**{**dict(prior.unet.config), "cross_attention_dim": 16})
    with pytest.raises(ModuleLoadError, match="cross_attention_dim"):
        module.check_fits(other, "module")
    with pytest.raises(ModuleLoadError, match="not a Style Appearance Module"):
        StyleAppearanceModule.load(tmp_path, prior.unet)


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_dataset_train_resume_and_style_views(tiny_sd, parity_dir, tmp_path):
    """sfa dataset -> sfa train -> --resume -> style-views --style-module: a 0-iteration module reproduces the
    plain style-views PNGs exactly, a trained one changes them."""
    runner = CliRunner()
    data, run = tmp_path / "data", tmp_path / "run"
    res = runner.invoke(app, ["sfa", "dataset", "--base", "lab", "--stylized", "lab:statue", "--samples", "3",
                              "--views", "2", "--out", str(data), "--no-progress"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert len(SFADataset(data)) == 3
    train = ["sfa", "train", "--data", str(data), "--prior", str(tiny_sd.model), "--vae", "", "--views", "2",
             "--held-out", "1", "--lr", "0.001", "--no-progress"]  # fmt: skip
    res = runner.invoke(app, [*train, "--out", str(tmp_path / "zero"), "--iterations", "0"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*train, "--out", str(run), "--iterations", "2"])
    assert res.exit_code == 0 and "held-out diffusion loss" in res.output, res.output
    res = runner.invoke(app, [*train, "--out", str(run), "--iterations", "3"])
    assert isinstance(res.exception, UserError) and "--resume" in str(res.exception)  # exit 2 under main()
    res = runner.invoke(app, ["sfa", "train", "--resume", str(run), "--iterations", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "module" / "sfa_module.json").read_text())["iterations"] == 3
    res = runner.invoke(app, [*train, "--out", str(tmp_path / "lora"), "--iterations", "2", "--lora-rank", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "lora" / "module" / "sfa_module.json").read_text())["lora_rank"] == 2

    style = tmp_path / "style.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(style)
    views = ["style-views", "--generator", str(parity_dir), "--prior", str(tiny_sd.model), "--vae", "",
             "--controlnet-depth", "", "--style-image", str(style), "--yaws", "0", "--steps", "4",
             "--strength", "0.5", "--raw-only"]  # fmt: skip
    pngs = {}
    for name, extra in (("plain", []), ("zero", ["--style-module", str(tmp_path / "zero" / "module")]),
                        ("trained", ["--style-module", str(run / "module")]),
                        ("lora", ["--style-module", str(tmp_path / "lora" / "module")])):  # fmt: skip
        res = runner.invoke(app, [*views, *extra, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        pngs[name] = np.asarray(Image.open(tmp_path / name / "seed0000_yaw+000_pitch+00.png"))
    np.testing.assert_array_equal(pngs["zero"], pngs["plain"])
    assert (pngs["trained"] != pngs["plain"]).any() and (pngs["lora"] != pngs["trained"]).any()
    res = runner.invoke(app, [*views, "--style-module", str(data), "--out", str(tmp_path / "bad")])
    assert isinstance(res.exception, UserError) and "not a Style Appearance Module" in str(res.exception)


def test_app_loads_a_trained_module(dataset, prior, tmp_path):
    """The app's Style image takes models.style_module: the frozen prior UNet stays the content module and the
    trained one writes the style bank; a folder that is no module is one line in the page."""
    from headstyle.app.config import AppConfig
    from headstyle.app.jobs import AppError
    from headstyle.app.models import Models

    result = SFATrainer(config(dataset, tmp_path / "run", iterations=1), prior, dataset).train(progress=False)
    cfg = AppConfig()
    cfg.models.style_module = str(result.module)
    fused, content_unet, style_unet = Models(cfg).sfa_parts(prior)
    trained = StyleAppearanceModule.load(result.module, prior.unet)
    assert fused is prior  # no LoRA: the prior's own main UNet
    assert content_unet is prior.unet and style_unet is not prior.unet
    assert all(torch.equal(a, b) for a, b in zip(style_unet.parameters(), trained.unet.parameters(), strict=True))
    cfg.models.style_module = str(dataset.root)
    with pytest.raises(AppError, match="not a Style Appearance Module"):
        Models(cfg).sfa_parts(prior)
    assert Models(AppConfig()).sfa_parts(prior) == (prior, None, None)


def test_ablation_scores_know_the_input_and_the_truth():
    """The ablation's scores on the two known answers: the unstylised input is at distance 0 from itself with
    stylisation 0, the ground truth has rgb error 0 and stylisation 1; and the unseen style must stay unseen."""
    from headstyle.lab.experiments.evaluate import make_eval_set
    from headstyle.lab.experiments.sfa_ablation import AblationSettings, lab_like, scores

    ev = make_eval_set("gold", lab_like(), identities=2, views=2)
    before, truth = scores(ev.before, ev), scores(ev.truth, ev)
    assert before["input_distance"] == 0 and before["stylisation"] == 0 and before["rgb_error"] > 0.01
    assert truth["rgb_error"] == 0 and truth["input_distance"] > 0.01
    assert truth["stylisation"] > 0.9  # the truth's own identities vs the style's reference identities
    with pytest.raises(ValueError, match="among the training styles"):
        AblationSettings(prior="", seen=("statue", "gold"), unseen="gold")
