"""A small training run on array_record files through `GrainDataModule`, started as a
subprocess by the Grain kill/resume test, and the data pieces the Grain tests share.

    python tests/grain_worker.py DATA_DIR CKPT_DIR [--resume] [--out DIR]

Checkpoints go to CKPT_DIR every step, keeping the most recent; `--resume` continues from the
newest valid one (`ckpt_path="last"`); `--out` saves the final experiment with `solstice.save`.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grain  # noqa: E402
import numpy as np  # noqa: E402
from array_record.python.array_record_module import ArrayRecordWriter  # noqa: E402
from helpers import blobs, make_mlp_experiment  # noqa: E402

import solstice  # noqa: E402
from solstice.callbacks import ModelCheckpoint  # noqa: E402
from solstice.datamodules import GrainDataModule  # noqa: E402

N_TRAIN, N_VAL, DIM = 96, 70, 8
EPOCHS = 3  # 6 steps an epoch


class Decode(grain.transforms.Map):
    """An array_record record (float32 bytes: the features, then the label) to a dict."""

    def map(self, record):
        row = np.frombuffer(record, np.float32)
        return {"image": row[:-1], "label": np.int64(row[-1])}  # int64: narrowed to int32


class Jitter(grain.transforms.RandomMap):
    """Random noise on the features, drawn from the record's generator."""

    def random_map(self, record, rng):
        noise = rng.normal(scale=0.1, size=record["image"].shape).astype(np.float32)
        return {**record, "image": record["image"] + noise}


def splits():
    return {"train": blobs(N_TRAIN, dim=DIM, seed=0), "val": blobs(N_VAL, dim=DIM, seed=1)}


def records(split):
    """A split as an in-memory random-access source: a list of dict records."""
    return [{"image": x, "label": y} for x, y in zip(split["image"], split["label"])]


def write_files(folder: Path) -> dict[str, Path]:
    """Each split as an array_record file in `folder`."""
    paths = {}
    for name, split in splits().items():
        paths[name] = folder / f"{name}.array_record"
        writer = ArrayRecordWriter(str(paths[name]), "group_size:1")
        for x, y in zip(split["image"], split["label"]):
            writer.write(np.concatenate([x, [np.float32(y)]]).astype(np.float32).tobytes())
        writer.close()
    return paths


def grain_datamodule(files, **kw):
    kw = {"batch_size": 16, "eval_batch_size": 32, "seed": 5, **kw}
    return GrainDataModule(train=files["train"], val=files["val"], operations=[Decode()], **kw)


def make_experiment():
    return make_mlp_experiment(in_size=DIM, num_classes=4)


def trainer_kwargs() -> dict:
    return dict(max_epochs=EPOCHS, log_every_n_steps=3, devices=1, enable_progress_bar=False)


def make_datamodule(data_dir):
    files = {name: Path(data_dir) / f"{name}.array_record" for name in ("train", "val")}
    return grain_datamodule(files, train_operations=[Jitter()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir")
    parser.add_argument("ckpt_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    checkpoint = ModelCheckpoint(args.ckpt_dir, every_n_train_steps=1, every_n_epochs=None)
    trainer = solstice.Trainer(**trainer_kwargs(), callbacks=[checkpoint])
    experiment = trainer.fit(
        make_experiment(),
        make_datamodule(args.data_dir),
        ckpt_path="last" if args.resume else None,
    )
    if args.out:
        solstice.save(args.out, experiment)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
