"""Memory: what the model's tensors occupy, and the process's peak resident set.

model_memory_bytes counts each storage once (a tied lm_head shares the embedding's storage), over
parameters and buffers: for a QuantLinear that is its unpacked uint8 codes + fp32 scales/zeros, as
held in memory today, not the packed size (size.py reports that).

peak_rss_bytes is the whole process's high-water mark since it started (getrusage ru_maxrss,
which Linux reports in KiB and macOS in bytes): run one evaluation per process (`lowbit eval`
does) for a per-model figure.
"""
from __future__ import annotations

import resource
import sys

import torch


def model_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of distinct tensor storages behind the model's parameters and buffers."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in seen or st.nbytes() == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def current_rss_bytes() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def memory_report(model: torch.nn.Module) -> dict:
    return {"model_bytes": model_memory_bytes(model), "rss_bytes": current_rss_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "method": "model_bytes: distinct parameter/buffer storages (tied weights once); "
                      "peak_rss_bytes: getrusage ru_maxrss of the whole process so far"}
