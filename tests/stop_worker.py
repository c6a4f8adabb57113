"""One run of `test_resume_guards.py`'s stop tests, in its own process (not run by pytest).

    python tests/stop_worker.py CKPT_DIR MAX_EPOCHS [continue]

Fits with `EarlyStopping` (patience 1 on a scripted `val/score`: it stops at epoch 2) and a
`ModelCheckpoint`, resuming from `ckpt_path="last"` as a preemptible job always does. Prints
one JSON line: where the run ended, the warnings it gave, and a digest of its parameters.
"""

import hashlib
import json
import sys
import warnings

import equinox as eqx
import jax
import numpy as np
from helpers import blobs_datamodule, make_mlp_experiment

import solstice
from solstice.callbacks import Callback, EarlyStopping, ModelCheckpoint

SCORES = [5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9, 5.0]  # patience 1: stops at epoch 2


class Scores(Callback):
    def provided_metrics(self):
        return ("val/score",)

    def on_validation_end(self, trainer, experiment):
        trainer.log_metrics({"val/score": SCORES[trainer.current_epoch]})


def main(ckpt_dir: str, max_epochs: int, continue_stopped: bool) -> None:
    trainer = solstice.Trainer(
        max_epochs=max_epochs,
        enable_progress_bar=False,
        callbacks=[
            Scores(),
            EarlyStopping("val/score", patience=1),
            ModelCheckpoint(ckpt_dir),
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exp = trainer.fit(
            make_mlp_experiment(in_size=8, num_classes=4),
            blobs_datamodule(),
            ckpt_path="last",
            continue_stopped=continue_stopped,
        )
    params = jax.tree.leaves(eqx.filter(exp.model, eqx.is_array))
    digest = hashlib.sha256(b"".join(np.asarray(p).tobytes() for p in params)).hexdigest()
    print(
        json.dumps(
            {
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
                "stopped": trainer.stopped,
                "warnings": [str(w.message) for w in caught],
                "params": digest,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["continue"])
