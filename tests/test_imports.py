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
