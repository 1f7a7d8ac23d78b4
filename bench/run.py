"""`sana-rl bench [SUITE ...] [--quick] [--out results.json]`: run suites, write JSON and Markdown.

    sana-rl bench --quick                      # every suite, short
    sana-rl bench dit lowprec --out bench/out/cpu.json

Each suite (bench/<name>.py, `run(quick) -> list[Row]`) measures its subject and its baseline in the same
process; the table reports the ratio and whether it meets the target. A suite that cannot run here
(GPU-only) returns rows that say why; nothing is invented.
"""

from __future__ import annotations

import importlib
import json
import platform
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.harness import Row

SUITES = ("dit", "lowprec", "kernels", "reward", "sync", "learner", "pipeline")
EXPLICIT = ("soak",)
"""Suites run only when named: the soak kills actors at random for minutes."""


def machine() -> str:
    """A short description of where the numbers were measured."""
    import os

    import torch

    desc = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        desc += f", {props.name} (CUDA {torch.version.cuda}, driver cc {props.major}.{props.minor})"
    else:
        desc += ", no GPU"
    return desc


def to_markdown(rows: list[Row]) -> str:
    lines = [
        "| suite | case | metric | value | baseline | ratio | target | met | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = f"{r.value:.4g}" + (f" ± {r.spread:.2g}" if r.spread is not None else "")
        base = f"{r.baseline:.4g} ({r.baseline_name})" if r.baseline is not None else r.baseline_name
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        met = {True: "yes", False: "**no**", None: ""}[r.met]
        lines.append(
            f"| {r.suite} | {r.case} | {r.metric} | {value} | {base} | {ratio} | {r.target} | {met} | {r.note} |"
        )
    return "\n".join(lines)


def main(suites: list[str], *, quick: bool = False, out: str | None = None) -> int:
    chosen = suites or list(SUITES)
    unknown = [s for s in chosen if s not in SUITES + EXPLICIT]
    if unknown:
        print(f"error: unknown suite(s) {unknown} (known: {', '.join(SUITES + EXPLICIT)})", file=sys.stderr)
        return 2
    rows: list[Row] = []
    for name in chosen:
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{name}")
            got = module.run(quick)
        except Exception as exc:  # one broken suite must not hide the others' numbers
            traceback.print_exc()
            got = [Row(suite=name, case="-", metric="error", value=float("nan"), note=f"failed: {exc}")]
        rows.extend(got)
        print(f"[{name}] {len(got)} rows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    table = to_markdown(rows)
    print(table)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "command": "sana-rl bench "
            + " ".join(([*suites] if suites else []) + (["--quick"] if quick else [])),
        }
        path.write_text(json.dumps({**meta, "rows": [r.as_dict() for r in rows]}, indent=2, default=str))
        path.with_suffix(".md").write_text(
            f"Measured {meta['date']} on {meta['machine']}\n\n`{meta['command']}`\n\n{table}\n"
        )
    return 0
