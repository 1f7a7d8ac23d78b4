"""Write the shapes world: a pretraining set of rendered scenes, the held-out RL prompts, the eval prompts.

    .venv/bin/python scripts/make_shapes.py runs/shapes                   # 4,000 records at 32 px, seed 0
    .venv/bin/python scripts/make_shapes.py runs/shapes64 --n 8000 --size 64 --seed 1
    .venv/bin/python scripts/make_shapes.py runs/shapes --grid grid.png   # also a PNG of the first 64 scenes

Files: shapes_train.parquet (caption, image PNG, width, height, objects JSON, split),
shapes_rl_prompts.parquet and shapes_eval_prompts.parquet (column `prompt`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from orchestrator.shapes_world import generate, write_world


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n", type=int, default=4000, help="pretraining records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=32, choices=[32, 64])
    parser.add_argument(
        "--n-eval", type=int, default=24, help="evaluation prompts (a prefix of the RL prompts)"
    )
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG grid of the first 64 scenes")
    args = parser.parse_args()

    start = time.perf_counter()
    files = write_world(args.out_dir, args.n, args.seed, args.size, args.n_eval)
    print(
        f"wrote {files.train}, {files.rl_prompts}, {files.eval_prompts} in {time.perf_counter() - start:.1f}s"
    )
    if args.grid is not None:
        from PIL import Image

        tiles = [s.render(args.size) for s in generate(64, args.seed, args.size)]
        rows = [np.concatenate(tiles[r * 8 : (r + 1) * 8], axis=1) for r in range(8)]
        Image.fromarray(np.concatenate(rows, axis=0)).save(args.grid)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
