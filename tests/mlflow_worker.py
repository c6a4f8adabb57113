"""A small training run logging to MLflow, started as a subprocess by test_mlflow.py's kill
test.

    python tests/mlflow_worker.py OUT_DIR TRACKING_URI [--resume]

Checkpoints go to OUT_DIR/ckpts (every step, keeping the most recent); metrics to the MLflow
experiment "killed" of TRACKING_URI, sent every 0.1 s (so a kill loses some). `--resume`
continues from the newest valid checkpoint. At the end it prints `RUN <run id>`.
"""

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import blobs_datamodule  # noqa: E402
from logger_worker import make_experiment, trainer_kwargs  # noqa: E402

import solstice  # noqa: E402
from solstice.callbacks import ModelCheckpoint  # noqa: E402

EPOCHS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("tracking_uri")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    saver = ModelCheckpoint(
        os.path.join(args.out, "ckpts"), every_n_train_steps=1, every_n_epochs=None
    )
    logger = solstice.MLFlowLogger(
        "killed",
        tracking_uri=args.tracking_uri,
        artifact_location=os.path.join(args.out, "artifacts"),
        flush_secs=0.1,
    )
    trainer = solstice.Trainer(**trainer_kwargs(EPOCHS), callbacks=[saver], loggers=[logger])
    trainer.fit(make_experiment(), blobs_datamodule(), ckpt_path="last" if args.resume else None)
    trainer.close()
    print(f"RUN {logger.run_id}", flush=True)


if __name__ == "__main__":
    main()
