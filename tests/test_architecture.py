"""The package's import structure, read from the source (nothing is imported): no import circles, no private
names taken across modules, imports at the top unless a comment says why, and the packages in layers.

What counts as an import of a ``megatron_pz`` module: every ``import`` / ``from ... import`` statement naming one
(absolute or relative), wherever it stands: at module level, inside a function, and under ``if TYPE_CHECKING:``
too. A type-only import is still a dependency a reader follows, and one needed to break a circle says the types
sit in the wrong module (there are none today). ``from package import name`` counts as an import of the
submodule ``package.name`` when there is one, else of the package.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_pz"

# Imports from a lower package to a higher one that stay, each with its reason (the README's "Where things are"
# names them too). Key: (importing package, imported package), as top-level folders or files of megatron_pz.
LAYER_EXCEPTIONS = {
    ("disagg", "memory_plan"): "a rollout rank checks its own memory plan at start-up (disagg/server.py), while "
                               "the plan of a disaggregated job uses the job's own split rules (disagg/roles.py "
                               "split_of, disagg/protocol.py WorkSplit), so `megatron-pz plan` refuses what the run "
                               "would refuse",
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module
    names: tuple[str, ...]  # names taken by a from-import
    line: int
    in_function: bool
    text: str  # the statement's first line


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str, known) -> str:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str, path: Path, known) -> list[Import]:
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("megatron_pz"):
                        found.append(Import(module, resolve(alias.name, known), (), child.lineno, in_function,
                                            lines[child.lineno - 1]))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - child.level + 1] + ([child.module] if child.module else []))
                if base.startswith("megatron_pz"):
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        target = full if full in known else resolve(base, known)
                        names = () if full in known else (alias.name,)
                        found.append(Import(module, target, names, child.lineno, in_function, lines[child.lineno - 1]))
            visit(child, inside)

    visit(tree, False)
    return [i for i in found if i.target and i.target != module]


@functools.lru_cache(maxsize=None)
def all_imports() -> list[Import]:
    known = modules()
    return [i for m, p in known.items() for i in imports_of(m, p, known)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def describe(component: list[str], imports: list[Import]) -> str:
    inside = set(component)
    return "\n".join(sorted({f"  {i.source} -> {i.target} (line {i.line}: {i.text.strip()})"
                             for i in imports if i.source in inside and i.target in inside}))


def test_no_import_cycles():
    imports = all_imports()
    edges: dict[str, set[str]] = {}
    for i in imports:
        edges.setdefault(i.source, set()).add(i.target)
    found = cycles(edges)
    assert not found, "import circles inside megatron_pz (break each at its cause):\n" + "\n".join(
        f"circle {n + 1}: {', '.join(c)}\n{describe(c, imports)}" for n, c in enumerate(found))


def test_no_private_names_across_modules():
    """``from megatron_pz.x import _name`` outside ``megatron_pz.x``, or ``x._name`` on an imported module."""
    known = modules()
    bad = [f"{i.source} line {i.line}: {i.text.strip()}" for i in all_imports()
           if any(n.startswith("_") and not n.startswith("__") for n in i.names)]
    for module, path in known.items():  # attribute access through an imported module: alias._name
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.startswith("megatron_pz")})
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_pz"):
                aliases.update({(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in known})
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{module} line {node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, "private names used outside their module (make them public, or move the code):\n" + "\n".join(bad)


def test_function_level_imports_say_why():
    """Imports of megatron_pz modules sit at the top of a module; one inside a function (to keep a heavy or
    optional dependency off a path that does not need it: `megatron-pz --help`, vLLM, nltk) carries a comment on
    its line saying so."""
    bare = sorted({f"{i.source} line {i.line}: {i.text.strip()}" for i in all_imports()
                   if i.in_function and "#" not in i.text})
    assert not bare, "function-level imports without a reason (move them to the top, or say why):\n" + "\n".join(bare)


def layer(module: str) -> str:
    """The top-level folder or file of megatron_pz a module belongs to (what `farm-studio look` draws as a room)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_packages_form_layers():
    """Between the top-level packages (and files) of megatron_pz the imports form no circle, apart from the
    exceptions listed with their reasons in LAYER_EXCEPTIONS."""
    imports = all_imports()
    edges: dict[str, set[str]] = {}
    for i in imports:
        a, b = layer(i.source), layer(i.target)
        if a != b and (a, b) not in LAYER_EXCEPTIONS:
            edges.setdefault(a, set()).add(b)
    found = cycles(edges)
    detail = [f"{', '.join(c)}:\n" + "\n".join(sorted({f"  {i.source} -> {i.target}" for i in imports
                                                      if layer(i.source) in c and layer(i.target) in c
                                                      and layer(i.source) != layer(i.target)}))
              for c in found]
    assert not found, "packages that import each other:\n" + "\n".join(detail)
    for (a, b), reason in LAYER_EXCEPTIONS.items():  # an exception that no longer exists is removed from the list
        assert any(layer(i.source) == a and layer(i.target) == b for i in imports), (a, b, reason)


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The checks above are not vacuous: on a small tree with a circle, a private import and a bare lazy import
    they report each."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    root = tmp_path / "megatron_pz"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "one.py").write_text("from megatron_pz.sub.two import _hidden\n")
    (root / "sub" / "two.py").write_text("def f():\n    from . import one\n    return one\n_hidden = 1\n")
    known = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    found = [i for m, p in known.items() for i in imports_of(m, p, known)]
    assert {(i.source, i.target, i.names, i.in_function) for i in found} == {
        ("megatron_pz.sub.one", "megatron_pz.sub.two", ("_hidden",), False),
        ("megatron_pz.sub.two", "megatron_pz.sub.one", (), True)}

