"""A recommender on clicks with planted structure: matrix factorisation with
a hashed user table of a million rows, trained row-wise (LazyAdam).

Run it:
  python -m trainer.main --task=examples.recommender:Recommender \
      --model_dir=runs/rec --train_steps=2000 --learning_rate=0.01 \
      --global_batch_size=256
  python -m launch.local --workers=2 --ps=2 -- \
      --strategy=parameter_server --task=examples.recommender:Recommender \
      --model_dir=runs/rec_ps --train_steps=2000 --learning_rate=0.01 \
      --global_batch_size=256
  python -m trainer.export --model_dir=runs/rec --export_dir=runs/rec_export
  python examples/recommender.py          (prints recall@10 vs the best)

The data: USERS users and ITEMS items with hidden factors (FACTORS dims);
user u clicks item i with probability softmax_i(SHARPNESS * <U_u, V_i>), all
drawn from a fixed seed. Training reads TRAIN_CLICKS clicks per user;
evaluation holds out one more click per user. Users carry raw 40-bit ids,
hashed into --task_args=user_rows=N rows (default 1,000,000).

The model: score(u, i) = <user_table[hash(u)], item_table[i]> + bias_i,
trained with softmax cross-entropy over all items. `recall_at_10` is 1 for
a click whose item is among the user's 10 best-scoring items. No model can
beat, on average, the ranking by the TRUE factors: `best_recall_at_10()`
computes it on the same held-out clicks (chance is 10 / ITEMS).

Export: `serving_default` scores (user, item) pairs; `top_items` returns
the TOP_K best items of a user and their scores.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

import layers
import trainer
from trainer.optim import LazyAdam
from trainer.serving import Signature

USERS = 4000
ITEMS = 500
FACTORS = 8
SHARPNESS = 4.0
TRAIN_CLICKS = 24
DIM = 32
TOP_K = 10
_SEED = 2026


def world(seed: int = _SEED):
  """(user ids int64 [USERS], user factors [USERS, FACTORS], item factors
  [ITEMS, FACTORS]): the hidden truth."""
  rng = np.random.default_rng(seed)
  ids = rng.choice(1 << 40, USERS, replace=False).astype(np.int64)
  users = rng.normal(size=(USERS, FACTORS)) / np.sqrt(FACTORS)
  items = rng.normal(size=(ITEMS, FACTORS))
  return ids, users, items


def true_scores(users, items):
  return SHARPNESS * users @ items.T


def clicks(split: str, seed: int = _SEED):
  """(user ids int64 [n], clicked items int32 [n]) of a split: "train"
  (TRAIN_CLICKS per user) or "test" (one held-out click per user)."""
  ids, users, items = world(seed)
  logits = true_scores(users, items)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  per_user = TRAIN_CLICKS if split == "train" else 1
  rng = np.random.default_rng([seed, 1 if split == "train" else 2])
  # Inverse-CDF sampling: one uniform per click.
  cdf = np.cumsum(p, 1)
  u = rng.random((USERS, per_user))
  chosen = np.minimum((cdf[:, None, :] < u[..., None]).sum(-1), ITEMS - 1)
  order = rng.permutation(USERS * per_user)
  return (np.repeat(ids, per_user)[order],
          chosen.reshape(-1)[order].astype(np.int32))


def best_recall_at_10(seed: int = _SEED) -> float:
  """recall@10 of the ranking by the true factors on the held-out clicks:
  the best any model can expect."""
  ids, users, items = world(seed)
  top = np.argsort(-true_scores(users, items), 1)[:, :10]
  row = {int(u): r for r, u in enumerate(ids)}
  test_ids, test_items = clicks("test", seed)
  return float(np.mean([item in top[row[int(u)]]
                        for u, item in zip(test_ids, test_items)]))


def recall_at_10(labels, logits):
  """Per click: 1 if the clicked item is among the 10 best-scoring."""
  return tf.cast(tf.math.in_top_k(tf.cast(labels, tf.int32),
                                  tf.cast(logits, tf.float32), 10),
                 tf.float32)


class MatrixFactorisation(keras.Model):
  """user ids int64 [B] -> scores of every item [B, ITEMS]."""

  def __init__(self, user_rows: int):
    super().__init__()
    init = keras.initializers.RandomNormal(stddev=0.05)
    self.users = layers.Embedding(user_rows, DIM, hashed=True,
                                  embeddings_initializer=init, name="users")
    # Every item is scored for every user: a dense table, dense gradient.
    self.items = self.add_weight(shape=(ITEMS, DIM), initializer=init,
                                 name="items")
    self.bias = self.add_weight(shape=(ITEMS,), initializer="zeros",
                                name="item_bias")

  def user_vectors(self, ids):
    return self.users(ids)

  def item_scores(self, vectors):
    """Scores of every item for user vectors [B, DIM]: [B, ITEMS]."""
    return tf.matmul(vectors, self.items,
                     transpose_b=True) + self.bias

  def call(self, ids):
    return self.item_scores(self.user_vectors(ids))


class Recommender(trainer.Task):
  """--task_args=user_rows=N (default 1,000,000): the user table's rows."""

  def __init__(self, config):
    super().__init__(config)
    self.user_rows = int(config.task_kwargs.get("user_rows", 1_000_000))

  def source(self, split):
    ids, items = clicks("train" if split == "train" else "test")
    return trainer.array_source(f"clicks:{split}", ids, items,
                                num_classes=ITEMS)

  def build_model(self, input_spec):
    del input_spec
    model = MatrixFactorisation(self.user_rows)
    model(tf.zeros([1], tf.int64))       # create the variables
    return model

  def optimizers(self):
    # Row-wise: a batch updates its users' rows of the table and slots,
    # not all of them (dense Adam would touch every row every update).
    return LazyAdam(learning_rate=self.config.learning_rate)

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(
        labels, outputs, from_logits=True)

  def metrics(self):
    return {"recall_at_10": recall_at_10}

  def serving_signatures(self, model, input_spec):
    del input_spec
    user = tf.TensorSpec([], tf.int64)

    def score(inputs):
      vectors = model.user_vectors(inputs["user"])
      item = tf.cast(inputs["item"], tf.int32)
      return {"score": tf.reduce_sum(
          vectors * tf.gather(model.items, item), -1)
              + tf.gather(model.bias, item)}

    def top_items(inputs):
      scores, items = tf.math.top_k(
          model.item_scores(model.user_vectors(inputs["user"])), TOP_K)
      return {"items": tf.cast(items, tf.int64), "scores": scores}

    return {"serving_default": Signature(
                {"user": user, "item": tf.TensorSpec([], tf.int64)}, score),
            "top_items": Signature({"user": user}, top_items)}


def main(argv):
  model_dir = next((a.split("=", 1)[1] for a in argv
                    if a.startswith("--model_dir=")), "runs/rec")
  config = trainer.Config(task="examples.recommender:Recommender",
                          train_steps=2000, learning_rate=0.01,
                          global_batch_size=256, model_dir=model_dir,
                          eval_every=1000)
  result = trainer.train(config, Recommender(config))
  result["best_recall_at_10"] = best_recall_at_10()
  print(result)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
