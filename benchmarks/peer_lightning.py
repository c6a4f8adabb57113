"""Peer: PyTorch Lightning on CPU torch, one epoch per `epoch` line (see `_common.Peer`).

    python benchmarks/peer_lightning.py --hidden 512 512 --batch-size 128

Run by `compute_bound.py` / `overhead_bound.py`; prints `ready` after a warm-up epoch. One
`Trainer.fit` runs for as many epochs as asked: a callback holds each epoch until told to go.
Lightning needs no torchvision here (`import lightning` works with the CPU torch alone).
"""

import argparse
import os
import sys
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, nargs="+", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--samples", type=int, default=60_000)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import lightning as L
        import torch
        import torch.nn.functional as F
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
    except ImportError as error:
        print(f"error {error} (pip install 'solstice[bench]' and a CPU torch)", flush=True)
        return
    from _common import mnist_like

    warnings.filterwarnings("ignore")  # Lightning's advice on num_workers etc.
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x, y = mnist_like(args.samples)
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long()),
        batch_size=args.batch_size,
        shuffle=True,
    )

    class MLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            sizes = [28 * 28, *args.hidden]
            layers: list[nn.Module] = [nn.Flatten()]
            for a, b in zip(sizes[:-1], sizes[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers.append(nn.Linear(sizes[-1], 10))
            self.net = nn.Sequential(*layers)

        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            logits = self.net(inputs)
            loss = F.cross_entropy(logits, labels)
            accuracy = (logits.argmax(-1) == labels).float().mean()
            self.log("train/loss", loss)
            self.log("train/accuracy", accuracy)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class Gate(L.Callback):
        start = cpu = 0.0

        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch > 0:  # epoch 0 is the warm-up
                command = sys.stdin.readline().strip()
                if command != "epoch":
                    sys.stdout.flush()
                    os._exit(0)
            self.start = time.perf_counter()
            self.cpu = time.process_time()

        def on_train_epoch_end(self, trainer, module):
            seconds = time.perf_counter() - self.start
            if trainer.current_epoch == 0:
                print("ready", flush=True)
            else:
                cpu = time.process_time() - self.cpu
                print(f"time {seconds:.6f} {args.samples} {cpu:.6f}", flush=True)

    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=10**6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Gate()],
    )
    trainer.fit(MLP(), loader)


if __name__ == "__main__":
    main()
