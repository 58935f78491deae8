"""What a bench figure was measured on: CPU model, the instruction-set flags
TF's kernels pick paths by, cores and load (no TensorFlow import).

The CPU behind these machines changes from one day to the next (AMD EPYC
one day, an Intel CPU with AVX512_BF16 and AMX the next), and the ratios
move with it, so every bench output starts with `header(info())`.
"""

import os
import platform

# One copy, in the trainer (--mixed_precision=auto reads the same flags).
from trainer import cpuinfo
from trainer.cpuinfo import TF_FLAGS, parse_cpuinfo  # noqa: F401 (re-exported)


def load() -> list[float] | None:
  """1, 5 and 15 minute load averages (None where /proc is absent)."""
  text = cpuinfo.read("/proc/loadavg")
  return [float(x) for x in text.split()[:3]] if text else None


def info() -> dict:
  """The machine now: CPU, TF-relevant flags, cores usable, load."""
  parsed = cpuinfo.this_cpu()
  try:
    usable = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    usable = os.cpu_count()
  return {**parsed, "cpus": os.cpu_count(), "cpus_usable": usable,
          "load": load(), "platform": platform.platform(),
          "python": platform.python_version()}


def header(m: dict) -> str:
  """One line: `machine: MODEL, N CPUs (usable U), flags ..., load a/b/c`."""
  flags = " ".join(m.get("flags") or []) or "none of " + "/".join(TF_FLAGS)
  load_avg = m.get("load")
  load_text = "/".join(f"{x:.2f}" for x in load_avg) if load_avg else "?"
  usable = m.get("cpus_usable")
  cpus = f"{m.get('cpus', '?')} CPUs" + (
      f" ({usable} usable)" if usable and usable != m.get("cpus") else "")
  return (f"machine: {m.get('cpu', '?')}, {cpus}, flags: {flags}, "
          f"load avg (1/5/15 min) {load_text}")
