"""LD's gradient-shaping constants for the lab's priors (headstyle.lab.prior.shaping_calibration), as a table.

Per prior and style: the std of its latents over the lab's renders, the RMS and max of the raw LD
gradient omega (eps_c - eps_u) w of the trainer's targets (held-out identities, canny single views +
depth grids, DDIM steps 35-49), the share the script's clamp would cut at the recipe's scale, the
energy share per rank of the (C, H*W) score, and the scale 1000 * latent_std. Without a learned prior
(the shipped one, or --prior DIR) only the exemplar prior is measured.

    .venv/bin/python benchmarks/lab_shaping.py [--prior /work/lab-prior-run-text/model] [--identities 8]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

from headstyle.lab.experiments.bench import LabSettings, new_generator
from headstyle.lab.prior.learned import EXEMPLAR, LabPriorError, resolve_prior
from headstyle.lab.prior.shaping_calibration import clamped_share, ld_scores, shaping_figures, shaping_scale
from headstyle.lab.world.heads import STYLES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="", help="an SD folder ('' = the shipped learned lab prior)")
    parser.add_argument("--identities", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=170)
    specs = []
    try:
        specs.append(resolve_prior(args.prior))
    except LabPriorError as err:
        console.print(f"[yellow]learned prior skipped: {err}")
    specs.append(resolve_prior(EXEMPLAR))
    settings = LabSettings()
    table = Table(title="LD gradient shaping per prior (raw gradient omega (eps_c - eps_u) w, before / scale)")
    for column in ("prior", "style", "latent std", "score rms", "score max", "recipe scale", "clamped",
                   "rank energy", "1000 x latent std"):  # fmt: skip
        table.add_column(column, justify="right")
    for spec in specs:
        prior, profile = spec.load(settings.resolution, settings.sr_factor, settings.prior_identities,
                                   settings.prior_views)  # fmt: skip
        for style in STYLES:
            torch.manual_seed(0)  # the VAE's posterior sample
            latents, grads = ld_scores(prior, new_generator(settings), style, args.identities)
            f = shaping_figures(latents, grads)
            table.add_row(
                profile.name, style, f"{f.latent_std:.3f}", f"{f.score_rms:.3f}", f"{f.score_max:.2f}",
                f"{profile.shaping_scale:g}", f"{clamped_share(grads, profile.shaping_scale):.4f}",
                "/".join(f"{e:.3f}" for e in f.rank_energy), f"{shaping_scale(f):.0f}",
            )  # fmt: skip
    console.print(table)


if __name__ == "__main__":
    main()
