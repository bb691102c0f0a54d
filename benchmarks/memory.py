"""This process's memory, from /proc: what a benchmark reports as resident and peak resident memory.

Peak RSS is VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across fork and exec, so a child started by
a benchmark that had touched 1.5 GB reported 1.5 GB whatever it used itself.
"""

from pathlib import Path


def rss_mb(field_name: str = "VmRSS") -> float:
    """Resident (VmRSS) or peak resident (VmHWM) memory of this process in MiB, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """This process's own peak resident memory in MiB (VmHWM), since it was started or last reset."""
    return rss_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM so the next peak is what follows (Linux clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
