"""Where a run stops: the stopping rule (optim.stop_rule) as pure functions of the signals a run logs.

The signal is label-free: the diffusion classifier margin of the trainable generator's renders
(Li et al. 2023), m = (E_source - E_style) / (E_source + E_style) of the eps errors under the source
and the style prompt at a few fixed probe views, noises and timesteps. It needs no ground truth, so
it runs with any prior. In the lab (README, "Where does the recipe stop?"), LD's stylisation peaks
where m crosses 0 and runs away after it while m keeps rising a little, so "classifier" ends the
run (or decays its learning rate) at the first check with m > optim.stop_margin (default 0).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from headstyle.training.checkpointing import on_cadence

# The log key of the margin, written at every stop check and at every checkpoint.
MARGIN = "classifier_margin"
# The run folder's table of every checkpoint's margin.
SIGNALS = "signals.csv"


def margin(err_source: Tensor, err_style: Tensor) -> float:
    """The diffusion classifier margin (E_src - E_sty) / (E_src + E_sty) of mean squared eps errors, in [-1, 1]:
    positive when the style prompt explains the images better than the source prompt."""
    e_src, e_sty = float(err_source.double().mean()), float(err_style.double().mean())
    return (e_src - e_sty) / (e_src + e_sty) if e_src + e_sty > 0 else 0.0


def fires(value: float, threshold: float) -> bool:
    """Whether the rule fires on one measured margin."""
    return value > threshold


def stop_iteration(records: Iterable[Mapping[str, Any]], threshold: float) -> int:
    """The iteration at which the rule fires on a run's logged records (log.jsonl), 0 if it never does: the first
    record whose margin was measured and fires. The trainer decides through the same ``fires``."""
    for record in records:
        if MARGIN in record and fires(float(record[MARGIN]), threshold):
            return int(record["iteration"])
    return 0


def checkpoint_signals(records: Iterable[Mapping[str, Any]], every: int, last: int) -> list[tuple[int, float]]:
    """(iteration, margin) at every checkpoint iteration of a run's records (multiples of ``every``, and ``last``,
    where it ended): the table a user picks a checkpoint from."""
    return [(int(r["iteration"]), float(r[MARGIN])) for r in records
            if MARGIN in r and on_cadence(int(r["iteration"]), every, last)]  # fmt: skip


def signals_csv(rows: list[tuple[int, float]], fired_at: int) -> str:
    """signals.csv: every checkpoint's margin, and where the rule fired (0: nowhere)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["iteration", MARGIN, "rule_fired"])
    writer.writerows((i, repr(m), int(i == fired_at)) for i, m in rows)
    return out.getvalue()


def describe(fired_at: int, action: str, threshold: float, signals: str) -> str:
    """One line on what the rule did, for the run's output (``signals``: the path of signals.csv)."""
    if not fired_at:
        return f"the stopping rule did not fire (every checkpoint's classifier margin: {signals})"
    what = ("ended the run there: its generator is this iteration's" if action == "stop"
            else "decayed the learning rate there")  # fmt: skip
    return (f"the stopping rule fired at iteration {fired_at} (the classifier margin passed {threshold:g}) and {what}; "
            f"every checkpoint's margin, to pick another: {signals}")
