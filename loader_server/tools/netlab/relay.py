"""A TCP relay that delays every byte by a fixed time plus jitter, each way: a slow link in userspace.

    python -m loader_server.tools.netlab.relay --listen 127.0.0.1:0 --to 10.213.0.1:5556 \
        --delay-ms 100 --jitter-ms 20 --seed 0

This kernel has no `netem` qdisc, so delay cannot be added to a link; instead a peer connects to
the relay, which forwards to the real endpoint. Each chunk read is held until now + delay ± jitter
(uniform), but never released before the chunk read before it on that connection: jitter varies
the latency, as on a real link, without reordering the byte stream, which TCP would not deliver
either. The relay prints `relaying LISTEN_ADDR -> TO_ADDR` on stdout once it accepts connections
(with the real port when --listen asks for port 0). It forwards until killed. Up to
MAX_QUEUED_CHUNKS chunks wait per direction; past that it stops reading, so a fast sender feels
back-pressure as it would from a full link.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("npyloader.relay")
CHUNK = 64 * 1024
MAX_QUEUED_CHUNKS = 1024


@dataclass(frozen=True)
class RelayConfig:
    listen_host: str
    listen_port: int
    to_host: str
    to_port: int
    delay_s: float
    jitter_s: float
    seed: int


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cfg: RelayConfig,
                rng: random.Random) -> None:
    """Copy reader to writer, each chunk delayed, order kept; close the write side at EOF."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(MAX_QUEUED_CHUNKS)

    async def read() -> None:
        due = 0.0
        try:
            while data := await reader.read(CHUNK):
                due = max(due, time.monotonic() + cfg.delay_s + rng.uniform(-cfg.jitter_s, cfg.jitter_s))
                await queue.put((due, data))
        except ConnectionError:
            pass
        await queue.put((due, b""))

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    reading = asyncio.create_task(read())
    try:
        await write()
    except ConnectionError:
        pass
    finally:
        reading.cancel()


async def _serve_one(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, cfg: RelayConfig,
                     rng: random.Random) -> None:
    try:
        server_r, server_w = await asyncio.open_connection(cfg.to_host, cfg.to_port)
    except OSError as e:
        log.warning("cannot reach %s:%d: %s", cfg.to_host, cfg.to_port, e)
        client_w.close()
        return
    try:
        await asyncio.gather(_pump(client_r, server_w, cfg, rng), _pump(server_r, client_w, cfg, rng))
    finally:
        for w in (client_w, server_w):
            w.close()


async def relay(cfg: RelayConfig) -> None:
    rng = random.Random(cfg.seed)
    server = await asyncio.start_server(lambda r, w: _serve_one(r, w, cfg, rng), cfg.listen_host, cfg.listen_port)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"relaying {host}:{port} -> {cfg.to_host}:{cfg.to_port}", flush=True)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (port 0-65535)")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loader_server.tools.netlab.relay", description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on (port 0: any free port)")
    p.add_argument("--to", type=_address, required=True, help="HOST:PORT to forward each connection to")
    p.add_argument("--delay-ms", type=float, default=100.0, help="added latency each way (default 100)")
    p.add_argument("--jitter-ms", type=float, default=20.0, help="uniform ± on each chunk's latency (default 20)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.jitter_ms > a.delay_ms:
        p.error(f"--jitter-ms {a.jitter_ms:g} must not exceed --delay-ms {a.delay_ms:g}")
    logging.basicConfig(level=logging.INFO, format="relay: %(message)s", stream=sys.stderr)
    cfg = RelayConfig(a.listen[0], a.listen[1], a.to[0], a.to[1], a.delay_ms / 1000, a.jitter_ms / 1000, a.seed)
    try:
        asyncio.run(relay(cfg))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
