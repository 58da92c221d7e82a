"""Hostile inputs to the readers of images, JSON, TOML and CSV, and to the output-folder checks (issue 31).

Every file is made here, a few bytes to a few hundred kilobytes: PNG headers that claim 3.6 G, 100 M or 72 M
pixels, a truncated PNG, JSON and TOML nested 10^5 deep, bench records tampered in the ways a user or a disk
can (not JSON, a list, a missing field, a 5000-digit integer, invalid UTF-8, a non-numeric cell, a float seed).
Each command case runs the real command line in-process and asserts exit 2, one line on stderr naming the file or
option, no traceback and nothing written; the library cases (datasets, module manifests, model configs) assert
the reader's one-line error.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from headstyle.cli import main
from headstyle.generator.latents import MAX_CODES
from headstyle.input_files import MAX_PIXELS, InputError, depth_problem, parse_toml, pixel_problem, read_image
from headstyle.io import content_digest
from headstyle.lab.experiments.bench import LabSettings, _bench_record
from headstyle.lab.prior import learned
from headstyle.settings import MAX_IDENTITIES, MAX_VIEWS
from headstyle.sfa import dataset as sfa_dataset
from headstyle.sfa import module as sfa_module
from headstyle.weight_files import WeightsError, read_config_json

DEEP = 100_000


def png(width: int = 8, height: int = 8) -> bytes:
    """An 8 x 8 RGB PNG whose header (IHDR, CRC fixed) claims ``width`` x ``height``: a bomb without the bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 150)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # chunk type + 13 bytes of data
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


IMAGES = {
    "bomb.png": png(60_000, 60_000),  # 3.6 G pixels: PIL's own DecompressionBombError
    "warned.png": png(10_000, 10_000),  # 100 M: PIL would warn and decode
    "over.png": png(9_000, 8_000),  # 72 M: within PIL's limit, over the budget
    "truncated.png": png()[:45],
    "page.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",  # EPS: never handed to Ghostscript
}


def deep_json() -> str:
    return "[" * DEEP + "]" * DEEP


def refused(monkeypatch, capsys, argv: list[str], names: str) -> str:
    """Run ``headstyle argv``: exit 2 and one line on stderr holding ``names``, no traceback."""
    monkeypatch.setattr("sys.argv", ["headstyle", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and names in err, err
    return err


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def files(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in IMAGES.items():
        (folder / name).write_bytes(data)
    (folder / "good.png").write_bytes(png())
    (folder / "weights.pkl").write_bytes(b"not read: the inputs are refused first")
    return folder


# ---------------------------------------------------------------------------------------------- pure checks


def test_pixel_and_depth_checks():
    assert pixel_problem((8192, 8192)) is None
    assert "more than the 67108864 allowed" in pixel_problem((8193, 8192))
    assert "0 x 5" in pixel_problem((0, 5))
    assert depth_problem("[" * 64 + "]" * 64) is None
    assert depth_problem("[" * 65 + "]" * 65) == "it nests deeper than 64 levels"
    assert depth_problem('["' + "[" * 1000 + '"]') is None  # brackets in strings do not count
    assert parse_toml('a = "[[[#"  # [[[\nb = \'[[[\'\n', "t", InputError) == {"a": "[[[#", "b": "[[["}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_read_image_refuses_before_decoding(files, name):
    with pytest.raises(InputError) as info:
        read_image(files / name, InputError)
    message = str(info.value)
    assert message.startswith(str(files / name)) and "\n" not in message
    if name == "page.png":  # PIL alone opens it as EPS, whose load runs Ghostscript
        assert "cannot identify image file" in message, message
    elif name != "truncated.png":
        assert str(MAX_PIXELS) in message, message


# ---------------------------------------------------------------------------------------------- images, by command


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_align_refuses_a_bad_photo(name, files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    refused(monkeypatch, capsys, ["align", str(files / name), "--out", str(out)], name)
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["style-views", "--generator", "{w}", "--style-image", "{img}"], "--style-image"),
        (["style-views", "--generator", "{w}", "--style-image", "{good}", "--mask", "{img}"], "--mask"),
        (["stylize", "--generator", "{w}", "--style-image", "{img}", "--set", "objective.name=sds", "--set",
          "objective.weighting=sds"], "--style-image"),
        (["project", "--generator", "{w}", "--image", "{img}"], "--image"),
        (["photo", "{img}", "--generator", "{w}", "--stylized", "{w}"], "bomb.png"),
    ],
)
def test_commands_refuse_an_image_bomb_before_any_model_loads(command, option, files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    values = {"w": files / "weights.pkl", "img": files / "bomb.png", "good": files / "good.png"}
    argv = [a.format(**values) for a in command] + ["--out", str(out)]
    err = refused(monkeypatch, capsys, argv, option)
    assert "bomb.png" in err and not out.exists()


def test_sfa_dataset_refuses_a_bomb_sample_png(tmp_path):
    root = tmp_path / "dataset"
    manifest = {"format": sfa_dataset.FORMAT, "version": sfa_dataset.FORMAT_VERSION, "styles": ["gold"],
                "settings": {"samples": 1, "views": 1}, "sources": {}}  # fmt: skip
    root.mkdir()
    (root / sfa_dataset.MANIFEST).write_text(json.dumps(manifest))
    (root / sfa_dataset.INDEX).write_text('{"style": "gold", "sample": 0, "content_seed": 1, "style_seed": 2}\n')
    sample = root / "samples" / "gold" / "00000"
    sample.mkdir(parents=True)
    save_file({"cameras": torch.zeros(1, 25)}, str(sample / sfa_dataset.ARRAYS))
    (sample / "content_front.png").write_bytes(IMAGES["bomb.png"])
    with pytest.raises(sfa_dataset.DatasetError, match=r"content_front\.png: an image bomb"):
        sfa_dataset.SFADataset(root).load(0)


# ---------------------------------------------------------------------------------------------- JSON and TOML


def test_project_refuses_a_deep_camera_file(files, tmp_path, monkeypatch, capsys):
    (files / "dataset.json").write_text(deep_json())
    argv = ["project", "--generator", str(files / "weights.pkl"), "--image", str(files / "good.png"), "--out",
            str(tmp_path / "out")]  # fmt: skip
    err = refused(monkeypatch, capsys, argv, "dataset.json")
    assert "nests deeper than 64 levels" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.toml", "a = " + deep_json()),
        ("deep.json", deep_json()),
        ("latin1.toml", b"a = '\xff'"),
        ("digits.json", '{"a": ' + "7" * 5000 + "}"),
        ("digits.toml", "a = " + "7" * 5000),
    ],
)
def test_style_views_refuses_a_hostile_config_file(name, text, files, tmp_path, monkeypatch, capsys):
    path = files / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(monkeypatch, capsys, ["style-views", "--config", str(path), "--out", str(tmp_path / "out")], name)
    assert not (tmp_path / "out").exists()


def test_a_deep_override_is_refused(tmp_path, monkeypatch, capsys):
    argv = ["style-views", "--set", "fusion.tau=" + deep_json(), "--out", str(tmp_path / "out")]
    refused(monkeypatch, capsys, argv, "fusion.tau")


def test_deep_dataset_manifest_and_index_are_refused(tmp_path):
    root = tmp_path / "dataset"
    root.mkdir()
    (root / sfa_dataset.MANIFEST).write_text(deep_json())
    with pytest.raises(sfa_dataset.DatasetError, match=r"dataset\.json: it nests deeper"):
        sfa_dataset.SFADataset(root)
    manifest = {"format": sfa_dataset.FORMAT, "version": sfa_dataset.FORMAT_VERSION, "styles": ["gold"],
                "settings": {}, "sources": {}}  # fmt: skip
    (root / sfa_dataset.MANIFEST).write_text(json.dumps(manifest))
    (root / sfa_dataset.INDEX).write_text(deep_json() + "\n")
    with pytest.raises(sfa_dataset.DatasetError, match=r"index\.jsonl, line 1: it nests deeper"):
        sfa_dataset.SFADataset(root)


def test_deep_module_manifest_and_model_config_are_refused(tmp_path):
    (tmp_path / sfa_module.MANIFEST).write_text(deep_json())
    with pytest.raises(sfa_module.ModuleLoadError, match=r"sfa_module\.json: it nests deeper"):
        sfa_module.read_manifest(tmp_path)
    (tmp_path / "config.json").write_text(deep_json())
    with pytest.raises(WeightsError, match=r"config\.json: it nests deeper"):
        read_config_json(tmp_path / "config.json", WeightsError, "give the model folder")


def test_deep_sd_model_index_and_checkpoint_records_are_refused(tmp_path):
    from headstyle.priors.diffusers_prior import DiffusersPrior, PriorLoadError
    from headstyle.training.checkpointing import ResumeError, load_checkpoint, verify_checkpoint

    model = tmp_path / "sd"
    model.mkdir()
    (model / "model_index.json").write_text(deep_json())
    with pytest.raises(PriorLoadError, match=r"model_index\.json: it nests deeper"):
        DiffusersPrior.from_pretrained(str(model), controlnets={})
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "checksums.json").write_text(deep_json())
    assert verify_checkpoint(checkpoint) == "checksums.json is missing or unreadable (it nests deeper than 64 levels)"
    (checkpoint / "state.json").write_text(deep_json())  # listed with its checksum: only its reader can refuse it
    (checkpoint / "checksums.json").write_text(json.dumps({"state.json": content_digest(checkpoint / "state.json")}))
    with pytest.raises(ResumeError, match=r"state\.json: it nests deeper"):
        load_checkpoint(checkpoint)



@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("log.jsonl", '{"iteration": 1}\n' + deep_json() + "\n", r"log\.jsonl, line 2: not a log entry: it nests"),
        ("log.jsonl", '{"iteration": 1.5}\n', r"line 1: not a log entry \(field 'iteration' must be int"),
        ("log.jsonl", "[1]\n", r"line 1: not a log entry \(not an object\)"),
        ("log.csv", "iteration,loss\n1,0.5\nx,0.5\n", r"log\.csv, row 2: no iteration"),
    ],
)
def test_a_resumed_runs_tampered_log_is_refused(name, text, message, tmp_path):
    from headstyle.training.checkpointing import ResumeError
    from headstyle.training.log import MetricsLog

    (tmp_path / name).write_text(text)
    with pytest.raises(ResumeError, match=message):
        MetricsLog(tmp_path, resume_iteration=1)



def test_lab_prior_runs_with_deep_records_are_refused(tmp_path, monkeypatch, capsys):
    from headstyle.lab.prior.recipe import DOMAINS, domain_name

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(deep_json())
    refused(monkeypatch, capsys, ["lab", "train-prior", "--out", str(run), "--resume", "--config", "tiny"],
            "config.json: it nests deeper")  # fmt: skip
    for domain in DOMAINS:  # the data and vae stages look done: prior-card reads stages.json next
        (run / "data" / f"{domain_name(domain)}.safetensors").write_bytes(b"")
    (run / "model" / "vae").mkdir(parents=True)
    (run / "stages.json").write_text(deep_json())
    refused(monkeypatch, capsys, ["lab", "prior-card", "--run", str(run)], "stages.json: it nests deeper")
    (run / "stages.json").write_text('{"decoder": {"finished": true}}')  # every stage done: the config is read
    for name in ("unet", "controlnet-depth", "controlnet-canny"):
        (run / "model" / name).mkdir()
    (run / "model" / "model_index.json").write_text("{}")
    (run / "config.json").write_text('{"unet_steps": 10, "bogus": 1}')
    refused(monkeypatch, capsys, ["lab", "prior-card", "--run", str(run)], "unknown field 'bogus'")



@pytest.mark.parametrize(("fixture", "name"), [("clip_dir", "tokenizer_config.json"),
                                              ("depth_dir", "preprocessor_config.json")])  # fmt: skip
def test_a_deep_processor_or_tokenizer_file_is_refused(fixture, name, request, tmp_path):
    import shutil

    from headstyle.metrics.clip_score import CLIPScorer
    from headstyle.metrics.depth_error import DepthAnything

    folder = tmp_path / "model"
    shutil.copytree(request.getfixturevalue(fixture), folder)
    (folder / name).write_text(deep_json())
    with pytest.raises(WeightsError, match=rf"{name}: it nests deeper"):
        (CLIPScorer if fixture == "clip_dir" else DepthAnything)(folder)


def test_the_apps_progress_skips_a_deep_log_line(tmp_path):
    from headstyle.app.training import _last_log_entry

    log = tmp_path / "log.jsonl"
    log.write_text('{"iteration": 3}\n' + "[" * 4000 + "]" * 4000 + "\n")
    assert _last_log_entry(log) == {"iteration": 3}


# ---------------------------------------------------------------------------------------------- bench records


def bench_folder(tmp_path: Path, record: bytes | None = None, runs: str | bytes | None = None) -> Path:
    """A bench --out holding ``record`` as bench.json (default: the genuine record of `lab bench --prior exemplar`
    with its defaults) and ``runs`` as runs.csv."""
    out = tmp_path / "bench"
    out.mkdir()
    genuine = _bench_record(learned.resolve_prior("exemplar"), LabSettings(curve_every=10))
    (out / "bench.json").write_bytes(record if record is not None else json.dumps(genuine).encode())
    if runs is not None:
        (out / "runs.csv").write_bytes(runs if isinstance(runs, bytes) else runs.encode())
    return out


def no_prior_load(monkeypatch) -> None:
    def load(*args, **kwargs):
        raise AssertionError("the prior loaded")

    monkeypatch.setattr(learned.LabPriorSpec, "load", load)


RESUME = ["lab", "bench", "--prior", "exemplar", "--resume", "--no-progress"]
HEADER = "style,variant,optimizer,seed,rgb_error\n"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"prior": "exemplar"}', "field 'settings' is missing"),
        (b'{"settings": [1]}', "field 'settings' must be dict"),
        (b'{"settings": {"iterations": ' + b"9" * 5000 + b"}}", "an integer too long"),
        (b'{"settings": "\xff"}', "not UTF-8"),
        (deep_json().encode(), "nests deeper"),
    ],
)
def test_a_tampered_bench_record_is_refused(record, message, tmp_path, monkeypatch, capsys):
    out = bench_folder(tmp_path, record)
    before = listing(out)
    no_prior_load(monkeypatch)
    err = refused(monkeypatch, capsys, [*RESUME, "--out", str(out)], "bench.json")
    assert message in err and listing(out) == before


@pytest.mark.parametrize(
    ("runs", "message"),
    [
        (HEADER + "statue,ld,adam,0,abc\n", "column 'rgb_error' must be a number"),
        (HEADER + "statue,ld,adam,1.5,0.1\n", "column 'seed' must be an integer"),
        (HEADER + "statue,ld,adam," + "9" * 5000 + ",0.1\n", "column 'seed' must be an integer"),
        (HEADER + "statue,ld,adam,-1,0.1\n", "column 'seed' must be an integer"),
        ("style,variant,rgb_error\nstatue,ld,0.1\n", "column 'optimizer' is empty or absent"),
        (HEADER + "statue,ld,adam,0,0.1,extra\n", "another number of cells"),
        (HEADER.encode() + b"statue,ld,adam,0,\xff\n", "not UTF-8"),
    ],
)
def test_a_tampered_runs_table_is_refused(runs, message, tmp_path, monkeypatch, capsys):
    out = bench_folder(tmp_path, runs=runs)
    before = listing(out)
    no_prior_load(monkeypatch)
    err = refused(monkeypatch, capsys, [*RESUME, "--out", str(out)], "runs.csv")
    assert message in err and listing(out) == before


def test_a_genuine_bench_folder_is_resumed(tmp_path, monkeypatch):
    """The control of the two above: the same record and a well-formed table get as far as the prior's load."""
    out = bench_folder(tmp_path, runs=HEADER + "statue,ld,adam,0,0.25\n")
    no_prior_load(monkeypatch)
    monkeypatch.setattr("sys.argv", ["headstyle", *RESUME, "--out", str(out)])
    with pytest.raises(AssertionError, match="the prior loaded"):
        main()


# ---------------------------------------------------------------------------------------------- output folders


@pytest.mark.parametrize("command", [["demo"], ["lab", "bench"]])
@pytest.mark.parametrize("where", ["file", "under-file", "proc"])
def test_lab_commands_check_their_output_folder(command, where, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = {"file": blocker, "under-file": blocker / "out", "proc": Path("/proc/headstyle-out")}[where]
    no_prior_load(monkeypatch)
    refused(monkeypatch, capsys, [*command, "--prior", "exemplar", "--out", str(out)], "--out")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_demo_refuses_a_seed_out_of_range(seed, tmp_path, monkeypatch, capsys):
    no_prior_load(monkeypatch)
    out = tmp_path / "out"
    refused(monkeypatch, capsys, ["demo", "--prior", "exemplar", "--seed", seed, "--out", str(out)], "--seed")
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["project", "--generator", "{w}", "--image", "{good}", "--seed", "-1"], "--seed"),
        (["photo", "{good}", "--generator", "{w}", "--stylized", "{w}", "--seed", "-1"], "--seed"),
        (["eval", "--base", "{w}", "--stylized", "{w}", "--reference-seed", "-1"], "--reference-seed"),
        (["sfa", "dataset", "--base", "{w}", "--stylized", "{w}", "--camera-seed", "-1"], "camera_seed"),
        (["stylize", "--generator", "{w}", "--prompt", "a statue", "--set", "run.seed=-1"], "run.seed"),
        (["style-views", "--generator", "{w}", "--style-image", "{good}", "--seed", "-1"], "seed must be"),
        (["sfa", "train", "--data", "{in}", "--seed", "-1"], "seed must be"),
    ],
)
def test_commands_refuse_a_negative_seed(command, option, files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    values = {"w": files / "weights.pkl", "good": files / "good.png", "in": files}
    argv = [a.format(**values) for a in command] + ["--out", str(out)]
    refused(monkeypatch, capsys, argv, option)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- own process

PEAK_LIMIT = 1 << 30  # 1 GiB: the interpreter with torch imported, and nothing the files declare
# `python -m headstyle ARGS` that writes its peak resident memory (VmHWM, which exec resets; a forked child's
# ru_maxrss would still count the pytest process it was forked from) to the file in argv[1] as it exits.
SPAWN = """
import atexit, runpy, sys
peak_file = sys.argv[1]

def peak():
    hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    open(peak_file, "w").write(str(int(hwm.split()[1]) * 1024))

atexit.register(peak)
sys.argv = ["headstyle", *sys.argv[2:]]
runpy.run_module("headstyle", run_name="__main__")
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["align", "{in}/bomb.png"],
        ["style-views", "--config", "{in}/deep.json"],
        ["demo", "--prior", "exemplar", "--seed", "-1"],
    ],
)
def test_a_refusal_in_its_own_process(argv, files, tmp_path):
    """`python -m headstyle` as a user runs it: exit 2 and one line at the file descriptor, within PEAK_LIMIT."""
    import os
    import subprocess
    import sys

    (files / "deep.json").write_text(deep_json())
    out, peak = tmp_path / "out", tmp_path / "peak.txt"
    command = [sys.executable, "-c", SPAWN, str(peak), *(a.format(**{"in": files}) for a in argv), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines
    assert int(peak.read_text()) < PEAK_LIMIT and not out.exists()


# ---------------------------------------------------------------------------------------------- work budgets

BIG_LIST = {"yaws": ",".join(["0"] * (MAX_VIEWS.high + 1)), "seeds": ",".join(map(str, range(MAX_IDENTITIES.high + 1)))}
PROJECT = ["project", "--generator", "{w}", "--image", "{good}"]
PHOTO = ["photo", "{good}", "--generator", "{w}", "--stylized", "{w}"]
RENDER = ["render", "--generator", "{w}"]
MESH = ["mesh", "--generator", "{w}"]
EVAL = ["eval", "--base", "{w}", "--stylized", "{w}"]
SFA_DATASET = ["sfa", "dataset", "--base", "{w}", "--stylized", "{w}"]
STYLE_VIEWS = ["style-views", "--generator", "{w}", "--style-image", "{good}"]


def budget_argv(command: list[str], files: Path, out: Path) -> list[str]:
    values = {"w": files / "weights.pkl", "good": files / "good.png", "in": files, "npz": files / "codes.npz",
              **BIG_LIST}
    return [a.format(**values) for a in command] + ["--out", str(out)]


@pytest.mark.parametrize(
    ("command", "names"),
    [
        ([*PROJECT, "--w-avg-samples", "1000000000"], "--w-avg-samples 1000000000 lies outside [1, 1000000]: each"),
        ([*PHOTO, "--w-avg-samples", "1000001"], "--w-avg-samples"),
        ([*PROJECT, "--steps", "1000001"], "--steps 1000001 lies outside [1, 1000000]: a million iterations"),
        ([*PROJECT, "--pti", "1000001"], "--pti"),
        ([*PHOTO, "--turntable", "3601"], "--turntable 3601 lies outside [0, 3600]: one frame per 0.1 degree"),
        ([*RENDER, "--turntable", "3601"], "--turntable"),
        ([*RENDER, "--yaws", "{yaws}"], "--yaws count 361 lies outside [0, 360]: one view per degree"),
        ([*RENDER, "--seeds", "{seeds}"], "--seeds count 10001 lies outside [1, 10000]"),
        ([*RENDER, "--truncation", "-2.5"], "--truncation -2.5 lies outside [-2.0, 2.0]: 1 = no truncation"),
        ([*RENDER, "--truncation", "1e9"], "--truncation"),
        ([*RENDER, "--truncation-cutoff", "-1"], "--truncation-cutoff -1 lies outside [0, 32]"),
        ([*RENDER, "--w-npz", "{npz}"], "holds 1001 codes, more than the 1000"),
        ([*MESH, "--truncation-cutoff", "33"], "--truncation-cutoff"),
        ([*MESH, "--smooth", "10001"], "--smooth 10001 lies outside [0, 10000]: each Taubin step"),
        ([*MESH, "--batch-size", str(2**24 + 1)], "--batch-size"),
        ([*EVAL, "--ring", "361"], "--ring 361 lies outside [1, 360]"),
        ([*EVAL, "--identities", "10001"], "--identities 10001 lies outside [1, 10000]"),
        ([*EVAL, "--views", "{yaws}"], "--views count 361"),
        ([*SFA_DATASET, "--views", "361"], "views = 361 lies outside [1, 360]: one view per degree"),
        ([*SFA_DATASET, "--samples", "10001"], "samples = 10001 lies outside [1, 10000]"),
        ([*SFA_DATASET, "--truncation", "-3"], "truncation_psi = -3.0 lies outside [-2.0, 2.0]"),
        (["sfa", "train", "--data", "{in}", "--views", "361"], "train: views = 361 lies outside [1, 360]"),
        (["sfa", "train", "--data", "{in}", "--iterations", "1000001"],
         "train: iterations = 1000001 lies outside [0, 1000000]"),
        (["stylize", "--generator", "{w}", "--prompt", "a statue", "--iterations", "1000001"],
         "run.iterations = 1000001 lies outside [1, 1000000]: a million"),
        (["stylize", "--generator", "{w}", "--prompt", "a statue", "--set", "latent.truncation_cutoff=-1"],
         "latent.truncation_cutoff = -1 lies outside [0, 32]"),
        ([*STYLE_VIEWS, "--steps", "100000000"],
         "sampling: steps = 100000000 lies outside [1, 1000]: the diffusion schedule"),
        ([*STYLE_VIEWS, "--truncation", "3"], "views: truncation_psi = 3.0 lies outside [-2.0, 2.0]"),
        ([*STYLE_VIEWS, "--seeds", "{seeds}"], "at most 10000 seeds"),
        (["lab", "sfa-ablation", "--identities", "10001"], "eval_identities = 10001 lies outside [1, 10000]"),
        (["lab", "sfa-ablation", "--iterations", "1000001"], "iterations = 1000001"),
        (["demo", "--prior", "exemplar", "--iterations", str(10**11)], "--iterations 100000000000 lies outside"),
        ([*EVAL, "--reference-steps", "1001"], "reference steps must lie in [1, 1000] (the diffusion schedule"),
        (["stylize", "--generator", "{w}", "--prompt", "a statue", "--set", "objective.num_inference_steps=1001"],
         "objective.num_inference_steps = 1001 lies outside [1, 1000]"),
    ],
)
def test_commands_refuse_work_past_their_budget(command, names, files, tmp_path, monkeypatch, capsys):
    """Each count, size and iteration past its maximum: exit 2, one line naming the option, its range and the
    reason, before any model loads (the generator is not a pickle at all)."""
    no_prior_load(monkeypatch)
    np.savez(files / "codes.npz", w=np.zeros((MAX_CODES + 1, 1, 512), np.float32))
    out = tmp_path / "out"
    refused(monkeypatch, capsys, budget_argv(command, files, out), names)
    assert not out.exists()


def test_render_at_its_budgets_gets_to_the_generator(files, tmp_path, monkeypatch, capsys):
    """At every maximum the options pass: the refusal is the generator file's, not a budget's."""
    np.savez(files / "codes.npz", w=np.zeros((MAX_CODES, 1, 512), np.float32))
    yaws = ",".join(["0"] * MAX_VIEWS.high)
    seeds = ",".join(map(str, range(MAX_IDENTITIES.high)))
    for extra in (["--turntable", "3600", "--yaws", yaws, "--truncation", "2", "--truncation-cutoff", "32",
                   "--seeds", seeds], ["--w-npz", "{npz}", "--truncation", "-2"]):
        err = refused(monkeypatch, capsys, budget_argv([*RENDER, *extra], files, tmp_path / "out"), "weights.pkl")
        assert "lies outside" not in err, err


def test_budgets_at_and_past_their_maxima():
    from headstyle import settings
    from headstyle.app.config import PhotoSection
    from headstyle.attention.config import SamplingConfig
    from headstyle.cli.common import UserError, check_count
    from headstyle.faces.projector import ProjectConfig
    from headstyle.sfa.dataset import DatasetSettings
    from headstyle.stylize.config import RunConfig

    ten = settings.Budget(10, "why")
    check_count("--n", 10, 0, ten)
    with pytest.raises(UserError, match=r"^--n 11 lies outside \[0, 10\]: why$"):
        check_count("--n", 11, 0, ten)
    with pytest.raises(UserError):
        check_count("--n", math.nan, 0, ten)
    SamplingConfig(steps=settings.MAX_DDIM_STEPS.high)
    DatasetSettings(samples=MAX_IDENTITIES.high, views=MAX_VIEWS.high, truncation_psi=2.0, truncation_cutoff=32)
    PhotoSection(steps=settings.MAX_ITERATIONS.high, w_avg_samples=settings.MAX_W_AVG_SAMPLES.high)
    assert settings.field_problem(RunConfig(iterations=settings.MAX_ITERATIONS.high, turntable_frames=3600)) is None
    for make in (lambda: SamplingConfig(steps=1001), lambda: DatasetSettings(truncation_cutoff=33),
                 lambda: PhotoSection(w_avg_samples=10**9)):  # fmt: skip
        with pytest.raises(ValueError, match="lies outside"):
            make()
    assert "lies outside [1, 1000000]: a million" in settings.field_problem(RunConfig(iterations=10**6 + 1))
    with pytest.raises(ValueError, match=r"w_avg_samples = 1000000000 lies outside \[1, 1000000\]"):
        ProjectConfig(w_avg_samples=10**9)  # the library's own check, for callers that skip the command line


def test_a_code_file_past_its_count_is_refused_from_its_header(tmp_path):
    from headstyle.generator.latents import CodeFileError, check_code_file, latents_from_npz

    path = tmp_path / "codes.npz"
    np.savez(path, w=np.zeros((MAX_CODES, 1, 512), np.float32))
    check_code_file(path)
    np.savez(path, w=np.zeros((MAX_CODES + 1, 1, 512), np.float32))
    for check in (check_code_file, lambda p: latents_from_npz(p, 14)):
        with pytest.raises(CodeFileError, match="holds 1001 codes"):
            check(path)
    path.write_bytes(b"PK not a zip")
    with pytest.raises(CodeFileError, match="not a readable npz file"):
        check_code_file(path)
