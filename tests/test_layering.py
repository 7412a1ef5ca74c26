"""The core's modules import each other without a cycle (any import, also inside functions), so a
reader can follow it in one direction: errors, registry -> parts -> spec -> layer -> adapt ->
handle -> io."""
import ast
from pathlib import Path

import lorazoo

SRC = Path(lorazoo.__file__).parent


def _imports(path: Path) -> set[str]:
    """Modules of lorazoo that ``path`` imports, as dotted names relative to the package."""
    pkg = path.relative_to(SRC).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(pkg[: len(pkg) - node.level + 1])
            mod = base + (node.module.split(".") if node.module else [])
            names = [mod + [a.name] for a in node.names] if not node.module else [mod]
            for m in names:
                if (SRC.joinpath(*m).with_suffix(".py")).exists():
                    found.add(".".join(m))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorazoo."):
            found.add(node.module.removeprefix("lorazoo."))
    return found


def test_no_import_cycle_in_the_library():
    graph = {".".join(p.relative_to(SRC).with_suffix("").parts): _imports(p)
             for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done or node not in graph:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
