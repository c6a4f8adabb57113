"""`DeviceStatsMonitor`: device and host memory, logged at log intervals."""

import logging
import os
import sys
from typing import Any

import jax

from ._callback import Callback
from ._intervals import is_train_interval

_log = logging.getLogger("solstice")

#: `Device.memory_stats()` keys logged, as the metric names they get.
_DEVICE_KEYS = (
    ("bytes_in_use", "bytes_in_use"),
    ("peak_bytes_in_use", "peak_bytes_in_use"),
    ("bytes_limit", "bytes_limit"),
)


def host_memory() -> dict[str, float]:
    """This process's resident memory now (`rss_bytes`: psutil if installed, else
    `/proc/self/status`) and at its peak (`peak_rss_bytes`), where the OS reports them."""
    out: dict[str, float] = {}
    try:
        import psutil

        out["rss_bytes"] = float(psutil.Process().memory_info().rss)
    except ImportError:
        status = _proc_status()
        if "VmRSS" in status:
            out["rss_bytes"] = status["VmRSS"]
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_bytes"] = float(peak if sys.platform == "darwin" else peak * 1024)
    except ImportError:  # (Windows)
        pass
    if "rss_bytes" in out and "peak_rss_bytes" in out:  # (the OS updates its peak lazily)
        out["peak_rss_bytes"] = max(out["peak_rss_bytes"], out["rss_bytes"])
    return out


def _proc_status() -> dict[str, float]:
    """The `kB` fields of `/proc/self/status`, in bytes (empty where there is none)."""
    if not os.path.exists("/proc/self/status"):
        return {}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[name] = float(parts[0]) * 1024
    return out


class DeviceStatsMonitor(Callback):
    """Logs the memory of every device of this process and of the host, at every training
    log interval (every `log_every_n_steps` steps and at epoch ends).

    For each local device, where the backend reports it (`jax.Device.memory_stats()`: GPUs
    and TPUs), `device_stats/<platform><id>/bytes_in_use`, `.../peak_bytes_in_use` and
    `.../bytes_limit` (e.g. `device_stats/gpu0/peak_bytes_in_use`). The CPU backend
    reports none: the `"solstice"` logger says so once, and only the host is logged. For
    the host (with `cpu_stats`), `device_stats/host/rss_bytes` (this process's resident
    memory: psutil if installed, else `/proc/self/status`) and
    `device_stats/host/peak_rss_bytes`.

    These are the allocator's and the OS's counters, read on the host: no device sync, and
    nothing per step.

    **Arguments:**

    - `cpu_stats`: also log the host's memory.

    **Example:**

    ```python
    trainer = solstice.Trainer(max_epochs=3, callbacks=[DeviceStatsMonitor()])
    ```
    """

    _reads_experiment = False

    def __init__(self, cpu_stats: bool = True):
        if not isinstance(cpu_stats, bool):
            raise TypeError(
                f"`DeviceStatsMonitor(cpu_stats=...)` must be a bool, got {cpu_stats!r}."
            )
        self.cpu_stats = cpu_stats
        self._unreported: set[str] = set()

    def device_stats(self, devices: list[jax.Device]) -> dict[str, float]:
        """The memory metrics of `devices` (those of this process) and of the host."""
        out: dict[str, float] = {}
        for device in devices:
            if device.process_index != jax.process_index():
                continue
            stats = device.memory_stats()
            if not stats:
                self._say_unreported(device)
                continue
            for key, name in _DEVICE_KEYS:
                if key in stats:
                    out[f"device_stats/{device.platform}{device.id}/{name}"] = float(stats[key])
        if self.cpu_stats:
            out.update({f"device_stats/host/{k}": v for k, v in host_memory().items()})
        return out

    def _say_unreported(self, device: jax.Device) -> None:
        if device.platform in self._unreported:
            return
        self._unreported.add(device.platform)
        _log.info(
            "DeviceStatsMonitor: the %s backend reports no memory statistics "
            "(`Device.memory_stats()` is None); logging host memory only.",
            device.platform,
        )

    def on_log(self, trainer, experiment, metrics: dict[str, Any], step: int) -> None:
        if trainer.progress.stage != "train":
            return
        if not is_train_interval(metrics):
            return
        stats = self.device_stats(trainer.devices)
        if stats:
            trainer.log_metrics(stats, step)
