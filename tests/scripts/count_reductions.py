"""Counts cross-replica reductions executed per update, at run time.

Usage: count_reductions.py MODEL_DIR REPLICAS ACCUM_STEPS UPDATES [--task=T]
(--task: a Task import path, e.g. examples.dcgan:DCGAN; default the cnn.)
Prints one JSON line {"reductions": N, "updates": U, "replicas": R,
"optimizers": O}.
"""

import json
import sys

import tensorflow as tf

from trainer import controller
from trainer.config import Config

task = [a.split("=", 1)[1] for a in sys.argv[5:] if a.startswith("--task=")]
model_dir, replicas, accum, updates = sys.argv[1], *map(int, sys.argv[2:5])

counter = None
original = tf.distribute.ReplicaContext.all_reduce


def counting_all_reduce(self, reduce_op, value, options=None):
  result = original(self, reduce_op, value, options)
  # Executed (not just traced) once per replica per reduction.
  with tf.control_dependencies(tf.nest.flatten(result)):
    counter.assign_add(1)
  return tf.nest.map_structure(tf.identity, result)


tf.distribute.ReplicaContext.all_reduce = counting_all_reduce
config = Config(strategy="mirrored" if replicas > 1 else "default",
                cpu_replicas=replicas if replicas > 1 else 0,
                grad_accum_steps=accum, global_batch_size=64,
                train_steps=updates, steps_per_loop=updates,
                summary_every=updates, checkpoint_every=updates,
                eval_every=0, mode="train", model_dir=model_dir,
                task=task[0] if task else "")
runner = controller.create(config)
with tf.device("/cpu:0"):
  counter = tf.Variable(0, dtype=tf.int64, trainable=False)
runner.train(evaluate=False)
print(json.dumps({"reductions": int(counter.numpy()), "updates": updates,
                  "replicas": runner.strategy.num_replicas_in_sync,
                  "optimizers": len(runner.parts.optimizers)}))
