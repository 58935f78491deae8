"""Shared by the orchestrator and the worker processes (no TensorFlow import
at module level: the orchestrator stays light)."""

import json
import os
import statistics

RESULT_TAG = "BENCH_RESULT "
WARMUP_INTERVALS = 2          # tracing + warm-up, dropped from every run

# Shapes of the benchmark models (what the framework gets through
# --dataset=synthetic --synthetic_shape=...).
SHAPES = {"cnn": (28, 28, 1), "resnet20": (32, 32, 3), "mlp": (28, 28, 1)}
NUM_CLASSES = 10


def emit(result: dict) -> None:
  """The last stdout line of a worker: its result as JSON."""
  print(RESULT_TAG + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict | None:
  for line in reversed(stdout.splitlines()):
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):])
  return None


def steady(rates: list[float]) -> list[float]:
  """The intervals after warm-up."""
  return list(rates[WARMUP_INTERVALS:])


def median(values):
  values = [v for v in values if v is not None]
  return statistics.median(values) if values else None


def quiet_env(extra: dict | None = None) -> dict:
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env.pop("TF_CONFIG", None)
  env.update(extra or {})
  return env
