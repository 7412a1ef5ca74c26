"""Print the README's variant table: every method of ../shared/VARIANTS.md with its status here.

    python tools/variant_table.py [path/to/VARIANTS.md] > table.md
"""
from __future__ import annotations

import sys
from pathlib import Path

import lorazoo

CATALOGUE = Path(__file__).resolve().parents[1].parent / "shared" / "VARIANTS.md"


def rows(path: Path):
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("name", "---") and not set(cells[0]) <= {"-"}:
            yield cells


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else CATALOGUE
    from lorazoo.variants import catalogue

    done = set(catalogue())
    print("| name | method | family | tier | status |")
    print("|---|---|---|---|---|")
    for name, method, family, _axis, _spec, tier in rows(path):
        status = "done" if name in done else "planned"
        print(f"| `{name}` | {method} | {family} | {tier} | {status} |")


if __name__ == "__main__":
    main()
