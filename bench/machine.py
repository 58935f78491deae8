"""What a bench figure was measured on: CPU model, the instruction-set flags
TF's kernels pick paths by, cores and load (no TensorFlow import).

The CPU behind these machines changes from one day to the next (AMD EPYC
one day, an Intel CPU with AVX512_BF16 and AMX the next), and the ratios
move with it, so every bench output starts with `header(info())`.
"""

import os
import platform

# The flags that change which oneDNN/Eigen kernels TF runs (fp32 and bf16).
TF_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
            "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def parse_cpuinfo(text: str) -> dict:
  """/proc/cpuinfo text -> {"cpu": model name, "flags": the TF_FLAGS set,
  "sockets_cores": logical processors listed}. Pure: tests feed it text."""
  model, flags, processors = None, [], 0
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "processor":
      processors += 1
    elif key == "model name" and model is None:
      model = value.strip()
    elif key == "flags" and not flags:
      flags = value.split()
  present = set(flags)
  return {"cpu": model or "unknown CPU",
          "flags": [f for f in TF_FLAGS if f in present],
          "processors_listed": processors}


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def load() -> list[float] | None:
  """1, 5 and 15 minute load averages (None where /proc is absent)."""
  text = _read("/proc/loadavg")
  return [float(x) for x in text.split()[:3]] if text else None


def info() -> dict:
  """The machine now: CPU, TF-relevant flags, cores usable, load."""
  parsed = parse_cpuinfo(_read("/proc/cpuinfo") or "")
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
