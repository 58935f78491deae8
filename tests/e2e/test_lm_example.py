"""examples/lm.py: a short run on the standard library's sources learns
(held-out bits per byte far below the untrained model's, the run's figure
equal to one recomputed with NumPy from its checkpoint), and a SIGKILLed
run resumes bit-identically on packed rows. Sampling from the
finished run matches a hand-written loop. `trainer.convert
--text_corpus` writes token files that read back as the text source."""

import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import (REPO, checkpoint_weights, env, kill_and_resume,
                      last_json, run_trainer)

pytestmark = pytest.mark.timeout(300)

# A tiny model; the last 100 held-out rows (22 of them partly padding,
# where short files end) at batch 32: the last eval batch is
# padded with weight-0 rows, which must not count as tokens.
TINY = "max_len=64,width=32,heads=2,blocks=1"
LM = ["--task=examples.lm:ByteLM", f"--task_args={TINY}",
      "--optimizer=adam", "--learning_rate=0.01", "--global_batch_size=16",
      "--train_steps=40", "--steps_per_loop=1", "--checkpoint_every=10",
      "--summary_every=40", "--eval_every=40", "--eval_split=test[-100:]",
      "--eval_batch_size=32", "--seed=3", "--deterministic"]


def _bits_per_byte(model_dir=None, untrained_seed=None) -> float:
  """Held-out bits per byte of test[-100:] computed here with NumPy, from
  the run's checkpoint or from a fresh (untrained) model."""
  import keras
  import tensorflow as tf
  import trainer
  from examples import lm
  if model_dir is not None:
    task, model = trainer.load(str(model_dir))
  else:
    keras.utils.set_random_seed(untrained_seed)
    task = lm.ByteLM(trainer.Config(task_args=TINY))
    model = task.build_model(None)
  source = task.source("test[-100:]")
  features, labels = source.gather(tf.range(source.num_examples,
                                            dtype=tf.int64))
  logits = model(features, training=False).numpy().astype(np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  targets = labels["targets"].numpy()
  weights = labels["weights"].numpy()
  nats = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  return float((nats * weights).sum() / weights.sum() / math.log(2.0))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("lm") / "straight"
  return model_dir, run_trainer(*LM, f"--model_dir={model_dir}")


def test_short_run_lowers_heldout_bits_per_byte(straight):
  model_dir, proc = straight
  result = last_json(proc)
  start = _bits_per_byte(untrained_seed=3)
  assert 7.5 < start < 9.0          # ~log2(259) = 8.02: knows nothing
  trained = result["eval_bits_per_byte"]
  assert trained < start - 2.5, (start, trained)
  # Reported per token over real tokens only: equals NumPy's figure.
  assert trained == pytest.approx(_bits_per_byte(model_dir), rel=1e-4)
  assert trained == pytest.approx(result["eval_loss"] / math.log(2.0),
                                  rel=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sample_matches_a_hand_written_loop(straight, temperature):
  """examples.lm_sample against a hand-written loop: the model on the last
  64 tokens (70 bytes: the window slides), then the argmax at the last one
  (greedy) or a draw from softmax(logits / T) with the same stateless
  seeds (at T = 1 the bytes vary, so a wrong slot or position shows)."""
  import tensorflow as tf
  import trainer
  from examples import lm_sample
  from trainer.data.readers import text
  model_dir = str(straight[0])
  got = lm_sample.generate(model_dir, "def ", length=70,
                           temperature=temperature, seed=5)
  _, model = trainer.load(model_dir)
  tokens, want = [text.BOS, *b"def "], []
  for i in range(70):
    row = tokens[-64:]
    n = len(row)
    features = {"tokens": np.array([row + [text.PAD] * (64 - n)]),
                "segment_ids": np.array([[1] * n + [0] * (64 - n)]),
                "positions": np.array([list(range(n)) + [0] * (64 - n)])}
    logits = model(features, training=False)[0, n - 1]
    if temperature == 0:
      token = int(np.argmax(logits))
    else:
      token = int(tf.random.stateless_categorical(
          logits[None] / temperature, 1, seed=[5, i])[0, 0])
    if token == text.EOS:
      break
    if token < 256:
      tokens.append(token)
      want.append(token)
  assert len(want) > 64
  assert got == bytes(want).decode("utf-8", errors="replace")


def test_sigkill_then_resume_is_bit_identical(tmp_path, straight):
  killed = tmp_path / "killed"
  kill_and_resume(LM, killed, first_step=10, last_step=40)
  a = checkpoint_weights(straight[0] / "ckpt-40")
  b = checkpoint_weights(killed / "ckpt-40")
  assert any(k.startswith("state/position") for k in a), sorted(a)[:10]
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def test_convert_text_corpus_flags(tmp_path):
  from trainer.data.readers import text, token_records
  import tensorflow as tf
  corpus = tmp_path / "corpus"
  for i in range(12):
    (corpus / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
    (corpus / f"d{i % 3}" / f"m{i}.txt").write_bytes(bytes(range(i, 3 * i + 5)))
  (corpus / "other.py").write_bytes(b"not taken")
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "trainer.convert", f"--text_corpus={corpus}",
       f"--out={out}", "--shards=2", "--text_pattern=*.txt",
       "--heldout_fraction=0.4"],
      cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for split in text.SPLITS:
    files = sorted(str(p) for p in out.glob(f"{split}-*.array_record"))
    assert len(files) == 2, files
    want = text.text_source(str(corpus), split, 16, packed=False,
                            pattern="*.txt", heldout_fraction=0.4)
    got = token_records.token_source(files, 16, text.PAD, packed=False)
    assert got.num_examples == want.num_examples
    rows = tf.range(want.num_examples, dtype=tf.int64)
    for a, b in zip(tf.nest.flatten(want.gather(rows)),
                    tf.nest.flatten(got.gather(rows))):
      np.testing.assert_array_equal(b.numpy(), a.numpy())
