"""--mixed_precision=auto: the Keras dtype policy this machine trains
fastest with at the same accuracy, as measured (bench/README.md).

On CPUs whose flags include AVX512_BF16 or AMX-BF16, mixed_bfloat16
(bfloat16 compute, float32 weights): on an AMD EPYC with AVX512_BF16 the
trainer's chunk ran 1.39x (cnn, batch 128) and 1.17x (resnet20, batch 64)
as fast as the float32 hand-written loop, and the cnn's eval accuracy on
real MNIST was 98.57% against 98.72% (mean of 3 seeds); resnet20's was
not worse (0.955 against 0.920 after 1,200 updates). Everywhere else
float32: without those flags bfloat16 is emulated and slower, and on GPUs
and TPUs nothing was measured here (name the policy there).
"""

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve(requested: str, cpu_flags, accelerator: bool) -> str:
  """The policy `requested` means here. Pure: `cpu_flags` as
  trainer.cpuinfo gives them; `accelerator`: a GPU or TPU is used."""
  if requested != "auto":
    return requested
  if not accelerator and any(f in BF16_FLAGS for f in cpu_flags):
    return "mixed_bfloat16"
  return "float32"


def for_this_machine(requested: str, strategy: str) -> str:
  """resolve() with this process's CPU flags and devices."""
  if requested != "auto":
    return requested
  import tensorflow as tf
  from trainer import cpuinfo
  accelerator = (strategy == "tpu"
                 or bool(tf.config.list_physical_devices("GPU")))
  return resolve(requested, cpuinfo.this_cpu()["flags"], accelerator)
