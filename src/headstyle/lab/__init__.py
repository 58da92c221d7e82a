"""The synthetic head lab, in three rooms, each importing only from the ones below it:

- world/: procedural identities, their 3D fields and ground-truth styles (heads), the held-out identity sets
  (identities), and a generator with PanoHead's interface (generator);
- prior/: what stands in for Stable Diffusion there: the learned SD-shaped prior (its recipe, data, models,
  training and card, and the shipped folder's loader in learned), the exact exemplar prior, and LD's
  gradient-shaping calibration;
- experiments/: scoring against the ground truth (evaluate), the demo, the bench, DiffStyle360's ablation.
"""
