"""The command-line options that locate a registry (database, artifact store, actor),
shared by every command that opens one: ``lora-gateway registry``, ``train``, ``adapter``.
Each defaults to the LGW_* variable ``serve`` reads for the same setting."""

from __future__ import annotations

import argparse
import os


def add_database_option(p: argparse.ArgumentParser) -> None:
    # --database-url and --artifacts-dir are `serve`'s names for the same settings
    p.add_argument("--db", "--database-url", dest="db",
                   default=os.environ.get("LGW_DATABASE_URL", "sqlite:///lora-gateway.db"),
                   help="SQLAlchemy URL of the registry database (env LGW_DATABASE_URL)")


def add_registry_options(p: argparse.ArgumentParser) -> None:
    add_database_option(p)
    p.add_argument("--artifacts", "--artifacts-dir", dest="artifacts",
                   default=os.environ.get("LGW_ARTIFACTS_DIR", "artifacts"),
                   help="artifact folder or s3://bucket/prefix (env LGW_ARTIFACTS_DIR)")
    p.add_argument("--s3-endpoint", default=os.environ.get("LGW_S3_ENDPOINT_URL"),
                   help="S3 endpoint for non-AWS servers (env LGW_S3_ENDPOINT_URL)")
    p.add_argument("--s3-region", default=os.environ.get("LGW_S3_REGION", "us-east-1"))
    p.add_argument("--actor", default=os.environ.get("USER") or "cli",
                   help="who is making the change, for the audit trail (default: $USER)")
    p.add_argument("--db-lock-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long a statement waits for another's lock (SQLite's busy timeout, "
                   "PostgreSQL's lock_timeout) before it fails as locked")


__all__ = ["add_database_option", "add_registry_options"]
