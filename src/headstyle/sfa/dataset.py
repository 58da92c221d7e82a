"""The paired multi-view dataset of DiffStyle360 (Sec. 3.4, Supp. 6), made by stylised 3D generators.

For each style (a stylised generator, e.g. a `headstyle stylize` run) and sample: the content identity's
front and back renders by the BASE generator (the content appearance module's input), a cross-identity
style exemplar (another identity, front and back, rendered by the STYLISED generator: the style module's
input), and V views of the content identity at random 360-degree cameras: the base render, the
ground-truth stylised render (the training target) and the stylised head's depth and mask.

Folder format (FORMAT, FORMAT_VERSION)::

    DIR/dataset.json            format, version, settings, style names and where their generators came from
    DIR/held_out.safetensors    "z" (E, z_dim): the evaluation identities the writer kept out of every pair
    DIR/index.jsonl             one line per COMPLETE sample:
                                {"style", "sample", "content_seed", "style_seed"}
    DIR/samples/<style>/<sample:05d>/
        content_front.png  content_back.png    base renders of the content identity (yaw 0 and 180 deg)
        style_front.png    style_back.png      stylised renders of the style identity (yaw 0 and 180 deg)
        view_XX_content.png                    base render of the content identity at camera XX
        view_XX_target.png                     stylised render of the content identity at camera XX
        arrays.safetensors                     cameras (V, 25), reference_cameras (2, 25), depth and mask
                                               (V, 1, h, w) of the stylised views, z_content, z_style (z_dim,)

Identities are named by seeds (z = headstyle.generator.latents.z_from_seed): sample i's content is
seed first_seed + 2 i, its style exemplar first_seed + 2 i + 1, the same for every style; the cameras of
sample i depend on (camera_seed, i) only, so every style's sample i is the same head at the same cameras.

Writing is incremental and resumable: a sample is written into a hidden folder, renamed into place when
complete, then its index line is appended and synced. The reader ignores a torn last line; a resume
rewrites any sample folder without its index line and continues where the index stops (``samples`` may
grow between runs, nothing else may change).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from headstyle.attention.config import REFERENCE_YAWS
from headstyle.cameras import cameras, conditioning_camera
from headstyle.generator.base import Generator
from headstyle.generator.latents import z_from_seed
from headstyle.input_files import MiB, parse_json, read_image, read_text
from headstyle.io import atomic_path, atomic_write_text, read_format_manifest
from headstyle.progress import progress_bar
from headstyle.settings import (
    MAX_IDENTITIES,
    MAX_TRUNCATION_CUTOFF,
    MAX_VIEWS,
    TRUNCATION_PSI,
    check_fields,
    param,
    seed_problem,
)
from headstyle.training.lock import folder_lock
from headstyle.training.signals import STOP

FORMAT = "headstyle-sfa-dataset"
FORMAT_VERSION = 1
MANIFEST = "dataset.json"
INDEX = "index.jsonl"
HELD_OUT = "held_out.safetensors"
ARRAYS = "arrays.safetensors"
STYLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Two identities closer than this in z are the same identity (z entries are N(0, 1) draws).
LEAK_DISTANCE = 1e-3
# An index line is about 80 bytes: room for 800 000 samples.
MAX_INDEX_BYTES = 64 * MiB


class DatasetError(ValueError):
    """A dataset folder that cannot be read or continued; the message names the file and the fix."""


class LeakError(DatasetError):
    """A training pair shows an evaluation identity."""


@dataclass(frozen=True)
class DatasetSettings:
    """samples per style, views per sample (the paper: 150 samples, a batch of 16 views), the identities'
    first seed, the mapping's truncation, the views' pitch range in DEGREES (uniform in [-pitch, pitch]),
    the cameras' seed and whether views are the super-resolved image (else the raw render)."""

    samples: int = param(150, at_least=1, budget=MAX_IDENTITIES)
    views: int = param(16, at_least=1, budget=MAX_VIEWS)
    first_seed: int = 100_000
    truncation_psi: float = param(0.7, budget=TRUNCATION_PSI)
    truncation_cutoff: int = param(14, low=0, budget=MAX_TRUNCATION_CUTOFF)
    pitch: float = 20.0
    camera_seed: int = 0
    render_sr: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 <= self.first_seed < 2**32 - 2 * self.samples:
            raise ValueError(f"first_seed must leave room for 2 * samples seeds below 2**32, got {self.first_seed}")
        if not (math.isfinite(self.pitch) and 0 <= self.pitch <= 80):
            raise ValueError(f"pitch is a range in degrees within [0, 80], got {self.pitch}")
        if problem := seed_problem("camera_seed", self.camera_seed):
            raise ValueError(problem)

    def seeds(self, sample: int) -> tuple[int, int]:
        """(content seed, style exemplar seed) of a sample: two different identities."""
        return self.first_seed + 2 * sample, self.first_seed + 2 * sample + 1

    def view_cameras(self, sample: int) -> Tensor:
        """(V, 25) cameras of a sample: one yaw in each of V equal sectors of 360 degrees, pitch in +-pitch."""
        seq = np.random.SeedSequence([self.camera_seed, sample])
        gen = torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] >> 1))
        u = torch.rand(self.views, 2, generator=gen)
        yaw = -math.pi + (torch.arange(self.views) + u[:, 0]) * (2 * math.pi / self.views)
        pitch = (2 * u[:, 1] - 1) * math.radians(self.pitch)
        return cameras(yaw, pitch)


@dataclass(frozen=True)
class Record:
    """One complete sample of the index."""

    style: str
    sample: int
    content_seed: int
    style_seed: int

    @property
    def folder(self) -> str:
        return f"samples/{self.style}/{self.sample:05d}"


@dataclass
class Sample:
    """A sample read back: images in [-1, 1] (N, 3, H, W) and its arrays."""

    record: Record
    content: Tensor  # (2, 3, H, W) base renders, front and back
    style: Tensor  # (2, 3, H, W) stylised renders of another identity, front and back
    views: Tensor  # (V, 3, H, W) base renders of the content identity
    targets: Tensor  # (V, 3, H, W) ground-truth stylised renders of the content identity
    cameras: Tensor  # (V, 25)
    reference_cameras: Tensor  # (2, 25)
    depth: Tensor  # (V, 1, h, w) ray depth of the stylised views
    mask: Tensor  # (V, 1, h, w)
    z_content: Tensor
    z_style: Tensor


# ------------------------------------------------------------------------------------------------- reading


def _read_png(path: Path) -> Tensor:
    """An RGB PNG as a (3, H, W) float tensor in [-1, 1] (exactly the uint8 values written)."""
    img = read_image(path, DatasetError, "rewrite it with `headstyle sfa dataset`", formats=("PNG",))
    if img.mode != "RGB":
        raise DatasetError(f"{path}: expected an RGB PNG, got {img.mode}; rewrite it with `headstyle sfa dataset`")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1


def _record(entry: object, where: str) -> Record:
    if not isinstance(entry, dict) or set(entry) != {"style", "sample", "content_seed", "style_seed"}:
        raise DatasetError(f"{where}: not an index entry")
    style, sample = entry["style"], entry["sample"]
    ints = [entry[k] for k in ("sample", "content_seed", "style_seed")]
    if not isinstance(style, str) or not STYLE_NAME.match(style) or not all(type(v) is int and v >= 0 for v in ints):
        raise DatasetError(f"{where}: bad style name or sample number")
    return Record(style, sample, entry["content_seed"], entry["style_seed"])


def read_index(root: Path) -> list[Record]:
    """The complete samples listed in root/index.jsonl; a torn last line (no newline) is ignored."""
    path = root / INDEX
    if not path.is_file():
        return []
    text = read_text(path, DatasetError, max_bytes=MAX_INDEX_BYTES)
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is empty or a torn write
    hint = "delete that line and resume the writer"
    return [_record(parse_json(line, f"{path}, line {number}", DatasetError, hint), f"{path}, line {number}")
            for number, line in enumerate(complete, start=1)]  # fmt: skip


class SFADataset:
    """A dataset folder read back (see the module docstring); ``load(i)`` reads the i-th complete sample."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        manifest = read_manifest(self.root)
        self.settings = DatasetSettings(**manifest["settings"])
        self.styles: list[str] = list(manifest["styles"])
        self.sources: dict[str, str] = dict(manifest["sources"])
        self.records = [r for r in read_index(self.root) if r.style in self.styles]

    def __len__(self) -> int:
        return len(self.records)

    def held_out(self) -> Tensor:
        """The evaluation identities' z the writer kept out, (E, z_dim)."""
        return load_file(str(self.root / HELD_OUT))["z"]

    def load(self, i: int) -> Sample:
        r = self.records[i]
        folder = self.root / r.folder
        v = self.settings.views
        try:
            arrays = load_file(str(folder / ARRAYS))
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{folder / ARRAYS}: unreadable ({exc})") from None

        def images(names: list[str]) -> Tensor:
            return torch.stack([_read_png(folder / f"{n}.png") for n in names])

        sample = Sample(
            record=r,
            content=images(["content_front", "content_back"]),
            style=images(["style_front", "style_back"]),
            views=images([f"view_{k:02d}_content" for k in range(v)]),
            targets=images([f"view_{k:02d}_target" for k in range(v)]),
            cameras=arrays["cameras"],
            reference_cameras=arrays["reference_cameras"],
            depth=arrays["depth"],
            mask=arrays["mask"],
            z_content=arrays["z_content"],
            z_style=arrays["z_style"],
        )
        if sample.cameras.shape != (v, 25) or sample.depth.shape[0] != v or sample.mask.shape != sample.depth.shape:
            raise DatasetError(f"{folder}: its arrays do not hold {v} views; rewrite the sample")
        return sample

    def split(self, held_out_per_style: int) -> tuple[list[int], list[int]]:
        """(train, validation) record numbers: the last ``held_out_per_style`` samples of each style validate.

        Validation samples are other identities than the training ones (each sample has its own seeds).
        """
        train, val = [], []
        for style in self.styles:
            ids = [i for i, r in enumerate(self.records) if r.style == style]
            ids.sort(key=lambda i: self.records[i].sample)
            cut = max(len(ids) - held_out_per_style, 0)
            train += ids[:cut]
            val += ids[cut:]
        return train, val


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    missing = f"{root} holds no {MANIFEST}: not an SFA dataset; make one with `headstyle sfa dataset`"
    manifest = read_format_manifest(path, FORMAT, DatasetError, missing)
    if manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: format version {manifest.get('version')}, this headstyle reads {FORMAT_VERSION}")
    styles = manifest.get("styles")
    if not isinstance(styles, list) or not all(isinstance(s, str) and STYLE_NAME.match(s) for s in styles):
        raise DatasetError(f"{path}: bad style names")
    try:
        DatasetSettings(**manifest["settings"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: bad settings ({exc})") from None
    return manifest


def check_no_leak(dataset: SFADataset, held_out: Tensor, min_distance: float = LEAK_DISTANCE) -> None:
    """Raise LeakError if any content or style identity of any pair lies within min_distance of a held-out z."""
    pairs, names = [], []
    for r in dataset.records:
        with safe_open(str(dataset.root / r.folder / ARRAYS), framework="pt") as f:
            pairs.append(torch.stack([f.get_tensor("z_content"), f.get_tensor("z_style")]))
        names.append(f"{r.style} sample {r.sample}")
    if pairs:
        check_pairs(torch.stack(pairs), held_out, names, min_distance)


def check_pairs(pairs: Tensor, held_out: Tensor, names: list[str], min_distance: float = LEAK_DISTANCE) -> None:
    """pairs (N, 2, z_dim): (content, style exemplar) identities of N samples named ``names``; LeakError if one
    of them is a held-out identity (E, z_dim)."""
    if held_out.numel() == 0:
        return
    if pairs.shape[-1] != held_out.shape[-1]:
        raise LeakError(f"identities have {pairs.shape[-1]} entries, the held-out ones {held_out.shape[-1]}")
    d = torch.cdist(pairs.float().reshape(-1, pairs.shape[-1]), held_out.float())
    if (d < min_distance).any():
        i, j = (d < min_distance).nonzero()[0].tolist()
        role = ("content", "style exemplar")[i % 2]
        raise LeakError(
            f"{names[i // 2]}: its {role} identity is held-out identity {j}; evaluation identities must stay out "
            "of training (choose another --first-seed)"
        )


# ------------------------------------------------------------------------------------------------- writing


def _save_png(image: Tensor, path: Path) -> None:
    """(3, H, W) in [-1, 1] as an RGB PNG (PanoHead's rounding, as headstyle.export)."""
    from headstyle.export import to_uint8

    Image.fromarray(to_uint8(image)).save(path, format="PNG")


def _sources_manifest(settings: DatasetSettings, styles: list[str], sources: Mapping[str, str]) -> dict:
    return {"format": FORMAT, "version": FORMAT_VERSION, "settings": asdict(settings), "styles": styles,
            "sources": dict(sources)}  # fmt: skip


def _check_continuation(old: dict, new: dict, root: Path) -> None:
    """A resume may only add samples: every other setting, the styles and their sources must be the same."""
    a = {**old, "settings": {k: v for k, v in old["settings"].items() if k != "samples"}}
    b = {**new, "settings": {k: v for k, v in new["settings"].items() if k != "samples"}}
    if a != b:
        diff = [k for k in ("settings", "styles", "sources") if a.get(k) != b.get(k)]
        raise DatasetError(
            f"{root} holds a dataset made with other {' and '.join(diff)}; continue it with the same ones "
            "(only --samples may grow) or choose another --out"
        )


@torch.no_grad()
def _render(G: Generator, seed: int, cams: Tensor, settings: DatasetSettings, device: torch.device):
    """Identity ``seed`` at ``cams``: constant noise inputs and the renderer's ray jitter drawn from the seed
    (as headstyle.export.render_view), so a sample is a pure function of its seeds and cameras (resumes match)."""
    z = z_from_seed(seed, G.z_dim).to(device)
    ws = G.mapping(z, conditioning_camera().to(device), settings.truncation_psi, settings.truncation_cutoff)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return G.synthesis(ws.expand(len(cams), -1, -1), cams.to(device), noise_mode="const",
                           render_sr=settings.render_sr)  # fmt: skip


def _image(out, settings: DatasetSettings) -> Tensor:
    return (out.image if settings.render_sr else out.image_raw).float().cpu()


def write_sample(
    folder: Path,
    base: Generator,
    styled: Generator,
    settings: DatasetSettings,
    sample: int,
    z_dim: int,
    device: torch.device,
) -> None:
    """Render and write one sample into ``folder`` (which must not exist yet); generators live on ``device``."""
    content_seed, style_seed = settings.seeds(sample)
    z_c, z_s = z_from_seed(content_seed, z_dim), z_from_seed(style_seed, z_dim)
    ref_cams = cameras(torch.tensor(REFERENCE_YAWS), torch.zeros(len(REFERENCE_YAWS)))
    cams = settings.view_cameras(sample)
    content = _image(_render(base, content_seed, ref_cams, settings, device), settings)
    style = _image(_render(styled, style_seed, ref_cams, settings, device), settings)
    views = _image(_render(base, content_seed, cams, settings, device), settings)
    target_out = _render(styled, content_seed, cams, settings, device)
    targets = _image(target_out, settings)
    folder.mkdir(parents=True)
    for name, image in (("content_front", content[0]), ("content_back", content[1]),
                        ("style_front", style[0]), ("style_back", style[1])):  # fmt: skip
        _save_png(image, folder / f"{name}.png")
    for k in range(len(cams)):
        _save_png(views[k], folder / f"view_{k:02d}_content.png")
        _save_png(targets[k], folder / f"view_{k:02d}_target.png")
    arrays = {
        "cameras": cams.float(),
        "reference_cameras": ref_cams.float(),
        "depth": target_out.depth.float().cpu(),
        "mask": target_out.mask.float().cpu(),
        "z_content": z_c[0].float(),
        "z_style": z_s[0].float(),
    }
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(folder / ARRAYS))


def _append_index(root: Path, record: Record) -> None:
    line = json.dumps({"style": record.style, "sample": record.sample, "content_seed": record.content_seed,
                       "style_seed": record.style_seed})  # fmt: skip
    with (root / INDEX).open("a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _drop_torn_line(root: Path) -> None:
    """Cut a torn last index line (a crash mid-append), so the next append starts on a line of its own."""
    path = root / INDEX
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):
            atomic_write_text(path, text[: text.rfind("\n") + 1])


def write_dataset(
    out: str | os.PathLike,
    base: Generator,
    stylized: Mapping[str, Generator],
    settings: DatasetSettings,
    held_out: Tensor,
    sources: Mapping[str, str],
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> SFADataset:
    """Write (or continue) the dataset in ``out`` for every style of ``stylized`` (name -> stylised generator).

    held_out: the evaluation identities' z (E, z_dim), E may be 0; a sample whose content or style identity is one
    of them is refused before anything renders. sources: where "base" and each style's generator came
    from (recorded in the manifest; a resume must name the same ones). A SIGINT/SIGTERM ends the sample being
    written, then raises Interrupted (the same call continues the dataset).
    """
    root = Path(out)
    styles = list(stylized)
    bad = [s for s in styles if not STYLE_NAME.match(s)]
    if bad or not styles:
        raise DatasetError(f"style names {bad or '(none)'}: give 1+ names of letters, digits, '_', '-', '.'")
    z_dim = int(base.z_dim)
    if any(int(G.z_dim) != z_dim for G in stylized.values()):
        raise DatasetError("every stylised generator must take the base generator's latents (z_dim differs)")
    if held_out.ndim != 2 or held_out.shape[1] != z_dim:
        raise DatasetError(f"held-out identities must be (E, {z_dim}), got {tuple(held_out.shape)}")
    held_out = held_out.float().cpu().contiguous()
    seeds = [settings.seeds(i) for i in range(settings.samples)]
    pairs = torch.stack([torch.cat([z_from_seed(c, z_dim), z_from_seed(s, z_dim)]) for c, s in seeds])
    check_pairs(pairs, held_out, [f"sample {i}" for i in range(settings.samples)])
    manifest = _sources_manifest(settings, styles, sources)
    if (root / MANIFEST).is_file():
        old = read_manifest(root)
        _check_continuation(old, manifest, root)
        if old["settings"]["samples"] > settings.samples:
            manifest["settings"]["samples"] = old["settings"]["samples"]
        if not torch.equal(load_file(str(root / HELD_OUT))["z"], held_out):
            raise DatasetError(f"{root} was written with other held-out identities; use the same ones")
    with folder_lock(root):  # one writer: a second process is refused before it writes anything
        for stale in root.glob("samples/*/.tmp-*"):
            shutil.rmtree(stale)
        with atomic_path(root / HELD_OUT) as tmp:
            save_file({"z": held_out}, str(tmp))
        atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1))
        _drop_torn_line(root)
        done = {(r.style, r.sample) for r in read_index(root)}
        todo = [(s, i) for s in styles for i in range(settings.samples) if (s, i) not in done]
        with STOP.deferred(), progress_bar(disable=not progress) as bar:
            task = bar.add_task("sfa dataset", total=len(styles) * settings.samples, completed=len(done))
            for style, i in todo:
                if STOP.requested:  # the samples written so far are complete; a rerun continues after them
                    break
                record = Record(style, i, *settings.seeds(i))
                final = root / record.folder
                if final.exists():  # renamed into place, but its index line never made it
                    shutil.rmtree(final)
                tmp = final.with_name(f".tmp-{final.name}")
                try:
                    write_sample(tmp, base, stylized[style], settings, i, z_dim, torch.device(device))
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                tmp.rename(final)
                _append_index(root, record)
                bar.update(task, advance=1, info=f"{style} {i}")
        STOP.raise_if_requested()
        return SFADataset(root)
