"""Turns the measured runs into the result table, the goal checks, and the
terminal / Markdown / JSON outputs."""

from bench import common, machine


def _ratio(a, b):
  return a / b if a and b else None


def _summarize(row, runs, flops, peak) -> dict:
  out = {"name": row.name, "group": row.group, "kind": row.kind,
         "config": row.describe(), "batch": row.batch, "ref": row.ref,
         "interval": row.interval}
  ok = [r for r in runs if "error" not in r and "skipped" not in r
        and (r.get("steps_per_sec") or r.get("final"))]
  skipped = [r["skipped"] for r in runs if "skipped" in r]
  errors = [r["error"] for r in runs if "error" in r]
  if skipped and not ok:
    out["status"] = "skipped: " + skipped[0]
  elif errors and not ok:
    out["status"] = "error: " + errors[0]
  else:
    out["status"] = "ok" if not errors else f"ok ({len(errors)} run(s) failed)"
  if errors:
    out["errors"] = errors
  commands = [r["command"] for r in runs if r.get("command")]
  if commands:
    out["command"] = commands[0]
  if not ok:
    return out
  finals = [r.get("final") for r in ok if r.get("final")]
  if finals and finals[0].get("eval_accuracy") is not None:
    out["eval_accuracy"] = finals[0]["eval_accuracy"]
    out["eval_loss"] = finals[0].get("eval_loss")
  out["foreign_load_max"] = max((r.get("foreign_load") or 0) for r in ok)
  per_run = [r["steps_per_sec"] for r in ok if r.get("steps_per_sec")]
  if not per_run:
    return out
  sps = common.median(per_run)
  out.update({
      "steps_per_sec": sps,
      "steps_per_sec_runs": per_run,
      "spread": [min(per_run), max(per_run)],
      "examples_per_sec": sps * row.batch,
      "intervals": [r["steady"] for r in ok if r.get("steps_per_sec")],
  })
  wall = [r.get("wall_steps_per_sec") for r in ok if r.get("wall_steps_per_sec")]
  if wall:
    out["wall_steps_per_sec"] = common.median(wall)
  per_example = (flops.get("models", {}).get(row.model, {})
                 .get("train_flops_per_example"))
  if per_example:
    out["gflops"] = out["examples_per_sec"] * per_example / 1e9
    if peak:
      out["pct_of_fp32_peak"] = 100.0 * out["gflops"] / peak
  return out


def _paired(a_row, b_row):
  """Per-repeat ratios of examples/sec (runs of one repeat ran close in time)."""
  if not a_row or not b_row:
    return []
  a = a_row.get("steps_per_sec_runs") or []
  b = b_row.get("steps_per_sec_runs") or []
  return [(x * a_row["batch"]) / (y * b_row["batch"])
          for x, y in zip(a, b) if x and y]


def _goal(name, target, cmp, a, b, summary, note=""):
  """One goal: ratio of examples/sec of rows a / b against a target."""
  ra, rb = summary.get(a), summary.get(b)
  ratio = _ratio(ra and ra.get("examples_per_sec"),
                 rb and rb.get("examples_per_sec"))
  if ratio is None:
    missing = [n for n, r in ((a, ra), (b, rb))
               if not r or not r.get("examples_per_sec")]
    return {"goal": name, "target": f"{cmp} {target}", "ratio": None,
            "met": None, "rows": [a, b],
            "detail": f"not measured ({', '.join(missing)})"}
  met = ratio >= target if cmp == ">=" else ratio <= target
  return {"goal": name, "target": f"{cmp} {target}", "ratio": ratio,
          "paired_ratios": _paired(ra, rb), "met": met, "rows": [a, b],
          "detail": note}


def goals(summary: dict) -> list[dict]:
  g = []
  for group in ("cnn_b32", "cnn_b128"):
    g.append(_goal(f"framework/raw {group}", 0.97, ">=",
                   f"{group}/fw_default", f"{group}/raw", summary))
    g.append(_goal(f"framework/raw with the framework's fused Adam {group}",
                   0.97, ">=", f"{group}/fw_default", f"{group}/raw_fused",
                   summary, "same optimizer: the cost of the rest of the "
                   "framework"))
  g.append(_goal("framework >= 2x Keras fit(spe=1), cnn_b32", 2.0, ">=",
                 "cnn_b32/fw_default", "cnn_b32/keras_spe1", summary))
  for group in ("cnn_b32", "cnn_b128"):
    kerases = [summary.get(f"{group}/keras_spe1"),
               summary.get(f"{group}/keras_spe50")]
    kerases = [k for k in kerases if k and k.get("examples_per_sec")]
    best = max(kerases, key=lambda k: k["examples_per_sec"])["name"] \
        if kerases else f"{group}/keras_spe50"
    g.append(_goal(f"framework >= Keras fit at its best, {group}", 1.0, ">=",
                   f"{group}/fw_default", best, summary,
                   f"best Keras setting: {best.split('/')[-1]}"))
  for group in ("cnn_b32", "cnn_b128"):
    g.append(_goal(f"accumulation K=4 per-example throughput vs K=1, {group}",
                   0.95, ">=", f"{group}/fw_accum4", f"{group}/fw_default",
                   summary, "same micro-batch; examples/sec"))
  for model in ("cnn", "resnet20"):
    g.append(_goal(f"2 workers pinned vs 1 worker pinned, {model} "
                   "(examples/sec)", 1.8, ">=", f"{model}_w2/pinned",
                   f"{model}_w1/pinned", summary))
  g.append(_goal("machine ceiling: 2 independent pinned raw loops vs 1, cnn "
                 "(examples/sec)", 1.8, ">=", "cnn_w2/raw_pinned",
                 "cnn_w1/raw_pinned", summary,
                 "no communication at all: the most any 2-worker job can "
                 "scale on this machine"))
  for variant in ("fw_mnist", "fw_tfrecord"):
    g.append(_goal(f"input pipeline {variant} vs in-memory, cnn_b128", 0.95,
                   ">=", f"cnn_b128/{variant}", "cnn_b128/fw_default", summary))
  for variant in ("fw_jpeg_folder", "fw_jpeg_array_record"):
    g.append(_goal(f"on-disk JPEG {variant} vs in-memory, cnn_b128", 0.9,
                   ">=", f"cnn_b128/{variant}", "cnn_b128/fw_default", summary,
                   "lazy reading, decode and random-resized crop per example"))
  fp32 = summary.get("accuracy/fp32", {}).get("eval_accuracy")
  for variant in ("bf16", "xla"):
    acc = summary.get(f"accuracy/{variant}", {}).get("eval_accuracy")
    if fp32 is None or acc is None:
      g.append({"goal": f"{variant} eval accuracy within 0.5 points of fp32",
                "target": "|diff| <= 0.5 points", "ratio": None, "met": None,
                "rows": [f"accuracy/{variant}", "accuracy/fp32"],
                "detail": "not measured"})
      continue
    diff = round(100.0 * (acc - fp32), 6)   # 0.969 - 0.974 is not -0.5000001
    g.append({"goal": f"{variant} eval accuracy within 0.5 points of fp32",
              "target": "|diff| <= 0.5 points", "ratio": None,
              "diff_points": diff, "met": abs(diff) <= 0.5,
              "rows": [f"accuracy/{variant}", "accuracy/fp32"],
              "detail": f"{100 * acc:.2f}% vs {100 * fp32:.2f}% "
                        f"({diff:+.2f} points)"})
  return g


def assemble(rows, results, flops, ceiling, run) -> dict:
  peak = (ceiling.get("float32") or {}).get("gflops")
  summary = {}
  for row in rows:
    summary[row.name] = _summarize(row, results[row.name], flops, peak)
  # Ratios: to the group's raw loop, and to the row's own reference.
  for s in summary.values():
    raw = summary.get(f"{s['group']}/raw")
    if raw and s["name"] != raw["name"]:
      s["x_raw"] = _ratio(s.get("examples_per_sec"), raw.get("examples_per_sec"))
    ref = summary.get(s["ref"]) if s["ref"] else None
    if ref:
      s["x_ref"] = _ratio(s.get("examples_per_sec"), ref.get("examples_per_sec"))
  # Goals about rows this run did not select are left out.
  chosen = [g for g in goals(summary) if any(r in summary for r in g["rows"])]
  return {"run": run, "ceiling": ceiling,
          "flops": {k: v for k, v in flops.get("models", {}).items()},
          "rows": list(summary.values()), "goals": chosen}


# ---- formatting ------------------------------------------------------------
def _f(value, fmt="{:.1f}", none="-"):
  return none if value is None else fmt.format(value)


_COLUMNS = ("row", "steps/s", "runs", "ex/s", "x raw", "x ref", "GFLOP/s",
            "%peak", "load", "status / accuracy")


def _cells(s) -> list[str]:
  runs = s.get("steps_per_sec_runs")
  status = s["status"]
  if s.get("eval_accuracy") is not None:
    status = f"eval_acc {100 * s['eval_accuracy']:.2f}%"
  elif len(status) > 70:
    status = status[:67] + "..."
  return [s["name"], _f(s.get("steps_per_sec"), "{:.2f}"),
          "/".join(f"{r:.1f}" for r in runs) if runs else "-",
          _f(s.get("examples_per_sec"), "{:.0f}"),
          _f(s.get("x_raw"), "{:.2f}"),
          (_f(s.get("x_ref"), "{:.2f}") + f" ({s['ref'].split('/')[-1]})")
          if s.get("x_ref") else "-",
          _f(s.get("gflops"), "{:.1f}"), _f(s.get("pct_of_fp32_peak"), "{:.0f}"),
          _f(s.get("foreign_load_max"), "{:.0%}") if s.get("foreign_load_max")
          is not None else "-", status]


def _goal_line(g) -> str:
  mark = {True: "MET", False: "NOT MET", None: "n/a"}[g["met"]]
  value = ""
  if g.get("ratio") is not None:
    value = f"{g['ratio']:.3f}"
    if g.get("paired_ratios"):
      value += " (per repeat: " + ", ".join(f"{r:.3f}" for r in
                                          g["paired_ratios"]) + ")"
  detail = g.get("detail") or ""
  return (f"{mark:7s} {g['goal']}: {value} target {g['target']}"
          f"{'; ' + detail if detail else ''}")


def _header_lines(data) -> list[str]:
  run, m = data["run"], data["run"]["machine"]
  lines = [
      f"date {run['started']}, {run['duration_s']} s, mode {run['mode']}, "
      f"{run['repeats']} repeat(s) per row, >= {run['min_seconds']:g} s and "
      f">= {run['min_intervals']} intervals of steady state per run, first "
      f"{run['warmup_intervals']} intervals dropped",
      machine.header(m) + (
          f" (at start {'/'.join(f'{x:.2f}' for x in m['load_start'])})"
          if m.get("load_start") else ""),
      f"TF {m.get('tensorflow')}, Keras {m.get('keras')}, Python "
      f"{m.get('python')}, git {m.get('git', '?')}",
  ]
  if run.get("interrupted"):
    lines.append("INTERRUPTED: only the runs finished before Ctrl-C are shown")
  loads = [s.get("foreign_load_max") or 0 for s in data["rows"]]
  if loads and max(loads) > 0.10:
    lines.append(f"WARNING: other processes used up to {max(loads):.0%} of the "
                 "CPUs during some runs (column load): those figures are "
                 "unreliable; re-run on a quiet machine")
  c = data.get("ceiling") or {}
  if c:
    lines.append("ceiling: 4096x4096 matmul " + ", ".join(
        f"{k} {_f(v.get('gflops'), '{:.0f}')} GFLOP/s" for k, v in c.items()))
  for name, f in data.get("flops", {}).items():
    lines.append(
        f"FLOPs {name}: forward {f['forward_flops_per_example_profiler'] / 1e6:.2f} "
        f"MFLOP/example (TF profiler; analytic "
        f"{f['forward_flops_per_example_analytic'] / 1e6:.2f}), training = 3 x "
        "forward")
  return lines


def terminal(data) -> str:
  rows = [_cells(s) for s in data["rows"]]
  widths = [max(len(str(x)) for x in col) for col in zip(_COLUMNS, *rows)]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
  out = _header_lines(data) + ["", line(_COLUMNS),
                               line(["-" * w for w in widths])]
  out += [line(r) for r in rows]
  out += ["", "goals:"] + ["  " + _goal_line(g) for g in data["goals"]]
  return "\n".join(out)


def markdown(data) -> str:
  out = ["# Benchmark results (`make bench`)", ""]
  out += [f"- {l}" for l in _header_lines(data)]
  out += [f"- {n}" for n in data["run"].get("setup_notes", [])]
  out += ["", "steps/s: median over runs of each run's median interval "
          "(updates/sec); runs: each run's figure; x raw: examples/sec over "
          "the group's raw loop; x ref: over the row named; GFLOP/s: "
          "examples/sec x 3 x forward FLOPs; %peak: of the fp32 matmul "
          "ceiling; load: CPU share other processes used during the run "
          "(max over runs).", ""]
  out.append("| " + " | ".join(_COLUMNS) + " |")
  out.append("|" + "---|" * len(_COLUMNS))
  for s in data["rows"]:
    out.append("| " + " | ".join(c.replace("|", "/") for c in _cells(s)) + " |")
  out += ["", "## Goals", ""]
  out += [f"- {_goal_line(g)}" for g in data["goals"]]
  out += ["", "## Row configurations", ""]
  for s in data["rows"]:
    out.append(f"- `{s['name']}`: {s['config']}" +
               (f"; `{s['command']}`" if s.get("command") else ""))
  return "\n".join(out) + "\n"
