"""How a chunk of updates runs: synchronously on every replica together
(sync: default, mirrored, multiworker, TPU) or scheduled on parameter-server
workers (ps). trainer.build picks one per strategy kind and hands it the
run's parts and these settings; the Controller drives it."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Settings:
  """What an executor reads (field names are the flags')."""
  train_split: str = "train"
  eval_split: str = "test"
  micro_batch_size: int = 64
  eval_batch_size: int = 64          # the effective one
  seed: int = 0
  steps_per_loop: int = 50
  peer_timeout_s: float = 120.0
  ps_shard_min_bytes: int = 256 << 10
  profile_steps: str = ""
