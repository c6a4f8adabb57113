"""What a checkpoint costs as the logged history grows: the size of its `solstice.json`, the
time to capture the trainer's state (on the training thread), the memory of the process, and
the training throughput.

    python benchmarks/checkpoint_size.py [--steps 1000 200000] [--saves 10] [--loggers]

For each step count N, a fresh process trains a tiny MLP (8-64-4, about 10 KB of parameters
and Adam state) for N steps of batch 32, logging every step (`log_every_n_steps=1`, the full
`ClassificationMetrics` battery, no loggers: `trainer.history` only), with a `ModelCheckpoint`
saving every N/saves steps. Printed per N: the size of the last checkpoint's `solstice.json`
(and of its `"history"` entry), how long `capture` (what every save runs on the training
thread) took at the last save and on average, the process's resident memory before and
after the run (VmRSS; its peak, VmHWM), and steps/s from the second epoch to the end.
`--loggers` adds a `CSVLogger` and a `TensorBoardLogger` (every record goes to both).

Compare two trees by running this script against each (the script only uses the public
API, and times the capture of the run's checkpoint state: `solstice.trainer._run.Run.
checkpoint_state` here, `solstice.trainer._resume.capture` in trees before the run became a
value):

    git worktree add /tmp/base <older commit>
    PYTHONPATH=/tmp/base python benchmarks/checkpoint_size.py
    python benchmarks/checkpoint_size.py
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _memory_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process, in MB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def run_one(steps: int, saves: int, loggers: bool) -> dict:
    """Train for `steps` steps in this process; return the measurements."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    import equinox as eqx
    import jax
    import numpy as np
    import optax

    import solstice

    try:  # the run's state as a value
        from solstice.trainer._run import Run

        owner, name = Run, "checkpoint_state"
    except ImportError:  # older trees
        import solstice.trainer._resume as owner

        name = "capture"
    from solstice.callbacks import Callback, ModelCheckpoint
    from solstice.datamodules import ArrayDataModule

    captures: list[float] = []
    capture = getattr(owner, name)

    def timed_capture(*args, **kwargs):
        start = time.perf_counter()
        try:
            return capture(*args, **kwargs)
        finally:
            captures.append(time.perf_counter() - start)

    setattr(owner, name, timed_capture)

    class EpochClock(Callback):
        _reads_experiment = False

        def __init__(self):
            self.starts: list[float] = []
            self.end = 0.0

        def on_train_epoch_start(self, trainer, experiment):
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer, experiment):
            self.end = time.perf_counter()

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)).astype(np.float32) * 3
    labels = rng.integers(0, 4, 4096).astype(np.int32)
    data = {
        "image": centers[labels] + rng.normal(size=(4096, 8)).astype(np.float32),
        "label": labels,
    }
    key_model, key_exp = jax.random.split(jax.random.key(0))
    model = eqx.nn.MLP(8, 4, 64, 1, key=key_model)
    experiment = solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.adam(1e-3), model), 4, key=key_exp
    )
    with tempfile.TemporaryDirectory() as tmp:
        clock = EpochClock()
        checkpoint = ModelCheckpoint(
            Path(tmp) / "ckpts", every_n_train_steps=max(1, steps // saves), every_n_epochs=None
        )
        trainer = solstice.Trainer(
            max_steps=steps,
            log_every_n_steps=1,
            devices=1,
            enable_progress_bar=False,
            callbacks=[checkpoint, clock],
            loggers=[solstice.CSVLogger(tmp), solstice.TensorBoardLogger(tmp)] if loggers else [],
        )
        rss_before, _ = _memory_mb()
        trainer.fit(experiment, ArrayDataModule(train=data, batch_size=32, seed=0))
        checkpoint.wait()
        rss_after, rss_peak = _memory_mb()
        last = Path(checkpoint.last_model_path)
        document = json.loads((last / "solstice.json").read_text())
        history_file = Path(tmp) / "ckpts" / "history.jsonl"
        timed_steps = steps - 128  # from the second epoch (128 steps each) on
        result = {
            "steps": steps,
            "records": trainer.history.num_records
            if hasattr(trainer.history, "num_records")
            else None,
            "solstice_json_bytes": (last / "solstice.json").stat().st_size,
            "history_entry_bytes": len(json.dumps(document["history"])),
            "history_file_bytes": history_file.stat().st_size if history_file.exists() else 0,
            "capture_last_s": captures[-1],
            "capture_mean_s": sum(captures) / len(captures),
            "saves": len(captures),
            "rss_before_mb": rss_before,
            "rss_after_mb": rss_after,
            "rss_peak_mb": rss_peak,
            "steps_per_s": timed_steps / (clock.end - clock.starts[1]),
        }
        trainer.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 200_000])
    parser.add_argument("--saves", type=int, default=10, help="checkpoints per run")
    parser.add_argument("--loggers", action="store_true", help="log to CSV and TensorBoard")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # (a child process)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.saves, args.loggers)))
        return

    sys.path.insert(0, str(HERE))
    from _common import machine

    import solstice

    print(machine())
    print(f"solstice from {Path(solstice.__file__).parent}; loggers: {args.loggers}")
    print(
        f"{'steps':>8} {'solstice.json':>14} {'history entry':>14} {'history.jsonl':>14} "
        f"{'capture last':>13} {'capture mean':>13} {'RSS before':>11} {'RSS after':>10} "
        f"{'RSS peak':>9} {'steps/s':>8}"
    )
    for steps in args.steps:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(steps), "--saves", str(args.saves)]
            + (["--loggers"] if args.loggers else []),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"{r['steps']:>8} {r['solstice_json_bytes'] / 1e3:>11.1f} KB "
            f"{r['history_entry_bytes'] / 1e3:>11.1f} KB {r['history_file_bytes'] / 1e6:>11.1f} MB "
            f"{1e3 * r['capture_last_s']:>10.1f} ms {1e3 * r['capture_mean_s']:>10.1f} ms "
            f"{r['rss_before_mb']:>8.0f} MB {r['rss_after_mb']:>7.0f} MB {r['rss_peak_mb']:>6.0f} MB "
            f"{r['steps_per_s']:>8.0f}"
        )


if __name__ == "__main__":
    main()
