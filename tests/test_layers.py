"""The shape rules of ``ARCHITECTURE.md``, checked on the source of ``timm_kd/**/*.py`` (stdlib ``ast``).

One test per rule over the real package; each violation reads ``file:line: [rule] what is wrong``.

Rules:

* ``cycle``: no import cycle among timm_kd modules. The graph has an edge for every ``import`` and
  ``from ... import`` (absolute or relative, at module level or inside a function, under
  ``TYPE_CHECKING`` too) and every ``importlib.import_module("timm_kd...")`` with a literal name. An
  edge goes to the module named; ``from X import a`` goes to ``X.a`` when that is a module, else to
  ``X``. Parent packages run on import too, but get no edge: a submodule's ``from ._x import y`` would
  otherwise close a false cycle with its own package's ``__init__``.
* ``layer``: no import from a higher layer (``LAYERS``), and none between two different top-level units
  (packages or single modules) of one layer: ``teacher`` and ``cache`` do not import each other. The
  root ``timm_kd/__init__.py`` (and ``__main__.py``) is the public API above every layer: it may import
  anything and nothing imports it (``from timm_kd import __version__`` inside the package is upward;
  take it from ``timm_kd.version``). A top-level unit missing from ``LAYERS`` is a violation: place it.
* ``private``: no private name (``_x``, not a dunder) and no private module (``timm_kd.losses._base``,
  ``timm_kd._io``) imported from outside the top-level unit that holds it.
* ``import-top``: imports at module level (also inside a module-level ``if``/``try``, such as
  ``if TYPE_CHECKING:`` or ``try: ... except ImportError:``), never inside a function or class body,
  except optional dependencies (``OPTIONAL_DEPENDENCIES``) and in ``LAZY_IMPORT_FILES`` (the CLI imports
  its subcommands when they run, for a fast ``--help``). That module-level imports precede other code
  is ruff's E402 (``tests/test_style.py``).
* ``is_compiling``: the word appears nowhere in ``timm_kd/``, code, comments or docstrings.
* ``size``: a file has at most ``MAX_FILE_LINES`` lines and a function (or method) at most
  ``MAX_FUNCTION_LINES`` (from its ``def`` line to its last line), declarative tables aside.

Declarative tables are not counted (``table_lines``):

* an assignment (``x = ...``, ``x: T = ...``; at any level) whose value is a dict, list, tuple or set
  display (or a call wrapping one, such as ``MappingProxyType({...})``) holding at least one constant
  and built only from constants, names, attributes, signed constants, nested displays and calls of
  the same (records such as ``Card(title="...", bibtex="...")``); a comprehension, lambda, operator or
  f-string anywhere in it makes it code;
* in a class decorated with ``@dataclass``, the field declarations (annotated assignments) and the
  string literals documenting them; when the body holds nothing else, the whole body, comments
  included.
"""
from __future__ import annotations

import ast
import functools
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "timm_kd"

#: ARCHITECTURE.md's layer order, lowest first: a unit imports only from lower layers (and itself).
LAYERS: dict[str, int] = {
    "version": 1,
    "lazy": 1,
    "files": 1,
    "offline": 1,
    "losses": 2,
    "data": 2,
    "models": 2,
    "metrics": 2,
    "teacher": 3,
    "cache": 3,
    "wrapper": 4,
    "hub": 4,
    "diagnostics": 3,
    "ranking": 4,
    "engine": 5,
    "cli": 6,
}
ROOT_UNIT = ""  # timm_kd/__init__.py and timm_kd/__main__.py: the public API, above every layer
ROOT_FILES = ("__init__", "__main__")
OPTIONAL_DEPENDENCIES = ("sklearn", "matplotlib", "tensorboard", "torch.utils.tensorboard", "wandb")
LAZY_IMPORT_FILES = ("cli.py",)  # relative to the package folder
FORBIDDEN_WORD = "is_compiling"
MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 120
RULES = ("cycle", "layer", "private", "import-top", "is_compiling", "size")


@dataclass(frozen=True)
class Violation:
    rule: str
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # absolute dotted module name
    name: str | None  # the name taken by ``from target import name`` (None: the module itself)
    lazy: bool  # inside a function or class body


@dataclass
class Module:
    name: str
    path: Path
    rel: str  # path as reported, relative to the folder above the package
    pkg_rel: str  # path relative to the package folder
    is_package: bool
    text: str
    tree: ast.Module


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def unit_of(module: str) -> str:
    """The top-level unit of a dotted name inside the package (``timm_kd.losses.kd`` -> ``losses``)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ROOT_FILES:
        return ROOT_UNIT
    return parts[1]


def load_modules(package_dir: Path) -> dict[str, Module]:
    pkg = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        name = ".".join([pkg, *parts])
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(package_dir.parent).as_posix()
        pkg_rel = path.relative_to(package_dir).as_posix()
        modules[name] = Module(name, path, rel, pkg_rel, is_package, text, ast.parse(text, filename=rel))
    return modules


# ---------------------------------------------------------------------------------------------------
# imports


def _resolve_relative(mod: Module, level: int, target: str | None) -> str:
    base = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _literal_import_call(node: ast.Call) -> str | None:
    """The module of ``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")``."""
    func = node.func
    fname = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if fname not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return arg.value
    return None


def collect_imports(mod: Module, known: set[str]) -> list[Import]:
    """Every import of ``mod``, with ``lazy`` set for those inside a function or class body."""
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, a.name, None, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(mod, node.level, node.module) if node.level else node.module or ""
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in known:
                    found.append(Import(node.lineno, sub, None, lazy))
                else:
                    found.append(Import(node.lineno, base, a.name, lazy))
        elif isinstance(node, ast.Call) and (target := _literal_import_call(node)):
            found.append(Import(node.lineno, target, None, lazy))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(mod.tree, False)
    return found


def _is_internal(target: str, pkg: str) -> bool:
    return target == pkg or target.startswith(pkg + ".")


def _is_optional(imp: Import) -> bool:
    names = [imp.target] + ([f"{imp.target}.{imp.name}"] if imp.name else [])
    return any(n == dep or n.startswith(dep + ".") for n in names for dep in OPTIONAL_DEPENDENCIES)


def check_imports(modules: dict[str, Module], pkg: str) -> list[Violation]:
    """The ``layer``, ``private`` and ``import-top`` rules."""
    known = set(modules)
    out: list[Violation] = []
    unplaced: set[str] = set()
    for mod in modules.values():
        src = unit_of(mod.name)
        if src != ROOT_UNIT and src not in LAYERS and src not in unplaced:
            unplaced.add(src)
            out.append(Violation("layer", mod.rel, 1, f"unit {src!r} has no layer: add it to LAYERS "
                                 f"in tests/test_layers.py (ARCHITECTURE.md's layer order)"))
        lazy_ok = mod.pkg_rel in LAZY_IMPORT_FILES
        for imp in collect_imports(mod, known):
            if imp.lazy and not lazy_ok and not _is_optional(imp):
                out.append(Violation("import-top", mod.rel, imp.line, f"imports {imp.target} inside a "
                                     f"function or class body; import it at module top (only optional "
                                     f"dependencies, OPTIONAL_DEPENDENCIES, are imported where used)"))
            if not _is_internal(imp.target, pkg):
                continue
            dst = unit_of(imp.target)
            if dst != src:
                out.extend(_layer_violation(mod, imp, src, dst))
                out.extend(_private_violation(mod, imp, dst))
    return list(dict.fromkeys(out))  # one report per statement, not per imported name


def _layer_violation(mod: Module, imp: Import, src: str, dst: str) -> list[Violation]:
    if src == ROOT_UNIT:
        return []
    if dst == ROOT_UNIT:
        msg = (f"imports {imp.name or 'itself'} from the package root {imp.target}: the public API sits "
               f"above every layer; import from the module that defines the name")
        return [Violation("layer", mod.rel, imp.line, msg)]
    if src not in LAYERS or dst not in LAYERS:
        return []  # reported once as a unit with no layer
    a, b = LAYERS[src], LAYERS[dst]
    if a < b:
        msg = f"upward import: {src} (layer {a}) imports {imp.target} ({dst}, layer {b})"
    elif a == b:
        msg = f"same-layer import between packages: {src} imports {imp.target} ({dst}), both layer {a}"
    else:
        return []
    return [Violation("layer", mod.rel, imp.line, msg)]


def _private_violation(mod: Module, imp: Import, dst: str) -> list[Violation]:
    parts = imp.target.split(".")[1:]
    if any(is_private(p) for p in parts):
        return [Violation("private", mod.rel, imp.line, f"imports private module {imp.target} from "
                          f"outside {dst or 'the root'}: make it public or move the code")]
    if imp.name and is_private(imp.name):
        return [Violation("private", mod.rel, imp.line,
                          f"imports private name {imp.name} of {imp.target} from outside "
                          f"{dst or 'the root'}: make it public or move the code")]
    return []


# ---------------------------------------------------------------------------------------------------
# cycles


def import_graph(modules: dict[str, Module], pkg: str) -> dict[str, dict[str, int]]:
    """``graph[a][b]``: the first line of ``a`` that imports ``b`` (timm_kd modules only)."""
    known = set(modules)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for mod in modules.values():
        for imp in collect_imports(mod, known):
            if imp.target in known and imp.target != mod.name:
                graph[mod.name].setdefault(imp.target, imp.line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def shortest_cycle(graph: dict[str, dict[str, int]], start: str, comp: set[str]) -> list[str]:
    """A shortest path ``start -> ... -> start`` inside one component."""
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w in comp and w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle of its component")


def check_cycles(modules: dict[str, Module], pkg: str) -> list[Violation]:
    graph = import_graph(modules, pkg)
    out = []
    for comp in strongly_connected(graph):
        path = shortest_cycle(graph, comp[0], set(comp))
        steps = " -> ".join(
            f"{b} ({modules[a].rel}:{graph[a][b]})" for a, b in zip(path, path[1:])
        )
        first = modules[path[0]]
        out.append(Violation("cycle", first.rel, graph[path[0]][path[1]],
                             f"import cycle among {', '.join(comp)}: {path[0]} -> {steps}"))
    return out


# ---------------------------------------------------------------------------------------------------
# is_compiling, sizes


def check_forbidden_word(modules: dict[str, Module]) -> list[Violation]:
    return [
        Violation("is_compiling", mod.rel, i, f"{FORBIDDEN_WORD!r} appears: no compile-only branches")
        for mod in modules.values()
        for i, line in enumerate(mod.text.splitlines(), 1)
        if FORBIDDEN_WORD in line
    ]


DISPLAYS = (ast.Dict, ast.List, ast.Tuple, ast.Set)


def _is_table_part(node: ast.AST) -> bool:
    if isinstance(node, (ast.Constant, ast.Name)):
        return True
    if isinstance(node, ast.Attribute):
        return _is_table_part(node.value)
    if isinstance(node, ast.UnaryOp):
        return isinstance(node.op, (ast.USub, ast.UAdd)) and isinstance(node.operand, ast.Constant)
    if isinstance(node, ast.Starred):
        return _is_table_part(node.value)
    if isinstance(node, ast.Dict):
        return all(_is_table_part(k) for k in node.keys if k is not None) and all(
            _is_table_part(v) for v in node.values
        )
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_is_table_part(e) for e in node.elts)
    if isinstance(node, ast.Call):
        return (
            isinstance(node.func, (ast.Name, ast.Attribute))
            and _is_table_part(node.func)
            and all(_is_table_part(a) for a in node.args)
            and all(_is_table_part(k.value) for k in node.keywords)
        )
    return False


def is_table_assignment(node: ast.AST) -> bool:
    if not isinstance(node, (ast.Assign, ast.AnnAssign)) or node.value is None:
        return False
    value = node.value
    if isinstance(value, ast.Call):  # a wrapped display: MappingProxyType({...}), frozenset({...})
        if not any(isinstance(a, DISPLAYS) for a in [*value.args, *(k.value for k in value.keywords)]):
            return False
    elif not isinstance(value, DISPLAYS):
        return False
    return _is_table_part(value) and any(isinstance(n, ast.Constant) for n in ast.walk(value))


def _is_dataclass(node: ast.ClassDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
        if name == "dataclass":
            return True
    return False


def _is_field_statement(stmt: ast.stmt) -> bool:
    if isinstance(stmt, (ast.AnnAssign, ast.Pass)):
        return True
    value = stmt.value if isinstance(stmt, ast.Expr) else None
    return isinstance(value, ast.Constant) and isinstance(value.value, str)


def _span(node: ast.AST) -> range:
    return range(node.lineno, node.end_lineno + 1)


def table_lines(tree: ast.Module) -> set[int]:
    """Line numbers of declarative tables (see the module docstring)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if is_table_assignment(node):
            lines.update(_span(node))
        elif isinstance(node, ast.ClassDef) and _is_dataclass(node):
            if all(_is_field_statement(s) for s in node.body):
                lines.update(range(node.body[0].lineno, node.end_lineno + 1))
            else:
                for stmt in node.body:
                    if _is_field_statement(stmt):
                        lines.update(_span(stmt))
    return lines


def check_sizes(modules: dict[str, Module]) -> list[Violation]:
    out = []
    for mod in modules.values():
        tables = table_lines(mod.tree)
        total = len(mod.text.splitlines())
        counted = len(set(range(1, total + 1)) - tables)
        if counted > MAX_FILE_LINES:
            out.append(Violation("size", mod.rel, 1, f"file has {counted} lines besides declarative "
                                 f"tables ({total} in all); the limit is {MAX_FILE_LINES}: split it"))
        for node in ast.walk(mod.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = len(set(_span(node)) - tables)
                if n > MAX_FUNCTION_LINES:
                    out.append(Violation("size", mod.rel, node.lineno, f"function {node.name} has {n} lines "
                                         f"besides declarative tables; the limit is {MAX_FUNCTION_LINES}"))
    return out


# ---------------------------------------------------------------------------------------------------
# the whole check


def check_package(package_dir: Path) -> list[Violation]:
    """Every violation of the rules in ``package_dir`` (a folder named like the package)."""
    pkg = package_dir.name
    modules = load_modules(package_dir)
    found = (
        check_cycles(modules, pkg)
        + check_imports(modules, pkg)
        + check_forbidden_word(modules)
        + check_sizes(modules)
    )
    return sorted(found, key=lambda v: (v.rule, v.path, v.line, v.message))


@functools.lru_cache(maxsize=1)
def _package_violations() -> tuple[Violation, ...]:
    return tuple(check_package(PACKAGE_DIR))


@pytest.mark.parametrize("rule", RULES)
def test_package_follows_rule(rule):
    found = [str(v) for v in _package_violations() if v.rule == rule]
    assert not found, f"{len(found)} violation(s) of rule {rule!r}:\n" + "\n".join(found)


def test_checker_sees_the_package():
    modules = load_modules(PACKAGE_DIR)
    graph = import_graph(modules, "timm_kd")
    assert {"timm_kd", "timm_kd.wrapper", "timm_kd.version", "timm_kd.teacher"} <= set(modules)
    assert "timm_kd.wrapper" in graph["timm_kd"]  # the public API re-exports DistillWrapper
    assert any(unit_of(b) == "models" for b in graph["timm_kd.teacher"])


# ---------------------------------------------------------------------------------------------------
# the checker on small synthetic trees


def make_tree(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "timm_kd"
    for rel, text in {"__init__.py": "", **files}.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return pkg


def by_rule(found: list[Violation], rule: str) -> list[Violation]:
    return [v for v in found if v.rule == rule]


CLEAN_TREE = {
    "__init__.py": "from .losses import create_loss\nfrom .version import __version__\n"
    "from .wrapper import Wrapper\n",
    "version.py": '__version__ = "0.1"\n',
    "losses/__init__.py": "from ._registry import create_loss\nfrom .kd import KD\n",
    "losses/_registry.py": "def create_loss():\n    return None\n",
    "losses/kd.py": "from ._registry import create_loss\n\n\nclass KD:\n    pass\n",
    "models.py": "import torch\n",
    "teacher.py": "from typing import TYPE_CHECKING\n\nfrom .models import torch\n\n"
    "if TYPE_CHECKING:\n    from .losses import KD\n",
    "wrapper.py": "try:\n    import wandb\nexcept ImportError:\n    wandb = None\n\n"
    "from timm_kd.teacher import torch\nfrom . import losses\n\n\nclass Wrapper:\n    pass\n",
    "diagnostics.py": "def plot():\n    from matplotlib.figure import Figure\n"
    "    from torch.utils.tensorboard import SummaryWriter\n    import sklearn.datasets\n"
    "    return Figure, SummaryWriter, sklearn\n",
    "ranking.py": "from .diagnostics import plot\n",
    "engine/__init__.py": "from .loop import fit\n",
    "engine/loop.py": "from ..wrapper import Wrapper\nfrom .config import _DEFAULTS\n\n\ndef fit():\n"
    "    return Wrapper\n",
    "engine/config.py": "_DEFAULTS = {}\n",
    "cli.py": "def main():\n    from .engine import fit\n    from .version import __version__\n"
    "    return fit, __version__\n",
}


def test_clean_tree_passes(tmp_path):
    assert check_package(make_tree(tmp_path, CLEAN_TREE)) == []


def test_cycle_is_reported_with_its_path(tmp_path):
    files = dict(CLEAN_TREE)
    files["cache.py"] = "def build():\n    from .engine import fit\n"  # lazy: still an edge
    files["engine/loop.py"] = "from ..cache import build\n"
    files["losses/a.py"] = "from .b import y\nx = 1\n"
    files["losses/b.py"] = "from . import a\ny = 1\n"
    cycles = by_rule(check_package(make_tree(tmp_path, files)), "cycle")
    assert len(cycles) == 2, cycles
    msgs = "\n".join(map(str, cycles))
    assert (
        "timm_kd/cache.py:2: [cycle] import cycle among timm_kd.cache, timm_kd.engine, timm_kd.engine.loop: "
        "timm_kd.cache -> timm_kd.engine (timm_kd/cache.py:2) -> timm_kd.engine.loop "
        "(timm_kd/engine/__init__.py:1) -> timm_kd.cache (timm_kd/engine/loop.py:1)"
    ) in msgs
    assert "timm_kd.losses.a -> timm_kd.losses.b (timm_kd/losses/a.py:1) -> timm_kd.losses.a" in msgs


def test_upward_same_layer_and_root_imports(tmp_path):
    files = dict(CLEAN_TREE)
    files["models.py"] = "import torch\nfrom .teacher import x\n"  # 2 -> 3
    files["losses/kd.py"] = "from ..engine.loop import fit\n\n\nclass KD:\n    pass\n"  # 2 -> 5
    files["cache.py"] = "import timm_kd.teacher\n"  # 3 -> 3, another unit
    files["hub/__init__.py"] = "from ..ranking import plot\nfrom timm_kd import __version__\n"
    files["data/__init__.py"] = "from .sources import load\n"  # inside one package: fine
    files["data/sources.py"] = "from ..version import __version__\nload = None\n"
    found = by_rule(check_package(make_tree(tmp_path, files)), "layer")
    got = {(v.path, v.line) for v in found}
    assert got == {
        ("timm_kd/models.py", 2),
        ("timm_kd/losses/kd.py", 1),
        ("timm_kd/cache.py", 1),
        ("timm_kd/hub/__init__.py", 1),
        ("timm_kd/hub/__init__.py", 2),
    }, found
    text = "\n".join(map(str, found))
    assert "upward import: models (layer 2) imports timm_kd.teacher (teacher, layer 3)" in text
    assert "same-layer import between packages: cache imports timm_kd.teacher (teacher), both layer 3" in text
    assert "imports __version__ from the package root timm_kd" in text


def test_unplaced_unit(tmp_path):
    files = dict(CLEAN_TREE, **{"extras.py": "x = 1\n"})
    found = by_rule(check_package(make_tree(tmp_path, files)), "layer")
    assert [(v.path, v.line) for v in found] == [("timm_kd/extras.py", 1)]
    assert "add it to LAYERS" in found[0].message


def test_private_imports_across_packages(tmp_path):
    files = dict(CLEAN_TREE)
    files["wrapper.py"] = (
        "from timm_kd.losses._registry import create_loss\n"
        "from .losses import _registry\n"
        "import timm_kd.losses._registry\n"
        "from .models import _helper\n"
        "from .version import __version__\n"
        "from .losses import create_loss as _c\n"
    )
    files["models.py"] = "_helper = 1\n"
    found = by_rule(check_package(make_tree(tmp_path, files)), "private")
    assert [v.line for v in found] == [1, 2, 3, 4], found
    assert all(v.path == "timm_kd/wrapper.py" for v in found)
    assert "private name _helper" in found[3].message
    assert "private module timm_kd.losses._registry" in found[0].message


def test_imports_inside_functions_and_classes(tmp_path):
    files = dict(CLEAN_TREE)
    files["teacher.py"] = (
        "import importlib\n\n\n"
        "def f():\n    import numpy\n    from .models import torch\n    return numpy, torch\n\n\n"
        "class T:\n    import json\n\n\n"
        "def g():\n    return importlib.import_module('timm_kd.models')\n"
    )
    found = by_rule(check_package(make_tree(tmp_path, files)), "import-top")
    assert [(v.path, v.line) for v in found] == [
        ("timm_kd/teacher.py", 5),
        ("timm_kd/teacher.py", 6),
        ("timm_kd/teacher.py", 11),
        ("timm_kd/teacher.py", 15),
    ], found
    assert "imports numpy inside a function" in found[0].message


def test_lazy_import_exemption_is_only_the_root_cli(tmp_path):
    files = dict(CLEAN_TREE)
    files["engine/cli.py"] = "def main():\n    import json\n"
    found = by_rule(check_package(make_tree(tmp_path, files)), "import-top")
    assert [(v.path, v.line) for v in found] == [("timm_kd/engine/cli.py", 2)]


def test_is_compiling_anywhere(tmp_path):
    files = dict(CLEAN_TREE)
    files["losses/kd.py"] = '"""Docstring."""\nimport torch\n\nif torch.compiler.is_compiling():\n    pass\n'
    files["models.py"] = "# no is_compiling branch here\n"
    found = by_rule(check_package(make_tree(tmp_path, files)), "is_compiling")
    assert [(v.path, v.line) for v in found] == [("timm_kd/losses/kd.py", 4), ("timm_kd/models.py", 1)]


def _function(name: str, body_lines: int) -> str:
    return f"def {name}():\n" + "    x = 0\n" * (body_lines - 2) + "    return x\n"


def test_sizes_and_tables(tmp_path):
    rows = "".join(f'    "k{i}": ("a", -1, None, C.x, R(t=1)),\n' for i in range(300))
    table = "TABLE = {\n" + rows + "}\n"
    fields = "".join(f"    f{i}: int = field(default={i}, metadata={{'help': 'h'}})\n" for i in range(300))
    dataclass_src = "@dataclass\nclass Config:\n    # comment\n" + fields
    methods_src = "@dataclasses.dataclass(frozen=True)\nclass Config2:\n" + fields + (
        "    def m(self):\n" + "        y = 1\n" * 10
    )
    big_table_in_function = "def f():\n    r = [\n" + "        (1, 2),\n" * 200 + "    ]\n    return r\n"
    files = dict(CLEAN_TREE)
    files["models.py"] = "\n".join(["x = 1"] * 801) + "\n"  # 801 lines of code
    files["metrics/__init__.py"] = table + table.replace("TABLE", "T2") + table.replace("TABLE", "T3")
    files["hub/__init__.py"] = dataclass_src + methods_src + big_table_in_function
    files["hub/code.py"] = "ROWS = [\n" + "    f(i) + 1,\n" * 850 + "]\n"  # code, not a table
    files["data/__init__.py"] = _function("ok", 120) + _function("too_long", 121)
    found = by_rule(check_package(make_tree(tmp_path, files)), "size")
    assert [(v.path, v.line) for v in found] == [
        ("timm_kd/data/__init__.py", 121),
        ("timm_kd/hub/code.py", 1),
        ("timm_kd/models.py", 1),
    ], found
    assert "function too_long has 121 lines" in found[0].message
    assert "file has 801 lines" in found[2].message


def test_table_recognition():
    def table(src: str) -> bool:
        return is_table_assignment(ast.parse(src).body[0])

    assert table("X = {'a': (1, -2.0, None), 'b': [Card(title='t', keys=('x',))], **BASE}")
    assert table("X: dict[str, int] = MappingProxyType({'a': 1, 'b': mod.CONST})")
    assert not table("x = f(a, 1)")  # a call is code unless it wraps a display
    assert not table("a, b = b, a")  # no constant: a swap, not a table
    assert not table("X = [f(i) for i in range(3)]")
    assert not table("X = {'a': lambda v: v}")
    assert not table("X = (1, 2) + EXTRA")
    assert not table("X = {'a': f'{y}'}")
    assert not table("X = compute")


def test_violation_format():
    v = Violation("layer", "timm_kd/a.py", 3, "upward import")
    assert str(v) == "timm_kd/a.py:3: [layer] upward import"
