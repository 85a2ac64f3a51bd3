"""Memory: peak memory of a region (measured, not estimated) and the machine's total."""
from __future__ import annotations

import gc
import resource

import torch


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak memory of a region above its start: CUDA allocator peak on CUDA, the
    resident set's high-water mark (reset through /proc/self/clear_refs) on CPU."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.method = ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        self.base = _proc_status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM growth (reset)"
        except OSError as e:
            self.method = f"ru_maxrss growth (upper bound: clear_refs refused: {e.strerror})"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            hwm = max(_proc_status_kib("VmHWM"),
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
            self.peak = max(0, hwm - self.base)
        return False


def total_memory_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemTotal from /proc/meminfo")


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB"


