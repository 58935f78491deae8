"""Text from a finished examples.lm run.

  .venv/bin/python -m examples.lm_sample --model_dir=runs/lm \\
      --prompt="def " --length=200 [--temperature=0.8] [--seed=0]

trainer.load rebuilds the run's task and model from MODEL_DIR (its
config.json and latest checkpoint); examples.lm.sample does the rest:
"""

import argparse
import sys

import trainer
from examples import lm
from trainer.errors import UserError


def generate(model_dir: str, prompt: str, length: int = 200,
             temperature: float = 0.0, seed: int = 0) -> str:
  """`length` bytes after `prompt` from the run in `model_dir`."""
  task, model = trainer.load(model_dir)
  out = lm.sample(model, prompt, length, temperature,
                  max_len=task.args["max_len"], seed=seed)
  return out.decode("utf-8", errors="replace")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="examples.lm_sample")
  p.add_argument("--model_dir", required=True)
  p.add_argument("--prompt", default="def ")
  p.add_argument("--length", type=int, default=200)
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0: greedy; else softmax(logits / T) draws")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  try:
    text = generate(args.model_dir, args.prompt, args.length,
                    args.temperature, args.seed)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(args.prompt + text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
