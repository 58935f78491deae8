"""A small text classifier (embedding + tiny transformer block) on
generated sentences.

Run it:
  python -m trainer.main --task=examples.text_classifier:Sentiment \
      --model_dir=runs/text
  python examples/text_classifier.py --model_dir=runs/text   (the Python API)

Sentences are token ids drawn from a small vocabulary; a sentence is
positive when it holds more "positive" words than "negative" ones (ties are
broken towards positive). Words anywhere in the sentence count, so the model
must pool over positions: an embedding, one self-attention block, mean
pooling and a linear classifier.
"""

import sys

import keras
import numpy as np
import tensorflow as tf

import trainer

VOCAB = 200
LENGTH = 24
POSITIVE = range(10, 20)      # token ids that count as positive words
NEGATIVE = range(20, 30)      # ... and as negative words


def sentences(n: int, seed: int):
  """(tokens int32 [n, LENGTH], labels int32 [n]); 0 is padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(30, VOCAB, size=(n, LENGTH), dtype=np.int32)
  lengths = rng.integers(8, LENGTH + 1, size=n)
  for i in range(n):
    k = rng.integers(1, 5)
    where = rng.choice(lengths[i], size=k, replace=False)
    pool = POSITIVE if rng.random() < 0.5 else NEGATIVE
    tokens[i, where] = rng.choice(list(pool), size=k)
    tokens[i, lengths[i]:] = 0
  pos = np.isin(tokens, list(POSITIVE)).sum(1)
  neg = np.isin(tokens, list(NEGATIVE)).sum(1)
  return tokens, (pos >= neg).astype(np.int32)


class Sentiment(trainer.Task):

  def source(self, split):
    tokens, labels = sentences(4000 if split == "train" else 800,
                               seed=1 if split == "train" else 2)
    return trainer.array_source(f"sentences:{split}", tokens, labels,
                                num_classes=2)

  def build_model(self, input_spec):
    tokens = keras.Input(input_spec.shape, dtype="int32")
    mask = keras.ops.cast(keras.ops.not_equal(tokens, 0), "float32")
    x = keras.layers.Embedding(VOCAB, 32)(tokens)
    x = x + keras.layers.Embedding(LENGTH, 32)(keras.ops.arange(LENGTH))
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=16)(
        x, x, attention_mask=mask[:, None, :] > 0)
    x = keras.layers.LayerNormalization()(x + attended)
    x = keras.layers.LayerNormalization()(
        x + keras.layers.Dense(32, activation="relu")(x))
    pooled = keras.ops.sum(x * mask[..., None], axis=1) / keras.ops.maximum(
        keras.ops.sum(mask, axis=1, keepdims=True), 1.0)
    return keras.Model(tokens, keras.layers.Dense(2, dtype="float32")(pooled))

  def loss(self, labels, outputs):
    return keras.losses.sparse_categorical_crossentropy(
        labels, outputs, from_logits=True)

  def metrics(self):
    return {"accuracy": trainer.task.accuracy}


def main(argv):
  model_dir = next((a.split("=", 1)[1] for a in argv
                    if a.startswith("--model_dir=")), "runs/text")
  config = trainer.Config(task="examples.text_classifier:Sentiment",
                          train_steps=800, learning_rate=2e-3,
                          global_batch_size=64, model_dir=model_dir,
                          eval_every=400)
  result = trainer.train(config, Sentiment(config))
  print(result)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
