"""The CPU this process runs on, from /proc/cpuinfo (no TensorFlow import):
its model and the instruction-set flags TF's kernels pick paths by.
bench.machine prints them with every figure; --mixed_precision=auto
(trainer.precision) decides by them."""

# The flags that change which oneDNN/Eigen kernels TF runs (fp32 and bf16).
TF_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16",
            "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def parse_cpuinfo(text: str) -> dict:
  """/proc/cpuinfo text -> {"cpu": model name, "flags": the TF_FLAGS set,
  "processors_listed": logical processors}. Pure: tests feed it text."""
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


def read(path: str) -> str | None:
  """A /proc file's text, or None where it is absent (not Linux)."""
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return None


def this_cpu() -> dict:
  """parse_cpuinfo of this machine ("unknown CPU", no flags off Linux)."""
  return parse_cpuinfo(read("/proc/cpuinfo") or "")
