"""Reads the trainer's TensorBoard scalars back (train/ under --model_dir)."""

import glob
import os


def read_scalars(log_dir: str) -> dict[str, list[tuple[int, float, float]]]:
  """tag -> [(step, wall_time, value)] sorted by step, from every event file
  in `log_dir` (TF2 summaries store scalars as tensors)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  from tensorflow.core.util import event_pb2
  out: dict[str, list] = {}
  for path in sorted(glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))):
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        try:
          if value.HasField("tensor"):
            number = float(tf.make_ndarray(value.tensor))
          elif value.HasField("simple_value"):
            number = float(value.simple_value)
          else:
            continue
        except (TypeError, ValueError):   # text summaries (config), etc.
          continue
        out.setdefault(value.tag, []).append(
            (int(event.step), float(event.wall_time), number))
  for series in out.values():
    series.sort()
  return out


def interval_rates(log_dir: str) -> tuple[list[float], list[float]]:
  """(steps_per_sec as the trainer logged it per summary interval,
  end-to-end steps/sec from the event wall times between summaries)."""
  scalars = read_scalars(log_dir)
  logged = [v for _, _, v in scalars.get("steps_per_sec", [])]
  points = [(s, t) for s, t, _ in scalars.get("steps_per_sec", [])]
  wall = [(s1 - s0) / (t1 - t0)
          for (s0, t0), (s1, t1) in zip(points, points[1:]) if t1 > t0]
  # wall[i] covers interval i+1 (the first interval has no start event).
  return logged, [None] + wall
