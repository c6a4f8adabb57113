"""Import benchmark: `import solstice` against `import jax, equinox, optax`, fresh processes.

    python benchmarks/import_time.py              # about 1 minute

Each round starts one fresh interpreter per contestant (in turn, rotating who goes first) and
times the import inside it, so interpreter start-up is not counted. Reports the medians and
the median of the per-round differences. Target (issue 6): `import solstice` within 0.2 s of
`import jax, equinox, optax`. Also checks that no heavy optional dependency (torch, wandb,
tensorboardX, orbax, scikit-learn, matplotlib, keras, lightning) is imported.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import machine

HEAVY = (
    "torch",
    "wandb",
    "tensorboardX",
    "orbax",
    "sklearn",
    "matplotlib",
    "keras",
    "lightning",
    "mlflow",
    "grain",
    "array_record",
    "fsspec",
    "s3fs",
    "boto3",
)

PROBE = """
import json, sys, time
start = time.perf_counter()
{imports}
seconds = time.perf_counter() - start
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print(json.dumps({{"seconds": seconds, "heavy": heavy, "modules": len(sys.modules)}}))
"""

CONTESTANTS = {
    "jax, equinox, optax": "import jax, equinox, optax",
    "solstice": "import solstice",
    "solstice + jax.devices()": "import solstice, jax; jax.devices()",
    "jax, equinox, optax + jax.devices()": "import jax, equinox, optax; jax.devices()",
}


# Bytecode as an installed package has it: pip compiles installed files, and Python caches a
# source checkout's in `__pycache__`, unless PYTHONDONTWRITEBYTECODE is set (as on some CI
# machines), when every import compiles Solstice's ~130 modules again (~0.1-0.2 s here).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def probe(imports: str) -> dict:
    code = PROBE.format(imports=imports, heavy=HEAVY)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=ENV
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    probe("import solstice")  # writes the bytecode cache of a source checkout (not timed)
    names = list(CONTESTANTS)
    times: dict[str, list[float]] = {n: [] for n in names}
    heavy: set[str] = set()
    modules: dict[str, int] = {}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            got = probe(CONTESTANTS[name])
            times[name].append(got["seconds"])
            modules[name] = got["modules"]
            if name.startswith("solstice"):
                heavy.update(got["heavy"])
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
            flush=True,
        )
    print(f"\n{'import':<38} {'median':>8} {'min':>8}  modules")
    for name in names:
        print(
            f"{name:<38} {statistics.median(times[name]):7.3f}s {min(times[name]):7.3f}s  "
            f"{modules[name]}"
        )
    for a, b in (
        ("solstice", "jax, equinox, optax"),
        ("solstice + jax.devices()", "jax, equinox, optax + jax.devices()"),
    ):
        diffs = [x - y for x, y in zip(times[a], times[b])]
        extra = statistics.median(diffs)
        ok = "met" if extra <= 0.2 else "MISSED"
        print(
            f"{a} - {b}: {extra:+.3f} s median per round "
            f"(range {min(diffs):+.3f} to {max(diffs):+.3f}; target <= +0.2 s: {ok})"
        )
    print("heavy optional dependencies imported by solstice:", sorted(heavy) or "none")


if __name__ == "__main__":
    main()
