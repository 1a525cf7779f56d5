"""The `lora-gateway` command: the composition root of the three packages.

Each package owns its subcommands (``register``/``run`` pairs); only the demo, which
strings all three together, lives here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters_registry import cli as registry_cli
from gateway import cli as gateway_cli
from loadtest import cli as loadtest_cli
from trainer import adapter_cli
from trainer import cli as trainer_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-gateway", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gateway_cli.register(sub)
    sub.choices["serve"].add_argument(
        "--worker", action="store_true",
        help="also run one fine-tuning worker in this process, on this machine (for one-machine "
             "use and the demo; production runs `lora-gateway worker` on its own GPUs)")
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
        "serve": _run_serve, "registry": registry_cli.run, "train": trainer_cli.run_train,
        "base": trainer_cli.run_base, "worker": trainer_cli.run_worker, "adapter": adapter_cli.run,
        "loadtest": loadtest_cli.run,
        "demo": _run_demo,
    }
    return runners[args.command](args)


def _run_serve(args: argparse.Namespace) -> int:
    return gateway_cli.run(args, on_started=start_worker if args.worker else None)


def start_worker(settings: Any) -> Callable[[], None]:
    """A fine-tuning worker beside the gateway (a thread of this process), for its base;
    returns what stops it (a run in progress goes back to the queue, to resume later)."""
    import threading

    from adapters_registry import Registry
    from trainer import Worker, WorkerOptions

    registry = Registry.open(settings.database_url, settings.artifacts_dir, actor="worker:in-process",
                             s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region,
                             migrate=False)
    worker = Worker(registry, WorkerOptions(f"{settings.replica_name}-worker", settings.base_model_dir,
                                            settings.base_model_id))
    thread = threading.Thread(target=worker.run, name="fine-tuning worker", daemon=True)
    thread.start()

    def stop() -> None:
        worker.stop.set()
        thread.join(timeout=60)
        registry.close()
    return stop


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
    stops: list[Callable[[], None]] = []

    def started() -> None:
        stops.append(start_worker(settings))  # the fine-tuning jobs API's worker, in process
        print(banner(setup, args.host, args.port, metrics_port=settings.metrics_port), flush=True)

    # As `lora-gateway serve` runs: the port bound first, then the engine, then uvicorn.
    try:
        return serve_settings(settings, "info", command="lora-gateway demo", on_started=started)
    finally:
        for stop in stops:
            stop()


def _say(line: str) -> None:
    """A demo step, announced before it starts."""
    print(f"==> {line}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
