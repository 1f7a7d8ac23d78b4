"""`ray start --head` on loopback, then `ray job submit` exactly as a user types it, with token auth on;
and `sana-rl submit`'s SDK path against the same head.

The head runs as `ray start --head --block` in a private temp dir on free ports, and is stopped by
terminating that one process (its Ray children share its fate). `ray stop` is not used: it kills every
Ray process of the machine, including other test sessions' clusters.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from orchestrator.cluster import loopback_env
from orchestrator.submit import stream_logs, submit_job
from tests.integration.test_cluster import bound_sockets, loopback_ip

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Head:
    dashboard: str
    """http://127.0.0.1:<port>: the job API."""
    env: dict[str, str]
    """What a user's shell has: venv on PATH, loopback mode, token mode and the token file."""
    proc: subprocess.Popen[bytes]
    tmp: Path


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_head(tmp: Path) -> Head:
    """`ray start --head --block` bound to 127.0.0.1 with its own token; returns when the job API answers."""
    token = tmp / "auth_token"
    token.write_text(os.urandom(16).hex())
    env = {
        **os.environ, **loopback_env(), "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, metrics = free_ports(5)
    args = [
        RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
        f"--temp-dir={tmp / 'ray'}", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats",
    ]  # fmt: skip
    log = (tmp / "head.log").open("wb")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"ray start exited {proc.returncode}: {(tmp / 'head.log').read_text()[-2000:]}"
            )
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            raise AssertionError("the job API answered without a token")
        except urllib.error.HTTPError as exc:
            assert exc.code == 401, exc  # up, and refusing anonymous requests
            return Head(dashboard=url, env=env, proc=proc, tmp=tmp)
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("ray start --head did not bring up the job API in 90 s")


def stop_head(head: Head) -> list[psutil.Process]:
    """Terminate the `ray start --block` process (our own, by pid); returns Ray processes left alive."""
    children = psutil.Process(head.proc.pid).children(recursive=True)
    head.proc.send_signal(signal.SIGTERM)
    head.proc.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=20)
    for p in alive:  # only processes this test started
        p.kill()
    return alive


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    # A short path: Ray's unix sockets live under the temp dir and must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="srl-head-", dir="/tmp"))
    head = start_head(tmp)
    try:
        yield head
    finally:
        leftover = stop_head(head)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not leftover, f"Ray processes outlived their head: {leftover}"


def cli_submit(head: Head, entrypoint: list[str], working_dir: Path) -> subprocess.CompletedProcess[str]:
    """`ray job submit --address URL --working-dir . -- <entrypoint>`, typed in `working_dir`."""
    return subprocess.run(
        [RAY, "job", "submit", "--address", head.dashboard, "--working-dir", ".", "--", *entrypoint],
        cwd=working_dir, env=head.env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.ray
def test_ray_job_submit_on_a_loopback_head_with_token_auth(head: Head) -> None:
    job_dir = head.tmp / "job"
    job_dir.mkdir()
    (job_dir / "entry.py").write_text(
        "import ray\nray.init()\nprint('ANSWER', ray.get(ray.put(41)) + 1, ray.util.get_node_ip_address())\n"
    )
    done = cli_submit(head, ["python", "entry.py"], job_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ANSWER 42 127.0.0.1" in done.stdout
    assert "succeeded" in done.stdout + done.stderr

    # Without the token the job API refuses (token auth stays on).
    anonymous = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    anonymous["HOME"] = str(head.tmp)  # no ~/.ray/auth_token there
    refused = subprocess.run(
        [RAY, "job", "list", "--address", head.dashboard],
        env=anonymous,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    # Every socket the head's processes listen on is on loopback: dashboard and job agent included.
    procs = [psutil.Process(head.proc.pid), *psutil.Process(head.proc.pid).children(recursive=True)]
    sockets = bound_sockets(procs)
    assert any(port == int(head.dashboard.rsplit(":", 1)[1]) for _, _, port in sockets)
    assert not [s for s in sockets if not loopback_ip(s[1])], sockets


@pytest.mark.ray
def test_sana_rl_submit_ships_the_project_and_runs_the_recipe_command(
    head: Head, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", head.env["RAY_AUTH_TOKEN_PATH"])
    client, job_id = submit_job(
        str(REPO / "recipes/tiny.yaml"), address=head.dashboard, command="check-recipe", root=REPO,
        overrides=["run.steps=3"],
    )  # fmt: skip
    out = io.StringIO()
    status = stream_logs(client, job_id, poll_s=0.5, out=out)
    assert status == "SUCCEEDED", out.getvalue()[-3000:]
    assert "ok: recipes/tiny.yaml (sol_rl, tiny)" in out.getvalue()
    info = client.get_job_info(job_id)
    assert info.entrypoint == "python -m orchestrator check-recipe recipes/tiny.yaml --set run.steps=3"


def test_entrypoint_and_token_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.schema import ConfigError
    from orchestrator.submit import auth_token, entrypoint

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a b.yaml").write_text("run: {}\n")
    cmd = entrypoint(str(tmp_path / "recipes" / "a b.yaml"), ["run.name=x y"], root=tmp_path)
    assert cmd == "python -m orchestrator run 'recipes/a b.yaml' --set 'run.name=x y'"
    with pytest.raises(ConfigError, match="must lie inside the shipped working directory"):
        entrypoint(str(tmp_path / "recipes" / "a b.yaml"), [], root=tmp_path / "recipes" / "sub")
    with pytest.raises(ConfigError, match="no such recipe"):
        entrypoint(str(tmp_path / "missing.yaml"), [], root=tmp_path)

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    with pytest.raises(ConfigError, match="no Ray auth token"):
        auth_token()
    (tmp_path / "tok").write_text("from-file\n")
    assert auth_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"


@pytest.mark.ray
def test_ray_job_submit_runs_the_tiny_recipe_as_written(head: Head) -> None:
    """`ray job submit --working-dir . -- recipes/tiny.yaml` (the recipe's shebang runs sana-rl)."""
    small = [
        "run.init_recipe=null", "run.steps=1", "run.checkpoint_every=0", "eval.num_prompts=1",
        "eval.seeds_per_prompt=1", "eval.steps=2", "rollout.prompts_per_step=1", "rollout.num_seeds=4",
        "rollout.keep=2", "rollout.preview_steps=1", "rollout.final_steps=2", "logging.wandb=disabled",
        "resources.learner_cpus=0.5", "resources.generator_cpus=0.5", "resources.reward_cpus=0.25",
    ]  # fmt: skip
    sets = [arg for item in small for arg in ("--set", item)]
    done = cli_submit(head, ["recipes/tiny.yaml", *sets], REPO)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "== tiny: sol_rl, 1 steps" in done.stdout
    assert "succeeded" in done.stdout + done.stderr
