"""The SHIPPED learned lab prior has learned the head world (loaded through DiffusersPrior.from_pretrained).

Every figure is measured on ground-truth renders of the lab's held-out identities, which the prior
never saw. HEADSTYLE_LAB_PRIOR points the tests at another folder (e.g. a snapshot of a run).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from headstyle.lab import prior_card as pc
from headstyle.lab.train_prior import CONFIGS, DOMAINS, PHRASINGS

MODEL = Path(os.environ.get("HEADSTYLE_LAB_PRIOR", pc.SHIPPED))
pytestmark = pytest.mark.skipif(
    not (MODEL / "model_index.json").is_file(),
    reason=f"no learned prior at {MODEL}: train one with `headstyle lab train-prior` and ship its model/ folder there",
)


@pytest.fixture(scope="module")
def prior():
    return pc.load_prior(MODEL)


FULL = CONFIGS["full"]
IDENTITIES, VIEWS = 4, 2


@pytest.fixture(scope="module")
def held_out():
    return pc.held_out_truth(IDENTITIES, VIEWS, FULL)


def test_diffusion_classifier_names_the_domain_of_held_out_renders(prior, held_out) -> None:
    """At t <= 281 the prompt with the lowest eps error is the render's own domain (>= 98%), single views."""
    accuracy, confusion = pc.classify(prior, held_out, grid=False)
    assert accuracy >= 0.98, f"confusion (rows: true {[str(d) for d in DOMAINS]}):\n{confusion}"


def test_not_a_memoriser(prior, held_out) -> None:
    """Denoising error at t <= 281 on held-out identities is within 1.1x of the training identities'."""
    train = pc.training_truth(IDENTITIES, VIEWS, FULL)
    ratio = pc.denoising_error(prior, held_out) / pc.denoising_error(prior, train)
    assert ratio <= 1.1


def test_guided_samples_have_their_domains_colours(prior, held_out) -> None:
    """DDIM + CFG samples per prompt fall nearest their domain's ground-truth colour centroid (>= 90%)."""
    accuracy, _ = pc.sample_accuracy(prior, held_out, n=4, steps=20)
    assert accuracy >= 0.9


def test_img2img_with_a_style_prompt_moves_towards_the_true_style(prior, held_out) -> None:
    """From t = 281 and 481, DDIM with each style prompt ends closer to the identity's true stylised render."""
    ratios = pc.img2img_ratios(prior, held_out, steps=25)
    assert set(ratios) == {(s, t) for s in DOMAINS[1:] for t in pc.IMG2IMG_T}
    assert all(r < 1 for r in ratios.values()), ratios


def test_prompts_are_the_lab_prompts(prior) -> None:
    """The lab's own prompts are the first phrasing of each domain and encode to distinct embeddings."""
    from headstyle.lab.world import STYLES, style_prompt

    assert [PHRASINGS[d][0] for d in DOMAINS] == [style_prompt(None), *(style_prompt(s) for s in STYLES)]
    embeds = torch.stack([prior.embed_prompts(PHRASINGS[d][0]).cond[0] for d in DOMAINS])
    assert torch.cdist(embeds.flatten(1), embeds.flatten(1)).fill_diagonal_(1e9).min() > 1e-3
