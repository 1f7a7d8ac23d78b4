"""The `sana-rl` command line. Recipes describe runs; the CLI only picks what to do with one.

    sana-rl check-recipe recipes/*.yaml
    sana-rl run recipes/tiny.yaml [--set learner.optim.lr=1e-4] [--dry-run] [--resume | --no-resume]
    sana-rl eval runs/tiny [--seeds-per-prompt 32] [--num-prompts N] [--seed S] [--steps N] [--out DIR]
    sana-rl submit recipes/sol_rl.yaml --address http://127.0.0.1:8265
    sana-rl serve-reward --scorer composition --port 50051
    sana-rl bench [SUITE ...] [--quick] [--out results.json]

Exit status 2 means the input was wrong (a recipe field, a path, an impossible resource request);
nothing was started.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sana-rl", description="RL post-training for the Sana DiT.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-recipe", help="validate recipes strictly; exit 2 naming the bad field")
    c.add_argument("recipes", nargs="+")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    r = sub.add_parser("run", help="run a recipe (embedded local Ray unless cluster.address is set)")
    r.add_argument("recipe")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument(
        "--dry-run", action="store_true", help="print plan, memory estimate and config; start nothing"
    )
    g = r.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=None)
    g.add_argument("--no-resume", dest="resume", action="store_false")

    e = sub.add_parser(
        "eval", help="evaluate a finished run's starting and final weights again, on more prompts and seeds"
    )
    e.add_argument("run_dir")
    e.add_argument("--num-prompts", type=int, default=None, help="default: the run's eval.num_prompts")
    e.add_argument(
        "--seeds-per-prompt", type=int, default=None, help="default: the run's eval.seeds_per_prompt"
    )
    e.add_argument(
        "--seed", type=int, default=None, help="first evaluation seed (default: the run's eval.seed)"
    )
    e.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's eval.steps)")
    e.add_argument("--out", default=None, help="default: RUN_DIR/eval-<prompts>x<seeds>-seed<seed>")

    s = sub.add_parser("submit", help="submit a recipe as a Ray job to a running cluster")
    s.add_argument("recipe")
    s.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"))
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--no-wait", action="store_true", help="return after submission instead of following logs")

    v = sub.add_parser("serve-reward", help="serve one reward scorer over gRPC")
    v.add_argument("--scorer", required=True)
    v.add_argument(
        "--host", default="127.0.0.1", help="bind address; anything but loopback needs --token-file"
    )
    v.add_argument("--port", type=int, default=50051)
    v.add_argument("--device", default=None, help="torch device for scorers that use one (e.g. cuda:0)")
    v.add_argument("--weights", default=None, help="local path of the scorer's weights")
    v.add_argument("--max-batch", type=int, default=32)
    v.add_argument("--max-wait-ms", type=float, default=5.0)
    v.add_argument("--queue-size", type=int, default=256)
    v.add_argument("--token-file", default=None)
    v.add_argument("--tls-cert", default=None)
    v.add_argument("--tls-key", default=None)
    v.add_argument("--tls-ca", default=None, help="CA for client certificates (mutual TLS)")
    v.add_argument("--scorer-arg", action="append", default=[], metavar="KEY=VALUE")

    b = sub.add_parser("bench", help="benchmark suites, each as a ratio to its baseline in the same run")
    b.add_argument("suites", nargs="*")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--out", default=None)
    return p


def _check(recipes: list[str], overrides: list[str]) -> int:
    from orchestrator.config import load_recipe
    from orchestrator.schema import ConfigError

    status = 0
    for path in recipes:
        try:
            cfg = load_recipe(path, overrides)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        print(f"ok: {path} ({cfg.run.mode}, {cfg.model.preset})")
    return status


def _run(args: argparse.Namespace) -> int:
    from orchestrator.config import load_recipe
    from orchestrator.launch import BadInput, launch
    from orchestrator.schema import ConfigError

    try:
        cfg = load_recipe(args.recipe, args.overrides)
        return launch(cfg, recipe=Path(args.recipe), dry_run=args.dry_run, resume=args.resume)
    except (ConfigError, BadInput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _eval(args: argparse.Namespace) -> int:
    from orchestrator.evaluate import EvalRequest, evaluate_run
    from orchestrator.launch import BadInput
    from orchestrator.schema import ConfigError

    request = EvalRequest(
        num_prompts=args.num_prompts, seeds_per_prompt=args.seeds_per_prompt, seed=args.seed, steps=args.steps
    )
    try:
        evaluate_run(Path(args.run_dir), request, Path(args.out) if args.out else None)
    except (ConfigError, BadInput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _submit(args: argparse.Namespace) -> int:
    from orchestrator.config import load_recipe
    from orchestrator.schema import ConfigError
    from orchestrator.submit import submit

    try:
        load_recipe(args.recipe, args.overrides)  # fail here, not on the cluster
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return submit(args.recipe, address=args.address, overrides=args.overrides, follow=not args.no_wait)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from rewards.server import serve

    kwargs: dict[str, object] = {}
    if args.device:
        kwargs["device"] = args.device
    if args.weights:
        kwargs["weights"] = args.weights
    for item in args.scorer_arg:
        key, _, value = item.partition("=")
        kwargs[key] = value
    try:
        asyncio.run(
            serve(
                args.scorer,
                host=args.host,
                port=args.port,
                max_batch=args.max_batch,
                max_wait_ms=args.max_wait_ms,
                queue_size=args.queue_size,
                token_file=args.token_file,
                tls_cert=args.tls_cert,
                tls_key=args.tls_key,
                tls_ca=args.tls_ca,
                scorer_kwargs=kwargs,
            )
        )
    except (ValueError, TypeError) as exc:  # unknown scorer, bad or unexpected scorer arguments
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        pass
    return 0


def _bench(args: argparse.Namespace) -> int:
    from bench.run import main as bench_main

    return bench_main(args.suites, quick=args.quick, out=args.out)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "check-recipe": lambda a: _check(a.recipes, a.overrides),
        "run": _run,
        "eval": _eval,
        "submit": _submit,
        "serve-reward": _serve,
        "bench": _bench,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
