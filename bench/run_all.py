"""Run every ``bench/bench_<feature>.py`` present and print their ratio tables.

Run it from the root of a clone: ``python -m bench.run_all [--quick] [--only locks,cache]``
(the benchmarks are not in the installed package). Each
module runs in its own interpreter (``python -m bench.bench_<feature>``), so a
bench that parses ``sys.argv``, starts servers or crashes cannot disturb the
others; its output (the ratio table) goes straight to stdout. A summary with
each module's status and duration follows.

The contract of a bench module: ``main(argv: Optional[List[str]] = None)``
runs under ``if __name__ == "__main__"``, prints a table whose ratios compare
mcp_redis with the alternatives (measured in the same run), starts its own
redis-server (``mcp_redis.testing.RedisServer``) unless ``REDIS_URL`` is set,
accepts ``--quick`` for a short run, and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ORDER = ("locks", "ratelimit", "cache", "sessions", "events")


def discover() -> List[str]:
    """Feature names of the bench modules present, in a stable order."""
    names = [f[len("bench_"):-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py")]
    known = [n for n in ORDER if n in names]
    return known + sorted(n for n in names if n not in ORDER)


def _supports_quick(name: str) -> bool:
    with open(os.path.join(HERE, f"bench_{name}.py"), encoding="utf-8") as f:
        return "--quick" in f.read()


def run_one(name: str, quick: bool, timeout: float) -> Tuple[int, float]:
    cmd = [sys.executable, "-m", f"bench.bench_{name}"]
    if quick and _supports_quick(name):
        cmd.append("--quick")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    started = time.monotonic()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        print(f"bench_{name}: timed out after {timeout:g}s", flush=True)
        rc = 124
    return rc, time.monotonic() - started


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run the bench/ comparisons and print their ratio tables.")
    parser.add_argument("--quick", action="store_true", help="ask each bench for a short run")
    parser.add_argument("--only", default="", help="comma-separated features, e.g. locks,cache")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per bench module")
    args = parser.parse_args(argv)
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown:
            print(f"no bench module for: {', '.join(unknown)} (present: {', '.join(names) or 'none'})",
                  file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted]
    if not names:
        print("no bench/bench_<feature>.py modules present", file=sys.stderr)
        return 2
    results: List[Tuple[str, int, float]] = []
    for name in names:
        print(f"\n=== bench_{name} " + "=" * max(0, 50 - len(name)), flush=True)
        rc, seconds = run_one(name, args.quick, args.timeout)
        results.append((name, rc, seconds))
    print("\n=== summary " + "=" * 44)
    print(f"{'bench':<20}{'status':<10}{'seconds':>10}")
    for name, rc, seconds in results:
        print(f"{'bench_' + name:<20}{'ok' if rc == 0 else f'rc={rc}':<10}{seconds:>10.1f}")
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
