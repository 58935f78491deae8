"""How a chunk of updates runs: synchronously on every replica together
(sync: default, mirrored, multiworker, TPU) or scheduled on parameter-server
workers (ps). The Controller owns the outer loop and is given one."""


def for_config(config, task=None):
  """(parts, executor) for the configured strategy."""
  if config.strategy == "parameter_server":
    from trainer.executors import ps
    return ps.create(config, task)
  from trainer.executors import sync
  return sync.create(config, task)
