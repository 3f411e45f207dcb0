"""The `mcp-redis` command (also ``python -m mcp_redis``).

Sub-commands: ``demo`` (the multi-process tour), ``health`` (exit code for
monitors), ``stats``, ``migrate`` and ``sessions cleanup``. Every report
takes ``--json``. Exit codes: 0 fine, 1 the check failed (a backend
down, a demo invariant broken), 2 usage or configuration error.

The benchmarks are not a sub-command: they compare against peer libraries and
reuse the test suite's worker processes, so they run from a clone of the
repository (``python -m bench.run_all``; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, Dict, List, Optional

__all__ = ["main", "build_parser"]

Command = Callable[[argparse.Namespace], int]
_COMMANDS: Dict[str, Command] = {}


def _print(data: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    _print_tree(data, 0)


def _print_tree(data: Any, depth: int) -> None:
    pad = "  " * depth
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, (dict, list)) and v:
                print(f"{pad}{k}:")
                _print_tree(v, depth + 1)
            else:
                print(f"{pad}{k}: {v}")
    elif isinstance(data, list):
        for v in data:
            print(f"{pad}- {v}")
    else:
        print(f"{pad}{data}")


def cmd_health(args: argparse.Namespace) -> int:
    from .health import health

    report = health()
    _print(report, args.json)
    return 0 if report["ok"] else 1


def cmd_stats(args: argparse.Namespace) -> int:
    from .stats import redis_ok, stats

    report = stats(scan_limit=args.scan_limit)
    report["note"] = (
        "process counters are this CLI process's only; a server exposes its own "
        "with `from mcp_redis.stats import stats` or mcp_redis.prometheus"
    )
    _print(report, args.json)
    return 0 if redis_ok(report.get("redis", {})) else 1


def _one_line(exc: BaseException) -> str:
    """An error on one line (libpq's messages run over several)."""
    return " ".join(str(exc).split())


def cmd_migrate(args: argparse.Namespace) -> int:
    from .config import settings
    from .postgres import migrate

    if not settings().database_url:
        print("mcp-redis migrate: DATABASE_URL is not set", file=sys.stderr)
        return 2
    from .errors import BackendUnavailable

    try:
        done = migrate()
    except BackendUnavailable as exc:  # PostgreSQL down, like `health`: 1 (retry later), not 2 (fix it)
        print(f"mcp-redis migrate: {_one_line(exc)}", file=sys.stderr)
        return 1
    _print({"ok": True, "statements": done}, args.json)
    return 0


def cmd_sessions_cleanup(args: argparse.Namespace) -> int:
    from .config import settings

    if not settings().database_url:
        print("mcp-redis sessions cleanup: DATABASE_URL is not set: no PostgreSQL session rows to clean "
              "(Redis and local bindings expire by themselves)", file=sys.stderr)
        return 2
    from .config import Mode

    if settings().mode("sessions") in (Mode.LOCAL, Mode.OFF):
        # With REDIS_URL missing here, sessions are in-process: the command would clean nothing and
        # say ok. Deleting the rows without Redis is no answer either: in write-through mode a row
        # past its expiry may belong to a binding that Redis still keeps alive.
        print("mcp-redis sessions cleanup: sessions are in local mode here (REDIS_URL is not set, or "
              "MCP_REDIS_SESSIONS_BACKEND is local or off): run it with the REDIS_URL and DATABASE_URL of "
              "the servers whose rows it cleans", file=sys.stderr)
        return 2
    try:
        sessions = importlib.import_module("mcp_redis.sessions")
    except ImportError:
        print("mcp-redis sessions cleanup: the sessions feature is not available", file=sys.stderr)
        return 2
    fn = getattr(sessions, "cleanup_expired", None)
    if fn is None:
        store_cls = getattr(sessions, "SessionStore", None)
        fn = getattr(store_cls(), "cleanup_expired", None) if store_cls is not None else None
    if fn is None:
        print("mcp-redis sessions cleanup: this version has no cleanup_expired()", file=sys.stderr)
        return 2
    from .errors import BackendUnavailable

    try:
        removed = fn()
    except BackendUnavailable as exc:  # a backend down, like `health`: 1 (it stopped there)
        print(f"mcp-redis sessions cleanup: {_one_line(exc)}", file=sys.stderr)
        return 1
    _print({"ok": True, "removed": removed}, args.json)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, format_report, run_demo

    options = DemoOptions(
        workers=args.workers,
        seconds=args.seconds,
        threads=args.threads,
        agents=args.agents,
        unsafe=args.unsafe,
        restart=not args.no_restart,
        progress=not args.quiet,
    )
    report = run_demo(options)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print(format_report(report))
    return 0 if report["ok"] else 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _int_up_to(most: int, why: str) -> Callable[[str], int]:
    """An argparse type: an int from 1 to `most` (a demo run that could never end, or fork
    a process or thread per unit without bound, is refused up front)."""

    def parse(text: str) -> int:
        value = _positive_int(text)
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:,} ({why})")
        return value

    parse.__name__ = "int"  # argparse's "invalid int value" for text that is no number
    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be a finite number > 0")
    if value > 86400:
        raise argparse.ArgumentTypeError("must be at most 86400 (a day)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-redis",
        description="Operate mcp_redis: the demo, health, stats, migrations and session cleanup.",
    )
    parser.add_argument("--log-level", default=os.environ.get("MCP_REDIS_LOG_LEVEL", "WARNING"),
                        help="level of the 'mcp_redis' logger on stderr (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="several worker processes sharing state through the library, with a report")
    p.add_argument("--workers", type=_int_up_to(64, "one process each"), default=4,
                   help="worker processes (default 4, at most 64)")
    p.add_argument("--seconds", type=_positive_float, default=10.0, help="run time (default 10)")
    p.add_argument("--threads", type=_int_up_to(256, "per worker"), default=2,
                   help="threads per worker (default 2, at most 256)")
    p.add_argument("--agents", type=_int_up_to(100_000, "each seeded as a PostgreSQL row before the run"),
                   default=8, help="distinct agents (default 8, at most 100,000)")
    p.add_argument("--unsafe", action="store_true",
                   help="skip agent_lock around the read-modify-write, to see lost updates")
    p.add_argument("--no-restart", action="store_true", help="do not kill and restart a worker mid-run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("health", help="check Redis and PostgreSQL; exit 1 when a configured backend is down")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("stats", help="metrics of this process, Redis memory and keys per namespace, pools")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--scan-limit", type=_positive_int, default=100_000,
                   help="stop counting keys after this many (SCAN, never KEYS)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("migrate", help="create the library's PostgreSQL tables (idempotent)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("sessions", help="session maintenance")
    ssub = p.add_subparsers(dest="action", required=True)
    c = ssub.add_parser("cleanup", help="delete expired session bindings from PostgreSQL")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.set_defaults(func=cmd_sessions_cleanup)

    return parser


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream it was
    when the handler was made (like logging's last-resort handler): a command run in-process
    again, e.g. by a test capturing its output, does not write to a stream closed since."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _setup_logging(level: str) -> None:
    logger = logging.getLogger("mcp_redis")
    if logger.handlers:
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)


class _ReaderMayLeave:
    """stdout or stderr for a command whose reader may leave (`mcp-redis health | head -1`,
    `demo 2>&1 | head`): once it has, the rest of that output goes to /dev/null and the command
    runs to its end, so its exit code still tells what it found (a BrokenPipeError ended the
    command and exited 0: a down Redis reported healthy, a demo cut off after 0.3 s passed)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _left(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            self._left()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._left()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _setup_logging(args.log_level)
    except ValueError:
        parser.error(f"--log-level: unknown level {args.log_level!r}")
    previous = _terminate_like_interrupt()
    streams = sys.stdout, sys.stderr
    if sys.stdout is not None:  # None: started with fd 1 closed (`>&-`); print() writes nothing then
        sys.stdout = _ReaderMayLeave(sys.stdout)
    if sys.stderr is not None:
        sys.stderr = _ReaderMayLeave(sys.stderr)
    try:
        code = int(args.func(args))
        if sys.stdout is not None:
            sys.stdout.flush()
        return code
    except _Terminated:  # SIGTERM (timeout, systemd, docker stop): cleaned up like Ctrl-C
        print(f"mcp-redis {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"mcp-redis {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every library error message is secret-free
        print(f"mcp-redis {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.stdout, sys.stderr = streams
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: every ``finally`` (the demo's cleanup) runs, as for Ctrl-C."""


def _terminate_like_interrupt() -> Any:
    """Make SIGTERM raise `_Terminated` in the main thread; the previous handler (None: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated()
    return signal.signal(signal.SIGTERM, terminated)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
