"""The `npyloader` command: serve, worker, stats, keygen, bench, soak, demo-data.

Flags are parsed into the config dataclasses here and nowhere else; any mistake a user can
make ends as one line on stderr naming the option or file, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loader_client import endpoints
from loader_client.security import ClientCurve, CurveKeyError
from loader_server import __version__
from loader_server.config import (
    DEFAULT_BIND,
    DEFAULT_TASK_TIMEOUT_S,
    LAYOUTS,
    ConfigError,
    DatasetConfig,
    ServeConfig,
    check_metrics_port,
    check_task_timeout,
    default_workers,
    load_toml,
    parse_shape,
)
from loader_server.signals import interrupt_on_stop_signals

log = logging.getLogger("npyloader")


def _dataset_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dataset (one dataset from flags; use --config for several)")
    g.add_argument("--data", action="append", metavar="GLOB_OR_DIR", help="files to serve (repeatable); quote globs")
    g.add_argument("--layout", choices=LAYOUTS, default="combined")
    g.add_argument("--label-column", type=int, metavar="N", help="combined layout: column holding the label, e.g. -1")
    g.add_argument("--targets", metavar="GLOB", help="paired / per-sample: target files (e.g. masks)")
    g.add_argument("--labels", metavar="FILE.npy", help="per-sample: one label per sample file")
    g.add_argument("--x-key", metavar="NAME", help=".npz: member holding the inputs")
    g.add_argument("--y-key", metavar="NAME", help=".npz: member holding the targets")
    g.add_argument("--x-shape", metavar="H,W[,C]", help="reshape each sample's features, e.g. 64,64")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--augment", action="append", default=[], metavar="OP:k=v,...",
                   help="augmentation op, applied in order (repeatable)")
    g.add_argument("--no-shuffle", action="store_true", help="serve samples in file order")
    g.add_argument("--drop-remainder", action="store_true", help="drop the last partial batch of each epoch")
    g.add_argument("--dataset", default="train", metavar="NAME", help="name clients ask for (default train)")
    g.add_argument("--on-bad-file", choices=["error", "skip"], default="error",
                   help="a file that becomes unreadable while serving: fail the batches that need it "
                        "(error, default; the client's error names the file) or serve them without its "
                        "samples (skip; logged once per file)")


def _metrics_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0 picks a free port)")
    p.add_argument("--metrics-host", default="0.0.0.0", metavar="ADDR",
                   help="address the metrics listen on (default 0.0.0.0, for a Prometheus on another host)")


def _client_curve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-secret-key", metavar="FILE", help="this peer's .key_secret, for a CURVE server")
    p.add_argument("--curve-server-key", metavar="FILE", help="the server's public .key")


def _client_curve(args: argparse.Namespace) -> ClientCurve | None:
    if not (args.curve_secret_key or args.curve_server_key):
        return None
    if not (args.curve_secret_key and args.curve_server_key):
        raise ConfigError("CURVE needs both --curve-secret-key and --curve-server-key")
    return ClientCurve.from_files(args.curve_secret_key, args.curve_server_key)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npyloader", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    from loader_server.data.augment import describe_ops

    serve = sub.add_parser("serve", help="serve datasets to RemoteSequence / BatchStream clients",
                           epilog=describe_ops(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _dataset_flags(serve)
    serve.add_argument("--config", metavar="FILE.toml", help="several datasets: [datasets.NAME] tables")
    serve.add_argument("--bind", default=None, help=f"client endpoint (default {DEFAULT_BIND})")
    serve.add_argument("--workers", type=int, default=None,
                       help=f"local worker processes (default {default_workers()}: one less than the cores; "
                            "0 = remote workers only)")
    serve.add_argument("--worker-bind", metavar="ENDPOINT",
                       help="also accept remote workers here, e.g. tcp://0.0.0.0:5556")
    serve.add_argument("--heartbeat", type=float, default=1.0, metavar="SECONDS",
                       help="worker heartbeat interval; a worker silent for 3 of them is replaced")
    serve.add_argument("--client-timeout", type=float, default=60.0, metavar="SECONDS",
                       help="forget a client silent this long (a waiting client pings every second)")
    serve.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="on SIGTERM/SIGINT, deliver the batches workers are already building for at most "
                            "this long before stopping (default 10; a second signal stops at once)")
    serve.add_argument("--task-timeout", type=float, default=None, metavar="SECONDS",
                       help="a worker still building one batch after this long is taken as hung (an op stuck "
                            "in C or looping keeps heartbeating): a local one is killed and replaced, and the "
                            "batch redone elsewhere; 3 timeouts in a row fail the batch. Default "
                            f"{DEFAULT_TASK_TIMEOUT_S:g}: fixed, not learnt from build times, so a batch that is "
                            "slow every time is not failed for a bound learnt from the fast ones. Below the clients' "
                            "default 30 s timeout, so a hang is redone before they give up: raise both together "
                            "for batches slower than that")
    serve.add_argument("--index-cache", metavar="DIR", type=Path, default=None,
                       help="where indexes of many-file datasets are cached (default ~/.cache/npyloader)")
    serve.add_argument("--no-index-cache", action="store_true", help="always read every file's header")
    _metrics_flags(serve)
    serve.add_argument("--curve-secret-key", metavar="FILE", help="this server's .key_secret (npyloader keygen)")
    serve.add_argument("--authorized-keys", metavar="DIR", help="public keys (*.key) of clients and workers to admit")

    worker = sub.add_parser("worker", help="join a server from this machine and build batches for it")
    worker.add_argument("--connect", required=True, metavar="ENDPOINT", help="the server's --worker-bind, e.g. tcp://HOST:5556")
    worker.add_argument("--processes", type=int, default=default_workers(), help="worker processes on this machine")
    worker.add_argument("--data-root", metavar="PATH",
                        help="where this machine keeps the data, if not at the server's paths")
    worker.add_argument("--heartbeat", type=float, default=1.0, metavar="SECONDS")
    worker.add_argument("--task-timeout", type=float, default=DEFAULT_TASK_TIMEOUT_S, metavar="SECONDS",
                        help="kill and restart a worker process still building one batch after this long (the "
                             "server cannot kill a process on this host; it redoes the batch elsewhere after its "
                             f"own --task-timeout and drops the late result). Default {DEFAULT_TASK_TIMEOUT_S:g}, "
                             "as for serve")
    _metrics_flags(worker)
    _client_curve_flags(worker)

    keygen = sub.add_parser("keygen", help="make a CURVE key pair: NAME.key (public) and NAME.key_secret")
    keygen.add_argument("dir")
    keygen.add_argument("--name", default="npyloader", help="file name stem (default npyloader)")

    stats = sub.add_parser("stats", help="show a running server's datasets, workers and clients")
    stats.add_argument("endpoint", nargs="?", default=DEFAULT_BIND)
    stats.add_argument("--json", action="store_true", help="machine-readable output (with --watch: one JSON object per line)")
    stats.add_argument("--watch", action="store_true",
                       help="refresh until Ctrl-C: a live table on a terminal, timestamped plain blocks into a pipe")
    stats.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="--watch refresh period (default 1)")
    stats.add_argument("--timeout", type=float, default=5.0)
    _client_curve_flags(stats)

    bench = sub.add_parser("bench", help="measure npyloader next to the alternatives, on the same files, in one run")
    bench.add_argument("--quick", action="store_true", help="small data, for a smoke test (figures not meaningful)")
    bench.add_argument("--workload", action="append", choices=["io", "aug"], help="default: both")
    bench.add_argument("--workers", type=int, default=None,
                       help="workers for every loader that has workers (default 2; 1 with --startup)")
    bench.add_argument("--repeats", type=int, default=3, help="timed epochs per loader; the best is kept")
    bench.add_argument("--out", metavar="FILE.md",
                       help="write the Markdown report here, with FILE.json and FILE.png beside it")
    bench.add_argument("--startup", action="store_true",
                       help="only time `npyloader serve` to a client's first batch over many one-sample files: "
                            "cold, writing the index cache, and from it (--workers defaults to 1 here)")
    bench.add_argument("--files", type=int, default=100_000, help="--startup: how many one-sample files")
    bench.add_argument("--startup-data", metavar="DIR", type=Path,
                       help="--startup: keep the one-sample files here and reuse them on the next run")

    soak = sub.add_parser("soak", help="run a server, workers and clients while injecting faults at random; "
                                       "check that no batch was lost or repeated")
    soak.add_argument("--minutes", type=float, default=10.0,
                      help="how long to inject faults (longer if needed to inject every kind once; default 10)")
    soak.add_argument("--seed", type=int, default=0, help="seeds the faults, their targets and the clients' orders")
    soak.add_argument("--workers", type=int, default=2, help="local workers of the server under test (default 2)")
    soak.add_argument("--out", metavar="FILE.md", type=Path,
                      help="write the Markdown report here, and FILE.json beside it")
    soak.add_argument("--logs", metavar="DIR", type=Path,
                      help="keep every process's log and the clients' records here (deleted otherwise)")

    demo = sub.add_parser("demo-data", help="write the bundled digits demo dataset (needs npyloader[demo])")
    demo.add_argument("dir", help="output folder (gets train/, val/ and loader.toml)")
    return parser


def _serve_config(args: argparse.Namespace) -> ServeConfig:
    server: dict = {}
    if args.config:
        if args.data:
            raise ConfigError("give either --config or --data, not both")
        loaded = load_toml(args.config)
        datasets, server = loaded["datasets"], loaded["server"]
    else:
        dcfg = DatasetConfig(
            name=args.dataset, data=tuple(args.data or ()), layout=args.layout,
            label_column=args.label_column, targets=args.targets, labels=args.labels,
            x_key=args.x_key, y_key=args.y_key,
            x_shape=parse_shape(args.x_shape) if args.x_shape else None,
            batch_size=args.batch_size, seed=args.seed, augment=tuple(args.augment),
            shuffle=not args.no_shuffle, drop_remainder=args.drop_remainder, on_bad_file=args.on_bad_file,
        )
        datasets = {dcfg.name: dcfg}
    bind = args.bind or server.get("bind", DEFAULT_BIND)
    workers = args.workers if args.workers is not None else server.get("workers", default_workers())
    worker_bind = args.worker_bind or server.get("worker_bind")
    task_timeout = server.get("task_timeout", DEFAULT_TASK_TIMEOUT_S) if args.task_timeout is None else args.task_timeout
    curve = None
    if args.curve_secret_key or args.authorized_keys:
        if not (args.curve_secret_key and args.authorized_keys):
            raise ConfigError("CURVE needs both --curve-secret-key and --authorized-keys")
        from loader_server.security import ServerCurve

        curve = ServerCurve.from_files(args.curve_secret_key, args.authorized_keys)
    from loader_server.data.index_cache import default_dir

    index_cache = None if args.no_index_cache else (args.index_cache or default_dir())
    return ServeConfig(datasets=datasets, bind=bind, workers=workers, worker_bind=worker_bind,
                       heartbeat_s=args.heartbeat, client_timeout_s=args.client_timeout,
                       drain_s=args.drain_timeout, task_timeout_s=task_timeout, metrics_port=args.metrics_port,
                       metrics_host=args.metrics_host, curve=curve,
                       index_cache=index_cache)


def _cmd_serve(args: argparse.Namespace) -> int:
    from loader_server.serve.server import serve

    interrupt_on_stop_signals()  # before the local workers start: they would inherit an ignored SIGTERM
    serve(_serve_config(args))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from loader_client.rates import with_rates
    from loader_client.stats_view import render
    from loader_client.stream import request_stats

    endpoints.parse(args.endpoint, "endpoint", bind=False)
    curve = _client_curve(args)
    if args.watch:
        from loader_server.tools import watch

        if args.interval <= 0:
            raise ConfigError(f"--interval must be positive, got {args.interval:g}")
        interrupt_on_stop_signals()
        return watch.run(args.endpoint, args.interval, lambda: request_stats(args.endpoint, args.timeout, curve=curve),
                         as_json=args.json)
    stats = request_stats(args.endpoint, args.timeout, curve=curve)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print("\n".join(render(args.endpoint, with_rates(None, stats))))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.startup:
        from loader_server.tools.bench import startup

        print(startup.main(args.files, args.repeats, args.workers or 1, args.startup_data))
        return 0
    from loader_server.tools.bench import run as bench

    print(bench.main(args.workload or ["io", "aug"], args.workers or 2, args.repeats, args.quick, args.out))
    return 0


def _cmd_soak(args: argparse.Namespace) -> int:
    from loader_server.tools.soak import run as soak
    from loader_server.tools.soak.report import markdown

    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {args.minutes:g}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1 (the soak kills and stops local workers), got {args.workers}")
    command = " ".join(["npyloader soak", f"--minutes {args.minutes:g}", f"--seed {args.seed}",
                        *([f"--workers {args.workers}"] if args.workers != 2 else []),
                        *([f"--out {args.out}"] if args.out else [])])
    try:
        report = soak.run(soak.SoakConfig(minutes=args.minutes, seed=args.seed, workers=args.workers), command,
                          args.out, args.logs)
    except soak.SoakError as e:
        print(f"npyloader soak: error: {e}", file=sys.stderr)
        return 1
    print(markdown(report))
    return 0 if report.ok else 1


def _cmd_worker(args: argparse.Namespace) -> int:
    from loader_server.worker.remote import RemoteWorkerSpec, run_workers

    if args.processes < 1:
        raise ConfigError(f"--processes must be at least 1, got {args.processes}")
    check_task_timeout(args.task_timeout)
    check_metrics_port(args.metrics_port)
    interrupt_on_stop_signals()
    spec = RemoteWorkerSpec(args.connect, args.data_root, args.heartbeat, os.getpid(), _client_curve(args),
                            task_timeout_s=args.task_timeout)
    metrics = (args.metrics_host, args.metrics_port) if args.metrics_port is not None else None
    return run_workers(spec, args.processes, metrics)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from loader_server.security import keygen

    public, secret = keygen(args.dir, args.name)
    print(f"wrote {public} (public: give it to the server's --authorized-keys, or to peers as "
          f"--curve-server-key) and {secret} (secret: keep it private)")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from loader_server.tools.demo_data import write_demo_data

    summary = write_demo_data(args.dir)
    log.info("demo data written: %s", summary)
    return 0


COMMANDS = {"serve": _cmd_serve, "worker": _cmd_worker, "stats": _cmd_stats, "keygen": _cmd_keygen,
            "bench": _cmd_bench, "soak": _cmd_soak, "demo-data": _cmd_demo_data}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    from loader_server.data.augment import AugmentError
    from loader_server.data.index import DatasetError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, endpoints.EndpointError, DatasetError, AugmentError, CurveKeyError, TimeoutError) as e:
        print(f"npyloader {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
