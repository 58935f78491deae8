"""trainer.hang's rule, on a clock the test moves, and its threads for real
(no TensorFlow): when a chunk without progress is a hang, the bound's
floor, median and start-up factor, tracing and pauses; every thread's
stack in the report; the exit code a launcher restarts."""

import threading
import time

import pytest

from trainer import exitcodes, hang


class Clock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def watch(timeout_s=10.0):
  clock = Clock()
  w = hang.HangWatch(timeout_s, lambda: 0, {"worker": "0 of 1"}, clock=clock,
                     on_hang=lambda message: None)
  return w, clock


def warmed(timeout_s=10.0):
  """A watch past start-up: one chunk of 10 updates in 0.5 s measured."""
  w, clock = watch(timeout_s)
  w.progress(0)
  w.arm(0)
  for i in range(1, 11):
    clock.now += 0.05
    w.progress(i)
  w.disarm(10)
  w.arm(10)   # the first chunk (start-up) is left out of the median
  for i in range(11, 21):
    clock.now += 0.05
    w.progress(i)
  w.disarm(10)
  return w, clock


def test_no_progress_for_longer_than_the_bound_is_a_hang():
  w, clock = warmed()
  w.arm(20)
  clock.now += 9.9
  assert w.check() is None
  clock.now += 0.2
  message = w.check()
  assert message and message.startswith("hang: no training progress for 10 s "
                                        "in the chunk from step 20")
  assert w.check() is None   # reported once


def test_each_update_restarts_the_clock_whatever_the_chunk_length():
  w, clock = warmed()
  w.arm(20)
  for i in range(21, 61):       # a long chunk: 40 updates of 9 s each
    clock.now += 9.0
    w.progress(i)
    assert w.check() is None
  clock.now += 10.5
  assert "waiting for the next update after 40 seen" in w.check()


def test_between_chunks_nothing_is_watched():
  w, clock = warmed()
  clock.now += 3600           # a long save, evaluation, summary: disarmed
  assert w.check() is None


def test_the_bound_is_ten_median_updates_when_that_is_longer():
  w, clock = watch(timeout_s=10.0)
  w.arm(0)
  w.progress(1)
  w.disarm(1)
  for start in range(1, 4):   # 4 s per update, measured after start-up
    w.arm(start)
    clock.now += 4.0
    w.progress(start + 1)
    w.disarm(1)
  assert w.bound() == pytest.approx(40.0)
  w.arm(4)
  clock.now += 39.0
  assert w.check() is None
  clock.now += 2.0
  assert "max(--hang_timeout_s=10, 10 x the median update time, 4 s)" in \
      w.check()


def test_python_on_the_loop_thread_restarts_the_clock():
  w, clock = warmed()
  w.arm(20)
  clock.now += 9.0
  w.python_ran()
  clock.now += 9.0
  assert w.check() is None
  clock.now += 1.5
  assert w.check()


@pytest.mark.parametrize("before", ["start", "save", "trace"])
def test_start_up_a_pause_or_a_trace_allow_five_bounds(before):
  w, clock = (watch() if before == "start" else warmed())
  if before == "save":
    w.note_pause()            # the Controller's save() and evaluate()
  w.arm(20)
  if before == "trace":
    w.note_trace(True)
    clock.now += 3600         # tracing is not a step: never a hang
    assert w.check() is None
    w.note_trace(False)
  clock.now += 49.0
  assert w.check() is None
  clock.now += 2.0
  assert f"{hang.START_FACTOR} x max(" in w.check()


def test_after_the_first_update_the_plain_bound_is_back():
  w, clock = watch()
  w.progress(0)
  w.arm(0)
  clock.now += 30.0           # start-up: within 5 bounds
  w.progress(1)
  clock.now += 10.5
  assert "the bound is 10 s" in w.check()


def test_a_progress_read_between_chunks_is_no_update_of_the_next():
  w, clock = warmed()
  w.progress(999)             # a rollback's restore, unarmed
  w.arm(20)
  clock.now += 10.5
  assert "waiting for its first update" in w.check()


def test_the_threads_report_a_stalled_chunk_with_every_stack(monkeypatch):
  """Real threads and clock: a counter that stops moving while a chunk is
  armed ends in on_hang; the stacks name a thread blocked elsewhere."""
  fired = threading.Event()
  messages = []
  blocked = threading.Event()

  def stuck_input_read():
    blocked.wait()

  reader = threading.Thread(target=stuck_input_read, name="input", daemon=True)
  reader.start()
  w = hang.HangWatch(0.3, lambda: 7, on_hang=lambda m: (messages.append(m),
                                                        fired.set()))
  captured = []
  original = hang.thread_stacks
  monkeypatch.setattr(hang, "thread_stacks",
                      lambda: captured.extend(original()) or captured)
  try:
    w.start()
    w.arm(3)                  # start-up: fires after 5 x 0.3 s
    assert fired.wait(20), "the watch never fired"
  finally:
    w.stop()
    blocked.set()
  assert messages[0].startswith("hang: no training progress")
  assert captured[0].startswith("hang: thread 'MainThread'")
  (mine,) = [s for s in captured if s.startswith("hang: thread 'input'")]
  assert "in stuck_input_read" in mine and "blocked.wait()" in mine


def test_python_running_on_the_loop_thread_is_not_a_hang():
  """Tracing and AutoGraph's conversion run Python on the loop's thread
  without moving the counter; a thread blocked in an op shows one frozen
  frame. The watch tells them apart by sampling that thread's frame."""
  fired = threading.Event()
  busy_until = time.monotonic() + 2.0
  release = threading.Event()
  w = hang.HangWatch(0.2, lambda: 0, on_hang=lambda m: fired.set())
  w.start()

  def loop():
    w.arm(0)                 # the thread that arms is the one watched
    total = 0
    while time.monotonic() < busy_until:   # "tracing": Python, no updates
      total += sum(range(100))
    release.wait()           # "a blocked op": one frozen frame

  thread = threading.Thread(target=loop, daemon=True)
  try:
    thread.start()
    time.sleep(1.8)
    assert not fired.is_set(), "Python on the loop thread was called a hang"
    assert fired.wait(20), "a frozen loop thread was not called a hang"
  finally:
    w.stop()
    release.set()
  assert time.monotonic() >= busy_until


def test_a_quiet_chunk_within_the_bound_does_not_fire():
  fired = []
  w = hang.HangWatch(5.0, lambda: 1, on_hang=fired.append).start()
  try:
    w.arm(0)
    time.sleep(0.5)
    w.disarm(0)
  finally:
    w.stop()
  assert not fired


def test_the_hang_code_is_retried_by_every_restart_policy():
  """launch.local restarts codes outside NOT_RETRYABLE; a Kubeflow TFJob
  with restartPolicy ExitCode retries 128-255 only."""
  assert exitcodes.HANG not in exitcodes.NOT_RETRYABLE
  assert 128 <= exitcodes.HANG <= 255
  assert exitcodes.HANG in exitcodes.MEANINGS
  assert len(set(exitcodes.MEANINGS)) == len(exitcodes.MEANINGS)
