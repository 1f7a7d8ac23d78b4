"""RewardHost under another interpreter: `RewardSpec.python` really moves the service into that venv.

test_reward_host.py passes our own interpreter, which cannot tell whether Ray used it. Here the host runs
under a throwaway venv made in tmp_path (`python -m venv --without-pip`, under a second) that borrows this
project's packages through a .pth file, so CI needs no second real environment (make env-hpsv2 /
env-imagereward build those; their tests run there).
"""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator.schema import ConfigError, from_dict
from rewards.client import RewardClientConfig, RewardClientSync, RewardSpec


def _borrowing_venv(root: Path) -> Path:
    """A bare venv whose site-packages reaches ours; returns its interpreter."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(root)], check=True, timeout=60)
    python = root / "bin" / "python"
    own_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    # addsitedir, not a bare path line: it also runs our site-packages' own .pth files (the editable
    # install of this project and its generated proto stubs).
    lines = [f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()]
    (Path(own_site) / "borrow_main_venv.pth").write_text("\n".join(lines) + "\n")
    return python


@pytest.mark.ray
def test_reward_host_runs_under_the_spec_interpreter(ray_cluster: dict[str, object], tmp_path: Path) -> None:
    import ray

    from actors.reward_host import launch_reward_host
    from rewards.server import ServerConfig

    venv = tmp_path / "scorer-venv"
    spec = RewardSpec(name="jpeg", scorer="jpeg_compressibility", python=str(_borrowing_venv(venv)))
    host = launch_reward_host(spec, server=ServerConfig(max_batch=4), num_cpus=0.5, max_restarts=0)
    client = None
    try:
        address = ray.get(host.start.remote(), timeout=120)
        prefix, executable = ray.get(host.__ray_call__.remote(lambda self: _interpreter()), timeout=60)
        assert Path(prefix) == venv and Path(executable).parent == venv / "bin"
        assert Path(sys.prefix) != venv  # the driver stayed where it was

        client = RewardClientSync(
            RewardClientConfig(rewards=[RewardSpec(name="jpeg", scorer=spec.scorer, address=address)])
        )
        images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
        scores = client.score_sync(images, ["a", "b"])
        assert scores.ok.all() and (scores.raw["jpeg"] < 0).all()
    finally:
        if client is not None:
            client.close()
        ray.kill(host)


def _interpreter() -> tuple[str, str]:
    return sys.prefix, sys.executable


def test_a_missing_interpreter_is_named_before_ray_starts_anything(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.python: .*no-venv/bin/python.* not an executable"):
        from_dict(
            RewardClientConfig, {"rewards": [{"name": "ir", "scorer": "imagereward", "python": missing}]}
        )

    from actors.reward_host import launch_reward_host

    with pytest.raises(ValueError, match="python: "):  # a spec built in code, not from a recipe
        launch_reward_host(RewardSpec(name="ir", scorer="imagereward", python=missing))
