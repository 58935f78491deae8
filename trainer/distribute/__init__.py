"""Everything about WHERE a run executes: strategies and their roles
(strategy.py), TF_CONFIG and Slurm cluster checks shared with launch.server
(cluster.py), TPU (tpu.py), the one "does host:port answer" probe (net.py)
and the watchdog over parameter-server workers and ps tasks
(worker_watch.py)."""
