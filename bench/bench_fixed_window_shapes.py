"""What a fixed-window hit costs Redis in each shape it could take: the script vs plain commands.

    python -m bench.bench_fixed_window_shapes [--procs 4] [--seconds 3] [--rounds 3] [--names 1000]

Issue 18's one rate-limit miss is the fixed window's Redis CPU per hit
against throttled-py's, which sends a bare ``INCRBY``. This bench measures the
server side alone: `--procs` processes each send one shape per round trip on
a raw socket (no client library, so no client cost is in the figures) over
`--names` keys, the limit never reached, and the server's CPU per hit is
the ``INFO cpu`` delta over the trial / the hits. Shapes:

* ``script``: ``EVALSHA`` of ``ratelimit_fixed_window.lua`` (what a hit sends);
* ``multi``: ``MULTI``, ``INCR``, ``PEXPIRE … NX``, ``PTTL``, ``EXEC`` (atomic, full result);
* ``pipeline``: ``INCR``, ``PEXPIRE … NX``, ``PTTL`` (full result, not atomic);
* ``incr_pttl``: ``INCR``, ``PTTL`` (no TTL for a new key: not a candidate, for scale);
* ``incrby``: a bare ``INCRBY``, throttled-py's admitted hit (its ``EXPIRE``
  is a second trip, on a window's first hit only).

Ratios are to ``incrby`` in the same round. The medians of `--rounds`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time
from typing import IO, Callable, Dict, List, Tuple

import redis

from mcp_redis.scripts import lua
from mcp_redis.testing import RedisServer


def _pack(*args: object) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _shapes(sha: str) -> Dict[str, Callable[[bytes], Tuple[bytes, int]]]:
    """Each shape: key -> (the bytes one hit sends, how many replies come back)."""
    return {
        "script": lambda k: (_pack("EVALSHA", sha, 1, k, 1, 50_000_000, 60_000_000), 1),
        "multi": lambda k: (_pack("MULTI") + _pack("INCR", k) + _pack("PEXPIRE", k, 60_000, "NX")
                            + _pack("PTTL", k) + _pack("EXEC"), 5),
        "pipeline": lambda k: (_pack("INCR", k) + _pack("PEXPIRE", k, 60_000, "NX") + _pack("PTTL", k), 3),
        "incr_pttl": lambda k: (_pack("INCR", k) + _pack("PTTL", k), 2),
        "incrby": lambda k: (_pack("INCRBY", k, 1), 1),
    }


def _skip_reply(f: IO[bytes]) -> None:
    line = f.readline()
    kind = line[:1]
    if kind == b"*":
        for _ in range(int(line[1:])):
            _skip_reply(f)
    elif kind == b"$" and not line.startswith(b"$-1"):
        f.readline()
    elif kind == b"-":
        raise RuntimeError(line.decode(errors="replace").strip())


def _worker(port: int, shape: str, sha: str, names: int, seconds: float, out: mp.Queue[int]) -> None:
    build = _shapes(sha)[shape]
    messages = [build(f"{{fw:{i}}}:k".encode()) for i in range(names)]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = sock.makefile("rb")
    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data, replies = messages[n % names]
        sock.sendall(data)
        for _ in range(replies):
            _skip_reply(f)
        n += 1
    sock.close()
    out.put(n)


def _trial(server: RedisServer, shape: str, sha: str, procs: int, names: int, seconds: float) -> float:
    client = redis.Redis(port=server.port)
    client.flushall()

    def cpu() -> float:
        info = client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    queue: mp.Queue[int] = mp.Queue()
    workers = [mp.Process(target=_worker, args=(server.port, shape, sha, names, seconds, queue))
               for _ in range(procs)]
    before = cpu()
    for w in workers:
        w.start()
    hits = sum(queue.get() for _ in workers)
    for w in workers:
        w.join()
    return (cpu() - before) * 1e6 / hits


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--names", type=int, default=1000)
    args = parser.parse_args()
    server = RedisServer()
    server.start()
    try:
        sha = redis.Redis(port=server.port).script_load(lua("ratelimit_fixed_window"))
        shapes = list(_shapes(sha))
        results: Dict[str, List[float]] = {s: [] for s in shapes}
        for _ in range(args.rounds):
            for shape in shapes:
                results[shape].append(_trial(server, shape, sha, args.procs, args.names, args.seconds))
        base = statistics.median(results["incrby"])
        print(f"redis-server on loopback, {args.procs} processes, {args.seconds:g} s trials, "
              f"{args.rounds} round(s), medians; Redis CPU per hit\n")
        print("| shape | Redis CPU µs/hit | × incrby |\n|---|---:|---:|")
        for shape in shapes:
            median = statistics.median(results[shape])
            print(f"| {shape} | {median:.2f} | {median / base:.2f}× |")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
