"""--deterministic=topology, the cheap core: the flag's forms, its refusals,
the exact sum against NumPy and under reordering, and bit-identical
weights (max abs difference 0.0) of the mlp with dropout on digits for
one replica and for two replicas with --grad_accum_steps 1 and 2 (in the
mirrored child process that test_sparse_step.py::test_mirrored_two_replicas
starts). The full matrix
(cnn, resnet20, a two-optimizer step, workers, resume): e2e/
test_topology_matrix.py behind TRAINER_SLOW=1."""

import functools

from absl import flags
import numpy as np
import pytest

from two_replicas import IN_CHILD as _CHILD

import tensorflow as tf  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer import controller as controller_lib  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.step import exact  # noqa: E402

pytestmark = pytest.mark.timeout(300)


# ---- the flag ---------------------------------------------------------
@pytest.fixture(scope="module")
def flag_values():
  fresh = flags.FlagValues()

  class Into:
    def __getattr__(self, name):
      return functools.partial(getattr(flags, name), flag_values=fresh)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(config_lib, "flags", Into())
    config_lib.define_flags()
  return fresh


@pytest.mark.parametrize("args,want", [
    ([], False), (["--deterministic"], True), (["--nodeterministic"], False),
    (["--deterministic=true"], True), (["--deterministic=false"], False),
    (["--deterministic=topology"], "topology"),
    (["--deterministic=Topology"], "topology")])
def test_deterministic_flag_forms(flag_values, args, want):
  flag_values.unparse_flags()
  try:
    flag_values(["trainer.main", *args])
    config = config_lib.from_flags(flag_values)
  finally:
    flag_values.unparse_flags()
  assert config.deterministic == want
  assert config.topology == (want == "topology")
  # command_line() gives back the same flag.
  if want == "topology":
    assert "--deterministic=topology" in config.command_line()


def test_deterministic_flag_refuses_other_words(flag_values):
  flag_values.unparse_flags()
  with pytest.raises(flags.Error, match="topology"):
    flag_values(["trainer.main", "--deterministic=topo"])
  flag_values.unparse_flags()
  flag_values(["trainer.main", "--virtual_shards=4"])
  with pytest.raises(UserError, match="only with --deterministic=topology"):
    config_lib.from_flags(flag_values)
  flag_values.unparse_flags()


@pytest.mark.parametrize("changes,replicas,match", [
    (dict(virtual_shards=8, grad_accum_steps=4), 4, r"2 x 4|4 x 4"),
    (dict(virtual_shards=6, global_batch_size=64), None, "divisible by "
     "--virtual_shards"),
    (dict(virtual_shards=8, grad_accum_steps=16, global_batch_size=64),
     None, "divisible by --grad_accum_steps"),
    (dict(strategy="parameter_server"), None, "parameter_server"),
    (dict(mixed_precision="mixed_float16"), None, "mixed_float16")])
def test_topology_refusals_are_one_line(changes, replicas, match):
  config = Config(deterministic="topology", **changes)
  with pytest.raises(UserError, match=match) as e:
    config_lib.validate(config, replicas)
  assert "\n" not in str(e.value)


def test_topology_accepts_every_divisor():
  for replicas in (1, 2, 4):
    for k in (1, 2, 4):
      config_lib.validate(Config(deterministic="topology", virtual_shards=16,
                                 global_batch_size=64, grad_accum_steps=k),
                          replicas)


# ---- the exact sum ------------------------------------------------------
def _shards(seed, shape=(8, 5, 7)):
  rng = np.random.default_rng(seed)
  # Magnitudes over 12 decades: float32 sums of these depend on the order.
  x = rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6, shape)
  return x.astype(np.float32)


def _exact(x, shards):
  return exact.exact_sum([tf.constant(x)], shards, "collective")[0].numpy()


def test_exact_sum_is_the_sum_in_any_order():
  x = _shards(0)
  want = x.astype(np.float64).sum(0)
  got = _exact(x, 8)
  # Within float32 rounding of the exact sum, away from cancellation.
  np.testing.assert_allclose(got, want, rtol=1e-6,
                             atol=float(np.abs(x).max()) * 2.0 ** -50)
  rng = np.random.default_rng(1)
  naive_sums = set()
  for _ in range(5):
    perm = x[rng.permutation(8)]
    assert np.array_equal(_exact(perm, 8).view(np.int32), got.view(np.int32))
    naive = np.zeros(x.shape[1:], np.float32)
    for row in perm:
      naive = naive + row
    naive_sums.add(naive.tobytes())
  # The plain float32 sum does depend on the order (so the check above
  # could fail).
  assert len(naive_sums) > 1


def test_exact_sum_split_across_callers_is_the_same():
  """Integer grid values of parts add up to those of the whole: the sum
  of two replicas' partial grids equals one replica's."""
  x = _shards(2)
  bits = exact.grid_bits(8)
  m = np.abs(x).max()
  e = int(np.floor(np.log2(m))) + 1
  q = np.round(x.astype(np.float64) * 2.0 ** (bits - e)).astype(np.int64)
  whole = (q.sum(0).astype(np.float64) * 2.0 ** (e - bits)).astype(np.float32)
  assert np.array_equal(_exact(x, 8), whole)


def test_exact_sum_of_nonfinite_is_nan():
  x = _shards(3)
  x[2, 1, 1] = np.inf
  got = _exact(x, 8)
  assert np.isnan(got).all()
  zeros = _exact(np.zeros((4, 3), np.float32), 4)
  assert np.array_equal(zeros, np.zeros(3, np.float32))


# ---- the same weights, bit for bit --------------------------------------
UPDATES = 4


def _weights(tmp_path, name, **kw):
  base = dict(model="mlp", dataset="digits", global_batch_size=32,
              train_steps=UPDATES, steps_per_loop=UPDATES,
              summary_every=UPDATES,
              checkpoint_every=UPDATES, eval_every=0, mode="train", seed=4,
              learning_rate=0.01, deterministic="topology", virtual_shards=4,
              progress="log", model_dir=str(tmp_path / name))
  base.update(kw)
  run = controller_lib.create(Config(**base))
  result = run.train(evaluate=False)
  variables = [v.numpy() for m in run.parts.models.values()
               for v in m.variables]
  variables += [v.numpy() for o in run.parts.optimizers.values()
                for v in o.variables]
  return variables, result


def _max_abs(a, b) -> float:
  return max(float(np.max(np.abs(x.astype(np.float64) - y)))
             for x, y in zip(a, b))


def test_trains_the_ordinary_model(tmp_path):
  """The mean gradient of the global batch, as the ordinary step's (the
  cnn: no dropout, whose draws differ), after the exact sum."""
  topo, result = _weights(tmp_path, "topo", model="cnn")
  assert result["global_step"] == UPDATES
  plain, _ = _weights(tmp_path, "plain", model="cnn", deterministic=True)
  assert 0.0 < _max_abs(plain, topo) < 1e-4


# ---- mirrored(2): test_sparse_step.py's child process runs this --------
@pytest.mark.skipif(not _CHILD, reason="runs in the mirrored child process")
def test_child_mirrored(tmp_path):
  one, result = _weights(tmp_path, "one")
  for k in (1, 2):
    two, again = _weights(tmp_path, f"two{k}", strategy="mirrored",
                          cpu_replicas=2, grad_accum_steps=k)
    assert _max_abs(one, two) == 0.0, k
    assert again["train_loss"] == result["train_loss"]
