"""The one "does host:port answer" probe (no TensorFlow here: the start-up
watchdog, launchers and the parameter-server watches all use it)."""

import socket


def answers(address: str, timeout_s: float = 1.0) -> bool:
  """True if 'host:port' (or '[v6]:port') accepts a TCP connection within
  `timeout_s` (a name lookup may take longer: see cluster.precheck, which
  resolves every host first, bounded in time)."""
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), timeout_s):
      return True
  except (OSError, ValueError):
    return False
