"""Package boundaries."""

import subprocess
import sys


def test_cos_model_never_imports_cosctl():
    """Importing cos_model (and building a model) loads no cosctl module."""
    code = (
        "import sys, cos_model\n"
        "cos_model.CosConfig()\n"
        "bad = sorted(m for m in sys.modules if m == 'cosctl' or m.startswith('cosctl.'))\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_cos_model_source_mentions_cosctl_imports():
    """No module under cos_model/ imports cosctl, even lazily inside a function."""
    import ast
    import pathlib

    import cos_model

    root = pathlib.Path(cos_model.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "cosctl" for n in names), f"{path} imports cosctl"


def _internal_imports(package_root, package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports, at module level or lazily inside a function
    (imports for type checkers only, under `if TYPE_CHECKING:`, never run and are left out)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in package_root.rglob("*.py"):
        parts = path.relative_to(package_root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        tree = ast.parse(path.read_text())
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets.update(c for c in candidates if c.split(".")[0] == package)
        graph[name] = targets
    known = set(graph)
    return {name: {t for t in targets if t in known and t != name} for name, targets in graph.items()}


def test_cosctl_module_imports_have_no_cycle():
    """The import graph of cosctl, lazy imports included, is acyclic (no module needs one that needs it
    back)."""
    import pathlib

    import cosctl

    graph = _internal_imports(pathlib.Path(cosctl.__file__).parent, "cosctl")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, "import cycle: " + " -> ".join(path[path.index(node) :] + [node])
        state[node] = 1
        for target in sorted(graph[node]):
            # A package's __init__ importing its own submodules is not a cycle of layers.
            if not target.startswith(node + "."):
                visit(target, path + [node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])
    assert "cosctl.storage.s3" in graph and "cosctl.checkpoint.checkpointer" in graph


def test_storage_does_not_depend_on_the_spec():
    """The storage package takes plain settings: none of its modules imports the run spec."""
    import pathlib

    import cosctl

    graph = _internal_imports(pathlib.Path(cosctl.__file__).parent, "cosctl")
    for module, targets in graph.items():
        if module.startswith("cosctl.storage"):
            assert not {
                t for t in targets if t.startswith(("cosctl.spec.specs", "cosctl.train.loop", "cosctl.train.run"))
            }, module


def test_design_references_resolve():
    """Every `docs/design.md §N` cited in code, tests, benchmarks or docs names a section that exists."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    design = (root / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## §(\d+) ", design, flags=re.M))
    cited = []
    for path in [*root.glob("cos*/**/*.py"), *root.glob("tests/*.py"), *root.glob("bench/*"), root / "README.md"]:
        for match in re.finditer(r"design\.md (§\d+(?:, §\d+)*)", path.read_text()):
            cited += [(path.name, number) for number in re.findall(r"§(\d+)", match.group(1))]
    assert cited, "nothing cites the design document"
    assert not [c for c in cited if c[1] not in sections], [c for c in cited if c[1] not in sections]
