"""TensorBoard writers (chief only) and the fixed-format progress line."""

import datetime
import os

import tensorflow as tf


class Writers:
  """train/ and eval/ event writers under --model_dir; no-ops off-chief."""

  def __init__(self, model_dir: str, is_chief: bool):
    if is_chief:
      self.train = tf.summary.create_file_writer(os.path.join(model_dir, "train"))
      self.eval = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))
    else:
      self.train = self.eval = tf.summary.create_noop_writer()

  def scalars(self, writer, step: int, values: dict) -> None:
    with writer.as_default(step=step):
      for name, value in values.items():
        if value is not None:
          tf.summary.scalar(name, value)
    writer.flush()

  def close(self):
    self.train.close()
    self.eval.close()


def progress_line(kind: str, step: int, total: int, values: dict,
                  eta_s: float | None = None) -> str:
  """`train | step: 100/1000 | loss: 0.1234 | ... | eta: 0:00:12`."""
  parts = [kind, f"step: {step}/{total}"]
  for name, value in values.items():
    if value is None:
      continue
    if name in ("steps_per_sec", "examples_per_sec"):
      parts.append(f"{name.replace('_per_', '/')}: {value:.1f}")
    else:
      parts.append(f"{name}: {value:.4f}")
  if eta_s is not None:
    parts.append(f"eta: {datetime.timedelta(seconds=int(eta_s))}")
  return " | ".join(parts)
