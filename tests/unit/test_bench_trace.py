"""bench.trace's arithmetic on profiler events (hand-made events, no TF)."""

import pytest

from bench import trace

MS = 10 ** 9   # picoseconds per millisecond


def test_category_of_op_events():
  c = trace.category
  assert c("while/body/_1/while/cnn_1/conv2_1/Relu:_MklNativeFusedConv2D") \
      == "forward"
  assert c("while/body/_1/gradient_tape/while/cnn_1/conv2_1/convolution/"
           "Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter") == "backward"
  assert c("while/body/_1/while/adam/Pow_1:Pow") == "optimizer"   # Keras
  assert c("while/body/_1/while/ResourceApplyAdam:ResourceApplyAdam") == \
      "optimizer"   # the framework's fused kernel
  assert c("while/body/_1/while/global_norm/L2Loss_4:L2Loss") == "other ops"
  assert c("ExecutorState::Process") == "executor overhead"
  assert c("Iterator::Root::Prefetch") is None
  assert c("EagerLocalExecute: __inference_train_loop_12") is None


def test_self_times_subtract_direct_children_only():
  events = [("outer", 0, 10 * MS),        # [0, 10) holds a and b
            ("a:Op", 1 * MS, 4 * MS),     # [1, 5) holds c
            ("c:Op", 2 * MS, 1 * MS),
            ("b:Op", 6 * MS, 2 * MS),
            ("later:Op", 12 * MS, 3 * MS)]
  got = dict(trace.self_times(events))
  assert got == {"outer": 4 * MS, "a:Op": 3 * MS, "c:Op": 1 * MS,
                 "b:Op": 2 * MS, "later:Op": 3 * MS}
  # Self times add up to the busy time of the thread.
  assert sum(got.values()) == trace.busy_ps(events) == 13 * MS


def test_busy_is_the_union_of_intervals():
  assert trace.busy_ps([("x", 0, 5), ("y", 3, 4), ("z", 10, 1)]) == 8
  assert trace.busy_ps([]) == 0


def test_breakdown_per_update():
  threads = {
      "tf_Compute/1": [("ExecutorState::Process", 0, 10 * MS),
                       ("m/conv:Conv2D", 1 * MS, 4 * MS),
                       ("gradient_tape/m/conv:Conv2DBackpropInput", 5 * MS,
                        4 * MS)],
      "tf_data_iterator_resource/7": [("ParallelMapProduce", 0, 3 * MS),
                                      ("Scan", 1 * MS, 1 * MS)],
      "tf_data_iterator_get_next/7": [("IteratorGetNextOp::DoCompute", 0,
                                       1 * MS)],
  }
  got = trace.breakdown(threads, main_call_ps=20 * MS, updates=2)
  assert got["wall"] == pytest.approx(10.0)
  assert got["forward"] == pytest.approx(2.0)
  assert got["backward"] == pytest.approx(2.0)
  assert got["executor overhead"] == pytest.approx(1.0)
  assert got["input pipeline CPU"] == pytest.approx(1.5)
  assert got["iterator get-next"] == pytest.approx(0.5)
  assert got["optimizer"] == got["other ops"] == 0.0
