"""The layout keeps its promises: one folder per format, runtimes never import the exporter, no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"phi_edge.exporter": REPO / "exporter", "phi_edge.runtimes": REPO / "runtimes",
            "phi_edge.targets": REPO / "targets"}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg, root in PACKAGES.items():
        for f in root.rglob("*.py"):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([pkg, *parts])] = f
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """phi_edge modules ``name`` imports anywhere in its file (functions included)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[:len(base) - node.level + 1]
                mod = ".".join(stem + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from pkg import sub" imports the submodule sub when it is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # a name inside a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {n: _imports(n, p, set(mods)) for n, p in mods.items()}


def test_no_two_modules_import_each_other():
    graph = _graph()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph.get(b, ())})
    assert not pairs, f"modules that import each other: {pairs}"


def test_runtimes_never_import_the_exporter():
    offenders = {n: sorted(d for d in deps if d.startswith("phi_edge.exporter"))
                 for n, deps in _graph().items() if n.startswith("phi_edge.runtimes")}
    assert not {n: d for n, d in offenders.items() if d}


def test_deploy_does_not_import_the_cli():
    graph = _graph()
    for n, deps in graph.items():
        if n.startswith("phi_edge.exporter.deploy"):
            assert "phi_edge.exporter.cli" not in deps, n


def test_each_format_lives_in_formats_and_the_registry_names_it():
    from phi_edge.exporter.formats import FORMAT_MODULES
    from phi_edge.runtimes import BACKENDS

    assert set(FORMAT_MODULES) == set(BACKENDS)
    for fmt, module in FORMAT_MODULES.items():
        assert module.startswith("phi_edge.exporter.formats."), module
        rel = module.removeprefix("phi_edge.exporter.formats.").replace(".", "/")
        assert (REPO / "exporter" / "formats" / f"{rel}.py").is_file() or \
            (REPO / "exporter" / "formats" / rel / "__init__.py").is_file(), fmt


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(REPO)) for p in _modules().values() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without an opening docstring: {missing}"
