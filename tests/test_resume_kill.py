"""A training process killed with SIGKILL at random points resumes bit for bit.

One run is killed five times at random moments (while it checkpoints every step, so kills
land mid-save and mid-delete too): each time once it has passed a random step, after a random
delay. It is restarted with `ckpt_path="last"` each time, then allowed to finish.
From the checkpoint each kill left behind, a run is resumed here and compared, bit for bit,
with a run that never stopped; so is the final result of the killed-and-restarted process.
"""

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import blobs_datamodule
from resume_worker import make_experiment, trainer_kwargs

import solstice
from solstice.checkpointing._find import find_last
from solstice.trainer._check_resume import _compare_arrays, _compare_metrics

WORKER = Path(__file__).with_name("resume_worker.py")
KILLS = 5
EPOCHS = 8  # 64 steps


def _newest_step(dirpath: Path) -> int:
    """The highest global step among committed checkpoints (names `epoch=E-step=S[-vN]`)."""
    if not dirpath.is_dir():
        return -1
    steps = []
    for p in list(dirpath.iterdir()):
        try:
            if "." not in p.name and (p / "solstice.json").exists():
                steps.append(int(p.name.split("step=")[1].split("-")[0]))
        except (OSError, IndexError, ValueError):  # renamed or removed while we look
            continue
    return max(steps, default=-1)


def _run_worker(ckpts: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(ckpts), "--max-epochs", str(EPOCHS), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )


def _differences(reference, expected, trainer, got) -> list[str]:
    differences: list[str] = []
    _compare_arrays(expected, got, differences)
    _compare_metrics(
        "progress", reference.progress.state_dict(), trainer.progress.state_dict(), differences
    )
    _compare_metrics(
        "callback_metrics", reference.callback_metrics, trainer.callback_metrics, differences
    )
    trainer.flush_logs()
    _compare_metrics(
        "logged metric", reference.history.metrics, trainer.history.metrics, differences
    )
    _compare_metrics("log steps of", reference.history.steps, trainer.history.steps, differences)
    return differences


@pytest.mark.slow
def test_sigkill_at_random_points_resumes_bit_for_bit(tmp_path):
    rng = random.Random(20240611)
    ckpts = tmp_path / "ckpts"
    reference = solstice.Trainer(**trainer_kwargs(EPOCHS))
    expected = reference.fit(make_experiment(), blobs_datamodule())
    reference.flush_logs()

    kill_points: list[tuple[int, Path]] = []
    targets = sorted(rng.sample(range(2, 8 * EPOCHS - 4), KILLS))
    for i, target in enumerate(targets):
        proc = _run_worker(ckpts, *(["--resume"] if i else []))
        try:
            deadline = time.monotonic() + 60
            while _newest_step(ckpts) < target and proc.poll() is None:
                assert time.monotonic() < deadline, "the worker does not get to its step"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.1))
            proc.kill()
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -9, f"the run ended before it was killed:\n{err}"
        path, document = find_last(ckpts)
        kept = shutil.copytree(path, tmp_path / f"kill{i}-{path.name}")
        kill_points.append((document["progress"]["global_step"], kept))

    proc = _run_worker(ckpts, "--resume", "--out", str(tmp_path / "final"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err

    matched = []
    for step, path in kill_points:
        trainer = solstice.Trainer(**trainer_kwargs(EPOCHS))
        got = trainer.fit(make_experiment(), blobs_datamodule(), ckpt_path=path)
        differences = _differences(reference, expected, trainer, got)
        assert not differences, f"resumed from step {step}: {differences}"
        matched.append(step)
    final = solstice.load(tmp_path / "final", like=make_experiment())
    differences: list[str] = []
    _compare_arrays(expected, final, differences)
    assert not differences, differences
    print(
        f"\n{KILLS} SIGKILL points (checkpoints at global steps {[s for s, _ in kill_points]} of "
        f"{reference.global_step}): {len(matched)} resumed bit for bit; the killed and "
        "restarted process finished bit for bit too."
    )
    assert len(matched) == KILLS
