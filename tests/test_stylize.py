"""Stylize: config round trip and overrides, presets, the relative-distance regulariser, checkpoint state."""

import dataclasses
import json
import math
import random
import re
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from headstyle import cameras, settings
from headstyle.distill.objectives import SDSParams
from headstyle.lab.world.generator import LabGenerator
from headstyle.priors.analytic import GaussianPrior
from headstyle.stylize.branches import BRANCHES, Grid, SingleView, build_branches, register_branch
from headstyle.stylize.config import (
    ConfigError,
    StylizeConfig,
    apply_overrides,
    dumps,
    load_config,
    load_saved_config,
    save_config,
)
from headstyle.stylize.factory import build_lpips
from headstyle.stylize.presets import PROMPTS, preset, resolve_config
from headstyle.stylize.regularisers import LPIPS, relative_distance
from headstyle.stylize.trainer import Stylizer
from headstyle.training import checkpointing
from headstyle.weight_files import WeightsError


def _non_default_config() -> StylizeConfig:
    cfg = StylizeConfig()
    return dataclasses.replace(
        cfg,
        prompt=dataclasses.replace(cfg.prompt, prompt='a "quoted" prompt = with equals', guidance_scale=5.0),
        objective=dataclasses.replace(
            cfg.objective, name="sds", params=SDSParams(weighting="fantasia3d"), min_step_index=10
        ),
        single=dataclasses.replace(cfg.single, rank_weights=(1.0, 0.5), mirror=False),
        optim=dataclasses.replace(cfg.optim, train_modules=("backbone.synthesis",), lr=3e-5),
        run=dataclasses.replace(cfg.run, iterations=7, sample_yaws=(0.25,)),
    )


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_config_round_trip(tmp_path, suffix):
    cfg = _non_default_config()
    path = tmp_path / f"run{suffix}"
    save_config(cfg, path)
    assert load_config(path) == cfg
    # A partial file fills in from the defaults.
    partial = tmp_path / "partial.toml"
    partial.write_text('[optim]\nlr = 0.5\n[single]\nrank_weights = [1, 0]\n')
    loaded = load_config(partial)
    assert loaded.optim.lr == 0.5 and loaded.single.rank_weights == (1.0, 0.0)
    assert dataclasses.replace(loaded, optim=StylizeConfig().optim, single=StylizeConfig().single) == StylizeConfig()


def test_overrides_typed_and_errors_name_the_field():
    cfg = apply_overrides(
        StylizeConfig(),
        ["optim.lr=5e-5", "single.mirror=false", "run.iterations=12", "single.rank_weights=[1, 0.5]",
         "prompt.prompt=a face, with = sign", "optim.train_modules=['superresolution']"],
    )
    assert cfg.optim.lr == 5e-5 and cfg.single.mirror is False and cfg.run.iterations == 12
    assert cfg.single.rank_weights == (1.0, 0.5)
    assert cfg.prompt.prompt == "a face, with = sign"
    assert cfg.optim.train_modules == ("superresolution",)
    with pytest.raises(ConfigError, match=r"unknown config field optim\.learning_rate"):
        apply_overrides(cfg, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"run\.iterations: expected an integer"):
        apply_overrides(cfg, ["run.iterations=many"])
    with pytest.raises(ConfigError, match=r"objective\.name"):
        apply_overrides(cfg, ["objective.name=magic"])
    with pytest.raises(ConfigError, match="weighting"):
        apply_overrides(cfg, ["objective.weighting=fantasia3d"])  # an SDS weighting while the objective is LD
    with pytest.raises(ConfigError, match="max_step_index"):
        apply_overrides(cfg, ["objective.max_step_index=50"])
    with pytest.raises(ConfigError, match=r"cameras: pivot must be 3 numbers within \[-1, 1\]"):
        apply_overrides(cfg, ["cameras.pivot=[0, 0]"])
    with pytest.raises(ConfigError, match=r"cameras\.pivot = \[0\.1, 0\.0, 0\.0\] lies off the plane x = 0"):
        apply_overrides(StylizeConfig(), ["cameras.pivot=[0.1, 0, 0]"])  # the mirror is on by default


@dataclass
class _Knobs:
    angle: float = settings.param(10.0, low=-90.0, high=90.0, unit="degrees")
    mode: str = settings.param("a", choices=("a", "b"))
    steps: int = settings.param(1, at_least=1)
    rate: float = settings.param(0.5, positive=True)
    free: float = 0.0


@dataclass
class _Knobbed:
    knobs: _Knobs = field(default_factory=_Knobs)


def test_field_metadata_declares_ranges_choices_and_units(tmp_path):
    """settings.param puts a field's range, choices and unit in its metadata; one validator reads them all."""
    cfg = _Knobbed()
    settings.check_sections(cfg)  # the defaults lie within their declarations
    refused = [
        ({"angle": 91.0}, "knobs.angle = 91.0 lies outside [-90.0, 90.0] (degrees)"),
        ({"angle": math.nan}, "knobs.angle = nan lies outside [-90.0, 90.0] (degrees)"),
        ({"mode": "c"}, "knobs.mode = 'c' is not one of a, b"),
        ({"steps": 0}, "knobs.steps must be >= 1, got 0"),
        ({"rate": math.inf}, "knobs.rate must be a positive number, got inf"),
    ]
    for change, message in refused:
        with pytest.raises(ConfigError) as info:
            settings.check_sections(_Knobbed(dataclasses.replace(cfg.knobs, **change)))
        assert str(info.value) == message
    assert settings.field_problem(dataclasses.replace(cfg.knobs, free=-1e9, angle=-90.0)) is None  # closed range
    assert settings.field_problem(dataclasses.replace(cfg.knobs, mode="x")) == "mode = 'x' is not one of a, b"
    assert settings.units(cfg) == {"knobs.angle": "degrees"}
    text = settings.comment_units(settings.dumps({"knobs": settings.plain(cfg.knobs)}), settings.units(cfg))
    assert text.splitlines()[:3] == ["[knobs]", "angle = 10.0  # degrees", 'mode = "a"']
    (tmp_path / "knobs.toml").write_text(text)
    assert settings.from_dict(_Knobbed(_Knobs(angle=0.0)), settings.read_file(tmp_path / "knobs.toml")) == cfg


def test_stylize_fields_carry_their_ranges_choices_and_units():
    cfg = StylizeConfig()
    for override, message in [
        ("latent.cond_yaw=200", "latent.cond_yaw = 200.0 lies outside [-180.0, 180.0] (degrees, 0 = front)"),
        ("run.seed=-1", "run.seed = -1 lies outside [0, 4294967295]"),
        ("optim.name=rmsprop", "optim.name = 'rmsprop' is not one of adam, sgd"),
        ("run.iterations=0", "run.iterations must be >= 1, got 0"),
        ("shaping.scale=0", "shaping.scale must be a positive number, got 0.0"),
    ]:
        with pytest.raises(ConfigError) as info:
            apply_overrides(cfg, [override])
        assert str(info.value) == message
    text = dumps(cfg)
    assert "cond_yaw = 0.0  # degrees, 0 = front\n" in text
    assert "scale = 1000.0  # divisor of every latent gradient\n" in text
    assert "lr = 0.0001  # learning rate (Adam; SGD: step = lr * velocity)\n" in text
    assert len(settings.units(cfg)) == 12 and settings.units(cfg)["run.sample_yaws"] == "degrees, 0 = front"


def test_branches_register_under_their_config_sections_in_step_order():
    """The step's branches are the registry's, in registration order (single view, then grid), each at its slot
    among the enabled ones: the noise slots and random draws of the runs before the registry."""
    assert list(BRANCHES.items()) == [("single", SingleView), ("grid", Grid)]
    cfg = StylizeConfig()

    def built(**enabled: bool) -> list[tuple[type, int]]:
        sections = {name: dataclasses.replace(getattr(cfg, name), enabled=on) for name, on in enabled.items()}
        ctx = types.SimpleNamespace(cfg=dataclasses.replace(cfg, **sections))  # the branches read only its cfg here
        return [(type(b), b.slot) for b in build_branches(ctx)]

    assert built() == [(SingleView, 0), (Grid, 1)]
    assert built(single=False) == [(Grid, 0)] and built(grid=False) == [(SingleView, 0)]
    with pytest.raises(ValueError, match="already registered for config section 'grid'"):
        register_branch(type("AnotherGrid", (Grid,), {}))
    assert BRANCHES["grid"] is Grid


def test_defaults_follow_the_script():
    cfg = StylizeConfig()
    assert (cfg.latent.truncation_psi, cfg.latent.truncation_cutoff) == (0.75, 14)
    assert (cfg.latent.cond_yaw, cfg.latent.cond_pitch) == (0.0, math.degrees(0.2))  # degrees: the script's 0.2 rad
    assert cfg.prompt.guidance_scale == 7.5 and cfg.objective.name == "ld"
    assert cfg.objective.params.weighting == "script"
    o = cfg.objective
    assert (o.min_step_index, o.max_step_index, o.num_inference_steps) == (35, 49, 50)
    assert cfg.single.rank_weights == (1.0, 0.75, 0.5, 0.25)
    assert (cfg.single.base_weight, cfg.single.mirror_weight, cfg.grid.weight) == (0.75, 0.25, 1.0)
    assert (cfg.shaping.scale, cfg.shaping.clamp) == (1000.0, 1.0)
    assert cfg.optim.lr == 1e-4 and cfg.optim.train_modules == ("backbone.synthesis", "superresolution")
    assert cfg.optim.train_biases is False and cfg.regularisers.relative_distance == 1.0
    assert (cfg.regularisers.tweedie_mse, cfg.regularisers.lpips) == (0.1, 0.05)
    assert cfg.cameras.pivot == (0.0, 0.0, 0.0) and cfg.model.vae == ""  # every camera looks at the origin; pipe.vae
    assert (cfg.model.prior_dtype, cfg.model.vae_dtype) == ("fp16", "fp16")


def test_presets_and_resolution_order(tmp_path):
    assert set(PROMPTS) == {"pixar", "joker", "zombie", "statue", "werewolf", "sketch"}
    for name in PROMPTS:
        cfg = preset(name)
        assert cfg.prompt.prompt == PROMPTS[name]
        assert (cfg.run.iterations, cfg.run.checkpoint_every) == (10_000, 250)
    file = tmp_path / "c.toml"
    file.write_text('[run]\niterations = 20\n[prompt]\nprompt = "from file"\n')
    cfg = resolve_config("Joker", file, None, ["run.iterations=30"])
    assert cfg.prompt.prompt == "from file" and cfg.run.iterations == 30 and cfg.run.checkpoint_every == 250
    with pytest.raises(ConfigError, match="unknown preset 'anime'"):
        resolve_config("anime")


def test_a_config_saved_before_a_field_existed_reads_as_its_run_ran(tmp_path):
    """A run saved before cameras.pivot and model.vae_dtype looked at PanoHead's pivot and kept an fp32 VAE under
    fp16 weights: resuming it keeps doing so (a user's partial config file still fills in today's defaults)."""
    text = dumps(StylizeConfig())
    old = re.sub(r"\[cameras\]\n(.*\n)*?\n", "", text.replace('vae_dtype = "fp16"\n', ""))
    assert "[cameras]" not in old and "vae_dtype" not in old
    (tmp_path / "config.toml").write_text(old)
    saved = load_saved_config(tmp_path / "config.toml")
    assert saved.cameras.pivot == cameras.PIVOT and saved.model.vae_dtype == "fp32"
    assert dataclasses.replace(saved, cameras=StylizeConfig().cameras, model=StylizeConfig().model) == StylizeConfig()
    assert load_config(tmp_path / "config.toml").cameras.pivot == cameras.LD_PIVOT


def test_relative_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    f_prev, f_cur = torch.randn(2, 1, 288, 4, 4, generator=g).unbind(0)
    # Same tri-grids: every pairwise distance kept, the regulariser is 0 (up to the 1e-8 guard).
    assert relative_distance(f_prev, f_cur, f_prev, f_cur) < 1e-6
    # T' = 2 T: squared distances grow 4x, so |4 - 1| = 3 everywhere (up to the 1e-8 guard).
    value = relative_distance(f_prev, f_cur, 2 * f_prev, 2 * f_cur)
    assert torch.allclose(value, torch.tensor(3.0), rtol=1e-5)
    # (N, 3, C*D, R, R) and the backbone's (N, 3*C*D, R, R) layout agree.
    five = [t.reshape(1, 3, 96, 4, 4) for t in (f_prev, f_cur, 2 * f_prev, 2 * f_cur)]
    assert torch.allclose(relative_distance(*five), value)
    # Per location over the plane axis: hand-computed for one location.
    a, b = torch.zeros(1, 3, 1, 1, 1), torch.tensor([1.0, 2.0, 2.0]).reshape(1, 3, 1, 1, 1)  # ||a - b||^2 = 9
    c, d = torch.zeros(1, 3, 1, 1, 1), torch.tensor([0.0, 0.0, 6.0]).reshape(1, 3, 1, 1, 1)  # ||c - d||^2 = 36
    assert torch.allclose(relative_distance(a, b, c, d), torch.tensor(3.0))
    # Gradients reach only the current trainable tri-grid.
    t_prev, t_cur = (2 * f_prev).requires_grad_(), (2 * f_cur).requires_grad_()
    relative_distance(f_prev, f_cur, t_prev, t_cur).backward()
    assert t_prev.grad is None and t_cur.grad is not None


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(3)
    state = checkpointing.capture_rng({"g": gen})
    # JSON-able meta and safetensors-able tensors: no pickle needed.
    json.dumps(state.meta)
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))  # noqa: NPY002
    torch.manual_seed(99)
    np.random.seed(99)  # noqa: NPY002
    random.seed(99)
    gen.manual_seed(99)
    checkpointing.restore_rng(state, {"g": gen})
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen))  # noqa: NPY002
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and torch.equal(expected[3], again[3])
    with pytest.raises(KeyError, match="other"):
        checkpointing.restore_rng(state, {"other": torch.Generator()})


def test_checkpoint_atomic_keep_last_and_optimizer_round_trip(tmp_path):
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.Adam([p], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (p**2).sum().backward()
        opt.step()
    state = checkpointing.capture_rng({})
    for it in (1, 2, 3):
        checkpointing.save_checkpoint(tmp_path, it, {"p": p}, opt, state, {"extra": it}, "x = 1\n", keep_last=2)
    names = [c.name for c in checkpointing.list_checkpoints(tmp_path)]
    assert names == ["iter_0000002", "iter_0000003"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    ckpt = checkpointing.load_checkpoint(tmp_path)
    assert ckpt.iteration == 3 and ckpt.meta["extra"] == 3 and torch.equal(ckpt.trainable["p"], p.detach())
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.Adam([q], lr=1e-2)
    checkpointing.optimizer_from_files(opt2, ckpt.optimizer_tensors, ckpt.meta["optimizer"])
    for o, param in ((opt, p), (opt2, q)):
        o.zero_grad()
        (param**2).sum().backward()
        o.step()
    assert torch.equal(p, q)
    with pytest.raises(checkpointing.ResumeError, match="num_processes 1"):
        checkpointing.load_checkpoint(tmp_path, world_size=2)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder"):
        checkpointing.resolve_checkpoint(tmp_path / "nothing")


def _lpips_files(tmp_path):
    """Random but well-formed LPIPS weights in the torchvision (.pth) and lpips (.safetensors) layouts."""
    g = torch.Generator().manual_seed(0)
    convs = [(0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3)]
    alexnet = {}
    for idx, cin, cout, k in convs:
        alexnet[f"features.{idx}.weight"] = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        alexnet[f"features.{idx}.bias"] = 0.01 * torch.randn(cout, generator=g)
    alexnet["classifier.1.weight"] = torch.zeros(2, 2)  # ignored, as in a full torchvision checkpoint
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c[2], 1, 1, generator=g) for i, c in enumerate(convs)}
    torch.save(alexnet, tmp_path / "alexnet.pth")
    save_file(linear, str(tmp_path / "alex.safetensors"))
    return tmp_path / "alexnet.pth", tmp_path / "alex.safetensors"


def test_lpips_from_local_weights(tmp_path):
    alex, lin = _lpips_files(tmp_path)
    lpips = LPIPS.from_files(alex, lin)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.rand(2, 2, 3, 64, 64, generator=g) * 2 - 1).unbind(0)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert torch.allclose(d, lpips(y, x)) and (d > 0).all()
    # Per layer, unit-normalised features differ by at most 2 in norm, so d <= 4 * sum of lin weights.
    bound = 4 * sum(w.sum() for w in load_file(str(lin)).values())
    assert (d <= bound).all()
    y.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert y.grad.abs().sum() > 0 and all(p.grad is None for p in lpips.parameters())
    bad = load_file(str(lin))
    bad["lin2.model.1.weight"] = torch.ones(1, 7, 1, 1)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"shape mismatch \(file vs model\): lin2.model.1.weight \(1, 7, 1, 1\)"):
        LPIPS.from_files(alex, tmp_path / "bad.safetensors")
    partial = {k: v for k, v in torch.load(alex, weights_only=True).items() if k != "features.8.bias"}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"missing keys: features\.8\.bias"):  # was a KeyError traceback
        LPIPS.from_files(tmp_path / "partial.pth", lin)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        LPIPS.from_files(tmp_path / "missing.pth", lin)


class _BackgroundSwitchLab(LabGenerator):
    """A lab generator whose synthesis takes PanoHead's generate_background switch (and records it)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.background_calls: list[bool] = []

    def synthesis(self, ws, c, noise_mode="const", render_sr=True, generate_background=True, planes=None):
        self.background_calls.append(generate_background)
        return super().synthesis(ws, c, noise_mode=noise_mode, render_sr=render_sr, planes=planes)


def test_trainer_on_an_analytic_prior_with_tweedie_losses(tmp_path):
    """The trainer drives any ScorePrior: here an exact Gaussian prior (identity codec, no ControlNets)."""
    alex, lin = _lpips_files(tmp_path)
    g = torch.Generator().manual_seed(0)
    prior = GaussianPrior({"style": torch.rand(3, 64, 64, generator=g) * 2 - 1, "photo": torch.zeros(3, 64, 64)})
    G = _BackgroundSwitchLab(resolution=8, sr_factor=8, seed=0)
    G.rendering_kwargs["depth_resolution"] = 8
    cfg = apply_overrides(StylizeConfig(), [
        "prompt.prompt=style", f"run.out={tmp_path / 'run'}", "run.device=cpu", "single.rank_weights=[1, 0.5]",
        "regularisers.lpips=0.05", f"regularisers.lpips_alexnet={alex}",
        f"regularisers.lpips_linear={lin}",
    ])
    stylizer = Stylizer(cfg, G, prior, lpips=build_lpips(cfg, torch.device("cpu")))
    assert stylizer.ctx.image_size == 64 and prior.control_names == frozenset()
    metrics = stylizer.step()
    assert metrics["tweedie_mse"] > 0 and metrics["tweedie_lpips"] > 0 and metrics["skipped"] == 0
    assert metrics["single_grad_norm"] > 0 and metrics["grid_grad_norm"] > 0
    # Every render without background, as the script: trainable single view + grid. The frozen generator renders
    # only what is read: the grid's mask (no canny ControlNet, no source); the previous identity needs its
    # tri-grid only.
    assert stylizer.G.background_calls == [False] * 2 and stylizer.frozen.background_calls == [False]
    with pytest.raises(ValueError, match="at most 3"):
        Stylizer(apply_overrides(cfg, ["single.rank_weights=[1, 1, 1, 1]"]), G, prior)
