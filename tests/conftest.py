"""Shared fixtures (builders live in tests/tiny.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cos_model import CosConfig, CosForConditionalGeneration
from tests.harness import cosctl, ok
from tests.tiny import tiny_config, tiny_model

pytest_plugins = ["tests.conftest_s3", "tests.conftest_slurm", "tests.llama_tokenizer"]


@pytest.fixture
def config() -> CosConfig:
    return tiny_config()


@pytest.fixture
def model(config: CosConfig) -> CosForConditionalGeneration:
    return tiny_model(config)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic set (96 samples, 64 px) with its tokenizer, shared by the training tests."""
    out = tmp_path_factory.mktemp("tiny_data") / "data"
    ok(cosctl("data", "synth", "--out", str(out), "--num-samples", "96", "--image-size", "64"))
    return out


@pytest.fixture
def in_process():
    """Run the training loop in this process (one rank), without leaking the launcher variables it
    sets into later subprocesses: `in_process(spec, run_dir, resume="auto", **options) -> summary`."""
    from cosctl.train.loop import run_training

    saved = dict(os.environ)
    yield lambda spec, run_dir, resume="auto", **options: run_training(
        spec, run_dir=run_dir, output=spec.run.output, resume=resume, **options
    )
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic set (48 samples, 64 px) written in this process, read-only for the tests."""
    from cosctl.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num_samples=48, seed=0, image_size=64)
    return out


@pytest.fixture(scope="session")
def tokenizer(synth_dir):
    """The synthetic set's tokenizer, with `<image>` and a pad token."""
    from cosctl.data.records import load_tokenizer

    return load_tokenizer(synth_dir / "tokenizer")
