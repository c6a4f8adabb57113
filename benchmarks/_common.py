"""Shared pieces of the benchmarks: data, the machine description, interleaved timing, peers.

Every benchmark measures its contestants *side by side*: round after round, each contestant
runs one epoch in turn, so that load from other processes on a shared machine hits all of them
alike. A ratio is computed per round and the median over rounds is reported.
"""

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def mnist_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` random MNIST-shaped samples: `float32 (n, 28, 28)` images, `int32 (n,)` labels."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, size=n).astype(np.int32)
    return x, y


def machine() -> str:
    """One line: CPU model, cores, Python, JAX backend."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        family = fields.get("CPU family", "").strip()
        mdl = fields.get("Model", "").strip()
        if family:
            model += f" (family {family}, model {mdl})"
    except (OSError, subprocess.CalledProcessError):
        pass
    import jax

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{model}, {cores} cores usable, load average {load:.1f} at start; Python "
        f"{platform.python_version()}, jax {jax.__version__} on "
        f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    )


class Contestant:
    """A named callable that runs one epoch and returns `(seconds, samples, cpu_seconds)`.

    `cpu_seconds` is the CPU time of every thread of the process that ran the epoch (its
    own XLA/BLAS threads included): the work done, which other processes' load on a shared
    machine disturbs far less than wall time.
    """

    def __init__(self, name: str, epoch: Callable[[], tuple[float, int, float]]):
        self.name = name
        self.epoch = epoch
        self.times: list[float] = []
        self.rates: list[float] = []  # samples per second (wall)
        self.cpu: list[float] = []  # samples per CPU second


def timed(fn: Callable[[], int]) -> Callable[[], tuple[float, int, float]]:
    """Wrap `fn() -> samples` (which must block until its work is done) to time it."""

    def run() -> tuple[float, int, float]:
        cpu = time.process_time()
        start = time.perf_counter()
        samples = fn()
        return time.perf_counter() - start, samples, time.process_time() - cpu

    return run


def interleave(contestants: list[Contestant], rounds: int, *, verbose: bool = True) -> None:
    """Run every contestant's epoch once per round, in turn (rotating who goes first)."""
    for r in range(rounds):
        order = contestants[r % len(contestants) :] + contestants[: r % len(contestants)]
        for c in order:
            seconds, samples, cpu = c.epoch()
            c.times.append(seconds)
            c.rates.append(samples / seconds)
            c.cpu.append(samples / cpu)
        if verbose:
            cells = ", ".join(f"{c.name} {c.times[-1]:.3f}s" for c in contestants)
            print(f"  round {r + 1}/{rounds}: {cells}", flush=True)


def run(contestants: list[Contestant], rounds: int) -> dict[str, Contestant]:
    """Interleave `rounds` rounds, close the contestants that need it (peer processes, running
    fits), print the report; the contestants by name."""
    print(f"timing {rounds} rounds, contestants interleaved", flush=True)
    try:
        interleave(contestants, rounds)
    finally:
        for c in contestants:
            close = getattr(c, "close", None)
            if close is not None:
                close()
    report(contestants)
    return {c.name: c for c in contestants}


def ratio(a: Contestant, b: Contestant) -> float:
    """Median over rounds of `speed(a) / speed(b)` (samples per second)."""
    return statistics.median(x / y for x, y in zip(a.rates, b.rates))


def best_ratio(a: Contestant, b: Contestant) -> float:
    """`best speed(a) / best speed(b)`: each at its least disturbed round."""
    return max(a.rates) / max(b.rates)


def cpu_ratio(a: Contestant, b: Contestant) -> float:
    """Median over rounds of `(samples per CPU second of a) / (... of b)`."""
    return statistics.median(x / y for x, y in zip(a.cpu, b.cpu))


def spread(a: Contestant, b: Contestant) -> tuple[float, float]:
    """The smallest and largest per-round ratio."""
    rs = [x / y for x, y in zip(a.rates, b.rates)]
    return min(rs), max(rs)


def report(contestants: list[Contestant]) -> None:
    width = max(len(c.name) for c in contestants)
    print(f"\n{'contestant':<{width}}  median epoch  best epoch  samples/s  samples/cpu-s")
    for c in contestants:
        print(
            f"{c.name:<{width}}  {statistics.median(c.times):10.3f} s {min(c.times):9.3f} s "
            f"{statistics.median(c.rates):10.0f} {statistics.median(c.cpu):14.0f}"
        )


def check(label: str, value: float, target: float) -> str:
    ok = "met" if value >= target else "MISSED"
    return f"{label:<58} {value:6.3f}x   (target >= {target}x: {ok})"


class Peer:
    """A contestant in its own process (Keras, Lightning), driven one epoch at a time.

    The peer script warms up (compiles, runs one epoch), prints `ready`, then runs one epoch
    per `epoch` line on its stdin and answers `time <seconds> <samples> <cpu_seconds>`.
    """

    def __init__(self, script: str, args: list[str], env: dict[str, str] | None = None):
        self.script = script
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            bufsize=1,
        )
        self.error: str | None = None
        line = self._read_line()
        if line is None or not line.startswith("ready"):
            self.error = self._failure(line)

    def _read_line(self) -> str | None:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                return None
            if line.startswith(("ready", "time", "error")):
                return line.strip()

    def _failure(self, line: str | None) -> str:
        if line is not None and line.startswith("error"):
            return line[len("error") :].strip()
        self.proc.kill()
        err = self.proc.stderr.read()
        return err.strip().splitlines()[-1] if err.strip() else "exited without output"

    def epoch(self) -> tuple[float, int, float]:
        self.proc.stdin.write("epoch\n")
        self.proc.stdin.flush()
        line = self._read_line()
        if line is None or not line.startswith("time"):
            raise RuntimeError(f"{self.script} failed: {self._failure(line)}")
        _, seconds, samples, cpu = line.split()
        return float(seconds), int(samples), float(cpu)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
