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

`dtype_hint`: under a mixed policy, a layer that mixes a float32 value (a
constant, a mask) into its float16/bfloat16 compute fails deep inside
Keras; the hint names the policy and the fix.
"""

import re

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


# TF's words for an op given float32 beside float16/bfloat16: at tracing
# ("Input 'y' of 'Mul' Op has type float32 that does not match type float16
# of argument 'x'.") and eagerly ("... was expected to be a half tensor but
# is a float tensor").
_MISMATCH = re.compile(
    r"Input '\w+' of '\w+' Op has type (\w+) that does not match type (\w+)"
    r"[^.\n]*|expected to be a (\w+) tensor but is a (\w+) tensor")
_LAYER = re.compile(r"when calling (\w+)\.call\(\)")
_LOW = {"float16", "half", "bfloat16"}
_FULL = {"float32", "float"}


def dtype_hint(message: str, policy: str) -> str | None:
  """One line for a float32 / float16-or-bfloat16 mismatch under a mixed
  Keras policy (`policy`: its name); None for anything else.

    >>> dtype_hint("Input 'y' of 'Mul' Op has type float32 that does not "
    ...            "match type float16 of argument 'x'.", "mixed_float16")[:72]
    'a layer mixes float32 into float16 compute under --mixed_precision=mixed'
    >>> dtype_hint("Input 'y' of 'Mul' Op has type float32 that does not "
    ...            "match type float16 of argument 'x'.", "float32") is None
    True
  """
  if not policy.startswith("mixed_"):
    return None
  match = _MISMATCH.search(message)
  if match is None:
    return None
  kinds = {k for k in match.groups() if k}
  if not (kinds & _LOW and kinds & _FULL):
    return None
  low = policy[len("mixed_"):]
  layer = _LAYER.search(message)
  who = f"layer {layer.group(1)}" if layer else "a layer"
  return (f"{who} mixes float32 into {low} compute under "
          f"--mixed_precision={policy} ({match.group(0)}); cast the float32 "
          "value to the layer's compute dtype (tf.cast(value, x.dtype) or "
          "self.compute_dtype), or train with --mixed_precision=float32.")
