"""Two optimizers on disjoint variables of ONE model: a per-group learning
rate, and a Keras optimizer the CLI does not name (Lion).

  python -m trainer.main --task=examples.lr_groups:LrGroups \\
      --train_steps=300 --model_dir=runs/lr_groups

Optional --task_args: body_lr=F (default 0.001, Adam), head_lr=F (default
0.0003, Lion; Lion's sign updates want a smaller rate than Adam's).

What it shows:
- `optimizers` returns {"body": Adam, "head": Lion}: any Keras 3 optimizer
  instance, applied in that order after the framework's single reduction
  per optimizer (Lion runs Keras' own update);
- `optimizer_variables` splits the one model's trainable variables: the
  last Dense layer (the classifier head) to "head", the rest to "body";
- `train_step` is the built-in supervised step, except that it hands the
  gradients of the one loss to each optimizer by name (with several
  optimizers the context must be told which group the gradients are for).
TensorBoard shows learning_rate/body and learning_rate/head.
"""

import keras
import tensorflow as tf

import layers
from trainer.errors import UserError
from trainer.task import ClassificationTask


class LrGroups(ClassificationTask):
  """The built-in cnn on --dataset, body and head trained apart."""

  def __init__(self, config):
    super().__init__(config, model_fn=layers.get("cnn"))
    args = config.task_kwargs
    unknown = sorted(set(args) - {"body_lr", "head_lr"})
    if unknown:
      raise UserError(f"examples.lr_groups:LrGroups: unknown --task_args "
                      f"{', '.join(unknown)}; it takes body_lr, head_lr.")
    try:
      self.body_lr = float(args.get("body_lr", 1e-3))
      self.head_lr = float(args.get("head_lr", 3e-4))
    except ValueError:
      raise UserError("--task_args: body_lr and head_lr must be numbers.") \
          from None

  def optimizers(self):
    return {"body": keras.optimizers.Adam(self.body_lr),
            "head": keras.optimizers.Lion(self.head_lr)}

  def optimizer_variables(self, name, models):
    model = models["model"]
    head = list(model.layers[-1].trainable_variables)
    if name == "head":
      return head
    ids = {id(v) for v in head}
    return [v for v in model.trainable_variables if id(v) not in ids]

  def train_step(self, batch, ctx):
    features, labels = batch
    model = ctx.model
    with tf.GradientTape(persistent=True) as tape:
      outputs = model(features, training=True)
      per_example = self.loss(labels, outputs)
      loss = ctx.scale_loss(per_example, model)
    # One loss, two groups: each optimizer gets the gradients of its own
    # variables (the loss is passed to both for the finite check).
    ctx.minimize(tape, loss, "body")
    ctx.minimize(tape, loss, "head")
    return {"loss": per_example, **self.metric_values(labels, outputs)}
