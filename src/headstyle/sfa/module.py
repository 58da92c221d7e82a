"""The Style Appearance Module (DiffStyle360 Sec. 3.2): a copy of the appearance UNet that writes the style bank.

It starts as an exact copy of the frozen content appearance module (here: the prior's own UNet, the
reference network of headstyle.attention) and is trained on stylised targets (headstyle.sfa.train), so
the content bank keeps identity and structure while the style bank learns to carry style.

role "style": the module writes the style bank, the frozen UNet the content bank (the paper's model).
role "shared": one fine-tuned module writes both banks (Table 2's "+ fine-tuning" row, before the
separate style module). lora_rank > 0: the module also carries LoRA (peft) on the main UNet's attention
projections, trained with it; the main UNet is then a copy of the prior's with the adapter, and the
prior's own UNet stays the frozen content module.

Saved folder: unet/ (a diffusers UNet2DConditionModel: config.json + safetensors weights), with LoRA
main_lora/pytorch_lora_weights.safetensors (diffusers' LoRA format: any SD 1.5 pipeline's load_lora_weights
reads it), and sfa_module.json (format, role, lora_rank, what it was trained from and how). Loading reads
safetensors only, and checks before anything is built: the UNet's config and weights (by their headers)
against the prior's UNet, and the LoRA's metadata (its rank within the targeted layers and MAX_LORA_RANK,
a finite positive alpha, target modules as literal names, peft's defaults elsewhere) and weights against
the layers it targets.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from headstyle.input_files import parse_json
from headstyle.io import atomic_dir, atomic_write_text, read_format_manifest
from headstyle.weight_files import (
    MAX_CONFIG_BYTES,
    first,
    folder_safetensors,
    folder_shapes,
    read_config_json,
    safetensors_header,
    state_problems,
)

FORMAT = "headstyle-sfa-module"
FORMAT_VERSION = 1
MANIFEST = "sfa_module.json"
Role = Literal["style", "shared"]
ROLES: tuple[str, ...] = ("style", "shared")
LORA_DIR = "main_lora"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA weight name
# The main UNet's attention projections (self- and cross-attention), as diffusers' LoRA training scripts target.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
MAX_LORA_RANK = 1024
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key of the LoraConfig in the weights' header
LORA_PREFIX = "unet."  # an SD pipeline's LoRA file names the UNet's entries so
# LoraConfig entries that record where a config came from, not what it builds
_LORA_BOOKKEEPING = frozenset({"peft_version"})


class ModuleLoadError(ValueError):
    """A module folder that cannot be used with this prior; the message names the folder and the fix."""


def unet_signature(unet: nn.Module) -> dict[str, Any]:
    """The UNet's architecture (its diffusers config without bookkeeping keys): two UNets whose signatures
    match have the same layers, so one's banks fit the other's Style Fusion Attention."""
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}


def with_lora(unet: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """A frozen copy of ``unet`` with a fresh LoRA adapter of ``rank`` (alpha = rank) on LORA_TARGETS, the
    adapter trainable and in float32; its up-projections start at zero, so the copy computes what ``unet``
    does until it trains, and its down-projections are drawn from ``seed`` (a run is a function of its seed)."""
    from peft import LoraConfig

    main = copy.deepcopy(unet).requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        main.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                    target_modules=list(LORA_TARGETS)))  # fmt: skip
    for p in main.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return main


class StyleAppearanceModule(nn.Module):
    """A trainable appearance UNet, its role and optionally the main UNet with LoRA (see the module
    docstring)."""

    def __init__(self, unet: nn.Module, role: Role = "style", main: nn.Module | None = None) -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.unet = unet
        self.role = role
        self.main = main

    @classmethod
    def from_unet(
        cls, unet: nn.Module, role: Role = "style", lora_rank: int = 0, seed: int = 0
    ) -> StyleAppearanceModule:
        """A copy of ``unet`` (the frozen content appearance module), trainable, in float32; with lora_rank > 0
        also a LoRA copy of it as the main UNet (with_lora, initialised from ``seed``)."""
        copied = copy.deepcopy(unet).float().requires_grad_(True)
        return cls(copied, role, with_lora(unet, lora_rank, seed) if lora_rank > 0 else None)

    @property
    def lora_rank(self) -> int:
        return 0 if self.main is None else int(self.main.peft_config["default"].r)

    def fusion(self, prior: Any) -> tuple[Any, nn.Module, nn.Module]:
        """(prior, content UNet, style UNet) for StyleFusionPrior given the base ``prior``: the prior whose UNet
        reads the banks (``prior`` itself, or a view of it with the LoRA main UNet) and the appearance UNets
        (the prior's own frozen UNet writes the content bank unless the role is "shared")."""
        fused = prior if self.main is None else prior.with_unet(self.main)
        return fused, (self.unet if self.role == "shared" else prior.unet), self.unet

    def check_fits(self, unet: nn.Module, where: str) -> None:
        """Refuse a module whose UNet has another architecture than the prior's ``unet``."""
        mine, theirs = unet_signature(self.unet), unet_signature(unet)
        _refuse_other_base(sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)), where)

    def save(self, folder: str | os.PathLike, meta: dict[str, Any]) -> Path:
        """Write unet/ and sfa_module.json into ``folder`` through a hidden folder renamed when complete."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            if self.main is not None:
                _save_lora(self.main, tmp / LORA_DIR)
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "role": self.role, "lora_rank": self.lora_rank,
                        **meta}  # fmt: skip
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, base_unet: nn.Module) -> StyleAppearanceModule:
        """A saved module for the prior whose UNet is ``base_unet``, frozen and in eval mode on its device and
        dtype (safetensors weights only; nothing executes). A module trained for another UNet is refused."""
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0

        manifest = read_manifest(folder)
        check_unet_folder(Path(folder) / "unet", base_unet, str(folder))
        if manifest["lora_rank"]:
            lora_file = check_lora_file(Path(folder) / LORA_DIR, base_unet, manifest["lora_rank"])
        device, dtype = next(base_unet.parameters()).device, next(base_unet.parameters()).dtype
        try:
            unet = UNet2DConditionModel.from_pretrained(Path(folder) / "unet", use_safetensors=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModuleLoadError(f"{folder}/unet: not a readable diffusers UNet ({type(exc).__name__})") from None
        unet.set_attn_processor(AttnProcessor2_0())
        module = cls(unet.to(device).eval().requires_grad_(False), manifest["role"])
        module.check_fits(base_unet, str(folder))
        if manifest["lora_rank"]:
            module.main = _load_lora(lora_file, base_unet)
        return module


def _refuse_other_base(keys: list[str], where: str) -> None:
    """The one refusal of a module whose UNet settings ``keys`` differ from the prior's UNet."""
    if keys:
        raise ModuleLoadError(
            f"{where} was trained for another base model (its UNet differs in {', '.join(keys[:5])}); "
            "use it with the SD model it was trained on"
        )


def check_unet_folder(folder: Path, base_unet: nn.Module, where: str) -> None:
    """Refuse a module's unet/ folder before it is built: a config setting it states unlike the prior's UNet,
    or weights (read from the safetensors headers) whose names and shapes are not the prior's UNet's. So
    building it costs what the prior's own UNet costs, and no weight is left to random initialisation."""
    hint = "give the module folder `headstyle sfa train` wrote for this SD model"
    config = read_config_json(folder / "config.json", ModuleLoadError, hint)
    theirs = json.loads(json.dumps(unet_signature(base_unet)))  # tuples as JSON lists, as the file has them
    _refuse_other_base(sorted(k for k, v in config.items() if k in theirs and v != theirs[k]), where)
    stored = folder_shapes(folder_safetensors(folder, "diffusion_pytorch_model", ModuleLoadError, hint),
                           ModuleLoadError, hint)  # fmt: skip
    if problems := state_problems({k: v.shape for k, v in base_unet.state_dict().items()}, stored):
        raise ModuleLoadError(f"{folder}: its weights are not the prior's UNet's: {'; '.join(problems)}; {hint}")


def lora_layers(unet: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    """name -> (in, out) of the Linear layers of ``unet`` that LoRA target names select as peft does for a list:
    the name itself or its last dotted parts (matched literally, never as a pattern)."""
    return {name: (m.in_features, m.out_features) for name, m in unet.named_modules()
            if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)}  # fmt: skip


def lora_problem(config: Mapping[str, Any], defaults: Mapping[str, Any], rank: int) -> str | None:
    """What is wrong with a LoRA's saved LoraConfig (diffusers' metadata, prefix removed) for a module whose
    manifest says ``rank``: r must be that rank (1..MAX_LORA_RANK), lora_alpha finite and positive,
    target_modules a list of module names (letters, digits, _ between dots: not a pattern), and every other
    setting peft's default (``defaults``: LoraConfig(r, lora_alpha, target_modules).to_dict()), so that what
    loads is a plain LoRA of those layers. The layers themselves are checked by check_lora_file."""
    r, alpha, targets = config.get("r"), config.get("lora_alpha"), config.get("target_modules")
    if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_LORA_RANK and r == rank):
        return f"r {r!r} is not the manifest's lora_rank {rank} (at most {MAX_LORA_RANK})"
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        return f"lora_alpha {alpha!r} is not a finite positive number"
    names = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    if not names or not all(part.isidentifier() or part.isdigit() for t in targets for part in t.split(".")):
        return f"target_modules {str(targets)[:80]!r} is not a list of module names (a pattern is not read)"
    unknown = sorted(k for k in config if k not in defaults and k not in _LORA_BOOKKEEPING)
    if unknown:
        return f"unknown LoraConfig settings {first(unknown, 3)}"
    changed = sorted(k for k, v in config.items() if k not in ("r", "lora_alpha", "target_modules", *_LORA_BOOKKEEPING)
                     and v != json.loads(json.dumps(defaults[k], default=sorted)))  # fmt: skip
    if changed:
        return f"LoraConfig settings {first(changed, 3)} differ from peft's defaults (only r, alpha and targets may)"
    return None


def _save_lora(main: nn.Module, folder: Path) -> None:
    """The adapter of ``main`` as an SD pipeline's LoRA file (keys "unet.<module>.lora.down/up.weight", the
    format diffusers' LoRA training scripts write), with its LoraConfig as metadata."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = main.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(main)),
        weight_name=LORA_FILE, safe_serialization=True, unet_lora_adapter_metadata=config,
    )  # fmt: skip


def check_lora_file(folder: Path, base_unet: nn.Module, rank: int) -> Path:
    """The module's LoRA file, refused before any adapter is built unless its metadata passes lora_problem, every
    target names a Linear layer of ``base_unet`` at least ``rank`` wide both ways, and its weights (by the
    header) are exactly the down (r, in) and up (out, r) matrices of those layers."""
    from peft import LoraConfig

    file = folder / LORA_FILE
    hint = "copy the whole module folder `headstyle sfa train` wrote"
    if not file.is_file():
        raise ModuleLoadError(f"{folder}: no {LORA_FILE}, though the manifest names a LoRA; {hint}")
    stored, metadata = safetensors_header(file, ModuleLoadError, hint)
    text = metadata.get(LORA_METADATA_KEY, "")
    if not 0 < len(text) <= MAX_CONFIG_BYTES:
        raise ModuleLoadError(f"{file}: no readable {LORA_METADATA_KEY} (its LoraConfig) in the header; {hint}")
    saved = parse_json(text, f"{file}: {LORA_METADATA_KEY}", ModuleLoadError, hint)
    if not isinstance(saved, dict):
        raise ModuleLoadError(f"{file}: no readable {LORA_METADATA_KEY} (its LoraConfig) in the header; {hint}")
    config = {k.removeprefix(LORA_PREFIX): v for k, v in saved.items() if k.startswith(LORA_PREFIX)}
    defaults = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)).to_dict()
    if problem := lora_problem(config, defaults, rank):
        raise ModuleLoadError(f"{file}: {problem}; {hint}")
    layers = lora_layers(base_unet, config["target_modules"])
    unmatched = [t for t in config["target_modules"] if not lora_layers(base_unet, [t])]
    narrow = [f"{name} {shape}" for name, shape in layers.items() if min(shape) < rank]
    if unmatched or narrow:
        what = f"targets no Linear layer of the UNet: {first(unmatched, 3)}" if unmatched else (
            f"rank {rank} exceeds the width of {first(narrow, 3)}")  # fmt: skip
        raise ModuleLoadError(f"{file}: {what}; {hint}")
    expected = {f"{LORA_PREFIX}{name}.lora.{part}.weight": shape for name, (i, o) in layers.items()
                for part, shape in (("down", (rank, i)), ("up", (o, rank)))}  # fmt: skip
    if problems := state_problems(expected, stored):
        raise ModuleLoadError(f"{file}: its weights are not a rank-{rank} LoRA of its targets: {'; '.join(problems)}")
    return file


def _load_lora(file: Path, base_unet: nn.Module) -> nn.Module:
    """A frozen copy of ``base_unet`` with the LoRA adapter of ``file`` (checked by check_lora_file)."""
    main = copy.deepcopy(base_unet).requires_grad_(False)
    try:
        main.load_lora_adapter(str(file.parent), prefix="unet", weight_name=file.name, use_safetensors=True,
                               adapter_name="default")  # fmt: skip
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModuleLoadError(f"{file}: not a LoRA for this UNet ({type(exc).__name__})") from None
    return main.eval()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """sfa_module.json of a module folder, checked (format, version, role)."""
    path = Path(folder) / MANIFEST
    missing = (
        f"{folder} holds no {MANIFEST}: not a Style Appearance Module; give the module/ folder that "
        "`headstyle sfa train` writes"
    )
    manifest = read_format_manifest(path, FORMAT, ModuleLoadError, missing)
    if manifest.get("version") != FORMAT_VERSION or manifest.get("role") not in ROLES:
        raise ModuleLoadError(f"{path}: version {manifest.get('version')} / role {manifest.get('role')!r} unknown")
    rank = manifest.setdefault("lora_rank", 0)  # modules saved before LoRA carry none
    if not (isinstance(rank, int) and not isinstance(rank, bool) and 0 <= rank <= MAX_LORA_RANK):
        raise ModuleLoadError(f"{path}: lora_rank {rank!r} is not a rank in [0, {MAX_LORA_RANK}]")
    return manifest
