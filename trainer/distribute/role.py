"""What this process does in the cluster: a leaf every layer may read."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Role:
  """What this process does in the cluster."""
  is_chief: bool        # writes checkpoints, summaries and config.json
  worker_index: int     # 0 for single-process strategies
  num_workers: int
