"""`lora-gateway serve`: run the gateway with settings from LGW_* variables and flags."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gateway.config import GatewaySettings
from gateway.logs import configure_logging, quiet_known_harmless

_FLAGS = {
    "database_url": str, "artifacts_dir": str, "s3_endpoint_url": str, "cache_dir": Path,
    "base_model_id": str,
    "base_model_dir": Path, "host": str, "port": int, "max_model_len": int,
    "max_loras": int, "max_cpu_loras": int, "max_lora_rank": int, "dtype": str, "max_num_seqs": int,
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="run the OpenAI-compatible gateway")
    for name, kind in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind,
                       help=GatewaySettings.model_fields[name].description)
    p.add_argument("--log-level", default="info")


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    overrides = {k: getattr(args, k) for k in _FLAGS if getattr(args, k, None) is not None}
    return GatewaySettings(**overrides)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    settings = settings_from_args(args)
    configure_logging(args.log_level)
    quiet_known_harmless(settings.cache_dir)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    services = getattr(app.state, "services", None)
    if services is not None and not services.ready:
        logging.getLogger(__name__).critical("exiting because the inference engine died")
        return 70  # EX_SOFTWARE: the supervisor restarts us
    return 0
