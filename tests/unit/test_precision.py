"""--mixed_precision=auto: which policy a machine gets, and where it is
refused."""

import keras
import pytest

from trainer import build, cpuinfo, precision
from trainer.config import Config, validate
from trainer.errors import UserError

pytestmark = pytest.mark.timeout(120)

AMD = "model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f avx512_bf16\n"
INTEL = ("model name\t: Intel(R) Xeon(R)\nflags\t\t: avx2 fma avx512f "
         "avx512_bf16 amx_bf16 amx_tile\n")


def test_auto_picks_bfloat16_only_on_a_bf16_cpu_without_accelerator():
  amd = cpuinfo.parse_cpuinfo(AMD)["flags"]
  intel = cpuinfo.parse_cpuinfo(INTEL)["flags"]
  old = ["avx2", "fma", "avx512f"]
  assert precision.resolve("auto", amd, accelerator=False) == "mixed_bfloat16"
  assert precision.resolve("auto", intel, accelerator=False) == \
      "mixed_bfloat16"
  assert precision.resolve("auto", ["amx_bf16"], accelerator=False) == \
      "mixed_bfloat16"
  assert precision.resolve("auto", old, accelerator=False) == "float32"
  assert precision.resolve("auto", [], accelerator=False) == "float32"
  assert precision.resolve("auto", amd, accelerator=True) == "float32"
  # A named policy is never changed.
  for named in ("float32", "mixed_bfloat16", "mixed_float16"):
    assert precision.resolve(named, old, accelerator=False) == named


@pytest.mark.parametrize("strategy", ["multiworker", "parameter_server"])
def test_auto_is_refused_where_processes_could_disagree(strategy):
  with pytest.raises(UserError, match="name the policy"):
    validate(Config(mixed_precision="auto", strategy=strategy))
  validate(Config(mixed_precision="auto", strategy="mirrored"))


def test_auto_resolves_once_for_every_part(tmp_path):
  expected = precision.resolve("auto", cpuinfo.this_cpu()["flags"],
                               accelerator=False)
  try:
    parts = build.parts(Config(dataset="synthetic", model="mlp",
                               global_batch_size=8, synthetic_examples=64,
                               mixed_precision="auto",
                               model_dir=str(tmp_path)))
    assert parts.config.mixed_precision == expected
    assert keras.mixed_precision.global_policy().name == expected
    model = next(iter(parts.models.values()))
    compute = {layer.dtype_policy.compute_dtype for layer in model.layers
               if layer.weights}
    assert ("bfloat16" in compute) == (expected == "mixed_bfloat16")
  finally:
    keras.mixed_precision.set_global_policy("float32")
