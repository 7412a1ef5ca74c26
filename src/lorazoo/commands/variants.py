"""lorazoo variants: the catalogue of registered variants."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("variants", help="list the registered variants with family and paper")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("name", nargs="?", help="describe one variant or part in full")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..variants import catalogue, describe

    if args.name:
        print(json.dumps(describe(args.name), indent=1))
        return 0
    rows = [describe(n) for n in catalogue()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ("name", "family", "axes", "paper")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0
