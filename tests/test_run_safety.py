"""Runs never mix, resumes continue the same run, and every bad input is one line with exit 2 (before any model
loads): the stylize CLI's and the trainer's guards, each on a case that used to go wrong."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headstyle.cli import main
from headstyle.stylize.config import ConfigError, StylizeConfig, apply_overrides, dumps, resume_differences
from headstyle.training import checkpointing
from headstyle.training.log import MetricsLog

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def stylize(monkeypatch, capsys):
    """Run `headstyle stylize ARGS` through main (as the console script does): (exit code, stderr)."""

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["headstyle", "stylize", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        return exit_info.value.code, capsys.readouterr().err

    return run


def _save(run: Path, iteration: int, value: float) -> Path:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
    rank_state = checkpointing.capture_rng({})
    return checkpointing.save_checkpoint(
        run, iteration, {"w": torch.full((2,), value)}, opt, rank_state, {"param_names": ["w"]}, "x = 1\n"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=nan", "optim.lr: expected a number"),
        ("optim.lr=-1", "optim.lr must be a positive number"),
        ("optim.beta1=2", "optim.beta1 = 2.0 lies outside"),
        ("latent.truncation_psi=nan", "latent.truncation_psi: expected a number"),
        ("optim.train_modules=[]", "optim.train_modules is empty"),
        ("single.yaw_range=1000", "single.yaw_range = 1000.0 lies outside [0.0, 180.0] (degrees"),
        ("run.sample_yaws=[inf]", "run.sample_yaws are degrees within [-360, 360]"),
    ],
)
def test_meaningless_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(StylizeConfig(), [override])


def test_angles_are_degrees_and_printed_with_their_unit():
    cfg = StylizeConfig()
    assert (cfg.single.yaw_range, cfg.grid.pitch_range, cfg.run.sample_pitch) == (60.0, 30.0, 10.0)
    text = dumps(cfg)
    assert "yaw_range = 60.0  # degrees" in text and "sample_yaws = [  # degrees" in text
    assert apply_overrides(StylizeConfig(), []) == cfg  # the commented TOML still reads back (config round trip)


def test_resume_may_change_only_length_and_outputs():
    saved = StylizeConfig()
    longer = apply_overrides(saved, ["run.iterations=20000", "run.out=elsewhere", "run.sample_every=10"])
    assert resume_differences(saved, longer) == []
    changed = apply_overrides(saved, ["optim.lr=2e-4", "prompt.prompt=other", "objective.name=sds"])
    assert resume_differences(saved, changed) == [
        "objective.name: 'ld' -> 'sds'",
        "optim.lr: 0.0001 -> 0.0002",
        "prompt.prompt: '' -> 'other'",
    ]


def test_stylize_refuses_a_folder_holding_a_run_and_names_the_fixes(tmp_path, stylize):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    (run / "notes.txt").write_text("mine")
    code, out = stylize("--generator", str(tmp_path / "G.safetensors"), "--prompt", "x", "--out", str(run))
    assert code == 2 and out.count("\n") == 1
    assert f"--resume {run}" in out and "--overwrite" in out
    checkpointing.clear_run(run)  # what --overwrite does first: only the run's own files go
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"] and not checkpointing.run_exists(run)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "{tmp}/file.txt/run"], "lies under the file"),
        (["--out", "/proc/headstyle-run"], "cannot write in /proc"),
        (["--out", "{tmp}/r", "--style-image", "{tmp}", "--set", "objective.name=sds", "--set",
          "objective.weighting=sds"], "is a folder"),
        (["--out", "{tmp}/r", "--style-image", "{tmp}/file.txt", "--set", "objective.name=sds", "--set",
          "objective.weighting=sds"], "not a readable image"),
        (["--out", "{tmp}/r", "--set", "run.device=tpu:7"], "available: cpu"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, stylize, args, message):
    (tmp_path / "file.txt").write_text("not an image")
    # The generator does not exist: every case must fail on its own problem before anything is loaded.
    base = ["--generator", str(tmp_path / "missing.safetensors"), "--prompt", "x"]
    code, out = stylize(*base, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and message in out and out.startswith("error: ") and out.count("\n") == 1, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_refused_not_run_on_cpu(tmp_path, stylize):
    code, out = stylize("--generator", str(tmp_path / "G"), "--prompt", "x", "--out", str(tmp_path / "r"),
                        "--device", "cuda")  # fmt: skip
    assert code == 2 and "--device 'cuda' is not usable here" in out and "available: cpu" in out


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    run = tmp_path / "run"
    older, newer = _save(run, 1, 1.0), _save(run, 2, 2.0)
    assert checkpointing.resolve_checkpoint(run) == newer
    data = bytearray((newer / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a weight
    (newer / "trainable.safetensors").write_bytes(bytes(data))
    skipped: list = []
    assert checkpointing.resolve_checkpoint(run, skipped) == older
    assert skipped == [(newer, "trainable.safetensors does not match its checksum")]
    with pytest.raises(checkpointing.ResumeError, match="corrupt"):
        checkpointing.resolve_checkpoint(newer)  # named explicitly: no silent fallback
    (older / "checksums.json").unlink()
    with pytest.raises(checkpointing.ResumeError, match=r"no checkpoint of .* verifies"):
        checkpointing.resolve_checkpoint(run)


def test_a_torn_log_line_names_its_file_and_line(tmp_path):
    entries = [json.dumps({"iteration": i, "loss": 0.5}) for i in (1, 2)]
    (tmp_path / "log.jsonl").write_text(entries[0] + "\n" + entries[1] + "\n" + '{"iterati')
    with pytest.raises(checkpointing.ResumeError, match=r"log\.jsonl, line 3: not a log entry"):
        MetricsLog(tmp_path, resume_iteration=2)


def test_a_second_signal_ends_the_process_at_once(tmp_path):
    """The first SIGINT asks for a clean stop; a second, while the checkpoint is written, kills the process by
    that signal (no traceback, no exit-0), and the previous checkpoint stays intact."""
    script = f"""
import signal, sys, time, torch
sys.path.insert(0, {str(REPO / 'src')!r})
from headstyle.training import checkpointing
from headstyle.training.signals import STOP
run = {str(tmp_path / 'run')!r}
opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
checkpointing.save_checkpoint(run, 1, {{"w": torch.ones(2)}}, opt, checkpointing.capture_rng({{}}), {{}}, "")
with STOP.deferred():
    signal.raise_signal(signal.SIGINT)
    print("requested", STOP.requested, flush=True)
    signal.raise_signal(signal.SIGINT)  # during the "save"
    print("still alive", flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGINT and proc.stdout == "requested True\n", proc.stderr
    assert "Traceback" not in proc.stderr
    assert checkpointing.resolve_checkpoint(tmp_path / "run").name == "iter_0000001"


def test_checkpoint_files_get_the_usual_permissions(tmp_path):
    """safetensors' save_file writes 0600; every checkpoint file gets 0666 less the umask like the run's others."""
    umask = os.umask(0)
    os.umask(umask)
    ckpt = _save(tmp_path / "run", 1, 1.0)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes
