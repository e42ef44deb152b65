"""Peak memory of a call. On CUDA, torch.cuda.max_memory_allocated over the call (bytes above what was allocated
before). On CPU, the growth of the process's resident set size: on Linux its high-water mark (VmHWM, reset through
/proc/self/clear_refs) minus the RSS before the call; elsewhere RSS sampled every 10 ms by a thread (psutil). RSS
includes allocator caching and freed-but-kept pages, so CPU figures are approximate upper bounds."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Measures the peak extra memory (bytes) of the block into result["bytes"] (see module doc)."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
        return
    if _reset_peak_rss():  # Linux keeps the resident-set high-water mark itself: exact, no sampling
        base = _proc_status_kb("VmRSS")
        yield result
        result["bytes"] = 1024 * max(_proc_status_kb("VmHWM") - base, 0)
        return
    import psutil

    process = psutil.Process()
    base = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result["bytes"] = int(max(peak, process.memory_info().rss) - base)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return _proc_status_kb("VmHWM") > 0
    except OSError:
        return False


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
