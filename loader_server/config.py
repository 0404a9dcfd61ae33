"""Configuration as data: what to serve and how, parsed once at the edge (CLI flags or TOML).

Everything downstream receives these frozen dataclasses, already validated, so that a
user's mistake is reported once, here, naming the option, instead of deep inside a worker.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loader_client import endpoints

if TYPE_CHECKING:
    from loader_server.security import ServerCurve

LAYOUTS = ("combined", "paired", "per-sample")
BAD_FILE_POLICIES = ("error", "skip")
DEFAULT_BIND = "tcp://127.0.0.1:5555"
MIN_CLIENT_TIMEOUT_S = 3.0
# A fixed bound, not one derived from observed build times: a batch that is slow every time it
# is built (a huge sample, a cold network disk) would be killed three times in a row and failed
# by a bound that adapts to the usual, fast batches; a fixed one is also one number a user can
# reason about. 20 s because a client waits 30 s for a batch by default: a hang is then redone
# (20 s, one heartbeat, one rebuild) before the trainer gives up. A batch that legitimately takes
# longer already fails the default client, so both are raised together.
DEFAULT_TASK_TIMEOUT_S = 20.0


class ConfigError(ValueError):
    """A user-supplied option is invalid; the message names it and says what to do."""


def default_workers() -> int:
    """Leave one core to the trainer (or the rest of the machine), but always have one worker."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass(frozen=True)
class DatasetConfig:
    """One named dataset: where its files are, how they are laid out, how batches are made."""

    name: str = "train"
    data: tuple[str, ...] = ()
    layout: str = "combined"
    label_column: int | None = None
    targets: str | None = None
    labels: str | None = None
    x_key: str | None = None
    y_key: str | None = None
    x_shape: tuple[int, ...] | None = None
    batch_size: int = 32
    seed: int = 0
    augment: tuple[str, ...] = ()
    shuffle: bool = True
    drop_remainder: bool = False
    on_bad_file: str = "error"

    def __post_init__(self) -> None:
        where = f"dataset '{self.name}'"
        if self.on_bad_file not in BAD_FILE_POLICIES:
            raise ConfigError(f"{where}: --on-bad-file {self.on_bad_file!r} is not one of {', '.join(BAD_FILE_POLICIES)}")
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"dataset name {self.name!r} must be letters, digits, '-' or '_'")
        if not self.data:
            raise ConfigError(f"{where}: no --data given; pass a glob or folder of .npy files")
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f"{where}: --layout {self.layout!r} is not one of {', '.join(LAYOUTS)}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"{where}: --batch-size must be at least 1, got {self.batch_size}")
        if self.seed < 0:
            raise ConfigError(f"{where}: --seed must be a non-negative integer, got {self.seed}")
        if self.label_column is not None and self.layout != "combined":
            raise ConfigError(f"{where}: --label-column only applies to --layout combined")
        if self.layout == "paired" and self.targets is None and self.y_key is None:
            raise ConfigError(
                f"{where}: --layout paired needs --targets GLOB (or --y-key for a .npz member)"
            )
        if self.labels is not None and self.layout != "per-sample":
            raise ConfigError(f"{where}: --labels only applies to --layout per-sample")
        if self.labels is not None and self.targets is not None:
            raise ConfigError(f"{where}: give --labels or --targets, not both")
        if self.x_shape is not None and any(d < 1 for d in self.x_shape):
            raise ConfigError(f"{where}: --x-shape dimensions must be positive, got {self.x_shape}")


@dataclass(frozen=True)
class ServeConfig:
    """The server: which datasets, where clients connect, how many local worker processes."""

    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    bind: str = DEFAULT_BIND
    workers: int = field(default_factory=default_workers)
    worker_bind: str | None = None
    heartbeat_s: float = 1.0
    client_timeout_s: float = 60.0
    drain_s: float = 10.0
    task_timeout_s: float = DEFAULT_TASK_TIMEOUT_S
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    curve: ServerCurve | None = None
    index_cache: Path | None = None

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("no dataset configured: pass --data or --config FILE.toml")
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.workers}")
        if self.workers == 0 and not self.worker_bind:
            raise ConfigError("--workers 0 leaves no one to build batches: add --worker-bind tcp://0.0.0.0:5556 "
                              "and start `npyloader worker --connect` on other hosts")
        for option, endpoint in (("--bind", self.bind), ("--worker-bind", self.worker_bind)):
            if endpoint is not None:
                endpoints.parse(endpoint, option, bind=True)
        if self.heartbeat_s <= 0:
            raise ConfigError(f"--heartbeat must be positive, got {self.heartbeat_s}")
        check_metrics_port(self.metrics_port)
        if self.drain_s < 0:
            raise ConfigError(f"--drain-timeout must be 0 or more seconds, got {self.drain_s:g}")
        check_task_timeout(self.task_timeout_s)
        if self.client_timeout_s < MIN_CLIENT_TIMEOUT_S:
            raise ConfigError(f"--client-timeout must be at least {MIN_CLIENT_TIMEOUT_S:g} s (waiting clients ping "
                              f"every second), got {self.client_timeout_s:g}")


def check_task_timeout(seconds: float) -> None:
    """Shared by `serve` and `worker`, which both bound how long one batch may take."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:  # NaN too
        raise ConfigError(f"--task-timeout must be a positive number of seconds, got {seconds!r}; a batch "
                          "that may legitimately take very long needs a large value, not none")


def check_metrics_port(port: int | None) -> None:
    """Checked before anything starts: Python's socket would only raise OverflowError later."""
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"--metrics-port {port} is out of range: ports are 1-65535 (0 picks a free one)")


def parse_shape(text: str, option: str = "--x-shape") -> tuple[int, ...]:
    """'64,64' or '64x64x3' -> (64, 64) / (64, 64, 3)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError as e:
        raise ConfigError(f"{option} {text!r} must be integers like 64,64 or 64,64,3") from e
    if not shape:
        raise ConfigError(f"{option} {text!r} is empty; use e.g. 64,64")
    return shape


_DATASET_KEYS = {f.name for f in fields(DatasetConfig)} - {"name"}


def dataset_from_mapping(name: str, values: dict[str, Any], source: str) -> DatasetConfig:
    """Build a DatasetConfig from a TOML table, accepting the CLI's spelling (dashes) too."""
    kwargs: dict[str, Any] = {"name": name}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key == "no_shuffle":
            key, value = "shuffle", not value
        if key not in _DATASET_KEYS:
            raise ConfigError(
                f"{source}: [datasets.{name}] has unknown key {raw_key!r}; "
                f"known keys: {', '.join(sorted(_DATASET_KEYS))}"
            )
        if key == "data" and isinstance(value, str):
            value = (value,)
        if key in ("data", "augment"):
            value = tuple(value)
        if key == "x_shape":
            value = parse_shape(value, f"{source} x_shape") if isinstance(value, str) else tuple(value)
        kwargs[key] = value
    return DatasetConfig(**kwargs)


def load_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a config file, naming it in every error. Relative data paths resolve against it."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"--config {p}: no such file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {p}: not valid TOML: {e}") from e
    tables = raw.get("datasets")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"--config {p}: needs at least one [datasets.NAME] table")
    base = p.resolve().parent
    datasets = {}
    for name, values in tables.items():
        if not isinstance(values, dict):
            raise ConfigError(f"--config {p}: datasets.{name} must be a table")
        values = _resolve_paths(dict(values), base)
        datasets[name] = dataset_from_mapping(name, values, f"--config {p}")
    server = raw.get("server", {})
    return {"datasets": datasets, "server": server}


def _resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    def rel(v: str) -> str:
        return v if os.path.isabs(v) else str(base / v)

    if "data" in values:
        data = values["data"]
        values["data"] = [rel(d) for d in ([data] if isinstance(data, str) else data)]
    for key in ("targets", "labels"):
        if isinstance(values.get(key), str):
            values[key] = rel(values[key])
    return values
