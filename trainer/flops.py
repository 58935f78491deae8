"""FLOPs of a step and the machine's matmul peak (the trainer's perf/
scalars and the benchmark share these; one copy here).

FLOPs are counted by TensorFlow's profiler (`tf.compat.v1.profiler`,
float_operation) on a traced graph: the ops with registered FLOP statistics
(MatMul, Conv2D and its gradients, BiasAdd, element-wise ops, ...); ops
without them (custom kernels, some fused ops) count 0, so a count is a lower
bound. The peak is the best rate of an n x n matmul in the compute dtype.
"""

import json
import os
import time

import tensorflow as tf

# Training FLOPs of the built-in step, as a multiple of the forward pass
# (the backward pass computes gradients with respect to activations and to
# weights, each about one forward).
TRAIN_FACTOR = 3.0


def graph_flops(graph) -> float:
  """FLOPs of one run of `graph`, by the profiler; 0 if it counts none."""
  opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  opts["output"] = "none"
  info = tf.compat.v1.profiler.profile(graph=graph, options=opts)
  return float(info.total_float_ops)


def profiler_forward_flops(model, batch: int, spec=None) -> float:
  """FLOPs of `model`'s forward pass (training=False) on `batch` examples;
  `spec`: the features' TensorSpec (nest) without the batch dimension
  (default: the model's own input shape)."""
  if spec is None:
    spec = tf.TensorSpec(model.input_shape[1:], tf.float32)
  batched = tf.nest.map_structure(
      lambda s: tf.TensorSpec([batch, *s.shape], s.dtype), spec)
  fn = tf.function(lambda x: model(x, training=False))
  return graph_flops(fn.get_concrete_function(batched).graph)


def matmul_gflops(n: int, dtype: str = "float32", reps: int = 4,
                  intervals: int = 5) -> list[float]:
  """GFLOP/s of `intervals` timed calls, each `reps` n x n matmuls."""
  dt = tf.dtypes.as_dtype(dtype)
  a = tf.cast(tf.random.normal([n, n], dtype=tf.float32), dt)
  b = tf.cast(tf.random.normal([n, n], dtype=tf.float32), dt)

  @tf.function
  def run(a, b, k):
    acc = tf.zeros([], tf.float32)
    for _ in tf.range(k):
      c = tf.matmul(a, b)
      acc += tf.cast(c[0, 0], tf.float32)   # keep every matmul alive
    return acc

  k = tf.constant(reps, tf.int32)
  run(a, b, tf.constant(1, tf.int32)).numpy()   # trace + warm-up
  rates = []
  for _ in range(intervals):
    began = time.perf_counter()
    run(a, b, k).numpy()
    rates.append(2.0 * n ** 3 * reps / (time.perf_counter() - began) / 1e9)
  return rates


# The trainer's peak: 2048^2 matmuls (17 GFLOP each), best of 3 calls of 2:
# ~0.5 s on a 2-core CPU; the benchmark's ceiling uses 4096 and more calls.
PEAK_SIZE, PEAK_REPS, PEAK_INTERVALS = 2048, 2, 3


def machine_peak(dtype: str, cache_dir: str | None,
                 key: dict) -> tuple[float, str]:
  """(the best matmul GFLOP/s of this machine in `dtype`, where it came
  from): measured once and kept in CACHE_DIR/matmul_peak.json under `key`
  (the CPU, its flags, the usable cores, TensorFlow's version); measured
  again, keeping the higher, when the kept one was measured on a busy
  machine (1-minute load above half the usable cores) and this one is
  not. None cache_dir: measured every time."""
  name = json.dumps({**key, "dtype": dtype, "size": PEAK_SIZE},
                    sort_keys=True)
  path = os.path.join(cache_dir, "matmul_peak.json") if cache_dir else None
  busy = _busy()
  cached = {}
  if path:
    try:
      with open(path) as f:
        cached = json.load(f)
    except (OSError, ValueError):
      cached = {}
    kept = cached.get(name)
    if isinstance(kept, dict) and (busy or not kept.get("busy")):
      return float(kept["gflops"]), f"measured earlier ({path})"
  peak = max(matmul_gflops(PEAK_SIZE, dtype, PEAK_REPS, PEAK_INTERVALS))
  kept = cached.get(name)
  if isinstance(kept, dict) and kept.get("gflops", 0) > peak:
    peak, busy = float(kept["gflops"]), bool(kept.get("busy"))
  if path:
    try:
      os.makedirs(cache_dir, exist_ok=True)
      cached[name] = {"gflops": peak, "busy": busy}
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        json.dump(cached, f, indent=1)
      os.replace(tmp, path)
    except OSError:
      pass   # a cache that cannot be written only costs the next run time
  return peak, (f"measured now ({PEAK_SIZE}x{PEAK_SIZE} matmul, best of "
                f"{PEAK_INTERVALS}{', on a busy machine' if busy else ''})")


def _busy() -> bool:
  """Is the 1-minute load above half the cores this process may use?"""
  try:
    usable = len(os.sched_getaffinity(0))
    return os.getloadavg()[0] > 0.5 * usable
  except (AttributeError, OSError):
    return False
