"""The project's imports point one way, and no two files import each other.

Layers, bottom up: engine.errors and engine.config.sections / .tree (with the package files that importing
them runs) import nothing else of the project; kernels/ and dataloading/ import only that bottom layer (and
their own package); the rest of engine/ imports them; the command-line modules sit on top, and only they
import each other. Module-level imports form no cycle. An import of the project inside a function says why
on its line, in one of two forms: `# lazy: <reason>` (start-up cost, or a layer the module must not load
when imported) or `# optional: <dependency>` (Triton, DALI, xformers).

A package's module-level `__getattr__` may import its own submodules lazily (a re-export): that edge is
charged to whoever imports the name from the package, which is where the submodule then gets loaded.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "kernels", "dataloading")
BOTTOM = frozenset({"engine", "engine.errors", "engine.config", "engine.config.sections", "engine.config.tree"})
LIBRARIES = ("kernels", "dataloading")
COMMAND_LINE = frozenset({"engine.train", "engine.predict", "dataloading.validate", "dataloading.make_index",
                          "dataloading.export_digits", "kernels.__main__"})
REASON = re.compile(r"#\s*(lazy|optional):\s*\S")
HOW_TO_EXPLAIN = "move it to the top of the module, or say why on its line: '# lazy: <reason>' or " \
                 "'# optional: <dependency>'"


@dataclass(frozen=True)
class Source:
    name: str  # dotted module name
    path: str  # shown in messages
    text: str
    package: bool  # an __init__.py


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # path:line
    local: bool  # inside a function
    runs: bool  # executed when the source is imported (module level, not under `if TYPE_CHECKING`)
    explained: bool  # a '# lazy: ...' / '# optional: ...' comment on the statement's lines

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


@dataclass(frozen=True)
class Graph:
    edges: list[Edge]
    lazy_exports: list[Edge]  # a package's __getattr__ importing its own submodules


# ------------------------------------------------------------------------------------------ reading the code
def project_sources(root: Path = ROOT) -> dict[str, Source]:
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            out[name] = Source(name, str(path.relative_to(root)), path.read_text(encoding="utf-8"), is_package)
    return out


def _comment_lines(text: str) -> set[int]:
    """Lines that carry a reason comment."""
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)
    return {tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT and REASON.match(tok.string)}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.Module):
    """(statement, inside a function, under `if TYPE_CHECKING`, inside the module-level __getattr__)."""
    found = []

    def visit(node, local: bool, type_only: bool, hook: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, local, type_only, hook))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                is_hook = node is tree and getattr(child, "name", "") == "__getattr__"
                visit(child, True, type_only, hook or is_hook)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), local, True, hook)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), local, type_only, hook)
            else:
                visit(child, local, type_only, hook)

    visit(tree, False, False, False)
    return found


def _eager_names(tree: ast.Module) -> set[str]:
    """Names a module binds when it is imported (what `from module import name` finds without __getattr__)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _base(statement: ast.ImportFrom, source: Source) -> str:
    if not statement.level:
        return statement.module or ""
    parts = source.name.split(".") if source.package else source.name.split(".")[:-1]
    parts = parts[: len(parts) - (statement.level - 1)]
    return ".".join(parts + ([statement.module] if statement.module else []))


def import_graph(sources: dict[str, Source]) -> Graph:
    trees = {name: ast.parse(src.text, filename=src.path) for name, src in sources.items()}
    statements = {name: _import_statements(tree) for name, tree in trees.items()}
    reasons = {name: _comment_lines(src.text) for name, src in sources.items()}
    eager = {name: _eager_names(tree) for name, tree in trees.items()}
    lazily_exported: dict[str, set[str]] = {}  # package -> submodules its __getattr__ imports

    def known(dotted: str) -> str | None:  # the project module a dotted name lands in
        parts = dotted.split(".")
        return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in sources), None)

    def targets(statement, source: Source) -> list[str]:
        if isinstance(statement, ast.Import):
            return [t for a in statement.names if (t := known(a.name))]
        base = _base(statement, source)
        if known(base) is None:
            return []
        out = []
        for alias in statement.names:
            if f"{base}.{alias.name}" in sources:  # a submodule
                out.append(f"{base}.{alias.name}")
                continue
            out.append(known(base))
            if base in sources and alias.name not in eager[base]:  # found by the package's __getattr__
                out.extend(sorted(lazily_exported.get(base, ())))
        return out

    def edge(name: str, statement, target: str, local: bool, type_only: bool) -> Edge:
        lines = range(statement.lineno, (statement.end_lineno or statement.lineno) + 1)
        return Edge(name, target, f"{sources[name].path}:{statement.lineno}", local=local,
                    runs=not local and not type_only, explained=any(line in reasons[name] for line in lines))

    lazy_exports = []
    for name, found in statements.items():
        for statement, local, type_only, hook in found:
            for target in targets(statement, sources[name]) if hook and sources[name].package else ():
                if target.startswith(name + "."):
                    lazily_exported.setdefault(name, set()).add(target)
                    lazy_exports.append(edge(name, statement, target, local, type_only))
    charged_elsewhere = {(e.where, e.target) for e in lazy_exports}
    edges = {}  # one per statement and target
    for name, found in statements.items():
        for statement, local, type_only, _ in found:
            for target in targets(statement, sources[name]):
                e = edge(name, statement, target, local, type_only)
                if (e.where, e.target) not in charged_elsewhere and target != name:
                    edges.setdefault((e.where, e.target), e)
    return Graph(list(edges.values()), lazy_exports)


# ------------------------------------------------------------------------------------------ the rules
def broken_rule(source: str, target: str) -> str | None:
    """Which layering rule the import source -> target breaks, or None."""
    if source in BOTTOM:
        return None if target in BOTTOM else "the bottom layer imports nothing else of the project"
    if source in COMMAND_LINE:
        return None
    if target in COMMAND_LINE:
        return "only a command-line module imports a command-line module"
    home, other = source.split(".")[0], target.split(".")[0]
    if home in LIBRARIES and other != home and target not in BOTTOM:
        return f"{home}/ imports only the bottom layer and its own package"
    return None


def upward_edges(graph: Graph) -> list[str]:
    return [f"{e}: {rule}" for e in graph.edges if (rule := broken_rule(e.source, e.target))]


def cycles(graph: Graph) -> list[str]:
    """One cycle per strongly connected group of modules, through module-level imports that run."""
    succ: dict[str, dict[str, Edge]] = {}
    for e in graph.edges:
        if e.runs:
            succ.setdefault(e.source, {}).setdefault(e.target, e)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v: str):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(succ):
        if v not in index:
            connect(v)
    return [_one_cycle(sorted(group)[0], group, succ) for group in groups]


def _one_cycle(start: str, group: set[str], succ: dict[str, dict[str, Edge]]) -> str:
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while start not in came_from:  # breadth first inside the group, until an edge leads back to start
        reached = []
        for v in frontier:
            for w, e in sorted(succ.get(v, {}).items()):
                if w in group and w not in came_from:
                    came_from[w] = e
                    reached.append(w)
        frontier = reached
    path, v = [], start
    while not path or v != start:
        path.append(came_from[v])
        v = path[-1].source
    return " -> ".join([start] + [f"{e.target} ({e.where})" for e in reversed(path)])


def unexplained_local_imports(graph: Graph) -> list[Edge]:
    return [e for e in graph.edges + graph.lazy_exports if e.local and not e.explained]


# ------------------------------------------------------------------------------------------ the project
def test_no_import_points_up_a_layer():
    broken = upward_edges(import_graph(project_sources()))
    assert not broken, "imports that point up a layer (move the shared code down, or pass values in):\n" + \
        "\n".join(broken)


def test_no_two_files_import_each_other_at_module_level():
    found = cycles(import_graph(project_sources()))
    assert not found, "import cycles (move the shared code into a module both can import):\n" + "\n".join(found)


def test_every_function_local_import_of_the_project_says_why():
    found = unexplained_local_imports(import_graph(project_sources()))
    assert not found, f"function-local imports without a reason ({HOW_TO_EXPLAIN}):\n" + \
        "\n".join(str(e) for e in found)


def test_importing_the_bottom_layer_loads_nothing_else_of_the_project():
    code = ("import sys, engine.errors, engine.config.sections, engine.config.tree; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {PACKAGES!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(ast.literal_eval(out.stdout.strip()))
    assert loaded <= BOTTOM, f"importing the bottom layer also loaded {sorted(loaded - BOTTOM)}"


def test_the_config_package_still_exports_the_loader_lazily():
    import engine.config
    from engine.config import load

    assert engine.config.load_plan is load.load_plan and engine.config.RunPlan is load.RunPlan


# ------------------------------------------------------------------------------------------ the checker itself
def _sources(**modules: str) -> dict[str, Source]:
    """Synthetic modules: keyword 'a__b' is module a.b; a trailing '__init' makes it a package."""
    out = {}
    for key, text in modules.items():
        package = key.endswith("__init")
        name = key.removesuffix("__init").removesuffix("__").replace("__", ".")
        out[name] = Source(name, name.replace(".", "/") + ("/__init__.py" if package else ".py"), text, package)
    return out


def test_the_checker_names_an_upward_edge_even_inside_a_function():
    sources = _sources(engine__init="", engine__errors="", engine__session="",
                       dataloading__init="", dataloading__build="def f():\n    from engine.session import x\n")
    assert upward_edges(import_graph(sources)) == [
        "dataloading.build -> engine.session (dataloading/build.py:2): dataloading/ imports only the bottom layer "
        "and its own package"]


def test_the_checker_names_an_import_of_a_command_line_module_and_of_the_layer_above_the_bottom():
    sources = _sources(engine__init="", engine__errors="import engine.inference\n", engine__inference="",
                       engine__predict="from engine import inference\n",
                       engine__pseudo_label="from engine.predict import f\n")
    assert [b.split(":")[-1].strip() for b in upward_edges(import_graph(sources))] == [
        "the bottom layer imports nothing else of the project",
        "only a command-line module imports a command-line module"]


def test_the_checker_names_a_cycle_of_module_level_imports_only():
    looped = _sources(kernels__init="", kernels__a="from kernels import b\n", kernels__b="import kernels.a\n")
    assert cycles(import_graph(looped)) == ["kernels.a -> kernels.b (kernels/a.py:1) -> kernels.a (kernels/b.py:1)"]
    deferred = _sources(kernels__init="", kernels__a="from kernels import b\n",
                        kernels__b="def f():\n    import kernels.a  # lazy: a needs b first\n")
    assert cycles(import_graph(deferred)) == []
    typing_only = _sources(kernels__init="", kernels__a="from kernels import b\n",
                           kernels__b="from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import kernels.a\n")
    assert cycles(import_graph(typing_only)) == []


def test_the_checker_wants_a_reason_on_a_function_local_import_of_the_project():
    def local(comment: str) -> dict[str, Source]:
        dispatch = f"import os\ndef f():\n    import json\n    from kernels import native{comment}\n"
        return _sources(kernels__init="", kernels__native="", kernels__dispatch=dispatch)

    assert [str(e) for e in unexplained_local_imports(import_graph(local("")))] == [
        "kernels.dispatch -> kernels.native (kernels/dispatch.py:4)"]
    assert unexplained_local_imports(import_graph(local("  # optional: the native library"))) == []
    assert unexplained_local_imports(import_graph(local("  # lazy: start-up cost"))) == []
    assert len(unexplained_local_imports(import_graph(local("  # lazy")))) == 1  # a tag without a reason


def test_a_lazy_package_export_is_charged_to_the_module_that_imports_the_name():
    sources = _sources(
        engine__init="", engine__errors="", engine__config__sections="from engine.errors import E\n",
        engine__config__load="import dataloading\n",
        engine__config__init=("from engine.config.sections import S\n"
                              "def __getattr__(name):\n"
                              "    from engine.config import load  # lazy: load sits above the bottom layer\n"
                              "    return getattr(load, name)\n"),
        dataloading__init="", dataloading__a="from engine.config import S\n",
        dataloading__b="from engine.config import load_plan\n")
    graph = import_graph(sources)
    assert not [e for e in graph.edges if e.source == "engine.config" and e.target == "engine.config.load"]
    assert upward_edges(graph) == [
        "dataloading.b -> engine.config.load (dataloading/b.py:1): dataloading/ imports only the bottom layer "
        "and its own package"]
    assert unexplained_local_imports(graph) == []
