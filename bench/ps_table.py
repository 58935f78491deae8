"""Peak RSS of the coordinator and of each parameter server for a table
sharded over the ps tasks, at several table sizes.

  python -m bench.ps_table [--rows=100000,4000000] [--dim=32] [--ps=2]

For each size, in turn: a cluster (1 worker and --ps ps tasks, launch.server)
and a coordinator process that builds, as the trainer does
(trainer.distribute.ps_strategy: MinSizePartitioner, one shard per ps,
compat.make_variables_on_the_ps), a ROWS x DIM layers.Embedding and the
LazyAdam slots of its table, looks up 1,024 rows from the coordinator (what
evaluation does; in a tf.function and eagerly), saves a checkpoint and
restores it as the trainer does (trainer.checkpoint: each shard released,
then read on its ps and assigned one at a time, the rest checked for
damage and restored; the rows looked up again must be the same). Figures
in MB: the
coordinator's RSS once table and slots are built, its peak while looking
up, saving and restoring (the kernel's high-water mark, reset before each
step through /proc/self/clear_refs), its peak over the whole run (building
included), each ps's peak, the bytes of the rows each ps holds (table and
slots), the table's bytes and the largest checkpoint data file.
Before the sizes, the same run with a 1-row table (--empty_rows): its peaks
are the fixed overhead of each process; for each size, each ps's peak less
that overhead, over the bytes of its rows ("x rows"), per step and overall.
Every output starts with the machine line (bench/machine.py).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench import machine
from bench.common import emit, parse_result, quiet_env, status_kb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


def _reset_peak(pid="self") -> None:
  """The high-water mark (VmHWM) back to the current RSS (Linux >= 4.0)."""
  with open(f"/proc/{pid}/clear_refs", "w") as f:
    f.write("5")


def _coordinator(rows: int, dim: int, directory: str, ps_pids) -> None:
  """Runs in the coordinator process (TF_CONFIG chief); emits its figures
  and, per step, each ps's peak (ps_pids: their process ids)."""
  phases = {}

  def phase(name):
    """The peaks since the last phase, as `name`; resets them."""
    phases[name] = {"coordinator": status_kb("VmHWM") / 1024,
                    "ps": [status_kb("VmHWM", p) / 1024 for p in ps_pids]}
    for pid in ["self", *ps_pids]:
      _reset_peak(pid)

  import numpy as np
  import tensorflow as tf
  import layers
  from trainer import compat, optim
  from trainer.distribute.ps_strategy import wait_for_servers

  tf_config = json.loads(os.environ["TF_CONFIG"])
  wait_for_servers(tf_config, 120)
  partitioner = tf.distribute.experimental.partitioners.MinSizePartitioner(
      max_shards=len(tf_config["cluster"]["ps"]))
  strategy = tf.distribute.ParameterServerStrategy(
      tf.distribute.cluster_resolver.TFConfigClusterResolver(),
      variable_partitioner=partitioner)
  compat.make_variables_on_the_ps(strategy)
  with strategy.scope():
    table = layers.Embedding(rows, dim, hashed=False)
    table.build()
    optimizer = compat.with_sharded_updates(optim.LazyAdam())
    optimizer.build(table.trainable_variables)
  sharded = compat.save_sharded_by_shard(table.weights + optimizer.variables)
  per_ps = {}
  for variable in sharded:
    for device, count in compat.shard_rows(variable):
      per_ps[device] = per_ps.get(device, 0) + count * dim * 4 / MB
  result = {"shards": [n for _, n in compat.shard_rows(sharded[0])]
                      if sharded else [rows],
            "sharded_variables": len(sharded),
            "ps_rows_mb": [per_ps[d] for d in sorted(per_ps)],
            "built_mb": status_kb("VmRSS") / 1024}
  phase("build")
  ids = tf.constant(np.random.default_rng(0).integers(0, rows, 1024))
  looked_up = tf.function(table)(ids)
  assert looked_up.shape == (1024, dim), looked_up.shape
  # Eagerly too (a model built by calling it on a batch looks up so): TF
  # would concat every shard on the coordinator (layers.embedding.lookup).
  eager = table(ids)
  assert np.array_equal(eager.numpy(), looked_up.numpy()), "eager differs"
  result["lookup_peak_mb"] = status_kb("VmHWM") / 1024
  phase("lookup")
  checkpoint = tf.train.Checkpoint(model=table, optimizer=optimizer)
  path = checkpoint.write(os.path.join(directory, "ckpt"))
  result["save_peak_mb"] = status_kb("VmHWM") / 1024
  phase("save")
  # As the trainer restores (trainer.checkpoint.Checkpointer): each
  # shard's old value released first, then read where it lives and
  # assigned, one at a time; the rest checked for damage and restored.
  from trainer.checkpoint import verified_config
  released = compat.release_for_restore(checkpoint, path)
  compat.restore_released(released, path)
  verified_config(path, skip={r.key for r in released})
  with compat.skipping(released):
    checkpoint.read(path).assert_consumed()
  compat.check_restored(released)
  result["restore_peak_mb"] = status_kb("VmHWM") / 1024
  again = tf.function(table)(ids)
  assert np.array_equal(again.numpy(), looked_up.numpy()), "restore differs"
  phase("restore")
  result["phases"] = phases
  import resource
  result["run_peak_mb"] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024
  emit(result)


def _free_ports(n):
  from launch.cluster import free_ports
  return free_ports(n)


def measure(rows: int, dim: int, num_ps: int) -> dict:
  """One size: servers up, the coordinator run, every process stopped."""
  ports = _free_ports(2 + num_ps)
  cluster = {"chief": [f"localhost:{ports[0]}"],
             "worker": [f"localhost:{ports[1]}"],
             "ps": [f"localhost:{p}" for p in ports[2:]]}
  servers = []
  with tempfile.TemporaryDirectory(prefix="ps_table-") as directory:
    try:
      for kind in ("worker", "ps"):
        for index in range(len(cluster[kind])):
          config = {"cluster": cluster, "task": {"type": kind, "index": index}}
          servers.append((kind, index, subprocess.Popen(
              [sys.executable, "-m", "launch.server"], cwd=REPO,
              env=quiet_env({"TF_CONFIG": json.dumps(config),
                             "PYTHONPATH": REPO}),
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
      chief = {"cluster": cluster, "task": {"type": "chief", "index": 0}}
      started = time.monotonic()
      proc = subprocess.run(
          [sys.executable, "-m", "bench.ps_table", "--coordinator",
           f"--rows={rows}", f"--dim={dim}", f"--dir={directory}",
           "--ps_pids=" + ",".join(str(p.pid) for kind, _, p in servers
                                    if kind == "ps")],
          cwd=REPO, capture_output=True, text=True, timeout=900,
          env=quiet_env({"TF_CONFIG": json.dumps(chief), "PYTHONPATH": REPO,
                         "GRPC_FAIL_FAST": "use_caller"}))
      result = parse_result(proc.stdout)
      if proc.returncode != 0 or result is None:
        raise RuntimeError(f"coordinator exited {proc.returncode}:\n"
                           f"{proc.stderr[-3000:]}")
      result["seconds"] = time.monotonic() - started
      # The coordinator reset each ps's high-water mark at every step: the
      # run's peak is the largest step's.
      result["ps_peak_mb"] = [
          max([status_kb("VmHWM", p.pid) / 1024] +
              [step["ps"][i] for step in result["phases"].values()])
          for i, p in enumerate(p for kind, _, p in servers if kind == "ps")]
      data = [os.path.getsize(os.path.join(directory, f))
              for f in os.listdir(directory) if ".data-" in f]
      result["largest_data_file_mb"] = max(data) / MB
    finally:
      for _, _, server in servers:
        server.terminate()
      for _, _, server in servers:
        try:
          server.wait(timeout=30)
        except subprocess.TimeoutExpired:
          server.kill()
          server.wait(timeout=30)
  result.update(rows=rows, dim=dim, table_mb=rows * dim * 4 / MB)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", default="100000,4000000")
  parser.add_argument("--dim", type=int, default=32)
  parser.add_argument("--ps", type=int, default=2)
  parser.add_argument("--empty_rows", type=int, default=1,
                      help="the table of the fixed-overhead run")
  parser.add_argument("--coordinator", action="store_true",
                      help=argparse.SUPPRESS)
  parser.add_argument("--dir", help=argparse.SUPPRESS)
  parser.add_argument("--ps_pids", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.coordinator:
    _coordinator(int(args.rows), args.dim, args.dir,
                 [int(p) for p in args.ps_pids.split(",") if p])
    return
  print(machine.header(machine.info()), flush=True)
  empty = measure(args.empty_rows, args.dim, args.ps)
  overhead = empty["ps_peak_mb"]
  print(f"empty model ({args.empty_rows} rows): coordinator peak "
        f"{empty['run_peak_mb']:.0f} MB, each ps's peak "
        + "/".join(f"{p:.0f}" for p in overhead) + " MB", flush=True)
  print(json.dumps(empty), flush=True)
  print(f"{'rows':>9} {'table':>8} {'built':>7} {'lookup':>7} {'save':>7} "
        f"{'restore':>8} {'run':>7} {'ps peaks':>12} {'ps rows':>12} "
        f"{'largest file':>13}  (MB)  ps x rows")
  for rows in [int(r) for r in args.rows.split(",")]:
    r = measure(rows, args.dim, args.ps)
    peaks = "/".join(f"{p:.0f}" for p in r["ps_peak_mb"])
    held = "/".join(f"{p:.0f}" for p in r["ps_rows_mb"])
    over = "/".join(
        f"{(p - o) / h:.2f}" for p, o, h in zip(r["ps_peak_mb"], overhead,
                                                r["ps_rows_mb"]))
    print(f"{rows:>9} {r['table_mb']:>8.1f} {r['built_mb']:>7.0f} "
          f"{r['lookup_peak_mb']:>7.0f} {r['save_peak_mb']:>7.0f} "
          f"{r['restore_peak_mb']:>8.0f} {r['run_peak_mb']:>7.0f} "
          f"{peaks:>12} {held:>12} "
          f"{r['largest_data_file_mb']:>13.1f}  {over}", flush=True)
    print("  ps peaks by step: " + ", ".join(
        f"{name} " + "/".join(f"{p:.0f}" for p in peaks["ps"])
        for name, peaks in r["phases"].items()), flush=True)
    if r["ps_rows_mb"]:
      print("  ps x rows by step (peak less the empty model's, over the "
            "rows it holds): " + ", ".join(
                f"{name} " + "/".join(
                    f"{(p - o) / h:.2f}" for p, o, h in zip(
                        peaks["ps"], overhead, r["ps_rows_mb"]))
                for name, peaks in r["phases"].items()), flush=True)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
