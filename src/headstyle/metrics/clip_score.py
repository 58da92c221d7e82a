"""CLIP similarities with a CLIP model from a local folder (transformers' CLIPModel layout).

The folder is what ``save_pretrained`` writes, or a downloaded hub repo such as
openai/clip-vit-large-patch14: config.json, model.safetensors (or its shards; other weight formats are not
read), the tokenizer files and preprocessor_config.json. The config is checked against the weights before any
weight is allocated (headstyle.weight_files.load_transformers).
Nothing is downloaded. Images are quantised to uint8 (headstyle.export.to_uint8) and preprocessed by
the folder's image processor (CLIP: shortest side resized bicubic to the model's size, centre crop,
CLIP's mean and std); prompts are tokenised by its tokenizer (truncated to the model's context).

Embeddings are CLIPModel's own: the pooled vision (text) output through the visual (text)
projection, L2-normalised, so a similarity is a cosine in [-1, 1] (CLIPModel's logits divided by
its logit scale):
- image-image (CLIP-I): cos(E_I(x), E_I(y)) of paired images (DiffStyle360 pairs a stylised view with
  its SD img2img reference; Portrait Diffusion with the reference view);
- image-text (CLIP-T): cos(E_I(x), E_T(prompt)).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from headstyle.export import to_uint8
from headstyle.weight_files import WeightsError, check_folder_json, load_transformers


class CLIPScorer:
    """Normalised CLIP image and text embeddings from a local transformers folder."""

    name = "clip"

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel

        self.path = Path(folder)
        hint = "give a local transformers CLIP folder, e.g. a download of openai/clip-vit-large-patch14"
        # config and weights are compared before any weight exists (headstyle.weight_files.load_transformers)
        self.model = load_transformers(AutoModel, self.path, WeightsError, hint)
        if not isinstance(self.model, CLIPModel):
            raise WeightsError(f"{self.path}: a {type(self.model).__name__}, not a CLIPModel; {hint}")
        check_folder_json(self.path, WeightsError, hint)
        try:
            self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"{self.path}: not a loadable CLIP folder ({type(exc).__name__}: {exc})") from None
        self.device = torch.device(device)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.name = f"clip:{self.path.name}"

    @torch.no_grad()
    def image_embeds(self, images: Tensor, batch: int = 16) -> Tensor:
        """(N, 3, H, W) images in [-1, 1] -> (N, D) unit embeddings (float32, CPU)."""
        out = []
        for start in range(0, len(images), batch):
            pil = [Image.fromarray(a) for a in to_uint8(images[start : start + batch])]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            out.append(F.normalize(self.model.visual_projection(pooled).float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> Tensor:
        """Prompts -> (N, D) unit embeddings (float32, CPU)."""
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pooled = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1).cpu()


def paired_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of unit embeddings (N, D) x (N, D) -> (N,); b may be (1, D) (one prompt)."""
    return (a * b).sum(-1)
