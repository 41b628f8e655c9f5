"""``tocoad storage|data|models``: the local S3 server, the dataset registry and the model registry."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _store(role: str | None = None):
    from storage.store import ArtifactStore

    return ArtifactStore(progress=os.environ.get("TOCOAD_PROGRESS", "1") != "0", settings=_settings(role))


def _settings(role: str | None):
    from storage.settings import resolve_settings

    return resolve_settings(role)


def resolve_data(data: str) -> Path:
    """A local dataset folder for ``--data``: a path, or a registry dataset (fetched and verified)."""
    from storage.datasets import DatasetRegistry, parse_dataset_uri

    ref = parse_dataset_uri(data)
    if ref is None:
        return Path(data)
    folder = DatasetRegistry(_store()).fetch(*ref)
    print(f"dataset {ref[0]}@{ref[1]} -> {folder}")
    return folder


def input_bundle(ref: str | Path, scratch: Path) -> Path:
    """A local bundle folder for ``--from``/``--bundle``: a path, or an S3 prefix pulled (verified) to ``scratch``."""
    if not str(ref).startswith("s3://"):
        return Path(ref)
    from storage.registry import parse_s3_uri, pull_bundle

    bucket, prefix = parse_s3_uri(str(ref))
    return pull_bundle(_store(), bucket, prefix, scratch)


def published(uri: str | Path, marker: str = "manifest.json") -> bool:
    """Whether an S3 output (a stage's bundle or report) is already committed; always False for local paths."""
    if not str(uri).startswith("s3://"):
        return False
    from storage.registry import parse_s3_uri

    bucket, prefix = parse_s3_uri(str(uri))
    return _store().stat(bucket, f"{prefix}/{marker}") is not None


def publish(folder: Path, uri: str, marker: str = "manifest.json") -> None:
    """Upload a stage's output folder to an S3 prefix, the ``marker`` file last (it commits the output)."""
    from components.bundle import file_index
    from storage.registry import parse_s3_uri, push_bundle
    from storage.trees import push_tree

    store = _store()
    bucket, prefix = parse_s3_uri(uri)
    if marker == "manifest.json":
        push_bundle(store, bucket, prefix, folder)
        return
    push_tree(store, bucket, prefix, folder, file_index(folder, exclude=marker), resume=True)
    store.put_file(bucket, f"{prefix}/{marker}", Path(folder) / marker)


def download_prefix(uri: str, dest: Path) -> Path:
    """Copy every object under an S3 prefix (e.g. an evaluation report) into a local folder, verified.

    Every key must name a path inside ``dest``; one that does not stops the copy before it writes anything.
    """
    from components.bundle import safe_relpath
    from storage.registry import parse_s3_uri

    store = _store()
    bucket, prefix = parse_s3_uri(uri)
    targets = {
        key: safe_relpath(key[len(prefix) + 1 :], Path(dest)) for key in store.list(bucket, prefix + "/")
    }
    for key, target in targets.items():
        store.get_file(bucket, key, target)
    return Path(dest)


# ---------------------------------------------------------------- storage
def cmd_storage(args: argparse.Namespace) -> int:
    """Start, check or stop the local S3 server."""
    from storage.local_server import LocalS3

    server = LocalS3()
    if args.action == "up":
        state = server.up()
        print(f"local S3 server running: http://{state['endpoint']}  (pid {state['pid']})")
        print(f"data: {state['data_dir']}\ncredentials: {server.credentials_file} (readable only by you)")
    elif args.action == "status":
        state = server.status()
        if state is None:
            print(f"local S3 server: not running (home {server.home})")
            return 1
        print(json.dumps({**state, "credentials": str(server.credentials_file)}, indent=2))
    else:
        print("local S3 server stopped" if server.down() else "local S3 server was not running")
    return 0


# ---------------------------------------------------------------- data
def cmd_data_push(args: argparse.Namespace) -> int:
    """Push a folder of images as a new dataset version; print the version, and each skipped file on stderr."""
    from storage.datasets import DatasetRegistry

    def report(rel: str, why: str) -> None:
        print(f"skipped {rel}: {why}", file=sys.stderr)

    reg = DatasetRegistry(_store(args.role))
    version = reg.push(Path(args.dir), args.name, note=args.note or "", report=report)
    print(version)
    announce_dataset(args.name, version)
    return 0


def announce_dataset(name: str, version: str) -> None:
    """Emit the Prefect event ``tocoad.dataset.pushed`` (it triggers ``retrain-on-new-data``) when a Prefect
    API is configured; without one there is nobody to tell."""
    if not os.environ.get("PREFECT_API_URL"):
        return
    from prefect.events import emit_event

    emit_event(
        event="tocoad.dataset.pushed",
        resource={"prefect.resource.id": f"tocoad.dataset.{name}", "prefect.resource.name": name},
        payload={"version": version},
    )


def cmd_data_list(args: argparse.Namespace) -> int:
    """List datasets and their versions; a version whose files do not match its manifest shows as damaged."""
    from components.datasets import is_mask
    from storage.datasets import DatasetRegistry, manifest_files

    reg = DatasetRegistry(_store())
    for name in [args.name] if args.name else reg.names():
        for version in reg.versions(name):
            m = reg.manifest(name, version)
            if problems := reg.check(name, version, m):
                state = f"damaged ({len(problems)} problem(s): {problems[0]})"
            else:
                status = reg.get_extra(name, version, "status.json")
                state = json.loads(status)["state"] if status else "-"
            masks = sum(map(is_mask, manifest_files(m)))
            print(
                f"{name}\t{version}\t{len(manifest_files(m)) - masks} images, {masks} masks\t"
                f"{m.get('bytes', 0) / 1e6:.1f} MB\t{state}\t{m.get('note', '')}"
            )
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    """Download a dataset version (verified) and print its folder."""
    from storage.datasets import DatasetRegistry

    name, _, ref = args.ref.partition("@")
    print(DatasetRegistry(_store()).fetch(name, ref or "latest", Path(args.out) if args.out else None))
    return 0


# ---------------------------------------------------------------- models
def _registry(role: str | None = None):
    from storage.registry import ModelRegistry

    return ModelRegistry(_store(role))


def _metric_text(metrics: dict) -> str:
    section = metrics.get("tocoad", metrics)
    return "  ".join(f"{k}={v:.2f}" for k, v in section.items() if isinstance(v, int | float))


def cmd_models_list(args: argparse.Namespace) -> int:
    """List models, their versions and which version each alias points to."""
    reg = _registry()
    for name in [args.name] if args.name else reg.models():
        aliases = {
            a: (rec or {}).get("version") for a in ("production", "candidate") if (rec := reg.alias(name, a))
        }
        for version in reg.versions(name):
            tags = ",".join(a for a, v in aliases.items() if v == version)
            print(f"{name}\t{version}\t{tags or '-'}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    """Show one version's manifest summary, the aliases and the promotion history."""
    reg = _registry()
    info = reg.info(args.name, args.ref)
    m = info.manifest
    out = {
        "name": info.name,
        "version": info.version,
        "uri": reg.uri(info.name, info.version),
        "created": m.get("created"),
        "stages": m.get("stages"),
        "metrics": m.get("metrics"),
        "files": {k: v["bytes"] for k, v in m.get("files", {}).items()},
        "aliases": {a: reg.alias(args.name, a) for a in ("production", "candidate")},
        "history": reg.history(args.name),
    }
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_models_promote(args: argparse.Namespace) -> int:
    """Point production at a version (default: the candidate)."""
    rec = _registry().promote(args.name, args.ref, reason=args.reason)
    print(f"{args.name}: production = {rec['version']} (was {rec['previous']})")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    """Point production back at the version it replaced (or --to VERSION)."""
    rec = _registry().rollback(args.name, to=args.to, reason=args.reason)
    print(f"{args.name}: production = {rec['version']} (was {rec['previous']})")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    """Download a version (verified) and print its folder."""
    print(_registry(args.role).pull(args.name, args.ref, Path(args.out) if args.out else None))
    return 0


def cmd_models_prune(args: argparse.Namespace) -> int:
    """Delete old versions, keeping the newest N and every aliased one; drop stale cut-off uploads."""
    deleted = _registry().prune(args.name, args.keep, stale_after_s=args.stale_hours * 3600)
    print(f"deleted {len(deleted)} version(s): {' '.join(deleted) or '-'}")
    return 0


def cmd_data_prune(args: argparse.Namespace) -> int:
    """Drop stale cut-off pushes and incomplete uploads of a dataset (and old versions with --keep)."""
    from storage.datasets import DatasetRegistry

    deleted = DatasetRegistry(_store()).prune(args.name, args.keep, stale_after_s=args.stale_hours * 3600)
    print(f"deleted {len(deleted)} version(s): {' '.join(deleted) or '-'}")
    return 0


def _stale_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--stale-hours",
        type=float,
        default=24.0,
        help="cut-off uploads older than this are removed (default 24; 0 removes every one, even a running one)",
    )


def register_trained(bundle: Path, name: str, keep: int | None) -> str:
    """``train --to-registry``: upload the bundle as a new candidate version; return its URI."""
    reg = _registry()
    info = reg.register(name, bundle, alias="candidate", reason="trained")
    if keep:
        reg.prune(name, keep)
    return reg.uri(name, info.version)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the storage, data and models subcommands."""
    role_help = (
        "S3 identity on the local server (admin, predictor, uploader); default $TOCOAD_S3_ROLE or admin"
    )
    sp = sub.add_parser("storage", help="the local S3 server: up | status | down")
    sp.add_argument("action", choices=["up", "status", "down"])
    sp.set_defaults(func=cmd_storage)

    data = sub.add_parser("data", help="dataset registry: push | list | fetch | prune").add_subparsers(
        dest="data_cmd", required=True
    )
    sp = data.add_parser("push", help="upload a folder of images as a new dataset version (prints it)")
    sp.add_argument("dir")
    sp.add_argument("--name", required=True)
    sp.add_argument("--note", help="free text kept in the manifest")
    sp.add_argument("--role", help=role_help)
    sp.set_defaults(func=cmd_data_push)
    sp = data.add_parser("list", help="datasets and versions")
    sp.add_argument("name", nargs="?")
    sp.set_defaults(func=cmd_data_list)
    sp = data.add_parser("fetch", help="download a version, verified: NAME[@VERSION]")
    sp.add_argument("ref")
    sp.add_argument("--out", help="folder (default: the local cache)")
    sp.set_defaults(func=cmd_data_fetch)
    sp = data.add_parser(
        "prune", help="drop cut-off pushes and stale incomplete uploads (old versions: --keep)"
    )
    sp.add_argument("name")
    sp.add_argument("--keep", type=int, help="also delete all but the newest N committed versions")
    _stale_option(sp)
    sp.set_defaults(func=cmd_data_prune)

    models = sub.add_parser("models", help="model registry: list | show | promote | rollback | pull | prune")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    sp = msub.add_parser("list", help="models, versions and aliases")
    sp.add_argument("name", nargs="?")
    sp.set_defaults(func=cmd_models_list)
    sp = msub.add_parser("show", help="one version: manifest, aliases, history")
    sp.add_argument("name")
    sp.add_argument(
        "ref", nargs="?", default="production", help="version, alias or latest (default production)"
    )
    sp.set_defaults(func=cmd_models_show)
    sp = msub.add_parser("promote", help="make a version production (default: the candidate)")
    sp.add_argument("name")
    sp.add_argument("ref", nargs="?", default="candidate")
    sp.add_argument("--reason", default="promoted by hand")
    sp.set_defaults(func=cmd_models_promote)
    sp = msub.add_parser("rollback", help="production back to the version it replaced")
    sp.add_argument("name")
    sp.add_argument("--to", help="a specific version instead")
    sp.add_argument("--reason", default="rolled back by hand")
    sp.set_defaults(func=cmd_models_rollback)
    sp = msub.add_parser("pull", help="download a version, verified")
    sp.add_argument("name")
    sp.add_argument("ref", nargs="?", default="production")
    sp.add_argument("--out", help="folder (default: the local cache)")
    sp.add_argument("--role", help=role_help)
    sp.set_defaults(func=cmd_models_pull)
    sp = msub.add_parser("prune", help="delete old versions (never an aliased one)")
    sp.add_argument("name")
    sp.add_argument("--keep", type=int, default=10)
    _stale_option(sp)
    sp.set_defaults(func=cmd_models_prune)
