"""The layering of docs/architecture.md, checked on the source with `ast`.

Every import counts, the ones inside functions too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sjea_tools", "trainers", "exports")
# trainers/ and exports/ install as sjea_tools.trainers and sjea_tools.exports (pyproject's package-dir)
IMPORT_PREFIX = {"trainers": "sjea_tools.trainers", "exports": "sjea_tools.exports"}

# Lower layers never import higher ones. A module's layer is that of its longest matching prefix.
LAYERS = {
    # 0: foundations, no project imports beyond this layer
    "sjea_tools": 0, "sjea_tools.errors": 0, "sjea_tools.io": 0, "sjea_tools.progress": 0,
    "sjea_tools.levels": 0, "sjea_tools.spec": 0, "sjea_tools.devices": 0, "sjea_tools.vectors": 0,
    "sjea_tools.metrics": 0, "sjea_tools.losses": 0, "sjea_tools.config": 0,
    "sjea_tools.baselines": 0,
    "sjea_tools.onnx_proto": 0,  # the ONNX wire format and the content check, for exports and models  # pixel floors; the evaluation passes its k-NN and probe in
    # 1: models, data, run folders
    "sjea_tools.models": 1, "sjea_tools.data": 1, "sjea_tools.runs": 1,
    # 2: training and export, built on the model
    "sjea_tools.trainers": 2, "sjea_tools.exports": 2,
    # 3: everything that works on stores and results
    "sjea_tools.store": 3, "sjea_tools.index": 3, "sjea_tools.clusters": 3, "sjea_tools.embed": 3,
    "sjea_tools.search": 3, "sjea_tools.evaluation": 3, "sjea_tools.plots": 3, "sjea_tools.grid": 3,
    "sjea_tools.query": 3, "sjea_tools.duplicates": 3,
    "sjea_tools.hierarchy": 3, "sjea_tools.hierarchy_variants": 3,
    "sjea_tools.pipeline": 4, "sjea_tools.engines": 4, "sjea_tools.serve": 5,
    # the command line is on top; nothing imports it
    "sjea_tools.cli": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    parts[0] = IMPORT_PREFIX.get(parts[0], parts[0])
    return ".".join(parts)


def layer_of(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{name} has no layer in tests/test_architecture.py: add it"
    return LAYERS[best]


def project_imports(path: Path) -> set[str]:
    """Project modules imported anywhere in the file, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import x` imports module x
    known = {module_name(p) for p in sources()}
    return {m for m in found if m in known and m != name}


def sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]


def graph() -> dict[str, set[str]]:
    return {module_name(p): project_imports(p) for p in sources()}


def test_no_import_goes_up_a_layer():
    wrong = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
             for a, deps in graph().items() for b in deps
             if layer_of(b) > layer_of(a) and not (a == "sjea_tools" or b.startswith(a + "."))]
    assert not wrong, "\n".join(sorted(wrong))


def test_import_graph_has_no_cycle():
    g = graph()
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    g = {a: {b for b in deps if not b.startswith(a + ".")} for a, deps in g.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in g.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_rich_and_typer_live_only_under_cli():
    offenders = []
    for p in sources():
        if module_name(p).startswith("sjea_tools.cli"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{module_name(p)} imports {n}" for n in names if n.split(".")[0] in ("rich", "typer")]
    assert not offenders, "\n".join(offenders)


def test_every_package_folder_is_installed_under_sjea_tools():
    """pyproject lists the packages (mapped folders are invisible to find()): a new package folder
    missing from the list would be left out of the wheel; and nothing installs a top-level
    `trainers` or `exports`."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {module_name(p) for p in sources() if p.name == "__init__.py"}
    assert set(setup["packages"]) == folders
    assert all(name.startswith("sjea_tools") for name in setup["packages"])
    assert setup["package-dir"] == {v: k for k, v in IMPORT_PREFIX.items()}


def test_trainers_and_exports_are_not_top_level_import_names(tmp_path):
    """Outside the checkout, only sjea_tools is importable: `import exports` in a user's environment
    finds their own package, never ours."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import importlib.util as u; import sjea_tools.trainers.optim, sjea_tools.exports.runtime; "
            "print(u.find_spec('trainers'), u.find_spec('exports'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "None"]


MAX_MODULE_LINES = 500  # a module longer than this holds more than one concept (docs/architecture.md)


def test_no_module_is_over_500_lines():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in sources()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, "\n".join(long)


def test_no_private_module_of_a_dependency_is_imported():
    """`typer._click`, `torch._dynamo`, `from faiss import _swigfaiss`...: private parts change without
    notice between versions; the project uses public names only (its own modules aside)."""
    own = {p.split(".")[0] for p in PACKAGES} | {"sjea_tools"}
    offenders = []
    for p in [*sources(), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            offenders += [f"{p.relative_to(ROOT)}: {n}" for n in names
                          if n.split(".")[0] not in own and any(part.startswith("_") and not part.startswith("__")
                                                               for part in n.split("."))]
    assert not offenders, "\n".join(offenders)
