"""Knowledge distillation: a frozen teacher from an earlier run, a smaller
student trained on the teacher's softened outputs plus the labels.

  # 1. the teacher: any earlier classification run (here the built-in cnn)
  python -m trainer.main --model=cnn --train_steps=600 --model_dir=runs/teacher
  # 2. the student, distilled from it
  python -m trainer.main --task=examples.distill:Distill \\
      --task_args=teacher_dir=runs/teacher --train_steps=600 \\
      --model_dir=runs/student

Optional --task_args: temperature=T (default 2), alpha=A (default 0.5, the
weight of the distillation term; 1 - A weighs the cross-entropy on labels).

What it shows:
- `build_model` returns {"model": student, "teacher": teacher}: the student
  is the main model (evaluation); the teacher is rebuilt from the earlier
  run's config.json, its checkpoint's model weights (its moving average if
  it ran with --ema_decay) are restored into it (refused with one line if
  they do not match; examples/frozen.py), and it is frozen
  (`trainable=False`), so the default optimizer updates the student only.
- `train_step`: per-example loss = A * T^2 * KL(teacher_T || student_T) +
  (1 - A) * CE(labels, student), scaled by the global batch by the context.
"""

import keras
import tensorflow as tf

from examples import frozen
from trainer.errors import UserError
from trainer.task import ClassificationTask


def student_model(input_shape, num_classes) -> keras.Model:
  """A small MLP: a fraction of the cnn teacher's parameters."""
  inputs = keras.Input(input_shape)
  x = keras.layers.Flatten()(inputs)
  x = keras.layers.Dense(32, activation="relu")(x)
  return keras.Model(inputs, keras.layers.Dense(num_classes,
                                                dtype="float32")(x),
                     name="student")


def kd_loss(labels, student_logits, teacher_logits, temperature, alpha):
  """Per-example A * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1-A) * CE."""
  t = tf.nn.log_softmax(tf.cast(teacher_logits, tf.float32) / temperature)
  s = tf.nn.log_softmax(tf.cast(student_logits, tf.float32) / temperature)
  kl = tf.reduce_sum(tf.exp(t) * (t - s), axis=-1)
  ce = keras.losses.sparse_categorical_crossentropy(
      labels, student_logits, from_logits=True)
  return alpha * temperature ** 2 * kl + (1.0 - alpha) * ce


class Distill(ClassificationTask):
  """Student (an MLP) distilled from a teacher run on the same dataset."""

  def __init__(self, config):
    super().__init__(config, model_fn=student_model)
    args = config.task_kwargs
    unknown = sorted(set(args) - {"teacher_dir", "temperature", "alpha"})
    if unknown or "teacher_dir" not in args:
      raise UserError("examples.distill:Distill needs --task_args="
                      "teacher_dir=DIR[,temperature=T,alpha=A]"
                      + (f"; unknown: {', '.join(unknown)}" if unknown else
                         "."))
    try:
      self.temperature = float(args.get("temperature", 2.0))
      self.alpha = float(args.get("alpha", 0.5))
    except ValueError:
      raise UserError(f"--task_args: temperature and alpha must be numbers, "
                      f"not {args.get('temperature')!r}, "
                      f"{args.get('alpha')!r}.") from None
    if self.temperature <= 0 or not 0.0 <= self.alpha <= 1.0:
      raise UserError("--task_args: temperature must be > 0 and alpha in "
                      "[0, 1].")
    self.teacher_dir = args["teacher_dir"]

  def build_model(self, input_spec):
    return {"model": super().build_model(input_spec),
            "teacher": frozen.load(self.teacher_dir, input_spec,
                                   self.config.dataset,
                                   "--task_args=teacher_dir")}

  def train_step(self, batch, ctx):
    images, labels = batch
    student, teacher = ctx.model, ctx.models["teacher"]
    teacher_logits = teacher(images, training=False)
    with tf.GradientTape() as tape:
      logits = student(images, training=True)
      per_example = kd_loss(labels, logits, teacher_logits, self.temperature,
                            self.alpha)
      loss = ctx.scale_loss(per_example, student)
    ctx.minimize(tape, loss)
    return {"loss": per_example, **self.metric_values(labels, logits)}
