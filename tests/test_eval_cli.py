"""`headstyle eval` on the lab world agrees with the lab bench's figures for the same run; bad input exits 2 with
one line before any model loads, and writes nothing."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from headstyle.cli import app, main


def test_eval_lab_reproduces_the_bench_row_of_a_run(tmp_path):
    from headstyle.lab.experiments.bench import LabSettings, run_bench

    settings = LabSettings(iterations=1, prior_identities=2, prior_views=2, eval_identities=2, eval_views=4,
                           prior="exemplar")
    run_bench(("statue",), ("sds",), settings, tmp_path / "bench", progress=False)
    with open(tmp_path / "bench" / "runs.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["variant"] == "sds")
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--lab", "statue", "--stylized", str(tmp_path / "bench" / "runs" /
                                      "statue-sds-adam-seed0"), "--identities", "2", "--ring", "4", "--out", str(out),
                                      "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    lab = report["metrics"]["lab"]
    run_figures = ("style", "variant", "optimizer", "seed", "seconds", "zero_grad_share", "nonfinite_grad_share",
                   "iterations_run")
    figures = {k: float(v) for k, v in row.items() if k not in run_figures}
    assert set(figures) == set(lab)
    for key, value in figures.items():
        assert lab[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # The general multi-view figure is the lab's own, for the same renders.
    assert report["metrics"]["multiview"]["mv_warp_error"] == lab["mv_warp_error"]
    assert report["counts"]["views"] == 8 and report["settings"]["identities"] == 2
    assert report["settings"]["yaws_degrees"] == [0.0, 90.0, -180.0, -90.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stylized", "{g}"], "give --base G"),
        (["--base", "{g}", "--lab", "statue", "--stylized", "{g}"], "exactly one"),
        (["--lab", "marble", "--stylized", "{g}"], "not a lab style"),
        (["--base", "{g}", "--stylized", "{g}", "--arcface", "{tmp}/missing.pth"], "--arcface"),
        (["--base", "{g}", "--stylized", "{g}", "--clip", "{tmp}/nowhere"], "no such folder"),
        (["--base", "{g}", "--stylized", "{g}", "--prior", "some/model"], "give --prompt too"),
        (["--base", "{g}", "--stylized", "{g}", "--prompt", "x", "--prior", "o/m", "--reference-start", "50"],
         "--reference-start"),
        (["--base", "{g}", "--stylized", "{g}", "--prompt", "x", "--prior", "{tmp}/small.pth"], "not a diffusers"),
        (["--base", "{g}", "--stylized", "{g}", "--views", "0,nan"], "--views"),
        (["--base", "{g}", "--stylized", "{g}", "--ring", "0"], "--ring"),
        (["--base", "{g}", "--stylized", "{tmp}/none.pkl"], "--stylized"),
        (["--base", "{g}", "--stylized", "{g}", "--inception", "{tmp}/small.pth"], "not the FID Inception"),
        (["--base", "{g}", "--stylized", "{g}", "--arcface", "{tmp}/small.pth"], "not an ArcFace backbone"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, message, tmp_path, monkeypatch, capsys):
    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "small.pth")
    out = tmp_path / "out"
    argv = ["headstyle", "eval", *(a.format(g=tmp_path / "small.pth", tmp=tmp_path) for a in args), "--out", str(out)]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_ring_views_are_the_lab_bench_cameras():
    from headstyle.cameras import cameras
    from headstyle.cli.eval import ring_yaws
    from headstyle.lab.experiments.evaluate import eval_cameras

    for n in (4, 8):
        yaws = torch.tensor(ring_yaws(n))
        torch.testing.assert_close(cameras(yaws, torch.full((n,), math.radians(10))), eval_cameras(n))
