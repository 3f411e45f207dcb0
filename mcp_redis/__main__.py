"""``python -m mcp_redis ...``: the `mcp-redis` command without installing a script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
