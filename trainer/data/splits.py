"""TFDS-style split strings: "train", "test[:8000]", "train[10%:]", "a+b"."""

import dataclasses
import re

import numpy as np

_SLICE = re.compile(r"^(?P<name>[A-Za-z_][\w-]*)(\[(?P<start>[^:\]]*):(?P<stop>[^\]]*)\])?$")


@dataclasses.dataclass(frozen=True)
class SplitPart:
  """One named split with a half-open slice, bounds as written (None = open)."""
  name: str
  start: str | None
  stop: str | None


def parse(spec: str) -> list[SplitPart]:
  """Parses "train[:80%]+test" into parts; raises ValueError on bad syntax."""
  parts = []
  for piece in spec.replace(" ", "").split("+"):
    m = _SLICE.match(piece)
    if not m:
      raise ValueError(
          f"bad split {spec!r}: expected NAME, NAME[a:b] or NAME[a%:b%] "
          "joined with '+', e.g. 'train', 'test[:8000]', 'train[10%:]'.")
    start, stop = m.group("start"), m.group("stop")
    for bound in (start, stop):
      if bound and not re.fullmatch(r"-?\d+%?", bound):
        raise ValueError(f"bad split {spec!r}: bound {bound!r} is not an "
                         "integer or a percentage.")
    parts.append(SplitPart(m.group("name"), start or None, stop or None))
  return parts


def _resolve(bound: str | None, n: int, default: int) -> int:
  if bound is None:
    return default
  if bound.endswith("%"):
    # TFDS rounds percent boundaries to the nearest example.
    value = int(round(n * int(bound[:-1]) / 100.0))
  else:
    value = int(bound)
  if value < 0:
    value += n
  return min(max(value, 0), n)


def indices(part: SplitPart, n: int) -> np.ndarray:
  """Example indices [start, stop) that `part` selects from a split of size n."""
  return np.arange(_resolve(part.start, n, 0), _resolve(part.stop, n, n))


def select(spec: str, sizes: dict[str, int]) -> list[tuple[str, np.ndarray]]:
  """For each part of `spec`: (split name, selected indices).

  `sizes` maps the split names the dataset has to their sizes; an unknown
  name raises ValueError listing the available ones.
  """
  out = []
  for part in parse(spec):
    if part.name not in sizes:
      raise ValueError(f"split {spec!r} names {part.name!r}, but the dataset "
                       f"has {sorted(sizes)}.")
    idx = indices(part, sizes[part.name])
    if idx.size == 0:
      raise ValueError(f"split {spec!r} selects no examples from "
                       f"{part.name!r} ({sizes[part.name]} examples).")
    out.append((part.name, idx))
  return out
