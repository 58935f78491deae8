"""A byte-level language model on the Python standard library's own sources.

  .venv/bin/python -m trainer.main --task=examples.lm:ByteLM \\
      --optimizer=adam --learning_rate=3e-3 --global_batch_size=32 \\
      --train_steps=600 --eval_every=300 --model_dir=runs/lm
  .venv/bin/python -m examples.lm_sample --model_dir=runs/lm --prompt="def "

No download and no tokenizer: the corpus is the *.py files that ship with
the interpreter (`os.path.dirname(os.__file__)`; site-packages, caches and
the stdlib's own test folders left out), read lazily by
trainer.data.readers.text as bytes 0-255 plus BOS, EOS and PAD (259 ids).
Files whose path hashes into the held-out 5% are split "test".

What it shows:
- packed rows: several files (or pieces of long ones) per row of max_len
  tokens, with segment ids and per-document positions; the model's causal
  attention is masked by trainer.data.sequence.attention_mask, so neither
  attention nor position crosses a document;
- the loss per real token over the whole update: `ctx.scale_loss(per_token,
  weights, mean_over="weights")`, exact under any replica count, worker
  count or --grad_accum_steps;
- metrics as (values, weights) pairs: `loss` is the mean per token, and
  `bits_per_byte` (loss / ln 2) the held-out figure of merit (8.02 for a
  model that knows nothing: log2(259));
- `tokens_per_row` (train): real tokens per packed row; the framework
  then writes the train scalar `tokens_per_sec` (examples_per_sec x
  tokens_per_row) and shows tokens/sec in the progress line.

--task_args (all optional): max_len=128, width=128, heads=4, blocks=2,
corpus=DIR (default: the standard library), pattern=*.py,
heldout_fraction=0.05.
"""

import math
import os

import keras
import tensorflow as tf

import trainer
from trainer.data import sequence
from trainer.data.readers import text
from trainer.errors import UserError

# The stdlib's tests are a third of its bytes and mostly repetitive
# fixtures: left out, the corpus lists and trains faster.
SKIP_DIRS = (*text.SKIP_DIRS, "test", "tests", "idle_test")
_INTS = {"max_len": 128, "width": 128, "heads": 4, "blocks": 2}
_DEFAULTS = {**{k: str(v) for k, v in _INTS.items()}, "corpus": "",
             "pattern": "*.py", "heldout_fraction": "0.05"}


def stdlib_dir() -> str:
  """The folder of the running interpreter's standard library sources."""
  return os.path.dirname(os.__file__)


def parse_args(kwargs: dict) -> dict:
  """--task_args as typed settings; one line naming a bad one."""
  unknown = sorted(set(kwargs) - set(_DEFAULTS))
  if unknown:
    raise UserError(f"examples.lm:ByteLM: unknown --task_args "
                    f"{', '.join(unknown)}; it takes "
                    f"{', '.join(sorted(_DEFAULTS))}.")
  args = {**_DEFAULTS, **kwargs}
  out = {"corpus": args["corpus"] or stdlib_dir(),
         "pattern": args["pattern"]}
  for key in _INTS:
    try:
      out[key] = int(args[key])
    except ValueError:
      raise UserError(f"--task_args={key}={args[key]!r} must be an "
                      "integer.") from None
    if out[key] < 1:
      raise UserError(f"--task_args={key}={out[key]} must be >= 1.")
  if out["width"] % out["heads"]:
    raise UserError(f"--task_args: width ({out['width']}) must be a "
                    f"multiple of heads ({out['heads']}).")
  try:
    out["heldout_fraction"] = float(args["heldout_fraction"])
  except ValueError:
    raise UserError(f"--task_args=heldout_fraction="
                    f"{args['heldout_fraction']!r} must be a number.") from None
  return out


def transformer(vocab: int, max_len: int, width: int, heads: int,
                blocks: int) -> keras.Model:
  """Logits [B, T, vocab] of the next token, from features {"tokens",
  "segment_ids", "positions"} (int32 [B, T], T <= max_len): pre-norm
  blocks of causal self-attention within each segment and an MLP."""
  names = ("tokens", "segment_ids", "positions")
  inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in names}
  x = (keras.layers.Embedding(vocab, width)(inputs["tokens"])
       + keras.layers.Embedding(max_len, width)(inputs["positions"]))
  mask = sequence.attention_mask(inputs["segment_ids"], causal=True)
  for _ in range(blocks):
    h = keras.layers.LayerNormalization()(x)
    x = x + keras.layers.MultiHeadAttention(heads, width // heads)(
        h, h, attention_mask=mask)
    h = keras.layers.LayerNormalization()(x)
    h = keras.layers.Dense(4 * width, activation="gelu")(h)
    x = x + keras.layers.Dense(width)(h)
  x = keras.layers.LayerNormalization()(x)
  logits = keras.layers.Dense(vocab, dtype="float32")(x)
  return keras.Model(inputs, logits, name="byte_lm")


def per_token_loss(targets, logits):
  """Cross-entropy in nats of each slot [B, T] (padding included: weigh it)."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=targets, logits=tf.cast(logits, tf.float32))


class ByteLM(trainer.Task):
  """Next-byte prediction on packed rows of a folder of text files."""

  def __init__(self, config):
    super().__init__(config)
    self.args = parse_args(config.task_kwargs)
    self._sources = {}

  def source(self, split):
    if split not in self._sources:
      a = self.args
      self._sources[split] = text.text_source(
          a["corpus"], split, a["max_len"], packed=True,
          pattern=a["pattern"], heldout_fraction=a["heldout_fraction"],
          seed=self.config.seed, skip_dirs=SKIP_DIRS)
    return self._sources[split]

  def preprocess(self, features, labels, meta, training):
    # Rows the pipeline added to fill evaluation's last batch (weight 0)
    # must not count as tokens.
    weights = labels["weights"] * meta["weight"][:, None]
    return features, {"targets": labels["targets"], "weights": weights}

  def build_model(self, input_spec):
    a = self.args
    return transformer(text.VOCAB_SIZE, a["max_len"], a["width"],
                       a["heads"], a["blocks"])

  def train_step(self, batch, ctx):
    features, labels = batch
    with tf.GradientTape() as tape:
      logits = ctx.model(features, training=True)
      per_token = per_token_loss(labels["targets"], logits)
      loss = ctx.scale_loss(per_token, labels["weights"], mean_over="weights")
    ctx.minimize(tape, loss)
    return {"loss": (per_token, labels["weights"]),
            "tokens_per_row": tf.reduce_sum(labels["weights"], axis=1)}

  def eval_step(self, batch, ctx):
    features, labels = batch
    per_token = per_token_loss(labels["targets"],
                               ctx.model(features, training=False))
    weights = labels["weights"]
    return {"loss": (per_token, weights),
            "bits_per_byte": (per_token / math.log(2.0), weights)}

  def loss(self, labels, outputs):
    """Per row: the mean loss over its real tokens (the steps above weigh
    tokens over the whole update instead)."""
    weights = labels["weights"]
    total = tf.reduce_sum(per_token_loss(labels["targets"], outputs)
                          * weights, axis=1)
    return total / tf.maximum(tf.reduce_sum(weights, axis=1), 1.0)


def sample(model, prompt: str, length: int = 200, temperature: float = 0.0,
           max_len: int = 128, seed: int = 0) -> bytes:
  """`length` bytes generated after `prompt` (a new document: BOS first)
  by a ByteLM model, one token at a time on the last max_len tokens;
  greedy at temperature 0, else drawn from softmax(logits / temperature).
  Stops early at EOS."""
  if temperature < 0:
    raise UserError(f"temperature ({temperature}) must be >= 0.")
  tokens = [text.BOS, *prompt.encode("utf-8")]
  window = tf.range(max_len, dtype=tf.int32)[None]

  @tf.function(input_signature=[tf.TensorSpec([1, max_len], tf.int32),
                                tf.TensorSpec([], tf.int32)])
  def next_logits(row, n):
    features = {"tokens": row,
                "segment_ids": tf.cast(window < n, tf.int32),
                "positions": tf.where(window < n, window, 0)}
    return model(features, training=False)[0, n - 1]

  out = []
  for i in range(length):
    recent = tokens[-max_len:]
    row = recent + [text.PAD] * (max_len - len(recent))
    logits = next_logits(tf.constant([row], tf.int32),
                         tf.constant(len(recent), tf.int32))
    if temperature == 0:
      token = int(tf.argmax(logits))
    else:
      token = int(tf.random.stateless_categorical(
          logits[None] / temperature, 1, seed=[seed, i])[0, 0])
    if token == text.EOS:
      break
    if token < 256:   # BOS/PAD are never targets; skip them if drawn
      tokens.append(token)
      out.append(token)
  return bytes(out)
