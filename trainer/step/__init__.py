"""The replica step: the context a train_step is given (context.py), the
tf.functions that run it (steps.py), and the metric sums (metric_sums.py)."""

from trainer.step.context import StepContext  # noqa: F401
