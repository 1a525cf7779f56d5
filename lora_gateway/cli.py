"""The `lora-gateway` command: the composition root of the three packages.

Each package owns its subcommands (``register``/``run`` pairs); only the demo, which
strings all three together, lives here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from adapters_registry import cli as registry_cli
from gateway import cli as gateway_cli
from loadtest import cli as loadtest_cli
from trainer import adapter_cli
from trainer import cli as trainer_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-gateway", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gateway_cli.register(sub)
    registry_cli.register(sub)
    trainer_cli.register(sub)
    adapter_cli.register(sub)
    loadtest_cli.register(sub)
    demo = sub.add_parser("demo", help="build a base, train two tenants' adapters, serve them")
    demo.add_argument("--base", default="smollm2-135m-instruct",
                      help="smollm2-135m-instruct (default) or tiny-llama")
    demo.add_argument("--home", type=Path, default=Path(".cache/demo"),
                      help="where the demo keeps its registry, adapters and keys")
    demo.add_argument("--models-cache", type=Path, default=Path(".cache/models"))
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--metrics-port", type=int, default=None,
                      help="where Prometheus scrapes /metrics (default: --port + 1)")
    demo.add_argument("--prepare-only", action="store_true",
                      help="build and register everything, then exit without serving")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runners: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": gateway_cli.run, "registry": registry_cli.run, "train": trainer_cli.run_train,
        "base": trainer_cli.run_base, "adapter": adapter_cli.run, "loadtest": loadtest_cli.run,
        "demo": _run_demo,
    }
    return runners[args.command](args)


def _run_demo(args: argparse.Namespace) -> int:
    from gateway import GatewaySettings, configure_logging, quiet_known_harmless, serve_settings
    from lora_gateway.demo import ENGINE_START_SECONDS, banner, prepare

    home = (args.home / args.base).resolve()
    configure_logging("INFO")
    quiet_known_harmless(home / "gateway-cache")
    _say(f"lora-gateway demo: {args.base}, two tenants' adapters and the gateway, all kept in {home}")
    _say("(the first run builds and trains, ≈4-7 min on 2 CPU cores; later runs reuse it all and "
         "are serving in ≈40 s)")
    setup = prepare(home, args.base, args.models_cache.resolve(), announce=_say,
                    progress=sys.stderr.isatty())
    if args.prepare_only:
        print(banner(setup, args.host, args.port, serving=False))
        return 0
    settings = GatewaySettings(
        database_url=setup.database_url, artifacts_dir=str(setup.artifacts_dir),
        cache_dir=home / "gateway-cache", base_model_id=setup.base_model_id,
        base_model_dir=setup.base_model_dir, host=args.host, port=args.port,
        metrics_port=args.metrics_port or args.port + 1,
    )
    _say(f"starting the gateway: vLLM loads {args.base} "
         f"(≈{ENGINE_START_SECONDS.get(args.base, 60)} s)")
    # As `lora-gateway serve` runs: the port bound first, then the engine, then uvicorn.
    return serve_settings(settings, "info", command="lora-gateway demo",
                          on_started=lambda: print(banner(setup, args.host, args.port,
                                                          metrics_port=settings.metrics_port),
                                                   flush=True))


def _say(line: str) -> None:
    """A demo step, announced before it starts."""
    print(f"==> {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
