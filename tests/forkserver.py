"""A fork server for the suite's `python -m MODULE` runs: TensorFlow once.

Every trainer process the suite starts spends about 4 s of CPU importing
TensorFlow, Keras and the trainer before it does any work, and the suite
starts a few hundred of them on 2 cores. This server (one per pytest
process) imports them once; each run is then a fork of it that executes
the module as `python -m` would (`runpy`, `__main__`), with the run's own
argv, environment, working directory, stdio and session.

What a fork cannot carry, a run does not get: a run whose environment
differs from the server's in a variable that is read while TensorFlow is
imported (TF_*, XLA_*, OMP_*, MKL*, ...) is started as a plain subprocess,
and so is every run when the server is unavailable (TRAINER_TEST_FORK=0
turns it off). The server imports no module that defines flags and runs no
TensorFlow op, so no thread pool or eager context exists when it forks.

Protocol, one connection per run: the client sends one JSON line (module,
argv, env, cwd, new_session) with its stdin/stdout/stderr descriptors
attached (SCM_RIGHTS); the server answers the child's pid on one line and,
when the child has exited, its exit code (as Popen.returncode: -N for a
signal) on another. The server never blocks on a child: a pidfd per child
in one select loop, and no threads, so that every fork is of a
single-threaded Python.
"""

import json
import os
import runpy
import select
import signal
import socket
import subprocess
import sys

# Variables that take effect while TensorFlow, oneDNN or Python start: a run
# that sets them differently cannot be a fork of a server that started
# without them.
_START_VARS = ("TF_", "XLA_", "OMP_", "KMP_", "MKL", "ONEDNN", "DNNL",
               "CUDA", "PYTHON", "LD_", "MALLOC", "TCMALLOC", "GRPC_")
_PRELOAD = ("keras", "numpy", "trainer.build", "trainer.controller",
            "trainer.cli", "trainer.rundir", "trainer.dirlock",
            "trainer.distribute.cluster", "trainer.export_dir",
            "trainer.load", "layers")


def _start_vars(env: dict) -> dict:
  return {k: v for k, v in env.items()
          if k.startswith(_START_VARS) and k != "PYTHONPATH"}


# ------------------------------------------------------------------ server


def _child(request: dict, fds: list[int], inherited: list) -> None:
  """In the forked child: become the requested `python -m` run."""
  code = 1
  try:
    for item in inherited:   # the server's sockets and pidfds
      if isinstance(item, int):
        os.close(item)
      else:
        item.close()
    if request["new_session"]:
      os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for target, fd in enumerate(fds):
      os.dup2(fd, target)
    for fd in fds:
      if fd > 2:
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    # As `python -m` in cwd with PYTHONPATH: the server's own entries stay
    # (same interpreter, same site-packages).
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep)
             if p]
    sys.path[:0] = [request["cwd"]] + extra
    sys.argv = [request["module"]] + request["argv"]
    # sys.stdin/stdout/stderr stay the objects they were (absl's handler
    # holds the server's sys.stderr): they write to fds 0-2, now the run's.
    try:
      runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      if e.code is None:
        code = 0
      elif isinstance(e.code, int):
        code = e.code
      else:
        print(e.code, file=sys.stderr)
        code = 1
    except BaseException:  # pylint: disable=broad-except
      import traceback
      traceback.print_exc()
      code = 1
    # What `python` does at exit, except that nothing of the server's runs.
    try:
      import logging
      logging.shutdown()
    except Exception:  # pylint: disable=broad-except
      pass
    import atexit
    atexit._run_exitfuncs()  # pylint: disable=protected-access
    sys.stdout.flush()
    sys.stderr.flush()
  finally:
    os._exit(code & 0xFF if code >= 0 else 1)


def serve(path: str) -> None:
  """Imports everything once, then forks a child per request until the
  parent pytest process is gone."""
  from trainer.tfimport import import_tensorflow
  import_tensorflow()
  import importlib
  for name in _PRELOAD:
    importlib.import_module(name)
  parent = os.getppid()
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path + ".tmp")
  listener.listen(16)
  os.rename(path + ".tmp", path)   # the client connects only when ready
  running = {}   # pidfd -> (pid, connection)
  while True:
    ready, _, _ = select.select([listener, *running], [], [], 1.0)
    if os.getppid() != parent:
      break
    for item in ready:
      if item is listener:
        conn, _ = listener.accept()
        conn.settimeout(30)
        message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        request = json.loads(message.decode())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
          _child(request, fds, [listener, conn, *running,
                                *(c for _, c in running.values())])
        for fd in fds:
          os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        running[os.pidfd_open(pid)] = (pid, conn)
      else:
        pid, conn = running.pop(item)
        os.close(item)
        _, status = os.waitpid(pid, 0)
        try:
          conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
        except OSError:
          pass
        conn.close()
  for fd, (pid, conn) in running.items():
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    conn.close()


# ------------------------------------------------------------------ client


class Forked:
  """The part of subprocess.Popen the suite uses, for a forked run."""

  def __init__(self, conn: socket.socket, args: list):
    self.args = args
    self._conn = conn
    self._buffer = b""
    self.pid = int(self._line(timeout=60))
    self.returncode = None

  def _line(self, timeout):
    self._conn.settimeout(timeout)
    while b"\n" not in self._buffer:
      chunk = self._conn.recv(64)
      if not chunk:
        raise ConnectionError("fork server closed the connection")
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    return line.decode()

  def poll(self):
    if self.returncode is None:
      try:
        self.returncode = int(self._line(timeout=0.0001))
      except (TimeoutError, BlockingIOError, socket.timeout):
        return None
      self._conn.close()
    return self.returncode

  def wait(self, timeout=None):
    if self.returncode is None:
      try:
        self.returncode = int(self._line(timeout=timeout))
      except (TimeoutError, socket.timeout):
        raise subprocess.TimeoutExpired(self.args, timeout) from None
      self._conn.close()
    return self.returncode

  def send_signal(self, sig):
    if self.returncode is None:
      try:
        os.kill(self.pid, sig)
      except ProcessLookupError:
        pass

  def terminate(self):
    self.send_signal(signal.SIGTERM)

  def kill(self):
    self.send_signal(signal.SIGKILL)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    if self.returncode is None:
      self.kill()
      self.wait(timeout=30)


class Server:
  """Starts the server on first use; `popen` forks a run, or returns None
  when this run must be a plain subprocess (the server not ready yet, or
  gone, or the run's start-up environment not the server's)."""

  def __init__(self, directory: str, pythonpath: str):
    self._path = os.path.join(directory, "forkserver.sock")
    self._pythonpath = pythonpath
    self._proc = None
    self._env = None
    self._broken = os.environ.get("TRAINER_TEST_FORK", "1") == "0"

  def start(self, env: dict) -> None:
    """Starts the server in the background (it takes a few seconds)."""
    if self._proc is not None or self._broken:
      return
    self._env = dict(env)
    # Its own output (import notices, a crash) goes to a log beside the
    # socket; the runs write to their own descriptors.
    with open(self._path + ".log", "w") as log:
      self._proc = subprocess.Popen(
          [sys.executable, __file__, self._path], env=self._env,
          stdin=subprocess.DEVNULL, stdout=log, stderr=log)

  def _connect(self):
    """A connection, or None while the server is still importing (this
    run is then a plain subprocess: waiting would cost as much) or gone."""
    if not os.path.exists(self._path):
      if self._proc.poll() is not None:
        self._broken = True
      return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
      conn.connect(self._path)
    except OSError:
      conn.close()
      self._broken = True
      return None
    return conn

  def popen(self, module: str, argv: list, env: dict, cwd: str,
            stdin=None, stdout=None, stderr=None, new_session=False):
    if self._broken:
      return None
    self.start(env)
    if _start_vars(env) != _start_vars(self._env):
      return None
    conn = self._connect()
    if conn is None:
      return None
    null = os.open(os.devnull, os.O_RDWR)
    fds = [null if f is None and i == 0 else i if f is None
           else f if isinstance(f, int) else f.fileno()
           for i, f in enumerate((stdin, stdout, stderr))]
    message = json.dumps({"module": module, "argv": list(argv),
                          "env": env, "cwd": str(cwd),
                          "new_session": new_session}).encode()
    try:
      socket.send_fds(conn, [message], fds)
    finally:
      os.close(null)
    return Forked(conn, [sys.executable, "-m", module, *argv])

  def close(self):
    if self._proc is not None and self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait(timeout=30)


if __name__ == "__main__":
  # Not tests/ (python puts the script's folder first): a run sees what
  # `python -m` would, plus its own PYTHONPATH.
  del sys.path[0]
  serve(sys.argv[1])
