"""One process of the 2-process mesh test (run by `test_mesh.py`, not by pytest).

    python tests/mesh_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR

Each process has 2 CPU devices; they join with `jax.distributed.initialize` (gloo) and train
`test_mesh`'s block on the mesh `{"data": 2, "model": 2}`: the data axis across processes,
the model axis within each. Writes `OUT_DIR/<process_id>.npz` (the trained parameters,
gathered whole) and `OUT_DIR/<process_id>.json` (where the mesh put this process's devices,
the specs and per-device bytes of the large matrix).
"""

import json
import os
import sys

import equinox as eqx
import jax
import numpy as np
from helpers import join_local_processes
from test_mesh import MESH, SETTINGS, datamodule, experiment, rules

import solstice


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    join_local_processes(process_id, num_processes, port, 2)
    # a checkpoint mid-epoch (step 2 of 4), for a resume on one device in the test process
    ckpt = solstice.callbacks.ModelCheckpoint(
        os.path.join(out_dir, "ckpt"), every_n_train_steps=2, save_top_k=-1
    )
    trainer = solstice.Trainer(mesh=MESH, sharding_rules=rules(), callbacks=[ckpt], **SETTINGS)
    fitted = trainer.fit(experiment(), datamodule())
    mesh = trainer.mesh
    big = fitted.model.mlp.layers[0].weight
    result = {
        "processes_by_data_slice": [
            sorted({d.process_index for d in row.flat}) for row in mesh.devices
        ],
        "axis_names": list(mesh.axis_names),
        "big_nbytes": big.nbytes,
        "big_shard_nbytes": sorted({s.data.nbytes for s in big.addressable_shards}),
        "big_spec": str(big.sharding.spec),
    }
    params = jax.tree.leaves(eqx.filter(fitted.model, eqx.is_array))
    # Whole on every device (one compiled collective), then read from a local copy.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    whole = jax.jit(lambda tree: tree, out_shardings=replicated)(params)
    arrays = {f"param{i}": np.asarray(p.addressable_data(0)) for i, p in enumerate(whole)}
    np.savez(os.path.join(out_dir, f"{process_id}.npz"), **arrays)
    with open(os.path.join(out_dir, f"{process_id}.json"), "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, nproc, port = (int(a) for a in sys.argv[1:4])
    main(pid, nproc, port, sys.argv[4])
