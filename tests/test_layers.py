"""The layers of ARCHITECTURE.md hold: every module of src/ovdense imports only from its own package and from the
layers below its own (imports inside functions included)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "ovdense"


def layers() -> dict[str, int]:
    """Each top-level module or package of ovdense -> its layer, read from ARCHITECTURE.md's table."""
    found = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        row = re.match(r"\| (\d+) \| ([^|]+) \|", line)
        if row:
            found.update({name: int(row[1]) for name in re.findall(r"`(\w+)`", row[2])})
    return found


def imported_parts(path: Path) -> set[tuple[str, int]]:
    """(top-level part of ovdense, line) for every import in `path` that reaches outside its own part."""
    relative = path.relative_to(PACKAGE)
    own, package = relative.parts[0].removesuffix(".py"), relative.parts[:-1]
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[:len(package) - node.level + 1]) + (node.module.split(".") if node.module else [])
            targets = [base[0]] if base else [alias.name for alias in node.names]  # `from . import x` at the top
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ovdense."):
            targets = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("ovdense.")]
        else:
            continue
        parts.update((target, node.lineno) for target in targets if target not in (own, "__version__"))
    return parts


def test_the_table_names_every_part_once():
    table = layers()
    present = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    present |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert present == set(table)


def test_imports_go_only_down():
    table = layers()
    upward = [f"{path.relative_to(PACKAGE)}:{line} imports {target} (layer {table[target]} >= {table[own]})"
              for path in PACKAGE.rglob("*.py") if path.relative_to(PACKAGE).parts[0] != "__init__.py"
              for own in [path.relative_to(PACKAGE).parts[0].removesuffix(".py")]
              for target, line in imported_parts(path) if table[target] >= table[own]]
    assert not upward, "\n".join(sorted(upward))
