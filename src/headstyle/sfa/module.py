"""The Style Appearance Module (DiffStyle360 Sec. 3.2): a copy of the appearance UNet that writes the style bank.

It starts as an exact copy of the frozen content appearance module (here: the prior's own UNet, the
reference network of headstyle.attention) and is trained on stylised targets (headstyle.sfa.train), so
the content bank keeps identity and structure while the style bank learns to carry style.

role "style": the module writes the style bank, the frozen UNet the content bank (the paper's model).
role "shared": one fine-tuned module writes both banks (Table 2's "+ fine-tuning" row, before the
separate style module).

Saved folder: unet/ (a diffusers UNet2DConditionModel: config.json + safetensors weights) and
sfa_module.json (format, role, what it was trained from and how). Loading reads safetensors only.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from headstyle.io import atomic_write_text, read_format_manifest

FORMAT = "headstyle-sfa-module"
FORMAT_VERSION = 1
MANIFEST = "sfa_module.json"
Role = Literal["style", "shared"]
ROLES: tuple[str, ...] = ("style", "shared")


class ModuleLoadError(ValueError):
    """A module folder that cannot be used with this prior; the message names the folder and the fix."""


def unet_signature(unet: nn.Module) -> dict[str, Any]:
    """The UNet's architecture (its diffusers config without bookkeeping keys): two UNets whose signatures
    match have the same layers, so one's banks fit the other's Style Fusion Attention."""
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}


class StyleAppearanceModule(nn.Module):
    """A trainable appearance UNet and its role (see the module docstring)."""

    def __init__(self, unet: nn.Module, role: Role = "style") -> None:
        super().__init__()
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.unet = unet
        self.role = role

    @classmethod
    def from_unet(cls, unet: nn.Module, role: Role = "style") -> StyleAppearanceModule:
        """A copy of ``unet`` (the frozen content appearance module), trainable, in float32."""
        copied = copy.deepcopy(unet).float().requires_grad_(True)
        return cls(copied, role)

    def appearance_unets(self, content_unet: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(content, style) appearance UNets for StyleFusionPrior, given the frozen content one."""
        return (self.unet if self.role == "shared" else content_unet), self.unet

    def check_fits(self, unet: nn.Module, where: str) -> None:
        """Refuse a module whose UNet has another architecture than the prior's ``unet``."""
        mine, theirs = unet_signature(self.unet), unet_signature(unet)
        if mine != theirs:
            keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ModuleLoadError(
                f"{where} was trained for another base model (its UNet differs in {', '.join(keys[:5])}); "
                "use it with the SD model it was trained on"
            )

    def save(self, folder: str | os.PathLike, meta: dict[str, Any]) -> Path:
        """Write unet/ and sfa_module.json into ``folder`` through a hidden folder renamed when complete."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.unet.save_pretrained(tmp / "unet", safe_serialization=True)
            manifest = {"format": FORMAT, "version": FORMAT_VERSION, "role": self.role, **meta}
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(
        cls, folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> StyleAppearanceModule:
        """A saved module, frozen and in eval mode on ``device`` (safetensors weights only; nothing executes)."""
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0

        manifest = read_manifest(folder)
        try:
            unet = UNet2DConditionModel.from_pretrained(Path(folder) / "unet", use_safetensors=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModuleLoadError(f"{folder}/unet: not a readable diffusers UNet ({type(exc).__name__})") from None
        unet.set_attn_processor(AttnProcessor2_0())
        return cls(unet.to(device).eval().requires_grad_(False), manifest["role"])


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
    return manifest
