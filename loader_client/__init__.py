"""npyloader client: stream batches from an npyloader server into Keras or any Python loop.

`import loader_client` needs only numpy, pyzmq and msgpack; Keras (and TensorFlow) load only
when `RemoteSequence`, `EpochSync` or `DataWaitMonitor` is first used, and torch only with
`RemoteDataset` (loader_client.torch), so tools and tests can use `BatchStream` without them.
`RemoteDataset` stays out of `__all__`, so that `import *` needs no torch.
"""

from typing import Any

from loader_client.endpoints import EndpointError
from loader_client.shm import ShmUnavailable
from loader_client.stream import BatchStream, ServerError, request_stats

__all__ = ["BatchStream", "DataWaitMonitor", "EndpointError", "EpochSync", "RemoteSequence", "ServerError", "ShmUnavailable",
           "request_stats"]


def __getattr__(name: str) -> Any:
    if name == "RemoteSequence":
        from loader_client.keras import RemoteSequence

        return RemoteSequence
    if name == "EpochSync":
        from loader_client.keras import EpochSync

        return EpochSync
    if name == "RemoteDataset":
        from loader_client.torch import RemoteDataset

        return RemoteDataset
    if name == "DataWaitMonitor":
        from loader_client.monitor import DataWaitMonitor

        return DataWaitMonitor
    raise AttributeError(f"module 'loader_client' has no attribute {name!r}")
