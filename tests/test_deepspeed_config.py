"""resolve_deepspeed: templates filled from a run spec, no "auto" left, batch sizes consistent."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from cosctl.common.dist import comm_backend
from cosctl.plan.deepspeed_config import TEMPLATE_DIR, load_template, resolve_deepspeed
from cosctl.spec.sections import DeepSpeedSpec
from cosctl.spec.specs import FinetuneSpec, parse_spec

TEMPLATES = ["zero3", "zero2", "zero3_offload"]
DEVICES = ["cpu", "cuda"]


def make_spec(precision: str = "auto", overrides: dict | None = None, grad_clip: float = 1.0) -> FinetuneSpec:
    return parse_spec(
        {
            "stage": "finetune",
            "run": {"name": "ds", "output": "runs/ds"},
            "model": {"source": "runs/x/model"},
            "data": {"root": "d"},
            "optim": {
                "lr": 2e-4,
                "betas": [0.9, 0.95],
                "eps": 1e-6,
                "weight_decay": 0.1,
                "grad_clip": grad_clip,
                "num_steps": 10,
            },
            "batch": {"samples_per_step": 32, "tokens_per_micro_batch": 1024},
            "deepspeed": {"precision": precision, "overrides": overrides or {}},
        }
    )


def resolve(name: str = "zero3", spec: FinetuneSpec | None = None, device: str = "cpu", **kwargs) -> dict:
    kwargs = {"world_size": 2, "micro_batch_size": 3, "hidden_size": 32, **kwargs}
    return resolve_deepspeed(load_template(name), spec or make_spec(), device_type=device, **kwargs)


def test_template_dir_holds_the_three_templates():
    """TEMPLATE_DIR is the repo's deepspeed_configs/ with one JSON file per template name."""
    assert TEMPLATE_DIR.name == "deepspeed_configs"
    assert sorted(p.stem for p in TEMPLATE_DIR.glob("*.json")) == sorted(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_leave_spec_values_auto(name):
    """Every value the spec owns is "auto" in the template, so no template can pin it silently."""
    template = load_template(name)
    params = template["optimizer"]["params"]
    owned = [
        template[k]
        for k in (
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
        )
    ]
    owned += [template["bf16"]["enabled"]] + [params[k] for k in ("lr", "betas", "eps", "weight_decay")]
    assert owned == ["auto"] * 9
    assert "scheduler" not in template


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_no_auto_survives(name, device, precision):
    """Resolving any template for any device and precision leaves no "auto" anywhere."""
    config = resolve(name, make_spec(precision=precision), device)
    assert '"auto"' not in json.dumps(config)


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_train_batch_size_is_micro_accum_world(world_size):
    """train_batch_size = micro-batch × accumulation × world size; DeepSpeed's own accumulation is 1,
    because the trainer marks each step's last micro-batch itself (the count varies per step)."""
    config = resolve(world_size=world_size, micro_batch_size=3)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 3 * world_size


def test_auto_precision_is_bf16_on_cuda_fp32_on_cpu():
    """precision auto trains in bf16 on GPU and in fp32 on CPU."""
    assert resolve(device="cuda")["bf16"] == {"enabled": True}
    assert resolve(device="cpu")["bf16"] == {"enabled": False}


def test_explicit_precision_is_honoured():
    """An explicit bf16 holds on CPU and an explicit fp32 holds on GPU."""
    assert resolve(spec=make_spec(precision="bf16"), device="cpu")["bf16"]["enabled"] is True
    assert resolve(spec=make_spec(precision="fp32"), device="cuda")["bf16"]["enabled"] is False


def test_optimizer_comes_from_the_spec():
    """The AdamW block carries the spec's lr, betas, eps and weight decay."""
    optimizer = resolve()["optimizer"]
    assert optimizer == {
        "type": "AdamW",
        "params": {"lr": 2e-4, "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1, "torch_adam": True},
    }


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_adam_everywhere(name, device):
    """torch's AdamW is always chosen, so no FusedAdam/CPUAdam JIT build can start."""
    assert resolve(name, device=device)["optimizer"]["params"]["torch_adam"] is True


def test_foreach_only_on_cuda():
    """The multi-tensor AdamW path is requested on GPU only."""
    assert resolve(device="cuda")["optimizer"]["params"]["foreach"] is True
    assert "foreach" not in resolve(device="cpu")["optimizer"]["params"]


@pytest.mark.parametrize("device", DEVICES)
def test_offload_allows_a_torch_optimizer(device):
    """zero3_offload turns off DeepSpeed's forced CPUAdam; the other templates leave it alone."""
    offload = resolve("zero3_offload", device=device)
    assert offload["zero_force_ds_cpu_optimizer"] is False
    assert offload["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "zero_force_ds_cpu_optimizer" not in resolve("zero3", device=device)


def test_gradient_clipping_zero_means_disabled():
    """grad_clip 0 becomes gradient_clipping 0.0 (DeepSpeed's "off"), others pass through as floats."""
    assert resolve(spec=make_spec(grad_clip=0))["gradient_clipping"] == 0.0
    assert resolve(spec=make_spec(grad_clip=0.5))["gradient_clipping"] == 0.5


def test_bucket_sizes_scale_with_hidden_size():
    """Auto bucket sizes follow the model width: h*h, 0.9*h*h and 10*h."""
    zero = resolve(hidden_size=32)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024
    assert zero["stage3_prefetch_bucket_size"] == 921
    assert zero["stage3_param_persistence_threshold"] == 320


def test_prefetch_bucket_holds_two_blocks():
    """Given the largest block's size, the prefetch bucket holds two such blocks (when that is more than
    0.9*h*h), so ZeRO-3 can gather the next block while the current one runs."""
    assert resolve(hidden_size=32, block_numel=5000)["zero_optimization"]["stage3_prefetch_bucket_size"] == 10_000
    assert resolve(hidden_size=32, block_numel=100)["zero_optimization"]["stage3_prefetch_bucket_size"] == 921


def test_auto_buckets_dropped_without_hidden_size():
    """Without a model width the auto bucket keys are removed so DeepSpeed's defaults apply."""
    zero = resolve(hidden_size=None)["zero_optimization"]
    assert not {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"} & set(zero)
    assert zero["stage"] == 3


def test_overrides_deep_merge():
    """Overrides merge key by key into nested sections instead of replacing them."""
    spec = make_spec(overrides={"zero_optimization": {"stage3_max_live_parameters": 12345}, "steps_per_print": 7})
    config = resolve(spec=spec)
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 12345
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["overlap_comm"] is True
    assert config["steps_per_print"] == 7


def test_template_and_spec_not_mutated():
    """Resolving leaves the template untouched and the result shares nothing with the spec."""
    template = load_template("zero3_offload")
    before = copy.deepcopy(template)
    spec = make_spec(overrides={"zero_optimization": {"stage3_max_live_parameters": 5}})
    config = resolve_deepspeed(template, spec, world_size=1, micro_batch_size=1, device_type="cpu")
    config["zero_optimization"]["stage3_max_live_parameters"] = 6
    assert template == before
    assert spec.deepspeed.overrides == {"zero_optimization": {"stage3_max_live_parameters": 5}}


def test_unknown_template_raises_listing_names():
    """An unknown template name raises ValueError naming the ones that exist."""
    with pytest.raises(ValueError, match="unknown DeepSpeed template 'zero1'; available: zero2, zero3, zero3_offload"):
        load_template("zero1")


def test_surviving_auto_names_its_key():
    """An "auto" left by an override raises naming its dotted key path."""
    spec = make_spec(overrides={"zero_optimization": {"stage3_max_live_parameters": "auto"}})
    with pytest.raises(ValueError, match=r"zero_optimization\.stage3_max_live_parameters"):
        resolve(spec=spec)


def test_batch_mismatch_raises():
    """A train_batch_size that disagrees with micro × accumulation × world is refused."""
    rogue = DeepSpeedSpec.model_construct(template="zero3", precision="auto", overrides={"train_batch_size": 7})
    spec = make_spec().model_copy(update={"deepspeed": rogue})
    with pytest.raises(ValueError, match=r"train_batch_size 7 != micro 3 × accumulation 1 × world 2"):
        resolve(spec=spec)


def test_non_positive_world_size_raises():
    """A world size or micro-batch below 1 is a caller bug and raises."""
    with pytest.raises(ValueError, match="world_size"):
        resolve(world_size=0)


def test_comm_backend():
    """NCCL on CUDA, gloo on anything else."""
    assert (comm_backend("cuda"), comm_backend("cpu")) == ("nccl", "gloo")


ENGINE_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    import deepspeed, torch
    config = json.loads(sys.argv[1])
    # Skips the g++ build of the shm op (inference-only) that CPU init_distributed would start.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    x, y = torch.randn(2, 32), torch.randn(2, 1)
    losses = []
    for _ in range(2):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    print(json.dumps({"losses": losses, "steps": engine.global_steps, "train_batch_size": engine.train_batch_size()}))
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resolved_zero3_builds_a_cpu_engine(tmp_path):
    """The resolved zero3 config builds a one-rank gloo ZeRO-3 engine on CPU that trains."""
    spec = make_spec()
    config = resolve("zero3", spec, world_size=1, micro_batch_size=2, hidden_size=8)
    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT, json.dumps(config)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2
    assert result["losses"][1] != result["losses"][0]
    assert result["train_batch_size"] == config["train_batch_size"] == 2
