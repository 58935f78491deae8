"""Print a Kubeflow TFJob manifest (YAML) that runs the trainer on N workers (+ M ps and a chief).

  python -m launch.kubernetes --workers=4 --image=registry/trainer:1 -- \\
      --strategy=multiworker --train_steps=1000 --model_dir=gs://bucket/run1 | kubectl apply -f -

The TF operator sets TF_CONFIG in every pod itself; the pods find each other on port 2222.

Restart policy (--restart_policy): OnFailure (the default) restarts a pod after any non-zero
exit, a hang's 142 included. ExitCode restarts only exits 128-255, which the operator takes for
retryable (the trainer's 137, a cluster that did not form, and 142, a hang, are in that range
on purpose; trainer/exitcodes.py), and fails the job on 1-127.
"""

import re

import yaml
from absl import app
from absl import flags

from launch import cli
from launch.output import log

PORT = 2222  # the TF operator's default port, named tfjob-port
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _replica(replicas, image, command, restart_policy, cpu, memory):
  container = {
      "name": "tensorflow",  # the TF operator finds the training container by this name
      "image": image,
      "command": list(command),
      "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
      "ports": [{"containerPort": PORT, "name": "tfjob-port"}],
  }
  resources = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
  if resources:
    # requests == limits: Guaranteed QoS, so step times do not depend on the neighbours.
    container["resources"] = {"requests": dict(resources), "limits": dict(resources)}
  return {"replicas": replicas, "restartPolicy": restart_policy,
          "template": {"spec": {"containers": [container]}}}


def manifest(workers, ps, image, trainer_args, name="tf-train", namespace="default",
             restart_policy="OnFailure", cpu=None, memory=None):
  """Returns the TFJob as a dict: Worker replicas run the trainer (ps == 0), or servers (ps > 0)."""
  trainer = ["python", "-m", "trainer.main", *trainer_args]
  server = ["python", "-m", "launch.server"]
  specs = {}
  if ps > 0:
    # ParameterServerStrategy: the chief is the coordinator; workers and ps only serve.
    specs["Chief"] = _replica(1, image, trainer, restart_policy, cpu, memory)
    specs["PS"] = _replica(ps, image, server, restart_policy, cpu, memory)
    specs["Worker"] = _replica(workers, image, server, restart_policy, cpu, memory)
  else:
    specs["Worker"] = _replica(workers, image, trainer, restart_policy, cpu, memory)
  return {
      "apiVersion": "kubeflow.org/v1",
      "kind": "TFJob",
      "metadata": {"name": name, "namespace": namespace},
      "spec": {"tfReplicaSpecs": specs},
  }


def render(job):
  """Returns the manifest as YAML, keys in the order written above."""
  return yaml.safe_dump(job, sort_keys=False, default_flow_style=False)


def _define(fv):
  flags.DEFINE_integer("workers", None, "Worker replicas.", flag_values=fv)
  flags.DEFINE_integer("ps", 0, "PS replicas; > 0 adds one Chief replica running the trainer.",
                       flag_values=fv)
  flags.DEFINE_string("image", None, "Container image holding this project.", flag_values=fv)
  flags.DEFINE_string("namespace", "default", "Kubernetes namespace.", flag_values=fv)
  flags.DEFINE_string("name", "tf-train", "TFJob name (a DNS label).", flag_values=fv)
  flags.DEFINE_enum("restart_policy", "OnFailure", RESTART_POLICIES,
                    "Pod restart policy: OnFailure restarts any non-zero exit; ExitCode only "
                    "128-255 (137: cluster did not form, 142: a hang).", flag_values=fv)
  flags.DEFINE_string("cpu", None, "CPU request and limit per pod, e.g. 4 or 500m.",
                      flag_values=fv)
  flags.DEFINE_string("memory", None, "Memory request and limit per pod, e.g. 8Gi.",
                      flag_values=fv)


def _main(argv):
  fv, trainer_args = cli.parse("launch.kubernetes", _define, argv)
  if fv.workers is None:
    raise app.UsageError("--workers is required (number of Worker replicas, >= 1)")
  cli.check(fv.workers >= 1, "workers", fv.workers, "must be >= 1")
  cli.check(fv.ps >= 0, "ps", fv.ps, "must be >= 0")
  if not fv.image:
    raise app.UsageError("--image is required (the container image holding this project)")
  cli.check(bool(_DNS_LABEL.match(fv.name)), "name", fv.name,
            "must be a DNS label: lowercase letters, digits and '-', at most 63")
  cli.check(bool(_DNS_LABEL.match(fv.namespace)), "namespace", fv.namespace,
            "must be a DNS label: lowercase letters, digits and '-', at most 63")
  if not trainer_args:
    raise app.UsageError("no trainer flags after '--' (e.g. -- --strategy=multiworker "
                         "--model_dir=...)")
  if not any(a.startswith("--strategy") for a in trainer_args):
    log("warning: no --strategy in the trainer flags; the replicas will not form one cluster",
        prog="launch.kubernetes")
  print(render(manifest(fv.workers, fv.ps, fv.image, trainer_args, fv.name, fv.namespace,
                        fv.restart_policy, fv.cpu, fv.memory)), end="")
  return 0


if __name__ == "__main__":
  cli.main("launch.kubernetes", _main)
