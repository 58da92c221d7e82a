"""What every trainer shares, below the trainers themselves: the runner (the loop, run folders, resume), the gradient
step (one all-reduce, the non-finite guard), checkpoints, the metrics log, seeds, signals and the folder lock."""
