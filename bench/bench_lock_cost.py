"""Redis's own work per lock cycle, counted in instructions: ``with agent_lock(a)`` vs redis-py ``Lock``.

    python -m bench.bench_lock_cost [--n 2000] [--scripts-only | --breakdown]

Runs a redis-server under valgrind's callgrind (instrumentation switched on
only around the measured loop) and counts the instructions the server runs
per uncontended acquire+release cycle over 1,000 names. Unlike ``INFO cpu``
(which on a shared 2-core VM moves ±30 % from run to run) the count is the
same from run to run to a few hundred instructions, so a change of a few
percent in the scripts shows. It leaves out the kernel's socket work, the
same per round trip for both (two round trips a cycle each), so the ratio of
whole-CPU cost is smaller than the ratio shown here.

``--scripts-only`` sends the library's commands directly (pipelined, like
the peer's two commands: the grant's plain ``SET``, the release script, and
in the fenced case the token's script between them), leaving out the
process liveness key refreshed every half second. ``--breakdown`` counts
what the token's script costs part by part: single-purpose scripts, each
pipelined on its own (a plain ``SET NX`` for scale; its first call per name
sets it, the rest find it set). Needs ``valgrind`` on PATH.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Dict

import redis
from redis.lock import Lock as RedisPyLock

import mcp_redis
from mcp_redis.scripts import lua
from mcp_redis.testing import free_port


def _totals(directory: str) -> int:
    best = 0
    for path in glob.glob(os.path.join(directory, "cg.*")):
        with open(path) as fh:
            for line in fh:
                if line.startswith("totals:"):
                    best = max(best, int(line.split()[1]))
    return best


def _plain_sets(r: redis.Redis[str], n: int, value: str) -> None:
    for start in range(0, n, 100):
        pipe = r.pipeline(transaction=False)
        for i in range(start, start + 100):
            pipe.set(f"plain{i % 1000}", value, nx=True, px=30000)
        pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="cycles per case")
    parser.add_argument("--scripts-only", action="store_true", help="send the scripts directly, pipelined")
    parser.add_argument("--breakdown", action="store_true",
                        help="what the fencing token's script costs, part by part (single-purpose scripts)")
    opts = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("valgrind (callgrind) is not installed")
    directory = tempfile.mkdtemp(prefix="mcp_redis_cg_")
    port = free_port()
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={directory}/cg.%p",
         "redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        mcp_redis.configure(redis_url=f"redis://127.0.0.1:{port}/0")
        n = opts.n

        def ours() -> None:
            for i in range(n):
                with mcp_redis.agent_lock(f"a{i % 1000}"):
                    pass

        def ours_fenced() -> None:
            for i in range(n):
                with mcp_redis.agent_lock(f"e{i % 1000}", fencing=True) as held:
                    assert held.fencing_token

        def theirs() -> None:
            for i in range(n):
                with r.lock(f"b{i % 1000}", timeout=30):
                    pass

        fence, release = r.script_load(lua("lock_fence")), r.script_load(lua("lock_release"))
        cad = r.script_load(RedisPyLock.LUA_RELEASE_SCRIPT)
        value = "L" + os.urandom(12).hex() + "|" + os.urandom(16).hex()

        def ours_commands(fenced: bool) -> Callable[[], None]:
            def run() -> None:
                for start in range(0, n, 100):
                    pipe = r.pipeline(transaction=False)
                    for i in range(start, start + 100):
                        key = f"mcp:agent-lock:{{{'f' if fenced else 'c'}{i % 1000}}}"
                        pipe.execute_command("SET", key, value, "NX", "PX", 30000, "GET")
                        if fenced:
                            pipe.evalsha(fence, 2, key, key + "#fence", value)
                        pipe.evalsha(release, 2, key, key + "#queue", value)
                    pipe.execute()
            return run

        def theirs_scripts() -> None:
            for start in range(0, n, 100):
                pipe = r.pipeline(transaction=False)
                for i in range(start, start + 100):
                    key = f"d{i % 1000}"
                    pipe.set(key, value, nx=True, px=30000)
                    pipe.evalsha(cad, 1, key, value)
                pipe.execute()

        def script_case(source: str) -> Callable[[], None]:
            sha = r.script_load(source)

            def run() -> None:
                for start in range(0, n, 100):
                    pipe = r.pipeline(transaction=False)
                    for i in range(start, start + 100):
                        pipe.evalsha(sha, 2, f"held{i % 1000}", f"held{i % 1000}#fence", value)
                    pipe.execute()
            return run

        def breakdown() -> Dict[str, Callable[[], None]]:
            for i in range(1000):
                r.set(f"held{i}", value)  # held by `value`: the ownership check passes
            check = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end "
            return {
                "plain SET NX PX (pipelined, for scale)": lambda: _plain_sets(r, n, value),
                "script: return 1 (the call itself)": script_case("return 1"),
                "script: the ownership GET": script_case(check + "return 1"),
                "script: GET + TIME": script_case(check + "local t = redis.call('TIME') return 1"),
                "script: GET + TIME + SET KEEPTTL GET": script_case(
                    check + "local t = redis.call('TIME') "
                    "redis.call('SET', KEYS[2], t[1] .. t[2], 'KEEPTTL', 'GET') return 1"),
                "script: lock_fence.lua (the token)": script_case(lua("lock_fence")),
            }

        cases: Dict[str, Callable[[], None]] = breakdown() if opts.breakdown else (
            {"mcp_redis commands (pipelined)": ours_commands(False),
             "redis-py Lock commands (pipelined)": theirs_scripts,
             "mcp_redis commands + fence (pipelined)": ours_commands(True)}
            if opts.scripts_only else
            {"with agent_lock(a)": ours, "with redis.lock(a, timeout=30)": theirs,
             "with agent_lock(a, fencing=True), token read": ours_fenced})

        def control(*args: str) -> None:
            subprocess.run(["callgrind_control", *args, str(proc.pid)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        counts: Dict[str, float] = {}
        for name, fn in cases.items():
            fn()  # warm: scripts loaded, keys and counters created
            for old in glob.glob(os.path.join(directory, "cg.*")):
                os.remove(old)
            control("-z")
            control("-i", "on")
            fn()
            control("-i", "off")
            control("-d")
            time.sleep(0.5)
            counts[name] = _totals(directory) / n
        if opts.breakdown:
            print(f"redis-server instructions per call (callgrind, n={n}, pipelined, 1,000 names)")
            for name, count in counts.items():
                print(f"  {name:40s} {count:9,.0f}")
            return
        base = list(counts.values())[1]  # redis-py's
        print(f"redis-server instructions per acquire+release cycle (callgrind, n={n}, 1,000 names)")
        for name, count in counts.items():
            print(f"  {name:38s} {count:9,.0f}  x{count / base:.2f}")
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
