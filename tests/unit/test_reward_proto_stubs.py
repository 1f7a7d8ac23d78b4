"""The committed Python stubs must be what scripts/gen_proto.sh makes from reward.proto today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py")


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    fresh = tmp_path / "sana_rl" / "reward" / "v1"
    committed = ROOT / "proto" / "sana_rl" / "reward" / "v1"
    stale = [name for name in STUBS if (fresh / name).read_bytes() != (committed / name).read_bytes()]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit them"


def test_every_proto_field_and_message_is_commented() -> None:
    lines = (ROOT / "proto" / "sana_rl" / "reward" / "v1" / "reward.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        code = line.strip()
        is_decl = code.endswith(";") and "=" in code and not code.startswith(("option", "syntax"))
        is_decl |= code.startswith(("message ", "enum ", "rpc ", "service "))
        if is_decl:
            assert lines[i - 1].strip().startswith("//"), f"reward.proto:{i + 1} has no comment: {code}"
