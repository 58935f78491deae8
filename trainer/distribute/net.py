"""The "does host:port answer" probes (no TensorFlow here: the start-up
watchdog, launchers and the parameter-server watches all use them)."""

import socket

# An HTTP/2 client's connection preface and an empty SETTINGS frame
# (RFC 9113 3.4, 6.5): a gRPC server answers them with its own SETTINGS.
_PREFACE = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
_FRAME_HEADER = 9


def _split(address: str):
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


def answers(address: str, timeout_s: float = 1.0) -> bool:
  """True if 'host:port' (or '[v6]:port') accepts a TCP connection within
  `timeout_s` (a name lookup may take longer: see cluster.precheck, which
  resolves every host first, bounded in time). The kernel accepts the
  connection for a stopped or hung process too: see grpc_answers."""
  try:
    with socket.create_connection(_split(address), timeout_s):
      return True
  except (OSError, ValueError):
    return False


def grpc_answers(address: str, timeout_s: float = 1.0) -> bool:
  """True if the gRPC server at 'host:port' itself answers within
  `timeout_s`: it must send an HTTP/2 frame back after our connection
  preface, which a stopped (SIGSTOP) or hung process never does."""
  try:
    with socket.create_connection(_split(address), timeout_s) as sock:
      sock.settimeout(timeout_s)
      sock.sendall(_PREFACE)
      got = b""
      while len(got) < _FRAME_HEADER:
        chunk = sock.recv(_FRAME_HEADER - len(got))
        if not chunk:
          return False
        got += chunk
      return True
  except (OSError, ValueError):
    return False
