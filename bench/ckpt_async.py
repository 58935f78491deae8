"""What a checkpoint blocks the training loop for: synchronous saves against
--async_checkpoint, on a wide dense model whose state (weights and Adam's
two slots) is --state_mb or more, in one process, interleaved round by
round.

  python -m bench.ckpt_async --state_mb=300 --rounds=7

Per round: a few training steps, a synchronous save (`Checkpointer.save`
returns once the checkpoint is committed: write, fsync, rename, index),
more steps, an asynchronous save (the time save() blocks the loop: the
copy of the state to the host; the write runs in a thread), then the next
training step (it runs beside the background write, and copies each
variable's buffer that the snapshot still holds before updating it) and the background write's own time (`background_seconds`),
after `wait()`. Prints the machine line, each figure's median over the
rounds, and blocked / synchronous. Both checkpointers write to the same
file system (--dir, default a temporary directory on local disk).
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

from bench import machine


def _model(state_mb: float, seed: int = 0):
  """Input 2048 -> Dense(W) -> Dense(W) -> Dense(10), W chosen so that the
  weights plus Adam's two slots take at least state_mb MB."""
  import keras
  keras.utils.set_random_seed(seed)
  inputs = 2048
  width = 256
  while 3 * 4 * (inputs * width + width * width) < state_mb * 1e6:
    width += 256
  model = keras.Sequential([keras.Input((inputs,)),
                            keras.layers.Dense(width, activation="relu"),
                            keras.layers.Dense(width, activation="relu"),
                            keras.layers.Dense(10)])
  return model, inputs


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--state_mb", type=float, default=300.0)
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--dir", default="",
                      help="where to write (default: a fresh temp dir)")
  args = parser.parse_args(argv)
  print(machine.header(machine.info()), flush=True)

  import keras
  import tensorflow as tf
  from trainer import checkpoint as ckpt_lib

  model, inputs = _model(args.state_mb)
  optimizer = keras.optimizers.Adam(1e-4)
  optimizer.build(model.trainable_variables)
  step = tf.Variable(0, dtype=tf.int64)
  x = tf.random.stateless_normal([args.batch, inputs], seed=[1, 2])
  y = tf.random.stateless_uniform([args.batch], [3, 4], maxval=10,
                                  dtype=tf.int32)

  @tf.function
  def train_step():
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
          y, model(x, training=True), from_logits=True))
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)
    step.assign_add(1)
    return loss

  def timed_step() -> float:
    began = time.perf_counter()
    train_step().numpy()
    return time.perf_counter() - began

  state_bytes = sum(v.numpy().nbytes for v in
                    [*model.weights, *optimizer.variables])
  root = args.dir or tempfile.mkdtemp(prefix="ckpt_async_")
  objects = {"model": model, "optimizer": optimizer, "global_step": step}
  savers = {}
  for name, asynchronous in (("sync", False), ("async", True)):
    directory = os.path.join(root, name)
    os.makedirs(directory, exist_ok=True)
    savers[name] = ckpt_lib.Checkpointer(directory, objects, keep=2,
                                         is_chief=True, worker_index=0,
                                         asynchronous=asynchronous)
  print(f"model: 2048 -> {model.layers[0].units} -> "
        f"{model.layers[1].units} -> 10, state {state_bytes / 1e6:.0f} MB "
        f"(weights + Adam slots); writing under {root}", flush=True)
  for _ in range(3):
    timed_step()
  figures = {k: [] for k in ("sync_save", "async_blocked", "background_write",
                             "step", "step_after_async_save")}
  try:
    for round_index in range(args.rounds + 1):   # round 0: warm-up
      timed_step()
      began = time.perf_counter()
      savers["sync"].save(int(step.numpy()))
      sync_save = time.perf_counter() - began
      plain_step = timed_step()
      before = savers["async"].background_seconds()
      began = time.perf_counter()
      savers["async"].save(int(step.numpy()))
      blocked = time.perf_counter() - began
      after_save = timed_step()
      savers["async"].wait()
      background = savers["async"].background_seconds() - before
      if round_index == 0:
        continue
      for key, value in (("sync_save", sync_save), ("async_blocked", blocked),
                         ("background_write", background),
                         ("step", plain_step),
                         ("step_after_async_save", after_save)):
        figures[key].append(value)
      print(f"round {round_index}: sync save {sync_save:.3f} s, async "
            f"blocked {blocked * 1e3:.1f} ms (background write "
            f"{background:.3f} s), step {plain_step * 1e3:.1f} ms, after an "
            f"async save {after_save * 1e3:.1f} ms", flush=True)
  finally:
    if not args.dir:
      shutil.rmtree(root, ignore_errors=True)
  med = {k: statistics.median(v) for k, v in figures.items()}
  print(f"median of {args.rounds} rounds: synchronous save "
        f"{med['sync_save']:.3f} s; async: blocked {med['async_blocked'] * 1e3:.1f}"
        f" ms = {med['async_blocked'] / med['sync_save']:.1%} of the "
        f"synchronous save, background write {med['background_write']:.3f} s;"
        f" the next step {med['step_after_async_save'] * 1e3:.1f} ms against "
        f"{med['step'] * 1e3:.1f} ms (it runs beside the background write, "
        "and copies the buffers the snapshot holds)",
        flush=True)
  print(machine.header(machine.info()), flush=True)


if __name__ == "__main__":
  main()
