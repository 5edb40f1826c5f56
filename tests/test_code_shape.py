"""The shape of the code (STYLE.md): functions under 60 lines, and every part of poolmgr placed in a layer.

Ruff checks complexity (C90, max 10) and `lint-imports` the layers themselves (both run by scripts/test); these
two rules have no tool of their own.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60


def long_functions(paths: list[Path], *, root: Path = ROOT) -> list[str]:
    """`file:line:name:lines` for every function or method (nested ones too) longer than the limit, counted
    from its `def` line to its last line."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno}:{node.name}:{lines}")
    return found


def test_no_function_in_poolmgr_or_bench_is_longer_than_60_lines() -> None:
    paths = sorted((ROOT / "poolmgr").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    too_long = long_functions(paths)
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines (file:line:name:lines):\n" + "\n".join(too_long)


def test_the_length_check_counts_from_the_def_line_to_the_last_line(tmp_path: Path) -> None:
    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    (tmp_path / "fits.py").write_text(f"class C:\n    def fits(self):\n{body}")
    (tmp_path / "long.py").write_text(f"class C:\n    async def long(self):\n{body}        y = 0\n")
    paths = [tmp_path / "fits.py", tmp_path / "long.py"]
    assert long_functions(paths, root=tmp_path) == [f"long.py:2:long:{MAX_FUNCTION_LINES + 1}"]


def test_every_module_and_package_of_poolmgr_is_in_a_layer() -> None:
    """A module outside every layer escapes the layers contract: placing it is part of adding it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (layers,) = [c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers"]
    placed = {name.strip().strip("()") for layer in layers["layers"] for name in layer.replace("|", ":").split(":")}
    top = {
        f"poolmgr.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "poolmgr").iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()
    }
    assert sorted(top - placed) == []
