"""The trainer's side of the in-process benchmarks: its chunk as a contender
(a callable running n updates), for bench.paired, bench.end_to_end and
bench.trace. Below all three: it imports none of them."""


def chunk(runner, guarded: bool = False):
  """The chunk the trainer runs (Steps.unguarded_chunk, or guarded_loop:
  the per-update guard), on its own input pipeline from the runner's
  current position: n -> runs n updates."""
  import tensorflow as tf
  iterator = runner.executor.train_iterator()
  steps = runner.steps
  fn = steps.guarded_loop if guarded else steps.unguarded_chunk
  return lambda n: fn(iterator, tf.cast(n, tf.int64))


def gan_runner(batch: int, model_dir: str):
  """The trainer on examples.dcgan:DCGAN at global batch `batch`."""
  from trainer import controller
  from trainer.config import Config
  return controller.create(Config(
      task="examples.dcgan:DCGAN", global_batch_size=batch,
      model_dir=model_dir))


def lm_runner(batch: int, model_dir: str, task_args: str,
              learning_rate: float):
  """The trainer on examples.lm:ByteLM at global batch `batch`, Adam."""
  from trainer import controller
  from trainer.config import Config
  return controller.create(Config(
      task="examples.lm:ByteLM", task_args=task_args,
      global_batch_size=batch, optimizer="adam",
      learning_rate=learning_rate, model_dir=model_dir))
