"""Tests for launch.kubernetes (TFJob YAML) and launch.slurm (sbatch script) through their CLIs."""

import pathlib
import shlex
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
TRAINER = ["python", "-m", "trainer.main"]
SERVER = ["python", "-m", "launch.server"]


def launch(tool, *args):
  return subprocess.run([sys.executable, "-m", f"launch.{tool}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def container(spec):
  (c,) = spec["template"]["spec"]["containers"]
  return c


def assert_container(c, image, command):
  assert c["name"] == "tensorflow"
  assert c["image"] == image
  assert c["command"] == command
  assert c["ports"] == [{"containerPort": 2222, "name": "tfjob-port"}]


@pytest.mark.timeout(120)
def test_kubernetes_multiworker_manifest():
  flags = ["--strategy=multiworker", "--model_dir=/data/run 1", "--train_steps=100"]
  proc = launch("kubernetes", "--workers=3", "--image=reg/trainer:1", "--namespace=ml",
                "--name=mnist-run", "--", *flags)
  assert proc.returncode == 0, proc.stderr
  job = yaml.safe_load(proc.stdout)
  assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
  assert job["metadata"] == {"name": "mnist-run", "namespace": "ml"}
  specs = job["spec"]["tfReplicaSpecs"]
  assert list(specs) == ["Worker"]
  assert specs["Worker"]["replicas"] == 3
  assert specs["Worker"]["restartPolicy"] == "OnFailure"
  c = container(specs["Worker"])
  assert_container(c, "reg/trainer:1", TRAINER + flags)
  assert "resources" not in c


@pytest.mark.timeout(120)
def test_kubernetes_parameter_server_manifest():
  flags = ["--strategy=parameter_server", "--train_steps=100"]
  proc = launch("kubernetes", "--workers=2", "--ps=1", "--image=img", "--cpu=2",
                "--memory=4Gi", "--restart_policy=Never", "--", *flags)
  assert proc.returncode == 0, proc.stderr
  job = yaml.safe_load(proc.stdout)
  assert job["metadata"] == {"name": "tf-train", "namespace": "default"}
  specs = job["spec"]["tfReplicaSpecs"]
  assert sorted(specs) == ["Chief", "PS", "Worker"]
  assert [specs[k]["replicas"] for k in ("Chief", "Worker", "PS")] == [1, 2, 1]
  assert {s["restartPolicy"] for s in specs.values()} == {"Never"}
  assert_container(container(specs["Chief"]), "img", TRAINER + flags)
  assert_container(container(specs["Worker"]), "img", SERVER)
  assert_container(container(specs["PS"]), "img", SERVER)
  assert container(specs["PS"])["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                                                 "limits": {"cpu": "2", "memory": "4Gi"}}


@pytest.mark.timeout(120)
def test_slurm_script():
  proc = launch("slurm", "--nodes=4", "--tasks_per_node=2", "--job_name=mnist",
                "--time=02:30:00", "--partition=cpu", "--cpus_per_task=8", "--port=9000",
                "--", "--train_steps=100", "--model_dir=/scratch/run 1")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == "#!/bin/bash"
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=2", "#SBATCH --job-name=mnist",
               "#SBATCH --time=02:30:00", "#SBATCH --partition=cpu",
               "#SBATCH --cpus-per-task=8", "export TRAINER_SLURM_PORT_BASE=9000"):
    assert line in lines
  (srun,) = [line.strip() for line in lines if line.strip().startswith("srun ")]
  assert shlex.split(srun) == ["srun", "python", "-m", "trainer.main", "--strategy=multiworker",
                               "--cluster_resolver=slurm", "--train_steps=100",
                               "--model_dir=/scratch/run 1"]


@pytest.mark.timeout(120)
def test_slurm_keeps_the_users_strategy_and_resolver():
  proc = launch("slurm", "--nodes=1", "--", "--strategy=multiworker",
                "--cluster_resolver=slurm")
  assert proc.returncode == 0, proc.stderr
  (srun,) = [line.strip() for line in proc.stdout.splitlines()
             if line.strip().startswith("srun ")]
  assert srun.count("--strategy") == 1 and srun.count("--cluster_resolver") == 1
  assert "#SBATCH --partition" not in proc.stdout
  assert "TRAINER_SLURM_PORT_BASE" not in proc.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tool, args, flag", [
    ("kubernetes", ["--workers=0", "--image=i", "--", "--x"], "--workers=0"),
    ("kubernetes", ["--workers=1", "--ps=-2", "--image=i", "--", "--x"], "--ps=-2"),
    ("kubernetes", ["--workers=1", "--", "--x"], "--image"),
    ("kubernetes", ["--workers=1", "--image=i"], "'--'"),
    ("kubernetes", ["--workers=1", "--image=i", "--name=Bad_Name", "--", "--x"], "--name"),
    ("kubernetes", ["--workers=1", "--image=i", "--restart_policy=Sometimes", "--", "--x"],
     "--restart_policy"),
    ("slurm", ["--nodes=0"], "--nodes=0"),
    ("slurm", ["--", "--x"], "--nodes"),
    ("slurm", ["--nodes=1", "--time=2h"], "--time=2h"),
    ("slurm", ["--nodes=1", "--tasks_per_node=0"], "--tasks_per_node=0"),
    ("slurm", ["--nodes=1", "--max_restarts=-1"], "--max_restarts=-1"),
])
def test_bad_flags_exit_2_with_one_line(tool, args, flag):
  proc = launch(tool, *args)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"launch.{tool}: ") and flag in lines[0]
  assert proc.stdout == ""


FAKE_SRUN = """#!/bin/bash
# Exits with the next code of $SRUN_CODES (one per call); records each call.
n=$(wc -l < "$SRUN_CALLS" 2>/dev/null || echo 0)
echo "$*" >> "$SRUN_CALLS"
codes=($SRUN_CODES)
exit "${codes[$n]}"
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codes, restarts, calls, final", [
    ("142 0", 3, 2, 0),            # a hang: the step runs again and finishes
    ("4 137 142 0", 3, 4, 0),      # a lost peer, a cluster that never formed, a hang
    ("142 142 142", 2, 3, 142),    # out of restarts: the last code
    ("2", 3, 1, 2),                # usage: a restart would repeat it
    ("75", 3, 1, 75),              # preempted: resubmit, not restart
    ("74", 3, 1, 74),              # disk full
])
def test_slurm_script_restarts_retryable_exits(tmp_path, codes, restarts, calls, final):
  """The sbatch script itself, run by bash with a stand-in srun: what it restarts is
  what launch.local restarts (trainer/exitcodes.py NOT_RETRYABLE), at most --max_restarts."""
  proc = launch("slurm", "--nodes=2", f"--max_restarts={restarts}", "--", "--train_steps=9")
  assert proc.returncode == 0, proc.stderr
  job = tmp_path / "job.sh"
  job.write_text(proc.stdout)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  record = tmp_path / "calls"
  run = subprocess.run(["bash", str(job)], capture_output=True, text=True, timeout=60,
                       env={"PATH": f"{bin_dir}:/usr/bin:/bin", "SRUN_CODES": codes,
                            "SRUN_CALLS": str(record)})
  assert run.returncode == final, run.stderr
  lines = record.read_text().splitlines()
  assert len(lines) == calls
  assert all(line.endswith("--train_steps=9") for line in lines)
  assert run.stderr.count("launch.slurm: restart ") == calls - 1
