"""`python -m trainer.plot`: train and eval curves of one or more runs (PNG).

  python -m trainer.plot --model_dir=runs/a [--model_dir=runs/b ...] \\
      [--out=curves.png] [--metrics=loss,accuracy]

One panel per metric against the update step. By default the runs' own
metrics: loss first, then the others in name order (the tags of eval/,
which holds metrics only, or of train/ less the framework's own scalars
such as learning_rate and steps_per_sec);
each run has its colour, train is a solid line, eval a dashed line with
markers. The curves come from the TensorBoard event files in MODEL_DIR/train
and MODEL_DIR/eval (a resumed run's repeated steps keep their newest value).
A run with a goodput account (MODEL_DIR/goodput.json, trainer/goodput.py)
adds a last panel: one bar per run, its wall time split into the account's
categories (seconds), titled with each run's goodput (--nogoodput: no
panel).
The image is --width x --height pixels (default 1200 x 450). Needs
matplotlib: pip install 'tf-trainer[plot]'.
"""

import logging as std_logging
import os

from absl import flags

from trainer import cli, goodput
from trainer.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command-line flags; only when run as a program, so that
  importing this module next to other absl programs is harmless."""
  flags.DEFINE_multi_string("model_dir", [], "A training --model_dir; repeat "
                            "the flag to overlay several runs.")
  flags.DEFINE_string("out", "curves.png", "The PNG file to write.")
  flags.DEFINE_list("metrics", [], "Scalar tags to plot, one panel each "
                    "(default: the runs' own metrics, loss first).")
  flags.DEFINE_list("labels", [], "Legend names of the runs (default: the "
                    "directory names).")
  flags.DEFINE_integer("width", 1200, "Image width in pixels.")
  flags.DEFINE_integer("height", 450, "Image height in pixels.")
  flags.DEFINE_bool("goodput", True, "Add the goodput panel (where the wall "
                    "time went) for runs with a goodput.json.")


_DPI = 100


def read_scalars(directory: str) -> dict[str, tuple[list, list]]:
  """tag -> (steps, values) of the scalar summaries in one event directory."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  if not os.path.isdir(directory):
    return {}
  acc = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.TENSORS: 0,
                                event_accumulator.SCALARS: 0})
  acc.Reload()
  points: dict[str, dict[int, tuple[float, float]]] = {}

  def add(tag, step, wall_time, value):
    seen = points.setdefault(tag, {})
    # A resumed or rolled-back run writes a step again: the newest wins.
    if step not in seen or seen[step][0] <= wall_time:
      seen[step] = (wall_time, value)

  tags = acc.Tags()
  for tag in tags.get("tensors", []):
    for event in acc.Tensors(tag):
      array = tensor_util.make_ndarray(event.tensor_proto)
      if array.shape == () and array.dtype.kind in "fiu":
        add(tag, event.step, event.wall_time, float(array))
  for tag in tags.get("scalars", []):   # TF1-style simple_value scalars
    for event in acc.Scalars(tag):
      add(tag, event.step, event.wall_time, event.value)
  return {tag: (sorted(seen), [seen[s][1] for s in sorted(seen)])
          for tag, seen in points.items()}


def load_run(model_dir: str) -> dict:
  """{"train": {tag: (steps, values)}, "eval": {...}} of one run."""
  run = {kind: read_scalars(os.path.join(model_dir, kind))
         for kind in ("train", "eval")}
  if not run["train"] and not run["eval"]:
    raise UserError(f"--model_dir={model_dir} has no train/ or eval/ event "
                    "files: give the --model_dir of a training run.")
  return run


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise UserError("matplotlib is not installed: pip install "
                    "'tf-trainer[plot]' (or: pip install matplotlib)."
                    ) from None
  matplotlib.use("Agg")   # files only; no display needed
  import matplotlib.pyplot as plt
  return plt


# What the framework writes to train/ beside the task's metrics
# (trainer/controller.py), by name or by prefix: not plotted by default.
_FRAMEWORK_SCALARS = frozenset({
    "steps_per_sec", "examples_per_sec", "tokens_per_sec", "grad_norm",
    "nonfinite_steps", "skipped_examples", "input_wait_share"})
_FRAMEWORK_PREFIXES = ("learning_rate", "goodput/", "perf/", "raw/")


def run_metrics(runs: list[dict]) -> list[str]:
  """The metrics the runs (load_run's dicts) report: loss first, then the
  others in name order. A run's are the tags of its eval/ (metrics only;
  raw/ holds the raw weights' copy under --ema_decay), or without one the
  tags of its train/ that are not the framework's own scalars."""
  found = set()
  for run in runs:
    tags = run["eval"] or {t: v for t, v in run["train"].items()
                           if t not in _FRAMEWORK_SCALARS}
    found.update(t for t in tags if not t.startswith(_FRAMEWORK_PREFIXES))
  return sorted(found, key=lambda t: (t != "loss", t))


def plot(model_dirs: list[str], out: str, metrics=None,
         labels=None, width: int = 1200, height: int = 450,
         with_goodput: bool = True) -> str:
  """Draws the curves of `model_dirs` into the PNG `out`; returns `out`.
  metrics: the tags to plot, one panel each; default: run_metrics.
  with_goodput: a last panel of the goodput accounts, where there are."""
  if not model_dirs:
    raise UserError("give at least one --model_dir.")
  if labels and len(labels) != len(model_dirs):
    raise UserError(f"--labels has {len(labels)} names for "
                    f"{len(model_dirs)} --model_dir values.")
  plt = _pyplot()
  runs = [load_run(d) for d in model_dirs]
  metrics = list(metrics) if metrics else run_metrics(runs)
  if not metrics:
    raise UserError(f"the runs have no metrics to plot (their scalars: "
                    f"{', '.join(_all_tags(runs))}); name some with "
                    "--metrics.")
  missing = [m for m in metrics
             if not any(m in run["train"] or m in run["eval"] for run in runs)]
  if missing:
    raise UserError(f"--metrics: no run has {', '.join(missing)}; the runs "
                    f"have: {', '.join(_all_tags(runs))}.")
  labels = list(labels) if labels else _default_labels(model_dirs)
  accounts = [goodput.read(d) if with_goodput else None for d in model_dirs]
  panels = len(metrics) + (1 if any(accounts) else 0)
  fig, axes = plt.subplots(1, panels, squeeze=False,
                           figsize=(width / _DPI, height / _DPI), dpi=_DPI)
  if any(accounts):
    goodput_panel(axes[0][-1], accounts, labels, plt)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, metric in zip(axes[0], metrics):
    for i, (run, label) in enumerate(zip(runs, labels)):
      color = colors[i % len(colors)]
      if metric in run["train"]:
        steps, values = run["train"][metric]
        ax.plot(steps, values, color=color, linewidth=1.5,
                label=f"{label} train")
      if metric in run["eval"]:
        steps, values = run["eval"][metric]
        ax.plot(steps, values, color=color, linewidth=1.5, linestyle="--",
                marker="o", markersize=4, label=f"{label} eval")
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    values = [v for line in ax.lines for v in line.get_ydata()]
    if metric == "loss" and values and min(values) > 0:
      ax.set_yscale("log")   # losses span decades
    ax.grid(True, alpha=0.3)
    if ax.lines:
      ax.legend(fontsize="small")
  fig.tight_layout()
  directory = os.path.dirname(os.path.abspath(out))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(out, format="png", dpi=_DPI)
  plt.close(fig)
  return out


def goodput_panel(ax, accounts: list, labels: list, plt) -> None:
  """One horizontal bar per run: its wall time by category (seconds)."""
  colors = plt.get_cmap("tab10").colors
  names = list(goodput.CATEGORIES)
  shown = [(label, account) for label, account in zip(labels, accounts)
           if account]
  for row, (label, account) in enumerate(shown):
    totals = account.get("totals", {})
    left = 0.0
    for i, name in enumerate(names):
      width = float(totals.get(name, 0.0))
      ax.barh(row, width, left=left, color=colors[i % len(colors)],
              label=name[:-2].replace("_", " ") if row == 0 else None)
      left += width
  ax.set_yticks(range(len(shown)))
  ax.set_yticklabels([f"{label}\ngoodput {a.get('goodput', 0.0):.0%}"
                      for label, a in shown], fontsize="small")
  ax.set_xlabel("wall time (s)")
  ax.set_title("goodput: where the wall time went")
  ax.legend(fontsize="x-small")


def _all_tags(runs) -> list[str]:
  return sorted({tag for run in runs for kind in ("train", "eval")
                 for tag in run[kind]})


def _default_labels(model_dirs):
  names = [os.path.basename(os.path.normpath(d)) for d in model_dirs]
  if len(set(names)) < len(names):   # same leaf names: use the whole paths
    names = [os.path.normpath(d) for d in model_dirs]
  return names


def main() -> None:
  # TensorBoard's reader logs every file it opens at INFO.
  std_logging.getLogger("tensorboard").setLevel(std_logging.WARNING)
  print(plot(FLAGS.model_dir, FLAGS.out, FLAGS.metrics, FLAGS.labels,
             FLAGS.width, FLAGS.height, FLAGS.goodput))


def run():
  cli.run("trainer.plot", main, define_flags)


if __name__ == "__main__":
  run()
