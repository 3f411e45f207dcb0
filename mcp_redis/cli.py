"""The `mcp-redis` command: health, migrate (and more sub-commands as features land)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Optional

__all__ = ["main"]

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


def cmd_migrate(args: argparse.Namespace) -> int:
    from .config import settings
    from .postgres import migrate

    if not settings().database_url:
        print("mcp-redis migrate: DATABASE_URL is not set", file=sys.stderr)
        return 2
    done = migrate()
    _print({"ok": True, "statements": done}, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-redis",
        description="Operate mcp_redis: health, migrations, stats, the demo and benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("health", help="check Redis and PostgreSQL; exit 1 when a configured backend is down")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_health)
    p = sub.add_parser("migrate", help="create the library's PostgreSQL tables (idempotent)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_migrate)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as exc:  # every library error message is secret-free
        print(f"mcp-redis {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
