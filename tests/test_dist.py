"""The object collectives of cosctl.common.dist in one process with no process group (how `cosctl data
prepare` runs them); their multi-rank behaviour runs in every `--nproc 2` test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cosctl.common.dist import agreed, gather, on_main, rank_and_world
from cosctl.common.errors import DataError
from tests.extras import require


def test_without_a_group_this_process_is_rank_0_of_1():
    """No process group: rank 0 of 1, and gather returns this process's value alone."""
    assert rank_and_world() == (0, 1)
    assert gather({"a": 1}) == [{"a": 1}]


def test_on_main_and_agreed_return_results_and_raise_the_callers_error():
    """on_main and agreed return the computed value, and re-raise the very exception they caught."""
    assert on_main(lambda: 41 + 1) == 42
    assert agreed(lambda: "ok") == "ok"
    problem = DataError("data.json: 3 of 4 records are bad")

    def fail():
        raise problem

    for collective in (on_main, agreed):
        with pytest.raises(DataError) as caught:
            collective(fail)
        assert caught.value is problem


def test_deepspeed_loads_without_importing_mlflow_which_stays_importable():
    """A rank's `import_deepspeed` keeps DeepSpeed's autotuner from importing an installed mlflow (0.1 GiB
    and over a second per rank); the MLflow tracker can still import it afterwards."""
    require("mlflow", "mlflow")
    script = (
        "import sys\n"
        "from cosctl.common.dist import import_deepspeed\n"
        "import_deepspeed()\n"
        "print('deepspeed' in sys.modules, 'mlflow' in sys.modules)\n"
        "import mlflow\n"
        "print(mlflow.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-2:] == ["True False", "mlflow"]  # after DeepSpeed's accelerator line
