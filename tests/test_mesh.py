"""2-D meshes (`Trainer(mesh={"data": 2, "model": 2})`) and tensor parallelism, on 4 forced
CPU devices: a transformer-like block trained with `TensorParallel` over "model" and FSDP
over "data" ends with the parameters of a one-device run, each device keeps a quarter of a
large matrix, a checkpoint resumes bit for bit, and mistakes are refused before the first step.
The same with 2 processes of 2 devices each (one subprocess pair, `mesh_worker.py`).
"""

import json
import os
import socket
import sys
import threading
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import blobs, params_of, run_processes
from jax.sharding import Mesh, PartitionSpec

import solstice
from solstice.datamodules import ArrayDataModule
from solstice.trainer._placement import Placement

P = PartitionSpec
MESH = {"data": 2, "model": 2}
WORKER = Path(__file__).with_name("mesh_worker.py")


class Block(eqx.Module):
    """A transformer-like classifier: embed 4 tokens, self-attention, an MLP, a head."""

    embed: eqx.nn.Linear
    attention: eqx.nn.MultiheadAttention
    mlp: eqx.nn.MLP
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 4)
        self.embed = eqx.nn.Linear(4, 16, key=k[0])
        self.attention = eqx.nn.MultiheadAttention(2, 16, key=k[1])
        self.mlp = eqx.nn.MLP(16, 16, 64, 1, key=k[2])  # (64, 16) column, (16, 64) row
        self.head = eqx.nn.Linear(16, 4, key=k[3])

    def __call__(self, x, *, key=None):
        h = jax.vmap(self.embed)(x.reshape(4, 4))
        h = h + self.attention(h, h, h)
        h = h + jax.vmap(self.mlp)(h)
        return self.head(jnp.mean(h, axis=0))


def experiment():
    model = Block(jax.random.key(0))
    return solstice.ClassificationExperiment(
        model, solstice.OptaxOptimizer(optax.adam(1e-2), model), num_classes=4
    )


def datamodule(**kw):
    return ArrayDataModule(train=blobs(64, dim=16), batch_size=16, **kw)


def rules():
    tp = solstice.TensorParallel(axis="model", linear=[(r"\.head$", "column")])
    return [solstice.Combined(tp, solstice.FullySharded(axis="data", min_size=64))]


SETTINGS = dict(max_epochs=1, enable_progress_bar=False, compilation_cache=False)


def _fit_one_step(batch_size=16, **kw):
    trainer = solstice.Trainer(
        max_steps=1, enable_progress_bar=False, compilation_cache=False, **kw
    )
    data = ArrayDataModule(train=blobs(64, dim=16), batch_size=batch_size)
    return trainer.fit(experiment(), data)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """2 processes of 2 devices each (`mesh_worker.py`), started at once and left running in
    a thread (the first test asks for them, so that they compile while it does); the test of
    their results joins the thread. `(out_dir, thread, [error])`."""
    out = tmp_path_factory.mktemp("two_processes")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 2 devices each
    env["JAX_PLATFORMS"] = "cpu"
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, str(WORKER), "{}", "2", str(port), str(out)]
    failure: list[BaseException] = []

    def launch():
        try:
            commands = [[a.format(i) for a in command] for i in range(2)]
            run_processes(commands, env=env, timeout=240, cwd=WORKER.parent)
        except BaseException as error:  # noqa: BLE001 - raised by the test that reads them
            failure.append(error)

    thread = threading.Thread(target=launch, daemon=True)
    thread.start()
    yield out, thread, failure
    thread.join()  # (never leave the processes behind)


@pytest.fixture(scope="module")
def one_device():
    """The one-device run, and its test metrics (70 rows: a short, padded last batch)."""
    trainer = solstice.Trainer(devices=1, **SETTINGS)
    fitted = trainer.fit(experiment(), datamodule())
    return fitted, trainer.test(fitted, datamodule(test=blobs(70, dim=16, seed=2)))


@pytest.fixture(scope="module")
def on_mesh(tmp_path_factory):
    """The run on the 2x2 mesh (batches gathered on the devices), and the same run resumed
    from the checkpoint it took mid-epoch at step 2 (host batches)."""
    out = tmp_path_factory.mktemp("mesh")

    def trainer():
        ckpt = solstice.callbacks.ModelCheckpoint(out, every_n_train_steps=2, save_top_k=-1)
        return solstice.Trainer(mesh=MESH, sharding_rules=rules(), callbacks=[ckpt], **SETTINGS)

    full = trainer()
    fitted = full.fit(experiment(), datamodule(on_device=True, mesh=full.mesh))
    table = full.describe_shardings()
    test = datamodule(test=blobs(70, dim=16, seed=2), on_device=True, mesh=full.mesh)
    metrics = full.test(fitted, test)
    (step2,) = [p for p in out.iterdir() if "step=2" in p.name]
    resumed = trainer().fit(experiment(), datamodule(), ckpt_path=step2)
    return fitted, table, resumed, metrics


def test_mesh_with_tensor_parallelism_trains_like_one_device(two_processes, one_device, on_mesh):
    fitted, table, _, metrics = on_mesh
    for a, b in zip(params_of(fitted), params_of(one_device[0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    assert metrics.keys() == one_device[1].keys()
    for name, value in one_device[1].items():  # every test row counted once, as on 1 device
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
    model = fitted.model

    def spec(x):  # the spec of `x`, without trailing `None`s (jit may drop them)
        entries = list(x.sharding.spec)
        while entries and entries[-1] is None:
            entries.pop()
        return P(*entries)

    # Megatron splits over "model", then FSDP over "data" on what is left
    assert spec(model.attention.query_proj.weight) == P("model", "data")  # column
    assert spec(model.attention.value_proj.weight) == P("model", "data")
    assert spec(model.attention.output_proj.weight) == P("data", "model")  # row
    assert spec(model.mlp.layers[0].weight) == P(("model", "data"))  # column
    assert spec(model.mlp.layers[0].bias) == P("model")
    assert spec(model.mlp.layers[1].weight) == P(None, ("model", "data"))  # row
    assert spec(model.mlp.layers[1].bias) == P()  # a row layer's bias: whole (and small)
    assert spec(model.head.weight) == P("model")  # a lone Linear, by its pattern
    assert spec(model.embed.weight) == P("data")  # no TP: FSDP alone
    # a large matrix: a quarter of it on each device, parameter and Adam moments alike
    big = model.mlp.layers[0].weight
    mu = fitted.optimizer.opt_state[0].mu.mlp.layers[0].weight
    for x in (big, mu):
        assert {s.data.nbytes for s in x.addressable_shards} == {x.nbytes // 4}
        assert spec(x) == spec(big)
    assert table.splitlines()[0] == "mesh: data=2, model=2"
    row = next(r for r in table.splitlines() if r.startswith(".model.mlp.layers[0].weight"))
    assert row.split()[-1] == str(big.nbytes // 4)


def test_mesh_checkpoint_resumes_bit_for_bit(on_mesh):
    fitted, _, resumed, _ = on_mesh
    leaves = [jax.tree.leaves(eqx.filter(e, eqx.is_array)) for e in (resumed, fitted)]
    for a, b in zip(*leaves, strict=True):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- mistakes, refused early


def test_mesh_arguments_errors_teach():
    with pytest.raises(ValueError, match=r"no data axis.*'data'"):
        solstice.Trainer(max_epochs=1, mesh={"x": 2, "model": 2})
    with pytest.raises(ValueError, match=r"needs 6 devices, but the Trainer uses 4"):
        solstice.Trainer(max_epochs=1, mesh={"data": 3, "model": 2})
    with pytest.raises(ValueError, match="several axes of size -1"):
        solstice.Trainer(max_epochs=1, mesh={"data": -1, "model": -1})
    with pytest.raises(TypeError, match="dict of axis name -> size"):
        solstice.Trainer(max_epochs=1, mesh=[2, 2])
    explicit = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "model"))
    with pytest.raises(ValueError, match=r"`devices` names devices \[0, 1\] but `mesh` is over"):
        solstice.Trainer(max_epochs=1, mesh=explicit, devices=2)
    with pytest.raises(ValueError, match=r"TensorParallel\(axis='model'\)`, but the mesh has"):
        _fit_one_step(devices=4, sharding_rules=[solstice.TensorParallel()])
    with pytest.raises(ValueError, match=r"takes \(pattern, 'column' \| 'row'\) pairs"):
        solstice.TensorParallel(linear=[("head", "diagonal")])
    # rows split over the data axis (2), 5 do not: refused before the first step
    with pytest.raises(ValueError, match=r"batch size 5 is not divisible .* 'data' axis"):
        _fit_one_step(mesh={"model": 2, "data": 2}, batch_size=5)


class _Holder(eqx.Module):
    layers: tuple


class _Weight(eqx.Module):
    weight: jax.Array


def test_tensor_parallel_matches_state_by_the_parameters_path():
    from solstice.trainer._sharding_rules import experiment_shardings

    mesh = Placement(mesh={"data": 2, "model": 2}).mesh
    mlp = eqx.filter(eqx.nn.MLP(8, 4, 16, 1, key=jax.random.key(0)), eqx.is_array)
    w0, w1 = (layer.weight for layer in mlp.layers)
    # state that lost the modules' types but kept the model's paths: split like them
    tree = {"model": mlp, "mu": _Holder((_Weight(w0), _Weight(w1))), "other": _Weight(w1)}
    specs = experiment_shardings(tree, mesh, [solstice.TensorParallel()])
    assert specs["mu"].layers[0].weight.spec == P("model", None)  # column, as layers[0]
    assert specs["mu"].layers[1].weight.spec == P(None, "model")  # row, as layers[1]
    assert specs["other"].weight.spec == P()  # another path: not a parameter's


def test_tensor_parallel_errors_name_array_shape_and_axis():
    from solstice.trainer._sharding_rules import experiment_shardings

    mesh = Placement(mesh={"data": 1, "model": 4}).mesh
    tp = solstice.TensorParallel()
    mlp = eqx.nn.MLP(8, 4, 6, 1, key=jax.random.key(0))  # (6, 8) column: 6 rows over 4
    with pytest.raises(ValueError, match=r"`\.layers\[0\]\.weight` \(shape \(6, 8\)\) over 4 "):
        experiment_shardings(eqx.filter(mlp, eqx.is_array), mesh, [tp])
    twice = solstice.Combined(
        solstice.ByPath([("w", P("model"))]), solstice.ByPath([("w", P(None, "model"))])
    )
    with pytest.raises(ValueError, match=r"split `\['w'\]` \(shape \(8, 8\)\) over mesh axis"):
        experiment_shardings({"w": np.zeros((8, 8), np.float32)}, mesh, [twice])
    mha = eqx.nn.MultiheadAttention(2, 8, key=jax.random.key(0))
    with pytest.raises(ValueError, match="it has 2 heads. Use a number of heads that is a"):
        experiment_shardings(eqx.filter(mha, eqx.is_array), mesh, [tp])
    # a tensor-parallel run that would silently replicate: said, with the layers' paths
    head = {"body": mlp, "head": eqx.nn.Linear(4, 8, key=jax.random.key(1))}
    typo = solstice.TensorParallel(linear=[(r"\.haed$", "column")])
    with pytest.raises(ValueError, match=r"`\\\.haed\$` match no .*`\['head'\]`"):
        experiment_shardings(eqx.filter(head, eqx.is_array), mesh, [typo])
    with pytest.raises(ValueError, match=r"found nothing to split.*`\['head'\]`"):
        experiment_shardings(eqx.filter({"head": head["head"]}, eqx.is_array), mesh, [tp])


def test_explicit_mesh_and_dict_mesh_place_batches_over_the_data_axis():
    devices = np.asarray(jax.devices()).reshape(2, 2)
    for placement in (
        Placement(mesh=Mesh(devices.T, ("model", "data"))),
        Placement(mesh={"model": 2, "data": -1}),
    ):
        assert placement.data_axis == "data" and placement.data_shards == 2
        batch = placement.put_batch({"x": np.arange(8, dtype=np.float32)})["x"]
        # rows 0-3 on the devices of data slice 0 (both model devices), 4-7 on slice 1
        shards = {s.device.id: np.asarray(s.data).tolist() for s in batch.addressable_shards}
        assert shards == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [4, 5, 6, 7], 3: [4, 5, 6, 7]}
    one_axis = Placement(devices=4)  # the default stays a 1-D "batch" mesh
    assert one_axis.data_axis == "batch" and one_axis.mesh.axis_names == ("batch",)


# ---------------------------------------------------------------- 2 processes x 2 devices


def test_two_processes_on_a_2x2_mesh_train_like_one_device(two_processes, one_device):
    out, thread, failure = two_processes
    thread.join()
    if failure:
        raise failure[0]
    expected = [np.asarray(p) for p in params_of(one_device[0])]
    for i in range(2):
        info = json.loads((out / f"{i}.json").read_text())
        # the data axis across the processes, the model axis within each
        assert info["axis_names"] == ["data", "model"]
        assert info["processes_by_data_slice"] == [[0], [1]]
        assert info["big_shard_nbytes"] == [info["big_nbytes"] // 4]
        with np.load(out / f"{i}.npz") as npz:
            got = [npz[f"param{k}"] for k in range(len(expected))]
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_a_checkpoint_of_two_processes_on_a_2x2_mesh_resumes_on_one_device(
    two_processes, one_device
):
    """Another topology: written mid-epoch by 2 processes of 2 devices (data across them,
    TP + FSDP), resumed in this one process on 1 device: allclose to the 1-device run."""
    out, thread, failure = two_processes
    thread.join()
    if failure:
        raise failure[0]
    (step2,) = [p for p in (out / "ckpt").iterdir() if "step=2" in p.name]
    trainer = solstice.Trainer(devices=1, **SETTINGS)
    with pytest.warns(RuntimeWarning, match=r"(?s)on another topology.*`mesh`.*allclose"):
        resumed = trainer.fit(experiment(), datamodule(), ckpt_path=step2)
    assert trainer.global_step == 4
    for a, b in zip(params_of(resumed), params_of(one_device[0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- the example


def test_tensor_parallel_example_smoke(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "tensor_parallel.py"
    spec = importlib.util.spec_from_file_location("tensor_parallel_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--smoke"])  # 4 steps on the 2x2 mesh (conftest gives 4 devices)
    out = capsys.readouterr().out
    assert out.startswith("mesh: data=2, model=2")
    assert ".model.attention.query_proj.weight" in out and "P('model', None)" in out
    assert "P(('model', 'data'), None)" in out  # the MLP's first layer: TP, then FSDP
    assert "tensor parallel on {'data': 2, 'model': 2}: train/loss_epoch" in out


# ---------------------------------------------------------------- the docs


def test_scaling_docs_mesh_section_runs():
    from test_docs import python_blocks

    page = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
    lines = page.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Meshes: data and model axes")
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("## "))
    blocks = [(line, code) for line, code in python_blocks(page) if start < line < end]
    assert blocks  # the section's ```python blocks, run in one namespace
    namespace: dict = {}
    for line, code in blocks:  # (compiled at their real line numbers, for tracebacks)
        exec(compile("\n" * line + code, str(page), "exec"), namespace)
