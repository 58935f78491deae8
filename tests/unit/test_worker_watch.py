"""The parameter-server watch's probe and its lines, in-process: a socket
that is accepted by the kernel but never answered (what a SIGSTOPped
server looks like) must count as silent."""

import socket
import threading
import time

from absl import logging
import pytest

from trainer.distribute import net, worker_watch


@pytest.fixture
def listener():
  """A listening socket nobody accepts from: the kernel completes the
  handshake, nothing ever answers."""
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  sock.listen(8)
  yield f"127.0.0.1:{sock.getsockname()[1]}"
  sock.close()


@pytest.fixture
def settings_server():
  """Answers each connection as a gRPC server does: a SETTINGS frame once
  the client's preface has arrived."""
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  sock.listen(8)
  stop = threading.Event()

  def serve():
    sock.settimeout(0.2)
    while not stop.is_set():
      try:
        conn, _ = sock.accept()
      except OSError:
        continue
      with conn:
        got = b""
        while len(got) < 24:
          got += conn.recv(64)
        conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")

  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  yield f"127.0.0.1:{sock.getsockname()[1]}"
  stop.set()
  thread.join(5)
  sock.close()


def test_a_silent_listener_accepts_but_does_not_answer(listener):
  assert net.answers(listener)   # what the watch used to see
  began = time.monotonic()
  assert not net.grpc_answers(listener, timeout_s=0.3)
  assert time.monotonic() - began < 2


def test_a_server_that_answers_and_a_closed_port(settings_server):
  assert net.grpc_answers(settings_server)
  closed = socket.socket()
  closed.bind(("127.0.0.1", 0))
  address = f"127.0.0.1:{closed.getsockname()[1]}"
  closed.close()   # bound then closed: nobody listens there
  assert not net.answers(address) and not net.grpc_answers(address)


def test_watch_names_a_silent_worker_once_and_its_return(monkeypatch):
  answering = {"w0": True, "w1": True}
  monkeypatch.setattr(worker_watch, "_answers",
                      lambda address, timeout_s: answering[address])
  lines = []
  monkeypatch.setattr(logging, "warning", lambda f, *a: lines.append(f % a))
  monkeypatch.setattr(logging, "info", lambda f, *a: lines.append(f % a))
  watch = worker_watch.WorkerWatch(["w0", "w1"], timeout_s=30)
  assert watch._probe() and lines == []
  answering["w1"] = False
  assert watch._probe() and lines == []   # one miss: a loaded machine
  for _ in range(3):
    assert watch._probe()   # worker 0 still answers
  assert lines == ["parameter_server: worker 1 (w1) does not answer "
                   "(exited, stopped or hung); its functions go to the "
                   "other workers within --peer_timeout_s=30."], lines
  answering["w0"] = False
  assert not watch._probe()   # nobody answers: the run's clock starts
  answering["w1"] = True
  assert watch._probe()
  assert lines[-1] == ("parameter_server: worker 1 (w1) answers again; the "
                       "coordinator takes it back."), lines


def test_watch_ends_the_run_when_a_ps_stays_silent(monkeypatch):
  """A ps silent for 2/3 of --peer_timeout_s: a line naming it after two
  missed probes, then exit 4 with one line; a ps that answers again before
  that resets its clock."""
  answering = {"w0": True, "p0": True, "p1": True}
  monkeypatch.setattr(worker_watch, "_answers",
                      lambda address, timeout_s: answering[address])
  now = [100.0]
  monkeypatch.setattr(worker_watch.time, "monotonic", lambda: now[0])
  lines, stops = [], []
  monkeypatch.setattr(logging, "warning", lambda f, *a: lines.append(f % a))
  monkeypatch.setattr(logging, "info", lambda f, *a: lines.append(f % a))
  monkeypatch.setattr(worker_watch.errors, "request_stop",
                      lambda program, message, code: stops.append(
                          (program, message, code)))
  watch = worker_watch.WorkerWatch(["w0"], timeout_s=30, ps=["p0", "p1"])
  watch._probe_ps()
  answering["p1"] = False
  for t in (101, 102):   # silent since 100 (a probe waits 1 s)
    now[0] = t
    watch._probe_ps()
  assert lines == ["parameter_server: ps 1 (p1) does not answer (exited, "
                   "stopped or hung); the run ends (exit 4) if it is still "
                   "silent 20 s after the first missed probe (2/3 of "
                   "--peer_timeout_s=30)."], lines
  answering["p1"] = True   # back in time: the clock starts again
  now[0] = 103
  watch._probe_ps()
  assert lines[-1] == "parameter_server: ps 1 (p1) answers again.", lines
  answering["p1"] = False
  for t in range(104, 123):   # silent since 103
    now[0] = t
    watch._probe_ps()
  assert stops == [], stops
  now[0] = 123
  watch._probe_ps()
  assert len(stops) == 1 and stops[0][2] == 4, stops
  assert stops[0][1].startswith("parameter_server: ps 1 (p1) has not "
                                "answered for 20 s (2/3 of "
                                "--peer_timeout_s=30)"), stops
