"""The ``tocoad`` command line: train, evaluate, predict, demo, config.

Errors that a user can fix (bad config, bad path, unreadable image, damaged bundle, S3 trouble) print one clear message and
exit with a status that says which (2 bad input or settings, 3 storage unreachable, 4 access denied, 5 checksum
mismatch, in S3 or in a local bundle); nothing prints a traceback unless ``TOCOAD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

EXIT_USAGE = 2


def exit_code(exc: BaseException, default: int) -> int:
    """The ``exit_code`` of ``exc`` or of an error it was raised from (a wrapped checksum error still exits 5)."""
    chain: BaseException | None = exc
    for _ in range(16):  # a cause chain is short; the bound guards against a cycle
        if chain is None:
            break
        if isinstance(code := getattr(chain, "exit_code", None), int):
            return code
        chain = chain.__cause__
    return default


def _config(args: argparse.Namespace):
    from components.config import TocoadConfig

    cfg = TocoadConfig.from_yaml(args.config) if getattr(args, "config", None) else TocoadConfig()
    return cfg.with_overrides(getattr(args, "set", None) or [])


def cmd_config(args: argparse.Namespace) -> int:
    """Print the default config (or the one given) with every setting's doc."""
    text = _config(args).to_yaml(with_docs=True)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train all stages, or one stage from the previous one's output (local folders or S3 URIs)."""
    from components.pipeline import bundle_config, train
    from tocoad.cli_storage import input_bundle, publish, published, register_trained, resolve_data

    if args.out is None and not args.to_registry:
        raise ValueError("say where the bundle goes: --out DIR|s3://..., or --to-registry NAME (or both)")
    if args.out and published(args.out):  # a stage job re-run after its output landed: nothing to do
        print(f"bundle: {args.out} exists already (cached); nothing to do")
        return 0
    with tempfile.TemporaryDirectory(prefix="tocoad-train-") as scratch:
        source = input_bundle(args.source, Path(scratch) / "from") if args.source else None
        cfg = _config(args)
        if args.stage and args.stage != "d" and source and not args.config:
            # continue with the config the earlier stages used; --set changes it from there
            cfg = bundle_config(source).with_overrides(args.set or [])
        if os.environ.get("TOCOAD_PROGRESS") == "0":  # a job whose output goes to a log: no progress bars
            cfg = cfg.with_overrides(["runtime.progress=false"])
        remote = bool(args.out) and str(args.out).startswith("s3://")
        out = Path(args.out) if args.out and not remote else Path(scratch) / "bundle"
        art = train(
            cfg, resolve_data(args.data), out, stage=args.stage, previous=source, overwrite=args.overwrite
        )
        seconds = art.metrics.get("stage_seconds", {})
        if remote:
            publish(out, args.out)
        print(f"bundle: {args.out or '(temporary)'}  (stages: {', '.join(art.stages)}; seconds: {seconds})")
        if art.calibration is not None:
            cal = art.metrics.get("calibration", {})
            sanity = art.calibration.image.synthetic_recall
            print(
                f"threshold: {art.calibration.threshold:.4f} (target false-alarm rate "
                f"{art.cfg.calibration.false_alarm_rate:g}, from {cal.get('normal_images', '?')} out-of-fold normal "
                f"scores, {cal.get('method', '?')})"
                + ("" if sanity is None else f"; synthetic anomalies caught: {100 * sanity:.0f} %")
            )
        if args.to_registry:
            print(f"registered candidate: {register_trained(out, args.to_registry, args.keep)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a bundle on a labelled test split and write the report (local folders or S3 URIs)."""
    from components.evaluate import evaluate
    from tocoad.cli_storage import input_bundle, publish, published, resolve_data

    if args.out and published(args.out, marker="metrics.json"):
        print(f"metrics: {args.out} exist already (cached); nothing to do")
        return 0
    with tempfile.TemporaryDirectory(prefix="tocoad-eval-") as scratch:
        bundle = input_bundle(args.bundle, Path(scratch) / "bundle")
        remote = bool(args.out) and str(args.out).startswith("s3://")
        if args.out and not remote:
            out = Path(args.out)
        else:
            out = Path(scratch) / "report" if remote else bundle.with_name(bundle.name + "-report")
        metrics = evaluate(bundle, resolve_data(args.data), out, progress=not args.quiet)
        _print_metrics(metrics)
        if remote:
            publish(out, args.out, marker="metrics.json")
            out = args.out
        print(f"metrics: {out}/metrics.json")
        print(f"report:  {out}/index.html")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Score images with a bundle: raw score, normalised score, label and threshold per image."""
    from components.predict import heatmap_paths, predict_files

    images = [Path(p) for p in args.images]
    if args.heatmaps is not None and (old := [t for t in heatmap_paths(images, args.heatmaps) if t.exists()]):
        print(f"replacing {len(old)} existing heatmap(s) in {args.heatmaps}, e.g. {old[0]}", file=sys.stderr)
    results = predict_files(Path(args.bundle), images, heatmap_dir=args.heatmaps)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(
                f"{r['path']}\tscore={r['score']:.4f}\tnormalized={r['normalized']:.3f}\t{r['label']}"
                f"\tthreshold={r['threshold']:.4f}"
                + (f"\theatmap={r['heatmap']}" if r.get("heatmap") else "")
            )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job, end to end from an empty machine: demo data -> dataset registry -> retraining flow -> predictor.

    The flow validates the images, runs the three stage jobs as local jobs (stage D and the contrastive stage pass
    their input on under the default config, which keeps F frozen), evaluates, registers the candidate and promotes
    it; the evaluation report is copied to ``OUT/report``. Then the predictor serves the production model on
    127.0.0.1:8080 (another free port if that one is taken) and answers a few demo images.
    """
    from components.demo_data import make_demo_dataset
    from storage.datasets import DatasetRegistry
    from tocoad.cli_flow import config_dict, run_flow
    from tocoad.cli_storage import _store, download_prefix

    out = Path(args.out)
    data = out / "data"
    print(f"making demo data in {data}")  # again each time (seconds): an earlier demo's data may be older
    make_demo_dataset(data, seed=0)
    config = config_dict(args.config, args.set)
    store = _store()
    version = DatasetRegistry(store).push(data, "demo", note="tocoad demo data")
    print(f"pushed {data} as dataset demo@{version} ({store.describe()['endpoint']})")
    result = run_flow("demo", "demo", config, dataset_version=version)
    metrics = result["candidate_metrics"] or {}
    _print_metrics(metrics)
    report = download_prefix(result["evaluations"]["candidate"], out / "report")
    print(f"candidate: {result['candidate']}  promoted: {result['promoted']} ({result['reason']})")
    print(f"report:  {report / 'index.html'}")
    from tocoad.demo_serving import serve_and_probe

    serve_and_probe("demo", data, out)
    return 0


def _print_metrics(metrics: dict) -> None:
    """The evaluation's metrics, and the confusion counts at the model's threshold."""
    for model in ("tocoad", "discriminator"):
        if model in metrics:
            vals = "  ".join(f"{k}={v:.2f}" for k, v in metrics[model].items())
            print(f"{model:>13}: {vals}")
    at = metrics.get("tocoad", {})
    if "misses_at_threshold" in at and "n_defective" in metrics:
        defective, good = metrics["n_defective"], metrics["n_test"] - metrics["n_defective"]
        print(
            f"at the threshold: {defective - at['misses_at_threshold']} of {defective} defective images found, "
            f"{at['false_alarms_at_threshold']} false alarm(s) among {good} good images"
        )


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options."""
    p = argparse.ArgumentParser(prog="tocoad", description="ToCoAD industrial anomaly detection.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help="YAML config (defaults: `tocoad config`)")
        sp.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting")

    sp = sub.add_parser("config", help="print the config with documented defaults")
    with_config(sp)
    sp.add_argument("--out", type=Path, help="write to this file instead of printing")
    sp.set_defaults(func=cmd_config)

    sp = sub.add_parser("train", help="train a model bundle (all stages, or one with --stage)")
    sp.add_argument(
        "--data",
        required=True,
        help="dataset folder (MVTec, VisA, BTAD layout or a folder of images), or s3://datasets/NAME[/VERSION]",
    )
    sp.add_argument(
        "--out", help="output bundle: a directory, or s3://models/... (skipped when it exists there)"
    )
    sp.add_argument(
        "--to-registry", metavar="NAME", help="upload the bundle as a new candidate version of NAME"
    )
    sp.add_argument(
        "--keep", type=int, help="with --to-registry: prune to the newest N versions (aliased kept)"
    )
    sp.add_argument("--stage", choices=["d", "c", "bank"], help="run only this stage")
    sp.add_argument(
        "--from",
        dest="source",
        help="the previous stage's output, a directory or s3://... (for --stage c|bank)",
    )
    sp.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
    with_config(sp)
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("evaluate", help="metrics and HTML report on a labelled test split")
    sp.add_argument("--bundle", required=True, help="a bundle directory or s3://models/NAME/VERSION")
    sp.add_argument("--data", required=True, help="dataset folder or s3://datasets/NAME[/VERSION]")
    sp.add_argument("--out", help="report directory or s3://... (default: BUNDLE-report)")
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("predict", help="score images")
    sp.add_argument("--bundle", required=True)
    sp.add_argument("images", nargs="+")
    sp.add_argument(
        "--heatmaps",
        type=Path,
        help="save heatmap overlays (PNG) into this folder, keeping the images' sub-folders "
        "below their common folder (test/crack/000.png -> DIR/crack/000_heatmap.png)",
    )
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_predict)

    sp = sub.add_parser(
        "demo",
        help="the main job: demo data -> S3 registry -> retraining flow -> promoted model served on :8080",
        description="Make the demo data, push it to the local S3 registry, run the retraining flow (validate, "
        "train, evaluate, register, promote) and start the predictor on the promoted model (127.0.0.1:8080), "
        "which answers a few demo requests. The S3 server and the predictor keep running; the demo prints "
        "how to stop them.",
    )
    sp.add_argument("--out", default="runs/demo", help="working folder (default runs/demo)")
    with_config(sp)
    sp.set_defaults(func=cmd_demo)

    from tocoad import cli_flow, cli_serve, cli_storage

    cli_storage.add_parsers(sub)
    cli_flow.add_parsers(sub)
    cli_serve.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tocoad`` script."""
    args = build_parser().parse_args(argv)
    if os.environ.get("TOCOAD_DEBUG") == "1":
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # our errors are ValueError subclasses with a clear text
        print(f"error: {exc}", file=sys.stderr)
        return exit_code(exc, EXIT_USAGE)
    except RuntimeError as exc:  # e.g. out of memory inside torch, or the local S3 server failing to start
        print(f"error: {exc}\n(set TOCOAD_DEBUG=1 for a traceback)", file=sys.stderr)
        return exit_code(exc, 1)


if __name__ == "__main__":
    sys.exit(main())
