"""The lab bench's machinery: the prior choice, the optimisers and stopping rule of the trainer, the zero-gradient
count, mean +- std over seeds, and LD's shaping figures (headstyle.lab.experiments.bench, headstyle.lab.prior.learned,
.shaping_calibration, headstyle.stylize.trainer)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from headstyle.lab.experiments.bench import (
    RUN_FIGURES,
    BenchResult,
    BenchResumeError,
    LabSettings,
    aggregate,
    dead_share,
    lab_config,
    new_generator,
    run_bench,
    step_range,
    train_variant,
)
from headstyle.lab.experiments.evaluate import oracle
from headstyle.lab.prior import learned
from headstyle.lab.prior.exemplar import build_lab_prior
from headstyle.lab.world.heads import UNSTYLED_PROMPT, style_prompt
from headstyle.priors.analytic import ExemplarPrior
from headstyle.stylize import stopping
from headstyle.stylize.config import OptimConfig, apply_overrides, load_config
from headstyle.stylize.stopping import margin
from headstyle.stylize.trainer import Stylizer, build_optimizer
from headstyle.training.gradients import calibrate_sgd

RES = 16  # raw renders; x2 single views


def sd_folder(tiny_sd, root: Path) -> Path:
    """An SD folder in the learned prior's layout (controlnet-depth/, controlnet-canny/ inside) from the tiny SD."""
    folder = root / "prior"
    folder.mkdir()
    for entry in Path(tiny_sd.model).iterdir():
        (folder / entry.name).symlink_to(entry)
    for name, path in tiny_sd.controlnets.items():
        (folder / f"controlnet-{name}").symlink_to(path)
    return folder


def refuse_prior_load(monkeypatch) -> None:
    """From here on, loading a lab prior fails the test (resume checks must come before the slow load)."""

    def no_load(*args, **kwargs):
        raise AssertionError("the prior loaded before the settings were checked")

    monkeypatch.setattr(learned.LabPriorSpec, "load", no_load)


# ---------------------------------------------------------------------------------------------- optimisers


def test_sgd_step_is_the_learning_rate_times_the_momentum_velocity():
    """v1 = g1, p1 = p0 - lr v1; v2 = mu v1 + g2, p2 = p1 - lr v2 (torch's SGD, dampening 0)."""
    p0 = torch.tensor([1.0, -2.0, 0.5])
    p = torch.nn.Parameter(p0.clone())
    lr, mu = 0.1, 0.9
    opt = build_optimizer([p], OptimConfig(name="sgd", lr=lr, momentum=mu))
    g1, g2 = torch.tensor([0.5, 1.0, -1.0]), torch.tensor([2.0, 0.0, 1.0])
    for g in (g1, g2):
        p.grad = g.clone()
        opt.step()
    expected = p0 - lr * g1 - lr * (mu * g1 + g2)
    assert torch.allclose(p.detach(), expected, atol=1e-7)
    assert isinstance(build_optimizer([p], OptimConfig()), torch.optim.Adam)


def test_sgd_calibration_gives_a_constant_gradient_steady_steps_of_the_set_rms():
    """lr = step (1 - mu) / rms(g1): the first step is (1 - mu) * step, the velocity of a constant g1 tends to
    g1 / (1 - mu), so the steps tend to RMS ``step`` (Adam's steady step is ~lr)."""
    p = torch.nn.Parameter(torch.zeros(4))
    mu = 0.9
    opt = build_optimizer([p], OptimConfig(name="sgd", lr=1.0, momentum=mu, sgd_step=0.01))
    assert not calibrate_sgd(opt, 0.0, 0.01)  # a zero gradient cannot set it: wait for the next step
    grad = torch.tensor([3.0, -4.0, 0.0, 0.0])
    rms = float(grad.norm()) / math.sqrt(grad.numel())
    assert calibrate_sgd(opt, rms, 0.01)
    steps = []
    for _ in range(200):
        before = p.detach().clone()
        p.grad = grad.clone()
        opt.step()
        steps.append(float((p.detach() - before).square().mean().sqrt()))
    assert steps[0] == pytest.approx((1 - mu) * 0.01, rel=1e-5) and steps[-1] == pytest.approx(0.01, rel=1e-5)
    assert not calibrate_sgd(opt, 1.0, 0.01) and opt.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - mu) / rms)


def test_classifier_margin_closed_form():
    assert margin(torch.full((3,), 2.0), torch.ones(3)) == pytest.approx(1 / 3)
    assert margin(torch.ones(2), torch.full((2,), 3.0)) == pytest.approx(-0.5)


def test_the_rule_stops_a_constructed_curve_within_one_check_of_its_peak():
    """A margin that rises through 0 at iteration 1230 (where a constructed stylisation peaks) with the probes' small
    wiggle, checked every 10 iterations: the rule stops at the first check past the crossing, never before it."""
    peak, every = 1230, 10
    records = [{"iteration": i, "loss": 0.1} if i % every else
               {"iteration": i, stopping.MARGIN: 0.02 * math.tanh((i - peak) / 300) + 1e-4 * math.sin(i)}
               for i in range(1, 4001)]  # fmt: skip
    stopped = stopping.stop_iteration(records, 0.0)
    assert peak <= stopped <= peak + every
    assert stopping.stop_iteration(records, 0.05) == 0  # a margin it never reaches: no stop


def _stop_run(tmp_path: Path, style_is_render: bool, action: str) -> tuple[Stylizer, int]:
    """A lab run with the stopping rule, on an exemplar prior whose style prompt holds exactly the probe views'
    current renders (style_is_render) or the gold truth of them, the unstyled prompt the other."""
    settings = LabSettings(iterations=4, lr=1e-3, resolution=RES, prior="exemplar")
    overrides = ("optim.stop_rule=classifier", "optim.stop_every=2", f"optim.stop_action={action}",
                 "optim.stop_decay=0.5", "grid.enabled=false", "regularisers.tweedie_mse=0.0")  # fmt: skip
    cfg = apply_overrides(lab_config("statue", settings, tmp_path / f"{style_is_render}-{action}"), list(overrides))
    G = new_generator(settings)
    placeholder = ExemplarPrior({style_prompt("statue"): torch.zeros(1, 3, 2 * RES, 2 * RES),
                                 UNSTYLED_PROMPT: torch.ones(1, 3, 2 * RES, 2 * RES)})  # fmt: skip
    ws, cams, _, _ = Stylizer(cfg, G, placeholder).probes
    with torch.no_grad():
        renders, gold = (g.synthesis(ws, cams, generate_background=False).image for g in (G, oracle("gold", G)))
    style, source = (renders, gold) if style_is_render else (gold, renders)
    prior = ExemplarPrior({style_prompt("statue"): style, UNSTYLED_PROMPT: source})
    stylizer = Stylizer(cfg, new_generator(settings), prior)
    return stylizer, stylizer.train(progress=False).iteration


def test_stopping_rule_fires_when_the_diffusion_classifier_names_the_style(tmp_path):
    """Known answer: the probe renders ARE the style prompt's data, so the first check (iteration 2) stops the run;
    when they are the unstyled prompt's data the rule never fires and the run goes its length."""
    stylizer, reached = _stop_run(tmp_path, style_is_render=True, action="stop")
    assert (reached, stylizer.stop_triggered_at) == (2, 2)
    assert stylizer.classifier_margin() > 0.5
    # The decision is the same pure function of the logged margins, and signals.csv names where it fired.
    records = [json.loads(line) for line in (stylizer.run_dir / "log.jsonl").read_text().splitlines()]
    assert stopping.stop_iteration(records, stylizer.cfg.optim.stop_margin) == 2
    rows = list(csv.DictReader((stylizer.run_dir / "signals.csv").open()))
    assert [(r["iteration"], r["rule_fired"]) for r in rows] == [("2", "1")]
    stylizer, reached = _stop_run(tmp_path, style_is_render=False, action="stop")
    assert (reached, stylizer.stop_triggered_at) == (4, 0)
    assert stylizer.classifier_margin() < 0
    stylizer, reached = _stop_run(tmp_path, style_is_render=True, action="decay")
    assert (reached, stylizer.stop_triggered_at) == (4, 2)
    assert stylizer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)


# ---------------------------------------------------------------------------------------------- bench figures


def test_dead_share_counts_exactly_zero_and_nonfinite_iterations():
    assert dead_share([True, False, False, False], [0, 0, 3, 0]) == (0.5, 0.25)
    with pytest.raises(ValueError, match="one record per iteration"):
        dead_share([True], [0, 0])


def test_zero_gradient_share_is_one_when_the_objective_gradient_is_exactly_zero(tmp_path):
    """LD with omega = 0 sends exactly 0 to the renders (the regulariser and the Tweedie loss still move the
    weights); SDS's eps_u - eps term never vanishes."""
    prior, _ = build_lab_prior(styles=("statue",), identities=2, views=4, resolution=RES)
    zero = LabSettings(iterations=3, resolution=RES, guidance=0.0, prior="exemplar")
    run = train_variant("statue", "ld", prior, zero, tmp_path / "ld", progress=False)
    assert run.figures["zero_grad_share"] == 1.0 and run.figures["nonfinite_grad_share"] == 0.0
    assert any(not torch.equal(a, b) for a, b in zip(run.G.parameters(), new_generator(zero).parameters(),
                                                      strict=True))  # fmt: skip
    sds = train_variant("statue", "sds", prior, LabSettings(iterations=3, resolution=RES, prior="exemplar"),
                        tmp_path / "sds", progress=False)  # fmt: skip
    assert sds.figures["zero_grad_share"] == 0.0


def test_aggregate_is_mean_and_sample_std_over_seeds():
    rows = [{"style": "s", "variant": "ld", "optimizer": "adam", "seed": k, "x": v} for k, v in enumerate((1.0, 2.0,
                                                                                                          6.0))]
    rows.append({"style": "s", "variant": "ld", "optimizer": "adam", "seed": 3, "error": "RuntimeError: boom"})
    rows.append({"style": "s", "variant": "sds", "optimizer": "adam", "seed": 0, "x": 5.0})
    ld, sds = aggregate(rows)
    assert (ld["runs"], ld["failed"], ld["x_mean"], ld["x_std"]) == (3, 1, 3.0, pytest.approx(math.sqrt(7)))
    assert (sds["runs"], sds["x_mean"], sds["x_std"]) == (1, 5.0, 0.0)


def test_bench_markdown_pivots_each_key_metric_into_variant_by_style_with_failed_seeds():
    """Known answer: stylisation 0.1 and 0.3 over two seeds is 0.200 ± 0.141; a style with one seed shows the mean
    alone, a failed seed is counted in its cell, a style without the run is blank."""

    def row(style: str, variant: str, seed: int, value: float | None, optimizer: str = "adam") -> dict:
        base = {"style": style, "variant": variant, "optimizer": optimizer, "seed": seed}
        if value is None:
            return {**base, "error": "NonFiniteError: 10 iterations"}
        return {**base, "stylisation": value, "rgb_error": 0.05, "id_accuracy_appearance": 1.0,
                **dict.fromkeys(("depth_error", "silhouette_iou", "diversity_rgb", "mv_warp_error"), 0.0),
                **dict.fromkeys(RUN_FIGURES, 0.0)}  # fmt: skip

    rows = [row("statue", "ld", 0, 0.1), row("statue", "ld", 1, 0.3), row("gold", "ld", 0, 0.5),
            row("gold", "ld", 1, None), row("statue", "ld", 0, -0.25, "sgd")]  # fmt: skip
    text = BenchResult(prior="p", rows=rows).markdown()
    table = text.split("stylisation, mean ± std over seeds:")[1].split("\n\n")[1].splitlines()
    assert table[0] == "| variant | statue | gold |"
    assert table[2] == "| ld | 0.200 ± 0.141 | 0.500 (1 failed) |"
    assert table[3] == "| ld (sgd) | -0.250 |  |"
    assert "id acc, mean ± std over seeds:" in text and "rgb err, mean ± std over seeds:" in text


def test_step_range_of_sd_timesteps():
    prior = ExemplarPrior({"a": torch.zeros(1, 3, 4, 4)})
    timesteps = prior.inference_timesteps(50)
    assert step_range(timesteps, 1, 281) == (35, 49)  # the LD script's range
    assert step_range(timesteps, 300, 500) == (25, 34)
    with pytest.raises(ValueError, match="no DDIM timestep"):
        step_range(timesteps, 282, 300)


def test_bench_through_an_sd_folder_writes_mean_std_runs_and_curves(tmp_path, tiny_sd):
    """The bench on an SD-layout folder (DiffusersPrior with both ControlNets, the learned prior's path) with two
    seeds: bench.csv holds the mean and std of runs.csv's rows, curves follow LD every iteration."""
    settings = LabSettings(iterations=2, prior_identities=2, prior_views=2, eval_identities=2, eval_views=4,
                           curve_every=1)  # fmt: skip
    spec = learned.resolve_prior(str(sd_folder(tiny_sd, tmp_path)))
    result = run_bench(("statue",), ("ld",), settings, tmp_path / "bench", progress=False, seeds=(0, 1),
                       prior_spec=spec)  # fmt: skip
    with open(tmp_path / "bench" / "runs.csv") as f:
        runs = [r for r in csv.DictReader(f) if r["variant"] == "ld"]
    with open(tmp_path / "bench" / "bench.csv") as f:
        ld = next(r for r in csv.DictReader(f) if r["variant"] == "ld")
    values = [float(r["stylisation"]) for r in runs]
    assert len(values) == 2 and ld["runs"] == "2"
    assert float(ld["stylisation_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-9)
    assert float(ld["stylisation_std"]) == pytest.approx(statistics.stdev(values), rel=1e-9)
    assert {int(float(c["iteration"])) for c in result.curves} == {0, 1, 2}
    assert len(result.curves) == 2 * 3  # seeds x (start + 2 checkpoints)
    # Each checkpoint's point carries the margin the trainer logged there (label-free); the start has none.
    for c in result.curves:
        run = tmp_path / "bench" / "runs" / f"statue-ld-adam-seed{c['seed']}"
        signals = dict(line.split(",")[:2] for line in (run / "signals.csv").read_text().splitlines()[1:])
        assert c.get(stopping.MARGIN) == (float(signals[str(int(c["iteration"]))]) if c["iteration"] else None)
    assert (tmp_path / "bench" / "curves.png").stat().st_size > 0
    assert "± " in (tmp_path / "bench" / "bench.md").read_text()
    cfg = load_config(tmp_path / "bench" / "runs" / "statue-ld-adam-seed1" / "config.toml")
    assert (cfg.shaping.scale, cfg.model.prior_image_size) == (1000.0, 64)
    assert cfg.single.rank_weights == (1, 0.75, 0.5, 0.25)


def test_a_resumed_bench_keeps_finished_runs_and_runs_only_the_missing_ones(tmp_path, monkeypatch):
    """Seed 0, then --resume with seeds 0,1: only seed 1 trains, seed 0's row and curve are kept as written, and
    seed 1's row equals a straight run's; other settings are refused before the prior loads."""
    settings = LabSettings(iterations=2, resolution=RES, prior_identities=2, prior_views=2, eval_identities=2,
                           eval_views=4, prior="exemplar", curve_every=1)  # fmt: skip
    out = tmp_path / "bench"
    first = run_bench(("statue",), ("ld",), settings, out, progress=False, seeds=(0,))
    trained: list[int] = []
    both = run_bench(("statue",), ("ld",), settings, out, progress=False, seeds=(0, 1), resume=True,
                     on_run=lambda row: trained.append(row["seed"]))  # fmt: skip
    assert trained == [1]
    ld = [r for r in both.rows if r["variant"] == "ld"]
    assert [r["seed"] for r in ld] == [0, 1] and len(both.rows) == 3  # one untrained row
    seed0 = next(r for r in first.rows if r["variant"] == "ld")
    assert ld[0] == seed0  # floats round-trip runs.csv exactly (repr)
    assert [c for c in both.curves if c["seed"] == 0] == first.curves
    straight = run_bench(("statue",), ("ld",), settings, tmp_path / "straight", progress=False, seeds=(1,))
    seed1 = next(r for r in straight.rows if r["variant"] == "ld")
    assert {k: v for k, v in ld[1].items() if k != "seconds"} == {k: v for k, v in seed1.items() if k != "seconds"}
    with open(out / "runs.csv") as f:
        assert [r["seed"] for r in csv.DictReader(f) if r["variant"] == "ld"] == ["0", "1"]

    refuse_prior_load(monkeypatch)
    with pytest.raises(BenchResumeError, match=r"other settings \(lr\)"):
        run_bench(("statue",), ("ld",), LabSettings(**{**settings.__dict__, "lr": 1e-4}), out, progress=False,
                  seeds=(0,), resume=True)  # fmt: skip


def test_resume_refuses_a_prior_retrained_into_the_same_folder(tmp_path, tiny_sd, monkeypatch):
    """The bench records the prior's weights (sha256), not only its folder: after one weight changes in place,
    --resume names the prior's weights before anything loads."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "prior"
    (tmp_path / "links").mkdir()
    shutil.copytree(sd_folder(tiny_sd, tmp_path / "links"), folder, symlinks=False)
    settings = LabSettings(iterations=1, prior_identities=2, prior_views=2, eval_identities=2, eval_views=4)
    out = tmp_path / "bench"
    run_bench(("statue",), ("ld",), settings, out, progress=False, prior_spec=learned.resolve_prior(str(folder)))
    unet = next((folder / "unet").glob("*.safetensors"))
    weights = load_file(unet)
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, unet)

    refuse_prior_load(monkeypatch)
    with pytest.raises(BenchResumeError, match=r"other settings \(prior_weights_sha256\)"):
        run_bench(("statue",), ("ld",), settings, out, progress=False, prior_spec=learned.resolve_prior(str(folder)),
                  resume=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the prior choice


def test_default_prior_until_it_ships_is_one_line_naming_both_options(tmp_path, monkeypatch, capsys):
    from headstyle.cli import main

    monkeypatch.setattr(learned, "SHIPPED", tmp_path / "learned_prior")
    for command in (["demo"], ["lab", "bench"]):
        monkeypatch.setattr("sys.argv", ["headstyle", *command, "--out", str(tmp_path / "out")])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--prior PATH" in err and "--prior exemplar" in err, err
        assert not (tmp_path / "out").exists()


def test_a_prior_folder_needs_both_controlnets_and_the_lab_size(tmp_path, tiny_sd):
    folder = sd_folder(tiny_sd, tmp_path)
    (folder / "controlnet-canny").unlink()
    with pytest.raises(learned.LabPriorError, match="controlnet-canny"):
        learned.resolve_prior(str(folder))
    with pytest.raises(learned.LabPriorError, match=r"model_index\.json"):
        learned.resolve_prior(str(tmp_path))
    (folder / "controlnet-canny").symlink_to(tiny_sd.controlnets["canny"])
    spec = learned.resolve_prior(str(folder))
    with pytest.raises(learned.LabPriorError, match="works at 64 px"):
        spec.load(resolution=16, sr_factor=2, identities=1, views=1)
    prior, profile = spec.load(resolution=32, sr_factor=2, identities=1, views=1)
    assert prior.control_names == {"depth", "canny"}
    assert (profile.image_size, profile.shaping_scale, profile.rank_weights) == (64, *learned.LEARNED_SHAPING)
    assert learned.resolve_prior("exemplar").folder is None


# ---------------------------------------------------------------------------------------------- shaping figures


def test_shaping_figures_closed_form():
    """Latents of std s and a rank-1 score c * u v^T: std, RMS |c|, max |c|, all energy in the first rank."""
    from headstyle.lab.prior.shaping_calibration import clamped_share, shaping_figures, shaping_scale

    gen = torch.Generator().manual_seed(0)
    latents = 2.0 * torch.randn(64, 4, 8, 8, generator=gen)
    u = torch.tensor([1.0, -1.0, 1.0, -1.0]).reshape(1, 4, 1, 1) / 2  # unit vector over channels
    v = torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0).reshape(1, 1, 8, 8) / 8  # unit vector over pixels
    grad = 3.0 * 16 * u * v  # every entry +-3 * 16 / 16 = +-3
    f = shaping_figures([latents], [grad.expand(2, -1, -1, -1)])
    assert f.latent_std == pytest.approx(float(latents.double().std()))
    assert (f.score_rms, f.score_max, f.samples) == (pytest.approx(3.0), pytest.approx(3.0), 2)
    assert f.rank_energy[0] == pytest.approx(1.0) and sum(f.rank_energy[1:]) == pytest.approx(0.0, abs=1e-12)
    assert shaping_scale(f) == pytest.approx(1000 * f.latent_std)
    assert clamped_share([grad], 2.0) == 1.0 and clamped_share([grad], 3.0) == 0.0


def test_ld_scores_are_the_trainers_targets(tmp_path):
    """ld_scores on the exemplar prior: a single-view and a grid gradient per identity, LD's omega (eps_c - eps_u) w:
    zero when omega is 0."""
    from headstyle.lab.prior.shaping_calibration import ld_scores

    prior, _ = build_lab_prior(styles=("statue",), identities=2, views=4, resolution=RES)
    G = new_generator(LabSettings(resolution=RES))
    latents, grads = ld_scores(prior, G, "statue", identities=2)
    assert [x.shape for x in latents] == [g.shape for g in grads]
    assert [tuple(g.shape) for g in grads] == [(2, 3, 2 * RES, 2 * RES)] * 2
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    _, silent = ld_scores(prior, G, "statue", identities=2, guidance=0.0)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in silent)


def test_app_lab_styles_train_on_the_configured_prior(tmp_path, tiny_sd, monkeypatch):
    """The app's lab.prior: the learned prior by default (its absence one line naming the setting), the recipe's
    shaping for an SD folder, the exemplar prior's on request."""
    from headstyle.app import training
    from headstyle.app.config import LabSection
    from headstyle.app.jobs import AppError

    monkeypatch.setattr(learned, "SHIPPED", tmp_path / "learned_prior")
    with pytest.raises(AppError, match=r"lab\.prior: the learned lab prior is not shipped yet"):
        training.lab_spec(LabSection(), "statue", 5, tmp_path / "a")
    folder = str(sd_folder(tiny_sd, tmp_path))
    sd = training.lab_spec(LabSection(prior=folder), "statue", 5, tmp_path / "b").config
    exemplar = training.lab_spec(LabSection(prior="exemplar"), "statue", 5, tmp_path / "c").config
    assert (sd["shaping"]["scale"], len(sd["single"]["rank_weights"])) == (1000.0, 4)
    assert (exemplar["shaping"]["scale"], len(exemplar["single"]["rank_weights"])) == (10.0, 3)
    assert training.lab_prior(LabSection(prior=folder)).control_names == {"depth", "canny"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--t-range", "281"], "--t-range"),
        (["--t-range", "300,10"], "--t-range"),
        (["--seeds", "0,x"], "--seeds"),
        (["--optimizer", "adam,lbfgs"], "--optimizer"),
        (["--guidance", "nan"], "--guidance"),
        (["--prior", "{tmp}"], "model_index.json"),
    ],
)
def test_bench_options_are_checked_before_any_model_loads(args, message, tmp_path, monkeypatch, capsys):
    from headstyle.cli import main

    argv = [a.format(tmp=tmp_path) for a in args]
    monkeypatch.setattr("sys.argv", ["headstyle", "lab", "bench", "--prior", "exemplar", *argv, "--out",
                                     str(tmp_path / "out")])  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
