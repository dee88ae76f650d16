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


def test_the_import_contracts_hold():
    """The package contracts in pyproject.toml (cos_model never imports cosctl; cosctl's packages import
    downwards only; no two modules or packages import each other, lazily or for type checkers) hold."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    lint_imports = pathlib.Path(sys.executable).parent / "lint-imports"  # installed with the test extra
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout, result.stdout[-2000:]


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
