"""The shape of the code, enforced: layers that import one way, no traffic in the Trainer's
private attributes, a thin Trainer module and short functions in the trainer package."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "solstice"
SUBPACKAGES = (
    "callbacks",
    "checkpointing",
    "datamodules",
    "loggers",
    "storage",
    "trainer",
    "tuner",
)


def _modules(*folders: Path):
    for folder in folders:
        yield from sorted(folder.rglob("*.py"))


def _layer(path: Path) -> str:
    """`core` for `solstice/_*.py`, else the subpackage a module belongs to."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else ("package" if parts[0] == "__init__.py" else "core")


def _imported_layers(path: Path) -> set[str]:
    """The layers a module of the package imports (annotations-only imports included)."""
    layers = set()
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif (node.module or "").startswith("solstice"):
                target = node.module.split(".")
            else:
                continue
            names = (
                [target + [alias.name] for alias in node.names] if len(target) == 1 else [target]
            )
            for name in names:
                sub = name[1] if len(name) > 1 else ""
                layers.add(sub if sub in SUBPACKAGES else "core")
    return layers


def test_subpackages_import_one_way():
    graph: dict[str, set[str]] = {}
    for path in _modules(PACKAGE):
        layer = _layer(path)
        if layer == "package":
            continue
        graph.setdefault(layer, set()).update(_imported_layers(path) - {layer})
    order: list[str] = []
    visiting: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in order:
            return
        assert node not in visiting, f"import cycle: {' -> '.join([*trail, node])}"
        visiting.add(node)
        for target in sorted(graph.get(node, ())):
            visit(target, [*trail, node])
        visiting.discard(node)
        order.append(node)

    for node in sorted(graph):
        visit(node, [])
    # the layers, bottom up, as DESIGN says: callbacks and checkpointing never see the trainer
    assert "trainer" not in graph["callbacks"] | graph["checkpointing"] | graph["datamodules"]
    # the tuner is the top layer: it builds on the trainer, and nothing builds on it
    assert "trainer" in graph["tuner"]
    assert not any("tuner" in deps for layer, deps in graph.items() if layer != "tuner")
    assert graph["loggers"] <= {"storage"}, graph["loggers"]
    assert graph["storage"] <= set(), graph["storage"]  # the lowest layer


def test_no_solstice_import_inside_a_function():
    found = []
    for path in _modules(PACKAGE):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                local = isinstance(node, ast.ImportFrom) and (
                    node.level or (node.module or "").startswith("solstice")
                )
                if local:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} in {fn.name}")
    assert not found, found


def _private_uses(path: Path) -> list[str]:
    """`trainer._x` / `run._x` (reads or writes, `getattr` included) in a module."""
    uses = []
    for node in ast.walk(ast.parse(path.read_text())):
        owner = attr = None
        if isinstance(node, ast.Attribute):
            owner, attr = node.value, node.attr
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            owner, attr = node.args[0], str(node.args[1].value)
        if owner is None or not attr.startswith("_") or attr.startswith("__"):
            continue
        name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        if name.lstrip("_") in ("trainer", "run"):
            uses.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{attr}")
    return uses


@pytest.mark.parametrize("folder", ["solstice", "tests", "examples", "benchmarks", "docs"])
def test_nothing_outside_the_trainer_package_touches_its_private_attributes(folder):
    paths = [
        p
        for p in _modules(ROOT / folder)
        if PACKAGE / "trainer" not in p.parents and p != Path(__file__)
    ]
    uses = [use for path in paths for use in _private_uses(path)]
    assert not uses, uses


def test_the_trainer_is_thin_and_its_functions_short():
    trainer_module = PACKAGE / "trainer" / "_trainer.py"
    assert len(trainer_module.read_text().splitlines()) < 300
    long = []
    for path in _modules(PACKAGE / "trainer"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert not long, long


def test_a_checkpoints_contents_are_defined_in_one_module():
    # what a checkpoint holds is built in one place: no other module writes its document
    defining = [
        path.relative_to(ROOT).as_posix()
        for path in _modules(PACKAGE)
        if '"kind": "trainer"' in path.read_text()
    ]
    assert defining == ["solstice/checkpointing/_checkpoint_state.py"]


def test_the_hook_list_is_one_list():
    from solstice import Experiment
    from solstice._hook_names import HOOK_NAMES
    from solstice.callbacks import Callback

    def hooks(cls):
        return {name for name in dir(cls) if name.startswith("on_")}

    assert hooks(Callback) == HOOK_NAMES == hooks(Experiment) - {"on_device"}


def test_pytree_is_one_type():
    # one `PyTree` (jaxtyping's), not an `Any` alias per module
    aliases = [
        path.relative_to(ROOT).as_posix()
        for path in _modules(PACKAGE)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "PyTree" for t in node.targets)
    ]
    assert not aliases, aliases
