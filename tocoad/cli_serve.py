"""``tocoad serve``: the KServe predictor on this machine (127.0.0.1 by default)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a registry model (its production alias by default), a storage URI, or a local bundle.

    A local bundle path is checked before the server stack is imported (that takes seconds), so a typo fails
    at once with exit 2.
    """
    os.environ.setdefault("TOCOAD_S3_ROLE", "predictor")  # least privilege: read models only
    if args.bundle:
        if not Path(args.bundle).exists():
            raise FileNotFoundError(f"--bundle {args.bundle}: the path does not exist")
        if not Path(args.bundle).is_dir():
            raise NotADirectoryError(f"--bundle {args.bundle}: not a folder (a bundle is a folder)")
        uri = str(args.bundle)
    elif args.storage_uri or os.environ.get("STORAGE_URI"):
        uri = args.storage_uri or os.environ["STORAGE_URI"]
    elif args.model:
        from storage.settings import resolve_settings

        # the predictor never starts a storage server: a configured endpoint, or a local one that runs already
        uri = f"s3://{resolve_settings(start_local=False).models_bucket}/{args.model}/{args.ref}"
    else:
        raise ValueError(
            "say what to serve: --model NAME, --storage-uri s3://models/NAME/VERSION, or --bundle DIR"
        )
    from serving.server import serve

    serve(uri, name=args.model_name, host=args.host, port=args.port)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``."""
    sp = sub.add_parser("serve", help="serve a model over HTTP (KServe V1 and V2 protocols, /metrics)")
    sp.add_argument("--model", help="registry model name (serves its --ref alias, default production)")
    sp.add_argument("--ref", default="production", help="version or alias with --model (default production)")
    sp.add_argument("--storage-uri", help="s3://models/NAME/VERSION|ALIAS (default: $STORAGE_URI)")
    sp.add_argument("--bundle", help="a local bundle folder, e.g. /mnt/models")
    sp.add_argument("--model-name", default="tocoad", help="the name in KServe's URLs (default tocoad)")
    sp.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 in a pod)")
    sp.add_argument("--port", type=int, default=8080)
    sp.set_defaults(func=cmd_serve)
