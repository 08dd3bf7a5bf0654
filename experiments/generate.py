"""One-shot generation: `python -m experiments.generate --image ... --audio ... --stage1 W1
--stage2 W2 --out out.mp4` (the same options as `hdtf-jax generate`, see hdtf_jax/cli.py)."""
from __future__ import annotations

import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # `python experiments/generate.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hdtf_jax import cli


def main(argv: Sequence[str] | None = None) -> int:
  return cli.main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  raise SystemExit(main())
