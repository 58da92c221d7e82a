"""Stylize training on tiny real models (CPU): exact resume, the frozen/trainable split, the CLI, DDP.

The PanoHead runs here use the grid branch only: PanoHead's super-resolution is fixed at 512 px
with 256/128 channels (about 20 s per image forward on CPU), so the single view, which needs it,
runs on the lab generator (same Generator protocol, cheap "SR").
"""

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import imageio.v3
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from headstyle.cli import app
from headstyle.generator.checkpoint import RELEASED_INIT_KWARGS, GeneratorConfig, build_generator, save_generator
from headstyle.lab.world.generator import LabGenerator
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.stylize.config import StylizeConfig, apply_overrides
from headstyle.stylize.trainer import Stylizer
from headstyle.training.gradients import NonFiniteError

REPO = Path(__file__).resolve().parents[1]
FAST_RUN = [
    "prompt.prompt=a pixar face",
    "run.device=cpu",
    "run.sample_identities=1",
    "run.sample_yaws=[0.0, 1.0]",
    "run.turntable_identities=0",
    "run.preview_sr=false",
    "optim.stop_probes=2",  # the classifier margin at every checkpoint: 2 probe views, not 8, in tests
]


@pytest.fixture(scope="module")
def prior(tiny_sd):
    return DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets=tiny_sd.controlnets, device="cpu")


@pytest.fixture(scope="module")
def prior_no_controls(tiny_sd):
    """The same SD without ControlNets: for tests of the loop's bookkeeping, where controls only cost time."""
    return DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets={}, device="cpu")


def lab_generator() -> LabGenerator:
    G = LabGenerator(resolution=8, sr_factor=8, seed=0)
    G.rendering_kwargs["depth_resolution"] = 8
    return G


@pytest.fixture(scope="module")
def tiny_panohead(tmp_path_factory) -> Path:
    """A PanoHead generator smaller than the parity fixture, saved through save_generator."""
    init = copy.deepcopy(RELEASED_INIT_KWARGS)
    init.update(channel_base=256, channel_max=16)
    init["rendering_kwargs"].update(
        triplane_size=16, depth_resolution=4, depth_resolution_importance=4, use_background=False
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        G = build_generator(GeneratorConfig.from_init_kwargs(init, 16))
        with torch.no_grad():  # non-zero biases, so "biases stay frozen" can be seen
            for name, p in G.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("panohead") / "tiny.safetensors"
    save_generator(G, path)
    return path


def subprocess_env() -> dict[str, str]:
    """The environment for `python -m headstyle` in a child process: this checkout's sources first."""
    pythonpath = os.pathsep.join(x for x in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if x)
    return {**os.environ, "PYTHONPATH": pythonpath}


def model_args(tiny_panohead: Path, tiny_sd, canny: bool = False, depth: bool = True) -> list[str]:
    """`headstyle stylize` flags naming the tiny PanoHead and tiny SD (no separate VAE), ControlNets by choice."""
    return [
        "--generator", str(tiny_panohead), "--prior", str(tiny_sd.model), "--vae", "",
        "--canny-controlnet", str(tiny_sd.controlnets["canny"]) if canny else "",
        "--depth-controlnet", str(tiny_sd.controlnets["depth"]) if depth else "",
    ]  # fmt: skip


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_a_picked_checkpoint_becomes_a_generator_of_its_own(tmp_path, prior_no_controls):
    """signals.csv names every checkpoint; resuming one with run.iterations at its iteration and another run.out
    writes that checkpoint's weights as a generator there, and leaves the run it came from as it was."""
    from headstyle.training.checkpointing import load_checkpoint

    run, picked = tmp_path / "run", tmp_path / "at-2"
    cfg = apply_overrides(StylizeConfig(), [*FAST_RUN, f"run.out={run}", "run.iterations=4",
                                            "run.checkpoint_every=2", "run.keep_last=2"])  # fmt: skip
    Stylizer(cfg, lab_generator(), prior_no_controls).train(progress=False)
    final = (run / "generator.safetensors").read_bytes()
    assert [r.split(",")[0] for r in (run / "signals.csv").read_text().splitlines()[1:]] == ["2", "4"]
    checkpoint = run / "checkpoints" / "iter_0000002"
    again = apply_overrides(cfg, ["run.iterations=2", f"run.out={picked}"])
    result = Stylizer(again, lab_generator(), prior_no_controls).train(resume=checkpoint, progress=False)
    assert result.generator_path == picked / "generator.safetensors"
    weights = load_file(result.generator_path)
    for name, value in load_checkpoint(checkpoint).trainable.items():
        assert torch.equal(weights[name], value), name
    assert (run / "generator.safetensors").read_bytes() == final


@pytest.mark.parametrize(
    "optim",
    [
        [],  # the paper's Adam
        # SGD with momentum, its lr set at the first step, and the stopping rule decaying it at iteration 2
        # (margin > -1 always holds): the lr, the calibration and the rule's state cross the checkpoint.
        ["optim.name=sgd", "optim.sgd_step=0.001", "optim.stop_rule=classifier", "optim.stop_every=2",
         "optim.stop_action=decay", "optim.stop_margin=-1.0", "optim.stop_probes=1"],
    ],
    ids=["adam", "sgd-stop-rule"],
)
def test_exact_resume_after_sigint_matches_straight_run(tmp_path, prior_no_controls, optim):
    """6 iterations straight == 3, Ctrl-C (checkpoint + clean stop), resume 3: bitwise-identical weights."""
    base = apply_overrides(
        StylizeConfig(),
        [
            *FAST_RUN,
            "run.iterations=6",
            "run.checkpoint_every=4",
            "run.sample_every=100",
            "single.rank_weights=[1, 0.5, 0.25]",
            *optim,
        ],
    )
    original = _state(lab_generator())

    straight = Stylizer(apply_overrides(base, [f"run.out={tmp_path / 'a'}"]), lab_generator(), prior_no_controls)
    result = straight.train(progress=False)
    assert (result.iteration, result.interrupted, result.skipped_steps) == (6, False, 0)

    interrupted = Stylizer(apply_overrides(base, [f"run.out={tmp_path / 'b'}"]), lab_generator(), prior_no_controls)
    step = interrupted.step

    def step_then_sigint():
        metrics = step()
        if interrupted.iteration == 2:  # the third step is running: Ctrl-C arrives now
            signal.raise_signal(signal.SIGINT)
        return metrics

    interrupted.step = step_then_sigint
    first = interrupted.train(progress=False)
    assert first.interrupted and first.iteration == 3 and first.checkpoint.name == "iter_0000003"
    assert first.generator_path is None

    resumed = Stylizer(apply_overrides(base, [f"run.out={tmp_path / 'b'}"]), lab_generator(), prior_no_controls)
    second = resumed.train(resume=tmp_path / "b", progress=False)
    assert second.iteration == 6 and not second.interrupted

    for name, p in straight.trainable_state().items():
        assert torch.equal(p, resumed.trainable_state()[name]), name
    assert straight.optimizer.state_dict()["param_groups"] == resumed.optimizer.state_dict()["param_groups"]
    assert straight.stop_triggered_at == resumed.stop_triggered_at == (2 if optim else 0)
    # Every checkpoint's margin (iterations 4 and 6, where it ended) comes out the same after the resume.
    signals = [(tmp_path / run / "signals.csv").read_text() for run in ("a", "b")]
    assert signals[0] == signals[1] and [r.split(",")[0] for r in signals[0].splitlines()[1:]] == ["4", "6"]
    # The logs agree line by line too (losses, timesteps, gradient norms), wall time aside.
    logs = []
    for run in ("a", "b"):
        lines = [json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        logs.append([{k: v for k, v in x.items() if k != "seconds"} for x in lines])
    assert [x["iteration"] for x in logs[1]] == [1, 2, 3, 4, 5, 6]
    assert logs[0] == logs[1]

    # Frozen copy untouched; only configured parameters moved (lab: backbone.synthesis weights, not biases).
    for stylizer in (straight, resumed):
        assert all(torch.equal(v, original[k]) for k, v in stylizer.frozen.state_dict().items())
        trained = stylizer.G.state_dict()
        changed = {k for k in original if not torch.equal(trained[k], original[k])}
        assert changed == {f"backbone.synthesis.{k}" for k in ("trigrid", "fc0.weight", "fc1.weight")}


def test_a_finished_run_continued_and_stopped_is_not_shown_as_finished(tmp_path, prior_no_controls):
    """A run that reached 2 iterations (generator written), resumed to 4 and stopped at 3: its folder holds no
    generator file, so the app shows it as stopped and offers no style from it; finishing writes it again."""
    from headstyle.app.models import trained_styles
    from headstyle.app.training import read_run

    run = tmp_path / "styles" / "run"
    cfg = apply_overrides(StylizeConfig(), [*FAST_RUN, f"run.out={run}", "run.iterations=2"])
    Stylizer(cfg, lab_generator(), prior_no_controls).train(progress=False)
    assert (run / "generator.safetensors").is_file() and read_run(run).generator is not None

    longer = apply_overrides(cfg, ["run.iterations=4"])
    cut = Stylizer(longer, lab_generator(), prior_no_controls)
    step = cut.step

    def step_then_sigint():
        metrics = step()
        if cut.iteration == 2:  # the third iteration is running
            signal.raise_signal(signal.SIGINT)
        return metrics

    cut.step = step_then_sigint
    assert cut.train(resume=run, progress=False).interrupted
    status = read_run(run)
    assert status.generator is None and status.summary.endswith("stopped at 3, resumable")
    assert trained_styles(tmp_path / "styles") == {}
    Stylizer(longer, lab_generator(), prior_no_controls).train(resume=run, progress=False)
    assert read_run(run).generator == run / "generator.safetensors"


@pytest.mark.parametrize(
    ("overrides", "unet_calls", "unet_batch"),
    [
        ([], 1, 4),  # single view (1) + grid (1), uncond and cond: ONE UNet call of batch 4
        (["objective.noise=mv_nrs"], 1, 6),  # the grid's anchor twin rides in the same call
        (["objective.name=ids", "objective.fpr_iterations=1"], 2, 8),  # N fixed-point calls + 1 (target, source)
    ],
)
def test_one_prior_call_and_one_backward_per_iteration(tmp_path, prior, overrides, unet_calls, unet_batch):
    cfg = apply_overrides(
        StylizeConfig(), [*FAST_RUN, f"run.out={tmp_path}", "single.rank_weights=[1, 0.5]", *overrides]
    )
    stylizer = Stylizer(cfg, lab_generator(), prior)
    batches: list[int] = []
    hook = prior.unet.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    backward = torch.Tensor.backward
    backward_calls = []

    def counting_backward(self, *args, **kwargs):
        backward_calls.append(1)
        return backward(self, *args, **kwargs)

    torch.Tensor.backward = counting_backward
    try:
        metrics = stylizer.step()
    finally:
        torch.Tensor.backward = backward
        hook.remove()
    assert len(batches) == unet_calls and batches[-1] == unet_batch
    assert len(backward_calls) == 1 and metrics["skipped"] == 0
    if "objective.noise=mv_nrs" in overrides:
        # Cell 0 always keeps its resampled noise; the other three keep whichever aligns better.
        assert metrics["mv_nrs_kept_resampled"] in (0.25, 0.5, 0.75, 1.0)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, prior_no_controls):
    overrides = ["single.enabled=false", "run.iterations=9", "run.checkpoint_every=1", "run.max_nonfinite_in_row=2"]
    cfg = apply_overrides(StylizeConfig(), [*FAST_RUN, f"run.out={tmp_path}", *overrides])
    stylizer = Stylizer(cfg, lab_generator(), prior_no_controls)
    step = stylizer.step

    def poisoned_step():
        if stylizer.iteration >= 1:  # from the 2nd iteration on, the regulariser sees NaN tri-grids
            stylizer.prev_planes = tuple(torch.full_like(p, float("nan")) for p in stylizer.prev_planes)
        return step()

    stylizer.step = poisoned_step
    with pytest.raises(NonFiniteError, match="2 iterations in a row"):
        stylizer.train(progress=False)
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["skipped"] for x in log] == [0, 1]  # the 3rd iteration raised before logging
    assert sorted(c.name for c in (tmp_path / "checkpoints").iterdir()) == ["iter_0000001", "iter_0000002"]
    saved = load_file(tmp_path / "checkpoints" / "iter_0000002" / "trainable.safetensors")
    after_first = load_file(tmp_path / "checkpoints" / "iter_0000001" / "trainable.safetensors")
    # The skipped step left the weights as they were, and nothing non-finite was written.
    assert all(torch.equal(saved[k], after_first[k]) and torch.isfinite(saved[k]).all() for k in saved)
    assert json.loads((tmp_path / "checkpoints" / "iter_0000002" / "state.json").read_text())["skipped"] == 1


def test_cli_end_to_end_panohead(tmp_path, tiny_sd, tiny_panohead):
    """`headstyle stylize` through the CLI on a PanoHead generator and tiny SD + ControlNets (grid branch)."""
    out = tmp_path / "run"
    args = [
        "stylize",
        "--preset",
        "zombie",
        *model_args(tiny_panohead, tiny_sd, canny=True),
        "--out",
        str(out),
        "--iterations",
        "2",
        "--no-progress",
        "--set",
        "single.enabled=false",
        "--set",
        "run.checkpoint_every=1",
        "--set",
        "run.keep_last=1",
        "--set",
        "run.sample_every=2",
        *[x for kv in FAST_RUN[1:] for x in ("--set", kv)],
        "--set",
        "run.turntable_identities=1",
        "--set",
        "run.turntable_frames=4",
    ]
    printed = CliRunner().invoke(app, [*args, "--print-config"])
    assert printed.exit_code == 0, printed.output
    assert 'prompt = "Portrait of a zombie"' in printed.output and "iterations = 2" in printed.output

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "stylised generator" in result.output
    # The default stopping rule checks every 10 iterations: here it had no check, and says where the margins are.
    assert f"the stopping rule did not fire (every checkpoint's classifier margin: {out / 'signals.csv'})" in \
        result.output
    assert [r.split(",")[0] for r in (out / "signals.csv").read_text().splitlines()] == ["iteration", "1", "2"]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in log] == [1, 2] and all(x["skipped"] == 0 for x in log)
    assert {"grid_t", "grid_grad_norm", "relative_distance", "grad_norm"} <= set(log[0])
    assert all(1 <= x["grid_t"] <= 281 for x in log)  # step indices 35..49 of 50: low noise only
    # From the first iteration on (previous identity drawn before training, as the script's batch 0); at the
    # first one trainable and frozen tri-grids agree, so every pairwise distance is kept.
    assert log[0]["relative_distance"] < 1e-3 and log[1]["relative_distance"] > 0
    assert (out / "log.csv").read_text().splitlines()[0].startswith("iteration,")
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter_0000000.png", "iter_0000002.png"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_0000002"]  # keep_last=1
    assert (out / "config.toml").is_file() and (out / "checkpoints" / "iter_0000002" / "config.toml").is_file()
    frames = imageio.v3.imread(out / "turntable" / "identity_0.gif", index=None)
    assert frames.shape[0] == 4 and frames.shape[1:3] == (16, 16)  # raw 16 px renders (preview_sr=false)

    # The stylised generator loads like any generator; only configured parameters moved, and the
    # grid's gradients (raw renders, before SR) reach the synthesis backbone but not the SR.
    from headstyle.generator.checkpoint import load_generator

    before = load_generator(tiny_panohead).state_dict()
    after = load_generator(out / "generator.safetensors").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("backbone.synthesis.") and not k.endswith(".bias") for k in changed)

    render = CliRunner().invoke(
        app,
        [
            "render",
            "--generator",
            str(out / "generator.safetensors"),
            "--out",
            str(tmp_path / "render"),
            "--yaws",
            "0",
            "--raw-only",
        ],
    )
    assert render.exit_code == 0, render.output

    # Resuming a finished run with more iterations continues from its last checkpoint.
    resume = ["stylize", "--resume", str(out), "--iterations", "3", "--no-progress"]
    more = CliRunner().invoke(app, [*resume, "--set", "run.turntable_identities=0"])
    assert more.exit_code == 0, more.output
    assert [json.loads(x)["iteration"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_cli_user_errors(tmp_path):
    runner = CliRunner()
    for args, message in [
        (["stylize", "--generator", "g.pkl"], "no prompt"),
        (["stylize", "--preset", "anime"], "unknown preset"),
        (["stylize", "--preset", "joker", "--set", "optim.lr=fast"], "optim.lr: expected a number"),
        (["stylize", "--preset", "joker", "--resume", str(tmp_path)], "neither a checkpoint folder"),
    ]:
        result = runner.invoke(app, args, standalone_mode=False)
        assert type(result.exception).__name__ == "UserError" and message in str(result.exception), result.output


def test_ddp_two_cpu_processes(tmp_path, tiny_sd, tiny_panohead):
    """accelerate launch, 2 CPU processes (gloo): ranks stay identical, draw different identities, batch adds up."""
    out = tmp_path / "ddp"
    # accelerate's own --cpu launcher needs MPI for several processes; --multi_gpu launches them with
    # torchrun, and run.device=cpu makes each Accelerator join a gloo process group on the CPU.
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "headstyle",
        "stylize",
        "--prompt",
        "a pixar face",
        *model_args(tiny_panohead, tiny_sd),
        "--out",
        str(out),
        "--iterations",
        "2",
        "--no-progress",
        "--set",
        "single.enabled=false",
        "--set",
        "run.sample_every=100",
        *[x for kv in FAST_RUN[1:] for x in ("--set", kv)],
    ]
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for entry in log:
        assert entry["effective_batch"] == 2
        digests = entry["weights_digest_per_rank"]
        assert len(digests) == 2 and digests[0] == digests[1]  # identical weights on both ranks after the step
        losses, local = entry["loss_per_rank"], entry["grad_norm_local_per_rank"]
        assert losses[0] != losses[1]  # per-rank seeds: different identities and cameras
        # The step used the mean of the ranks' gradients: shorter than the mean of their norms, and not rank 0's.
        assert entry["grad_norm"] <= (local[0] + local[1]) / 2 * (1 + 1e-6)
        assert entry["grad_norm"] != pytest.approx(local[0], rel=1e-6)
    ckpt = out / "checkpoints" / "iter_0000002"
    assert (ckpt / "rank0.safetensors").is_file() and (ckpt / "rank1.safetensors").is_file()
    # An exact resume needs the same number of processes.
    solo = CliRunner().invoke(app, ["stylize", "--resume", str(out), "--iterations", "3", "--no-progress"])
    assert solo.exit_code != 0 and "num_processes 2" in str(solo.exception) + solo.output


def test_sigterm_checkpoints_and_exits_143_with_resume_hint(tmp_path, tiny_sd, tiny_panohead, monkeypatch):
    out = tmp_path / "run"
    step = Stylizer.step

    def step_then_sigterm(self):
        metrics = step(self)
        if self.iteration == 1:  # the second iteration is running when the signal arrives
            signal.raise_signal(signal.SIGTERM)
        return metrics

    monkeypatch.setattr(Stylizer, "step", step_then_sigterm)
    args = [
        "stylize",
        "--prompt",
        "a pixar face",
        *model_args(tiny_panohead, tiny_sd, depth=False),
        "--out",
        str(out),
        "--iterations",
        "1000",
        "--no-progress",
        "--set",
        "single.enabled=false",
        *[x for kv in FAST_RUN[1:] for x in ("--set", kv)],
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 128 + signal.SIGTERM, result.output  # as shells report it: `&& render` stops
    assert f"interrupted at iteration 2; checkpoint: {out / 'checkpoints' / 'iter_0000002'}" in result.output
    assert f"resume with: headstyle stylize --resume {out}" in result.output
    assert (out / "checkpoints" / "iter_0000002" / "state.json").is_file()
    assert not (out / "generator.safetensors").exists()  # an interrupted run is not a finished one
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after the run


def test_style_image_target_uses_each_samples_frozen_render_as_content(tmp_path, prior_no_controls, monkeypatch):
    """style.image wraps the prior in Style Fusion Attention; every iteration hands it one content reference
    per sample (the frozen render, in branch order). That a style changes eps is tested in test_style_views."""
    from headstyle.stylize.factory import style_fusion_prior

    pixels = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
    imageio.v3.imwrite(tmp_path / "style.png", pixels)
    cfg = apply_overrides(
        StylizeConfig(),
        [
            *FAST_RUN,
            "objective.name=sds",
            "objective.weighting=sds",
            "run.iterations=1",
            f"run.out={tmp_path / 'run'}",
            f"style.image={tmp_path / 'style.png'}",
        ],
    )
    encoded, contents = [], []
    encode = prior_no_controls.encode
    monkeypatch.setattr(prior_no_controls, "encode", lambda x, **kw: encoded.append(encode(x, **kw)) or encoded[-1])
    sfa = style_fusion_prior(cfg, prior_no_controls)
    set_content = sfa.set_content
    monkeypatch.setattr(sfa, "set_content", lambda x, **kw: contents.append((x, kw)) or set_content(x, **kw))
    trainer = Stylizer(cfg, lab_generator(), sfa)
    encoded.clear()
    trainer.step()

    # One encode: single view + mirror, grid, then the frozen sources of single view and grid (1 identity).
    (latents,) = encoded
    assert latents.shape[0] == 5
    ((content, kw),) = contents
    assert kw == {"images_per_group": 1} and torch.equal(content, latents[3:].float())
    assert all(torch.isfinite(p.grad).all() for p in trainer.optimizer.param_groups[0]["params"])


def test_style_image_needs_sds_with_a_timestep_weighting():
    from headstyle.stylize.config import ConfigError

    for objective in (["objective.name=ld"], ["objective.name=sds"], ["objective.name=ids"]):
        with pytest.raises(ConfigError, match=r"style\.image needs objective\.name=sds"):
            apply_overrides(StylizeConfig(), ["style.image=x.png", *objective])
    cfg = apply_overrides(StylizeConfig(), ["style.image=x.png", "objective.name=sds", "objective.weighting=sds"])
    assert cfg.style.image == "x.png"
    with pytest.raises(ConfigError, match=r"style\.image_2 is set without style\.image"):
        apply_overrides(StylizeConfig(), ["style.image_2=x.png"])


def test_single_view_on_panohead_trains_backbone_and_super_resolution(tmp_path, prior, tiny_panohead):
    """One iteration of the single-view branch (512 px SR render + its mirror, canny control) on PanoHead:
    the gradient reaches the SR and the synthesis backbone; biases and every frozen module stay put."""
    from headstyle.generator.checkpoint import load_generator

    G = load_generator(tiny_panohead)
    before = _state(G)
    cfg = apply_overrides(
        StylizeConfig(),
        [*FAST_RUN, "grid.enabled=false", "run.iterations=1", f"run.out={tmp_path}", "run.sample_every=100"],
    )
    trainer = Stylizer(cfg, G, prior)
    metrics = trainer.step()
    assert 1 <= metrics["single_t"] <= 281 and metrics["single_nonfinite"] == 0
    moved = {k for k, v in G.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("superresolution.") for k in moved)
    assert any(k.startswith("backbone.synthesis.") for k in moved)
    assert all(k.startswith(("superresolution.", "backbone.synthesis.")) and not k.endswith(".bias") for k in moved)
    assert all(torch.equal(v, before[k]) for k, v in trainer.frozen.state_dict().items())
