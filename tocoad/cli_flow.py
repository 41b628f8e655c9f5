"""``tocoad flow run``: the retraining flow on embedded defaults (ephemeral Prefect, local S3, local runner)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def _prefect_defaults() -> None:
    # the ephemeral Prefect server starts slowly on a busy 2-core machine; its default 20 s is too tight
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from a closed network


def config_dict(config_file: Path | None, sets: list[str] | None) -> dict[str, Any]:
    """The flow's ``config`` parameter from a YAML file and ``--set section.key=value`` items."""
    import yaml

    out: dict[str, Any] = {}
    if config_file:
        for section, values in (yaml.safe_load(Path(config_file).read_text()) or {}).items():
            for key, value in (values or {}).items():
                out[f"{section}.{key}"] = value
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_flow(
    dataset: str, model: str, config: dict[str, Any], runner: str = "local", **kw: Any
) -> dict[str, Any]:
    """Run the retraining flow in this process and return its summary."""
    _prefect_defaults()
    from flows.retrain import retrain

    return retrain(
        dataset=dataset, model_name=model, config=config, runner=runner, **kw
    )  # kw: return_state, ...


def cmd_flow_run(args: argparse.Namespace) -> int:
    """Optionally push a folder as a new dataset version, then run the retraining flow on it."""
    if args.push:
        from storage.datasets import DatasetRegistry
        from tocoad.cli_storage import _store

        version = DatasetRegistry(_store()).push(Path(args.push), args.dataset)
        print(f"pushed {args.push} as {args.dataset}@{version}")
    result = run_flow(
        args.dataset,
        args.model or args.dataset,
        config_dict(args.config, args.set),
        runner=args.runner,
        eval_dataset=args.eval_dataset,
        deploy_model=not args.no_deploy,
    )
    print(json.dumps(result, indent=2, default=str))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``flow run``."""
    flow = sub.add_parser("flow", help="the retraining flow (Prefect)").add_subparsers(
        dest="flow_cmd", required=True
    )
    sp = flow.add_parser("run", help="validate, train (stage jobs), evaluate, register, promote, deploy")
    sp.add_argument("--dataset", required=True, help="dataset name in the registry")
    sp.add_argument("--push", metavar="DIR", help="first push this folder as a new version of --dataset")
    sp.add_argument("--model", help="model name (default: the dataset name)")
    sp.add_argument("--runner", choices=["local", "kubernetes"], default="local")
    sp.add_argument(
        "--eval-dataset", help="fixed validation set in the registry, for data without a test split"
    )
    sp.add_argument("--no-deploy", action="store_true", help="promote but do not notify the predictor")
    sp.add_argument("--config", type=Path, help="YAML config (defaults: `tocoad config`)")
    sp.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting")
    sp.set_defaults(func=cmd_flow_run)
