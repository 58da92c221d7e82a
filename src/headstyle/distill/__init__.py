"""Distillation: objectives (prior -> latent gradient), shaping, noise, timesteps and injection.

A training step, per branch: sample t (timesteps), noise (noise), build a DistillTarget; call ONE
objective over all branches (objectives); shape each gradient (shaping); inject them (inject) and
sum with the regularisers; one backward.
"""

from headstyle.distill.inject import inject
from headstyle.distill.noise import (
    Retention,
    cosine_alignment,
    identity_noise,
    init_anchor_noise,
    random_noise,
    resample_noise,
    retain_better_aligned,
    warp_noise,
)
from headstyle.distill.objectives import (
    LD_WEIGHTINGS,
    OBJECTIVES,
    SDS_WEIGHTINGS,
    DistillResult,
    DistillTarget,
    cfg,
    dds,
    get_objective,
    ids,
    ld,
    nfsd,
    predicted_x0,
    run_objective,
    sds,
    tweedie_x0,
)
from headstyle.distill.shaping import (
    DEFAULT_RANK_WEIGHTS,
    GradStats,
    flip_w,
    match_channel_stats,
    mirror_gradients,
    postprocess,
    rank_reweight,
    resize_mask,
    resize_to,
    tile_2x2,
    untile_2x2,
)
from headstyle.distill.timesteps import (
    TimestepSample,
    annealed_t_max,
    sample_annealed_t,
    sample_ddim_steps,
    sample_uniform_t,
)

__all__ = [
    "DEFAULT_RANK_WEIGHTS",
    "LD_WEIGHTINGS",
    "OBJECTIVES",
    "SDS_WEIGHTINGS",
    "DistillResult",
    "DistillTarget",
    "GradStats",
    "Retention",
    "TimestepSample",
    "annealed_t_max",
    "cfg",
    "cosine_alignment",
    "dds",
    "flip_w",
    "get_objective",
    "identity_noise",
    "ids",
    "init_anchor_noise",
    "inject",
    "ld",
    "match_channel_stats",
    "mirror_gradients",
    "nfsd",
    "postprocess",
    "predicted_x0",
    "random_noise",
    "rank_reweight",
    "resample_noise",
    "resize_mask",
    "resize_to",
    "retain_better_aligned",
    "run_objective",
    "sample_annealed_t",
    "sample_ddim_steps",
    "sample_uniform_t",
    "sds",
    "tile_2x2",
    "tweedie_x0",
    "untile_2x2",
    "warp_noise",
]
