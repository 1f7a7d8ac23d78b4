"""`sana-rl submit RECIPE`: run a recipe as a Ray job on a running cluster, with Ray's token auth.

    sana-rl submit recipes/sol_rl.yaml --address http://127.0.0.1:8265 [--set run.steps=100] [--no-wait]

is the same as typing, from the project root,

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        -- python -m orchestrator run recipes/sol_rl.yaml

The project directory is shipped as the job's working directory (without virtual environments, caches,
run outputs or anything .gitignore names); the cluster's Python must have the project's dependencies.
The job API runs arbitrary code, so it is reached with the cluster's auth token (RAY_AUTH_TOKEN, the
file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token, the order Ray itself uses) as a bearer header;
submission never falls back to an unauthenticated request. Secrets are not put into the job's runtime
environment (the dashboard shows it): the cluster's nodes must have WANDB_API_KEY and reward tokens
themselves.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.schema import ConfigError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXCLUDES = [".git", ".venv", ".venv-*", "runs", "wandb", "**/__pycache__", ".mypy_cache", ".ruff_cache"]
"""Never shipped with the working directory (on top of what .gitignore names)."""


def auth_token() -> str:
    """The Ray auth token this machine would use, looked up the way Ray does; ConfigError if none."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_env) if path_env else Path.home() / ".ray" / "auth_token"
    try:
        token = path.read_text().strip()
    except OSError:
        token = ""
    if not token:
        raise ConfigError(
            f"{'RAY_AUTH_TOKEN_PATH' if path_env else 'auth token'}: no Ray auth token in RAY_AUTH_TOKEN or {path}; "
            "copy the cluster's token there (`ray get-auth-token` on the head node prints it)"
        )
    return token


def job_client(address: str) -> Any:
    """A JobSubmissionClient for `address` (http://host:dashboard_port) that sends the auth token."""
    from ray.job_submission import JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    headers = {"Authorization": f"Bearer {auth_token()}"}
    try:
        return JobSubmissionClient(address, headers=headers)
    except (ConnectionError, RuntimeError) as exc:
        raise ConfigError(f"--address: no Ray job API at {address}: {exc}") from None


def entrypoint(recipe: str, overrides: list[str], *, command: str = "run", root: Path | None = None) -> str:
    """The job's shell command: `python -m orchestrator <command> <recipe relative to root> --set ...`."""
    root = (root or Path.cwd()).resolve()
    path = Path(recipe).resolve()
    if not path.is_file():
        raise ConfigError(f"{recipe}: no such recipe")
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise ConfigError(f"{recipe}: must lie inside the shipped working directory {root}") from None
    args = ["python", "-m", "orchestrator", command, rel.as_posix()]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def submit_job(
    recipe: str,
    *,
    address: str,
    overrides: list[str] | None = None,
    command: str = "run",
    root: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[Any, str]:
    """Submit the recipe; returns (client, job id). `command` is the sana-rl subcommand the job runs
    (`run`; `check-recipe` validates on the cluster); `env` adds non-secret environment variables."""
    root = (root or Path.cwd()).resolve()
    client = job_client(address)
    runtime_env = {
        "working_dir": str(root),
        "excludes": EXCLUDES,
        "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **(env or {})},
    }
    job_id = client.submit_job(
        entrypoint=entrypoint(recipe, overrides or [], command=command, root=root),
        runtime_env=runtime_env,
        metadata={"sana-rl.recipe": Path(recipe).name},
    )
    return client, str(job_id)


def stream_logs(client: Any, job_id: str, *, poll_s: float = 1.0, out: Any = None) -> str:
    """Print the job's log as it grows until the job ends; returns its final status name."""
    out = out or sys.stdout
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out.write(logs[shown:])
            out.flush()
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def submit(recipe: str, *, address: str, overrides: list[str] | None = None, follow: bool = True) -> int:
    """What `sana-rl submit` does: submit, print the job id, follow the logs when asked. Exit status: 0
    submitted (or succeeded when following), 1 failed or stopped, 2 bad input (nothing submitted)."""
    try:
        client, job_id = submit_job(recipe, address=address, overrides=overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"submitted {job_id} to {address}", file=sys.stderr)
    if not follow:
        return 0
    status = stream_logs(client, job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


__all__ = ["auth_token", "entrypoint", "job_client", "stream_logs", "submit", "submit_job"]
