"""The generator's module tree matches PanoHead's state_dict layout (full-size release and reduced fixture)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from headstyle.generator import Generator, TriPlaneGenerator


def _init_kwargs(config: dict, size: str) -> dict:
    """Constructor kwargs as train.py passes them: G_kwargs minus class_name, plus common_kwargs."""
    kwargs = {k: v for k, v in config[size]["G_kwargs"].items() if k != "class_name"}
    return {**kwargs, **config[size]["common_kwargs"]}


@pytest.fixture(scope="module")
def config(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "config.json").read_text())


def _read_key_table(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
        rows.append((key, dims, dtype))
    return rows


def test_full_size_state_dict_matches_release_table(parity_dir: Path, config: dict) -> None:
    with torch.device("meta"):
        G = TriPlaneGenerator(**_init_kwargs(config, "full_size"))
    expected = _read_key_table(parity_dir / "panohead_full_keys.tsv")
    got = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in G.state_dict().items()]
    assert [k for k, _, _ in got] == [k for k, _, _ in expected]  # same keys in the same order
    assert got == expected
    params = list(G.parameters())
    assert len(params) == config["full_size"]["num_parameter_tensors"]
    assert sum(p.numel() for p in params) == config["full_size"]["num_parameters"]
    assert sum(v.numel() for v in G.state_dict().values()) == config["full_size"]["num_state_dict_elements"]
    assert G.num_ws == config["full_size"]["backbone_num_ws"]
    assert G.bcg_synthesis.num_ws == config["full_size"]["bcg_num_ws"]
    assert G.neural_rendering_resolution == config["full_size"]["neural_rendering_resolution"]


def test_reduced_fixture_loads_strictly(parity_dir: Path, config: dict) -> None:
    G = TriPlaneGenerator(**_init_kwargs(config, "reduced"))
    params = load_file(parity_dir / "params.safetensors")
    G.load_state_dict(params, strict=True)
    assert isinstance(G, Generator)
    assert G.box_warp == G.rendering_kwargs["box_warp"] and isinstance(G.box_warp, float)
    assert set(G.state_dict()) == set(params)  # safetensors stores keys sorted, so compare as sets
    for key, value in G.state_dict().items():
        assert torch.equal(value, params[key]), key
    assert G.num_ws == config["reduced"]["backbone_num_ws"]
    assert G.bcg_synthesis.num_ws == config["reduced"]["bcg_num_ws"]
    assert sum(p.numel() for p in G.parameters()) == config["reduced"]["num_parameters"]


def test_optional_modules_follow_rendering_kwargs(config: dict) -> None:
    kwargs = _init_kwargs(config, "reduced")
    kwargs["rendering_kwargs"] = {**kwargs["rendering_kwargs"], "use_background": False, "use_torgb_raw": False}
    with torch.device("meta"):
        G = TriPlaneGenerator(**kwargs)
    assert G.bcg_synthesis is None and G.torgb is None
    assert not any(k.startswith(("bcg_synthesis.", "torgb.")) for k in G.state_dict())


def test_constructor_rejects_unsupported_configuration(config: dict) -> None:
    kwargs = _init_kwargs(config, "reduced")
    bad_sr = {**kwargs, "rendering_kwargs": {**kwargs["rendering_kwargs"], "superresolution_module": "x.SR2X"}}
    with pytest.raises(ValueError, match="SuperresolutionHybrid8XDC"):
        TriPlaneGenerator(**bad_sr)
    missing = {**kwargs, "rendering_kwargs": {"ray_start": 2.25}}
    with pytest.raises(ValueError, match="triplane_size"):
        TriPlaneGenerator(**missing)


def test_load_generator_returns_the_generator_seam(parity_dir: Path) -> None:
    """load_generator's generator declares every attribute callers read (Generator)."""
    from headstyle.generator.checkpoint import load_generator

    G = load_generator(parity_dir)
    assert isinstance(G, Generator)
    assert (G.w_dim, G.img_resolution) == (G.init_kwargs["w_dim"], G.init_kwargs["img_resolution"])
    assert G.box_warp == G.rendering_kwargs["box_warp"]
