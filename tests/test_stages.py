"""cosctl.stages: where each stage's model comes from and where it is staged."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from cos_model import CosConfig, CosForConditionalGeneration
from cosctl.checkpoint.layout import publish
from cosctl.data.conversation import IMAGE_TOKEN
from cosctl.data.records import load_tokenizer
from cosctl.storage import LocalStore
from tests.harness import RECIPES, REPO, env


def published_tiny_model(data, out):
    """A tiny Chain-of-Sight model for the synthetic tokenizer, published as `<out>/model/` with its
    manifest (as the inflate stage publishes one)."""
    tokenizer = load_tokenizer(data / "tokenizer")
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        patch_size=4,
        image_size=64,
    )
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    config = CosConfig(
        vision_config=vision,
        text_config=text,
        feature_layers=[0, 1],
        resampler_num_heads=4,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    local = out.parent / "unpublished"
    CosForConditionalGeneration(config).save_pretrained(local)
    tokenizer.save_pretrained(local)
    publish(LocalStore(out), local, "model")
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_nodes_sharing_a_run_dir_stage_the_source_model_each_in_their_own_folder(tiny_data, tmp_path):
    """Finetune as two torchrun node groups on one host (--nnodes 2, one rank each) sharing one run dir:
    each node downloads the source model into its own folder, and the run trains to the end."""
    source = published_tiny_model(tiny_data, tmp_path / "source")
    run_dir, port = tmp_path / "shared-run-dir", free_port()
    sets = [
        f"model.source={source}",
        f"data.root={tiny_data}",
        "optim.num_steps=2",
        "checkpoint.every_steps=1",
        "eval.every_steps=null",
        "batch.samples_per_step=4",
        "batch.tokens_per_micro_batch=2048",
    ]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=1",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m",
                "cosctl",
                "finetune",
                str(RECIPES / "tiny" / "finetune.yaml"),
                "--run-dir",
                str(run_dir),
                "--output",
                str(tmp_path / "out"),
                *[a for s in sets for a in ("--set", s)],
            ],
            cwd=REPO,
            env=env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for node in (0, 1):
        assert (run_dir / "staging" / f"node_{node:04d}" / "source" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "adapter" / "manifest.json").is_file()


def test_inflate_with_a_plan_mapping_writes_its_summary(tiny_data, tmp_path):
    """An inflation whose plan is {image_size, scales} (not a preset) finishes with a JSON summary naming
    the plan's scales as plain values (it once failed after publishing: a Scale is not JSON)."""
    import json

    from cosctl.spec.specs import load_spec
    from cosctl.stages.inflate import run_inflate

    source = published_tiny_model(tiny_data, tmp_path / "source")
    plan = "{image_size: 128, scales: [{window: 32, queries_per_window: 16}, {window: 8, queries_per_window: 1}]}"
    spec = load_spec(RECIPES / "tiny" / "inflate.yaml", [f"source={source}", f"plan={plan}"])
    run_inflate(spec, run_dir=tmp_path / "run", output=str(tmp_path / "out"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["plan"]["image_size"] == 128 and summary["visual_tokens"] == {"from": 32, "to": 32}
    assert [(s["window"], s["queries_per_window"]) for s in summary["plan"]["scales"]] == [(32, 16), (8, 1)]
