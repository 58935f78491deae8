"""How a chunk of updates runs: synchronously on every replica together
(sync: default, mirrored, multiworker, TPU) or scheduled on parameter-server
workers (ps). trainer.build picks one per strategy kind and hands it the
run's parts; the Controller drives it."""
