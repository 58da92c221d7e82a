"""Fidelity to the LD authors' scripts (train_LD.py, infer_LD.py): cameras by known answers, the model folder's own
VAE offline, the README's fidelity table against --print-config, and the deviations a run prints."""

import importlib
import re
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from headstyle.cli import app
from headstyle.lab.world.generator import LabGenerator
from headstyle.priors.analytic import GaussianPrior
from headstyle.priors.diffusers_prior import DiffusersPrior
from headstyle.settings import ConfigError
from headstyle.stylize import factory
from headstyle.stylize.config import apply_overrides, conditioning_camera, view_cameras
from headstyle.stylize.presets import preset
from headstyle.stylize.trainer import Stylizer

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def script_cameras() -> dict[tuple[float, float], list[float]]:
    """25-vectors of the scripts' get_pose(cam_pivot=(0, 0, 0), yaw, pitch) at radius 2.7 and FOV 18.837: PanoHead's
    LookAtPoseSampler.sample(pi/2 + yaw, pi/2 + pitch, lookat (0, 0, 0)), create_cam2world_matrix and
    FOV_to_intrinsics written out in numpy float64 (not headstyle's code), rounded to 7 decimals. (0, 0.2) is the
    conditioning camera of both scripts."""
    k = [4.2633909, 0.0, 0.5, 0.0, 4.2633909, 0.5, 0.0, 0.0, 1.0]
    return {
        (0.0, 0.2): [1.0, 0.0, 0.0, 0.0, 0.0, -0.9918612, 0.127324, -0.3437747,
                     0.0, -0.127324, -0.9918612, 2.6780252, 0.0, 0.0, 0.0, 1.0, *k],
        (0.0, 0.0): [1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 2.7, 0.0, 0.0, 0.0, 1.0, *k],
        (0.5, -0.3): [0.8775826, 0.0915635, -0.4706006, 1.2706217, 0.0, -0.9815928, -0.1909859, 0.515662,
                      -0.4794255, 0.1676059, -0.8614287, 2.3258575, 0.0, 0.0, 0.0, 1.0, *k],
        (-1.0, 0.4): [0.5403023, 0.2142788, 0.8137309, -2.1970735, 0.0, -0.9670338, 0.2546479, -0.6875494,
                      0.841471, -0.1375869, -0.5224906, 1.4107247, 0.0, 0.0, 0.0, 1.0, *k],
        (-2.8, 0.2): [-0.9422223, 0.042652, 0.3322617, -0.8971067, 0.0, -0.9918612, 0.127324, -0.3437747,
                      0.3349882, 0.1199675, 0.9345538, -2.5232952, 0.0, 0.0, 0.0, 1.0, *k],
    }  # fmt: skip


class _RecordingLab(LabGenerator):
    """A lab generator that records every camera it maps with or renders at."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cams: list[torch.Tensor] = []

    def mapping(self, z, c, *args, **kwargs):
        self.cams.append(c.detach().clone())
        return super().mapping(z, c, *args, **kwargs)

    def synthesis(self, ws, c, *args, **kwargs):
        self.cams.append(c.detach().clone())
        return super().synthesis(ws, c, *args, **kwargs)


def test_ld_cameras_are_the_scripts_look_at_the_origin(script_cameras, tmp_path):
    """The preset's training cameras and its conditioning camera are the scripts' matrices, and every camera a
    training step, the probes and the previews use looks at (0, 0, 0)."""
    cfg = preset("werewolf")
    for (yaw, pitch), expected in script_cameras.items():
        torch.testing.assert_close(view_cameras(cfg, yaw, pitch)[0], torch.tensor(expected), atol=2e-6, rtol=0)
    torch.testing.assert_close(conditioning_camera(cfg)[0], torch.tensor(script_cameras[0.0, 0.2]), atol=2e-6, rtol=0)

    g = torch.Generator().manual_seed(0)
    prior = GaussianPrior({"style": torch.rand(3, 64, 64, generator=g) * 2 - 1, "photo": torch.zeros(3, 64, 64)})
    G = _RecordingLab(resolution=8, sr_factor=8, seed=0)
    G.rendering_kwargs["depth_resolution"] = 8
    cfg = apply_overrides(cfg, ["prompt.prompt=style", f"run.out={tmp_path}", "run.device=cpu",
                                "single.rank_weights=[1, 0.5]", "run.sample_identities=1"])  # fmt: skip
    stylizer = Stylizer(cfg, G, prior)
    stylizer.step()
    stylizer.write_samples()
    used = torch.cat(stylizer.G.cams + stylizer.frozen.cams)
    assert len(used) > 20  # mapping, single view + mirror, grid, probes, previews
    pose = used[:, :16].reshape(-1, 4, 4)
    origin, forward = pose[:, :3, 3], pose[:, :3, 2]
    torch.testing.assert_close(forward, -origin / origin.norm(dim=1, keepdim=True), atol=1e-5, rtol=0)
    conditioning = torch.tensor(script_cameras[0.0, 0.2])
    assert any(torch.allclose(c, conditioning, atol=2e-6) for c in used)


def test_a_complete_local_sd_folder_loads_with_nothing_but_the_folder(tiny_sd):
    """DiffusersPrior.from_pretrained(folder) offline: the folder's own vae/, no ControlNets."""
    prior = DiffusersPrior.from_pretrained(tiny_sd.model)
    assert prior.control_names == frozenset()
    with_own = DiffusersPrior.from_pretrained(tiny_sd.model, vae=None, controlnets={}, latent_sample="mean")
    prior.latent_sample = "mean"
    images = torch.rand(1, 3, tiny_sd.image_size, tiny_sd.image_size) * 2 - 1
    with torch.no_grad():
        assert torch.equal(prior.encode(images), with_own.encode(images))


def _fidelity_rows() -> list[tuple[str, str]]:
    """(section.field, TOML literal) of every row of the README's fidelity table that names a config field."""
    text = README.read_text()
    table = text[text.index("### Fidelity to the LD scripts") :]
    table = table[: table.index("\n\n", table.index("| script |"))]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`[a-z_]+\.[a-z_0-9]+`", cells[2]):
            rows.append((cells[2].strip("`"), cells[3].strip("`")))
    return rows


def test_print_config_of_a_preset_equals_the_fidelity_table():
    result = CliRunner().invoke(app, ["stylize", "--preset", "werewolf", "--print-config"])
    assert result.exit_code == 0, result.output
    printed = tomllib.loads(result.output)
    rows = _fidelity_rows()
    assert len(rows) >= 50
    for key, literal in rows:
        section, name = key.split(".")
        assert printed[section][name] == tomllib.loads(f"v = {literal}")["v"], key


def _alexnet_features(path: Path) -> Path:
    """torchvision AlexNet's feature convolutions (random), as the torch hub cache would hold them."""
    convs = [(0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3), (10, 256, 256, 3)]
    state = {}
    for idx, cin, cout, k in convs:
        state[f"features.{idx}.weight"], state[f"features.{idx}.bias"] = torch.randn(cout, cin, k, k), torch.zeros(cout)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_lpips_and_depth_come_from_the_caches_or_the_run_says_it_deviates(tmp_path, monkeypatch, depth_dir):
    """LPIPS-alex from torchvision's AlexNet in the torch hub cache and the lpips package's linear layers (found
    without importing it); without them, and without a depth estimator, one line each says what deviates and how
    to supply it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = preset("werewolf")
    notes: list[str] = []
    assert factory.build_lpips(cfg, torch.device("cpu"), notes.append) is None
    assert len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith("deviation from train_LD.py: no LPIPS-alex AlexNet or linear layers here")
    assert "alexnet-owt-7be5be79.pth" in notes[0] and "pip install lpips" in notes[0]

    _alexnet_features(tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    package = tmp_path / "site" / "lpips"
    (package / "weights" / "v0.1").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    sizes = (64, 192, 384, 256, 256)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(sizes)},
               package / "weights" / "v0.1" / "alex.pth")  # fmt: skip
    importlib.invalidate_caches()  # the folder was scanned before the package was put there
    notes.clear()
    assert factory.build_lpips(cfg, torch.device("cpu"), notes.append) is not None and notes == []

    prior = types.SimpleNamespace(control_names=frozenset({"canny", "depth"}))  # all the factory reads of it
    assert factory.build_depth_estimator(cfg, prior, torch.device("cpu"), notes.append) is None
    assert len(notes) == 1 and notes[0].startswith("deviation from train_LD.py: the grid's depth control is the")
    given = apply_overrides(cfg, [f"model.depth_estimator={depth_dir}"])
    assert factory.build_depth_estimator(given, prior, torch.device("cpu"), notes.append) is not None
    assert len(notes) == 1
    factory.check_local_files(given)
    with pytest.raises(ConfigError, match="no such file"):
        factory.check_local_files(apply_overrides(cfg, [f"regularisers.lpips_alexnet={tmp_path / 'none.pth'}"]))
