"""SIGINT/SIGTERM end a whole command (headstyle.training.signals): the run in progress checkpoints, no table or page
compares runs of unequal budgets, the command exits 130/143 saying how to resume, and the resumed command gives
what an uninterrupted one gives."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from headstyle.lab.experiments.bench import SHORT_MARK, LabSettings, run_bench
from headstyle.lab.experiments.demo import COMPARISONS
from headstyle.training import checkpointing
from headstyle.training.signals import STOP, Interrupted, resume_hint

# The demo and the bench on the shipped learned prior, scored on few identities and views: seconds per command.
ITERATIONS = 8
SMALL_EVAL = ("--eval-identities", "2", "--eval-views", "2")


def headstyle(*args: str) -> list[str]:
    return [sys.executable, "-m", "headstyle", *args]


def run(*args: str) -> None:
    proc = subprocess.run(headstyle(*args), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


def cut(args: tuple[str, ...], log: Path, signum: int, timeout: float = 300) -> tuple[int, str]:
    """Run ``args`` and send ``signum`` as soon as ``log`` holds an iteration (its run is training); returns the exit
    code and stderr."""
    proc = subprocess.Popen(headstyle(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not (log.is_file() and log.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{log} never got an entry"
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err
    return proc.returncode, err


def without_timings(value):
    """A metrics record with the wall/CPU-time figures taken out (everything else is computed, and must agree)."""
    timing = {"seconds", "wall_seconds", "cpu_seconds", "peak_rss_mib", "note"}
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in timing}
    return value


# ---------------------------------------------------------------------------------------------- the mechanism


def test_a_signal_outside_a_loop_raises_at_once_inside_one_it_waits_for_the_loop():
    host = signal.getsignal(signal.SIGINT)  # Python's default_int_handler, or SIG_IGN in a background job
    with STOP.installed():
        with pytest.raises(Interrupted) as info:
            signal.raise_signal(signal.SIGTERM)
        assert info.value.exit_code == 143 and STOP.signal == signal.SIGTERM
    with STOP.installed():  # the outermost installation starts clean
        assert not STOP.requested
        with STOP.deferred():
            signal.raise_signal(signal.SIGINT)
            assert STOP.requested  # nothing raised: the loop checkpoints first
        with pytest.raises(Interrupted, match="interrupted by SIGINT; continue it with: x") as info:
            with resume_hint("continue it with: x"):
                STOP.raise_if_requested()
        assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is host  # the host's handlers are back


# ---------------------------------------------------------------------------------------------- demo


def test_sigint_in_the_demo_checkpoints_the_run_writes_no_comparison_and_resume_gives_the_same_metrics(tmp_path):
    demo = ("demo", "--iterations", str(ITERATIONS), *SMALL_EVAL, "--turntable-frames", "2", "--no-progress")
    run(*demo, "--out", str(tmp_path / "a"))
    out = tmp_path / "b"
    code, err = cut((*demo, "--out", str(out)), out / "runs" / "statue-ld" / "log.jsonl", signal.SIGINT)
    assert code == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted by SIGINT; continue it with: headstyle {' '.join(demo)} "
                                            f"--out {out} --resume")  # fmt: skip
    assert not any((out / name).exists() for name in COMPARISONS)
    (checkpoint,) = checkpointing.list_checkpoints(out / "runs" / "statue-ld")
    assert 1 <= int(checkpoint.name.split("_")[-1]) < ITERATIONS  # the cut run's own checkpoint
    assert not (out / "runs" / "statue-sds").exists()  # the second run never started

    run(*demo, "--out", str(out), "--resume")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "a", out))
    assert without_timings(a) == without_timings(b)
    assert a["results"]["ld"]["iterations_run"] == b["results"]["ld"]["iterations_run"] == ITERATIONS


# ---------------------------------------------------------------------------------------------- lab bench


def test_sigterm_in_the_bench_keeps_the_finished_run_tables_only_and_resume_finishes_the_cut_one(tmp_path):
    bench = ("lab", "bench", "--styles", "statue", "--objectives", "ld,sds", "--iterations", str(ITERATIONS),
             "--curve-every", "4", *SMALL_EVAL, "--no-progress")  # fmt: skip
    run(*bench, "--out", str(tmp_path / "a"))
    out = tmp_path / "b"
    code, err = cut((*bench, "--out", str(out)), out / "runs" / "statue-sds-adam-seed0" / "log.jsonl", signal.SIGTERM)
    assert code == 143, err
    assert err.strip().splitlines()[-1].startswith("interrupted by SIGTERM; continue it with: headstyle lab bench")
    with open(out / "runs.csv", newline="") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == ["untrained", "ld"]  # the cut SDS run is in no table
    assert "| sds |" not in (out / "bench.md").read_text()

    run(*bench, "--out", str(out), "--resume")
    for name in ("runs.csv", "curves.csv"):
        with open(tmp_path / "a" / name, newline="") as fa, open(out / name, newline="") as fb:
            assert [without_timings(r) for r in csv.DictReader(fa)] == [without_timings(r) for r in csv.DictReader(fb)]
    assert SHORT_MARK not in (out / "bench.md").read_text()


def test_a_bench_row_that_ran_fewer_iterations_than_the_budget_is_marked(tmp_path):
    """A hand-made bench folder: one of its runs claims 7 of 8 iterations. Its table row and pivot cells carry the
    mark and the note says why, the equal runs do not."""
    settings = LabSettings(iterations=ITERATIONS, prior="exemplar", resolution=16, prior_identities=2, prior_views=4,
                           eval_identities=2, eval_views=2)  # fmt: skip
    out = tmp_path / "bench"
    run_bench(("statue",), ("ld", "sds"), settings, out, progress=False)
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[-1]["iterations_run"] = "7.0"  # the SDS run
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = run_bench(("statue",), ("ld", "sds"), settings, out, progress=False, resume=True).markdown()
    assert table == (out / "bench.md").read_text()
    marked = [line for line in table.splitlines() if SHORT_MARK in line]
    assert marked[0].startswith(f"| statue | sds {SHORT_MARK} |") and "| 7 |" in marked[0]
    assert all("| ld " not in line for line in marked)
    assert marked[-1].startswith(f"{SHORT_MARK} trained fewer than the budget of {ITERATIONS} iterations")


# ---------------------------------------------------------------------------------------------- one writer a folder


def test_a_folder_another_live_process_writes_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path, capsys):
    from headstyle.training.lock import LOCK_NAME, FolderLockedError, folder_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom headstyle.training.lock import folder_lock\n"
        f"with folder_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FolderLockedError, match=rf"is being written by pid {holder.pid} on "):
            folder_lock(tmp_path).__enter__()
    finally:
        holder.kill()  # no clean release: its lock file keeps its name
        holder.wait()
    with folder_lock(tmp_path), folder_lock(tmp_path):  # the same process may take it again
        assert f"from pid {holder.pid} on " in capsys.readouterr().err  # the stale lock, taken over with a note
        assert str(os.getpid()) in (tmp_path / LOCK_NAME).read_text()
    assert not (tmp_path / LOCK_NAME).exists()  # released


def test_a_second_writer_on_a_live_bench_exits_2_naming_it_and_the_folder_keeps_one_run(tmp_path):
    out = tmp_path / "bench"
    bench = ("lab", "bench", "--styles", "statue", "--objectives", "ld", "--iterations", "100000", "--curve-every", "0",
             *SMALL_EVAL, "--no-progress", "--out", str(out))  # fmt: skip
    live = subprocess.Popen(headstyle(*bench), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = out / "runs" / "statue-ld-adam-seed0"
    try:
        deadline = time.monotonic() + 300
        while not ((run / "log.jsonl").is_file() and (run / "log.jsonl").read_text()):
            assert live.poll() is None and time.monotonic() < deadline, live.communicate()
            time.sleep(0.05)
        others = [
            headstyle(*bench),
            headstyle(*bench, "--resume"),
            headstyle("demo", "--out", str(out)),
            # --resume of the live run: refused before its checkpoints are read
            headstyle("stylize", "--resume", str(run)),
            # --overwrite on the live run's own folder: refused before it clears anything or loads a model
            headstyle("stylize", "--prompt", "x", "--generator", "G.pkl", "--overwrite", "--out", str(run)),
        ]
        for command in others:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 2, (command, proc.stderr)
            (line,) = proc.stderr.strip().splitlines()
            assert f"is being written by pid {live.pid} on " in line and "lab bench" in line, line
        assert (run / "config.toml").is_file() and live.poll() is None  # the first writer goes on, untouched
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=300)
    assert live.returncode == 143
    assert [p.name for p in (out / "runs").iterdir()] == ["statue-ld-adam-seed0"]
