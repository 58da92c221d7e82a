"""The parts of an SD 1.5 folder that the project writes itself, for the models it builds (the tests' tiny SD,
the lab's learned prior), which then load through from_pretrained like any SD 1.5 folder.

- ``write_clip_tokenizer``: CLIP's byte-level BPE with merges that build chosen words whole (no CLIP
  vocabulary can be downloaded here).
- ``write_model_index``: model_index.json naming the components, as StableDiffusionPipeline saves it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from headstyle.io import atomic_write_text


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to chars from U+0100."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def write_clip_tokenizer(folder: Path, words: Sequence[str], max_length: int = 77) -> int:
    """A CLIP byte-level BPE (vocab.json, merges.txt, tokenizer_config.json) whose merges build ``words`` whole;
    any other text still encodes, byte by byte. Returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    merges: list[str] = []
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair, merged = f"{symbols[0]} {symbols[1]}", symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
                tokens.append(merged)
            symbols = [merged, *symbols[2:]]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(vocab)


def write_model_index(folder: Path) -> None:
    """model_index.json of an SD 1.5 folder with DDIM, no safety checker and no feature extractor."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2) + "\n")
