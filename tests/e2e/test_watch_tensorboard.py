"""TensorBoard extras, read back with TensorBoard's own readers: the config
as hparams and text, histograms, input_wait_share, the profiler trace."""

import json

import numpy as np
import pytest

from conftest import last_json, run_trainer, event_accumulator

pytestmark = pytest.mark.timeout(300)

COMMON = ["--model=mlp", "--train_steps=20", "--global_batch_size=32",
          "--steps_per_loop=5", "--summary_every=10", "--eval_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two sibling runs: a on one device, b on 2 CPU replicas."""
  parent = tmp_path_factory.mktemp("runs")
  a = run_trainer(*COMMON, f"--model_dir={parent / 'a'}",
                  "--learning_rate=0.01",
                  "--histograms_every=10", "--profile_steps=3,7",
                  "--input_wait_steps=4")
  b = run_trainer(*COMMON, f"--model_dir={parent / 'b'}",
                  "--learning_rate=0.002",
                  "--strategy=mirrored", "--cpu_replicas=2",
                  "--histograms_every=10", "--grad_accum_steps=2")
  return parent, {"a": last_json(a), "b": last_json(b)}




def _values(acc, tag):
  from tensorboard.util import tensor_util
  return [(e.step, tensor_util.make_ndarray(e.tensor_proto))
          for e in acc.Tensors(tag)]


def test_hparams_tab_compares_sibling_runs(runs):
  """What the HParams tab shows for `tensorboard --logdir=PARENT`."""
  from tensorboard import context
  from tensorboard.backend.event_processing import data_provider
  from tensorboard.backend.event_processing import plugin_event_multiplexer
  from tensorboard.plugins import base_plugin
  from tensorboard.plugins.hparams import api_pb2, backend_context
  from tensorboard.plugins.hparams import get_experiment, list_session_groups
  parent, results = runs
  mux = plugin_event_multiplexer.EventMultiplexer()
  mux.AddRunsFromDirectory(str(parent))
  mux.Reload()
  ctx = backend_context.Context(base_plugin.TBContext(
      logdir=str(parent), multiplexer=mux,
      data_provider=data_provider.MultiplexerDataProvider(mux, str(parent))))
  request = context.RequestContext()
  experiment = get_experiment.Handler(
      request, ctx, "", api_pb2.GetExperimentRequest()).run()
  assert {"learning_rate", "model", "strategy"} <= \
      {h.name for h in experiment.hparam_infos}
  metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
  assert {("eval", "loss"), ("eval", "accuracy"), ("", "eval_loss"),
          ("", "eval_accuracy"), ("train", "loss")} <= metrics
  groups = list_session_groups.Handler(
      request, ctx, "", api_pb2.ListSessionGroupsRequest(
          start_index=0, slice_size=10,
          allowed_statuses=[api_pb2.STATUS_UNKNOWN])).run().session_groups
  assert len(groups) == 2
  by_lr = {g.hparams["learning_rate"].number_value: g for g in groups}
  for name, lr in (("a", 0.01), ("b", 0.002)):
    group = by_lr[lr]
    final = {m.name.tag: m.value for m in group.metric_values
             if m.name.group == ""}
    assert final["eval_loss"] == pytest.approx(results[name]["eval_loss"],
                                               rel=1e-6)
    assert final["eval_accuracy"] == pytest.approx(
        results[name]["eval_accuracy"], rel=1e-6)
    assert group.hparams["model_dir"].string_value == str(parent / name)


def test_config_text_summary(runs):
  parent, _ = runs
  acc = event_accumulator(parent / "a" / "train")
  assert "config" in acc.PluginTagToContent("text")
  (step, text), = _values(acc, "config")
  assert step == 0
  body = text.item().decode()
  assert all(line.startswith("    ") for line in body.splitlines())  # code
  saved = json.loads((parent / "a" / "config.json").read_text())
  assert json.loads(body) == saved


def test_histograms_and_input_wait_share(runs):
  parent, _ = runs
  for name in ("a", "b"):
    acc = event_accumulator(parent / name / "train")
    tags = acc.Tags()["tensors"]
    for kind in ("weights", "gradients"):
      for layer in ("hidden/kernel", "logits/bias"):
        steps = [s for s, _ in _values(acc, f"{kind}/{layer}")]
        assert steps == [10, 20], (name, kind, layer, steps)
    assert acc.SummaryMetadata("gradients/hidden/kernel").plugin_data \
        .plugin_name == "histograms"
    shares = _values(acc, "input_wait_share")
    assert [s for s, _ in shares] == [10, 20], (name, tags)
    assert all(0.0 <= float(v) <= 1.0 for _, v in shares)


def test_profile_trace_written(runs):
  parent, _ = runs
  traces = list((parent / "a" / "train" / "plugins" / "profile").glob(
      "*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert not (parent / "b" / "train" / "plugins").exists()


@pytest.mark.timeout(120)
def test_gradient_histogram_is_the_applied_gradient(tmp_path):
  """The gradient the histograms show (computed apart from the step) is the
  all-reduced gradient the next update applies: w - w' = lr * g for SGD."""
  import tensorflow as tf
  from trainer import controller
  from trainer.config import Config
  lr = 0.5
  runner = controller.create(Config(model_dir=str(tmp_path / "run"), model="mlp",
                              optimizer="sgd", learning_rate=lr,
                              global_batch_size=32, train_steps=5,
                              histograms_every=2))
  iterator = runner.executor.train_iterator()
  runner.steps.guarded_loop(iterator, tf.constant(2, tf.int64))
  values = runner.histograms.values(2)
  variables = runner.model.trainable_variables
  before = [v.numpy() for v in variables]
  runner.steps.guarded_loop(iterator, tf.constant(1, tf.int64))
  for v, old in zip(variables, before):
    np.testing.assert_allclose(values[f"gradients/{v.path}"].numpy(),
                               (old - v.numpy()) / lr, atol=2e-6,
                               err_msg=v.path)
    np.testing.assert_array_equal(values[f"weights/{v.path}"].numpy(), old)
