"""Communication volume: the bytes DeepSpeed actually moves per optimizer step, counted on the real engine,
against what `cosctl.plan.comm` (the model `cosctl plan` prints) predicts.

Every collective of `torch.distributed` is wrapped before DeepSpeed starts (DeepSpeed's torch backend
keeps references to the functions it finds at start, so they must be the counting ones), and each call
adds the logical size of its tensor to its kind: the full gathered buffer of an all-gather, the full
input of a reduce-scatter, the tensor of an all-reduce, reduce or broadcast. Each byte is also put down
to the phase it moved in: the engine's forward, its backward, or the optimizer step. The model predicts
the same logical sizes; a rank's traffic is (W-1)/W of them for all-gather and reduce-scatter in a ring.
ZeRO-3's all-gather is predicted by replaying DeepSpeed's parameter coordinator on the model's module
trace (`cosctl.plan.gathers`): what is gathered in the forward, what is released and gathered again for
the backward, and the persistent parameters after the step.

Each variant builds the tiny recipe's model with `cosctl.stages.pretrain.build_pretrain_model`, wraps it with
`cosctl.train.engine.build_engine` (the spec's DeepSpeed template: fp32 and gloo on CPU), runs warm-up steps
(ZeRO-3 records its parameter trace in the first) and then counts `--steps` optimizer steps of
`--micro-batches` micro-batches each (`cosctl.train.loop.train_step`, synthetic batches). Variants: ZeRO-3 and
ZeRO-2, with the LLM trained and frozen (only the bridge trains, so the LLM back-propagates without
weight gradients); and ZeRO-3 with the live/reuse thresholds lowered below this small model's sizes
(`-regather`: stage3_max_reuse_distance 200,000 and stage3_max_live_parameters 50,000 elements, where the
templates say 1e9), so that, as in a 7B LLM at the templates' thresholds, parameters are released after
their forward use and gathered again in the backward.

    python bench/comm_volume.py --json comm.json            # relaunches itself on 2 local ranks (CPU)
    python bench/comm_volume.py --variants zero3-llm-trained,zero3-llm-trained-regather --micro-batches 2
    python bench/comm_volume.py --nproc 1                   # one rank: nothing should move
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import common
import torch
import torch.distributed as dist

TRAINED, FROZEN = ["resampler", "projector", "language_model"], ["resampler", "projector"]
# Thresholds a 0.79M-parameter model crosses (the templates' 1e9 elements are crossed only by LLMs of
# several billion parameters): an LLM block (164,096 elements) is released after its forward when the
# next 200,000 elements of the trace do not reach its backward use, and gathering more than 50,000
# elements stops the prefetch that would otherwise keep it.
LOWERED = [
    "deepspeed.overrides.zero_optimization.stage3_max_reuse_distance=200000",
    "deepspeed.overrides.zero_optimization.stage3_max_live_parameters=50000",
]
# name -> (template, trainable modules, spec overrides)
VARIANTS = {
    "zero3-llm-trained": ("zero3", TRAINED, []),
    "zero3-llm-frozen": ("zero3", FROZEN, []),
    "zero2-llm-trained": ("zero2", TRAINED, []),
    "zero2-llm-frozen": ("zero2", FROZEN, []),
    "zero3-llm-trained-regather": ("zero3", TRAINED, LOWERED),
    "zero3-llm-frozen-regather": ("zero3", FROZEN, LOWERED),
}
DEFAULT_VARIANTS = "zero3-llm-trained,zero3-llm-frozen,zero2-llm-trained,zero2-llm-frozen"
PHASES = ("forward", "backward", "step")


# ---------------------------------------------------------------------------------------------------
# Counting collectives


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


# collective -> (kind it counts as, which argument holds the logical size)
COUNTED = {
    "all_gather_into_tensor": ("all_gather", lambda a, k: k.get("output_tensor", a[0] if a else None)),
    "_all_gather_base": ("all_gather", lambda a, k: k.get("output_tensor", a[0] if a else None)),
    "all_gather": ("all_gather", lambda a, k: k.get("tensor_list", a[0] if a else None)),
    "reduce_scatter_tensor": ("reduce_scatter", lambda a, k: k.get("input", a[1] if len(a) > 1 else None)),
    "_reduce_scatter_base": ("reduce_scatter", lambda a, k: k.get("input", a[1] if len(a) > 1 else None)),
    "reduce_scatter": ("reduce_scatter", lambda a, k: k.get("input_list", a[1] if len(a) > 1 else None)),
    "all_reduce": ("all_reduce", lambda a, k: k.get("tensor", a[0] if a else None)),
    "all_reduce_coalesced": ("all_reduce", lambda a, k: k.get("tensors", a[0] if a else None)),
    "reduce": ("reduce", lambda a, k: k.get("tensor", a[0] if a else None)),
    "broadcast": ("broadcast", lambda a, k: k.get("tensor", a[0] if a else None)),
}


class Counter:
    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.by_phase: dict[tuple[str, str], int] = defaultdict(int)  # (kind, phase) -> bytes
        self.phase: str | None = None
        self.on = False

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.by_phase.clear()

    def follow(self, engine) -> None:
        """Put each byte down to the engine phase it moved in (forward, backward, step)."""
        for phase in PHASES:
            original = getattr(engine, phase)

            def in_phase(*args, _original=original, _phase=phase, **kwargs):
                self.phase = _phase
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.phase = None

            setattr(engine, phase, in_phase)

    def wrap(self, name: str, function):
        kind, tensor_of = COUNTED[name]

        @functools.wraps(function)
        def counted(*args, **kwargs):
            if self.on:
                tensors = tensor_of(args, kwargs)
                size = _nbytes(tensors) if tensors is not None else 0
                self.bytes[kind] += size
                self.by_phase[kind, self.phase or "other"] += size
                self.calls[kind] += 1
            return function(*args, **kwargs)

        counted.counts_bytes = True
        return counted


def install(counter: Counter) -> None:
    """Replace the collectives in `torch.distributed` and its `distributed_c10d` module by counting ones."""
    c10d = dist.distributed_c10d
    for name in COUNTED:
        for module in (dist, c10d):
            original = getattr(module, name, None)
            if original is not None and not getattr(original, "counts_bytes", False):
                setattr(module, name, counter.wrap(name, original))


# ---------------------------------------------------------------------------------------------------
# One variant


def variant_spec(template: str, trainable: list[str], samples_per_step: int, overrides: list[str]):
    from cosctl.spec.specs import load_spec

    return load_spec(
        common.REPO / "recipes/tiny/pretrain.yaml",
        [
            f"deepspeed.template={template}",
            f"model.trainable={json.dumps(trainable)}",
            f"batch.samples_per_step={samples_per_step}",
            "batch.tokens_per_micro_batch=100000",
            "model.gradient_checkpointing=false",
            *overrides,
        ],
    )


def run_variant(name: str, args, dist_info, counter: Counter) -> dict:
    from cosctl.plan.comm import param_counts, step_volume
    from cosctl.plan.gathers import Zero3Settings, zero3_gathers
    from cosctl.stages.pretrain import build_pretrain_model, pretrain_config
    from cosctl.train.autobatch import synthetic_micro_batch
    from cosctl.train.engine import build_engine
    from cosctl.train.loop import train_step

    template, trainable, overrides = VARIANTS[name]
    world = dist_info.world_size
    spec = variant_spec(
        template, trainable, args.micro_batch * args.micro_batches * world, [*overrides, *args.overrides]
    )
    vocab, image_token = 512, 511
    config = pretrain_config(spec, vocab_size=vocab, image_token_id=image_token)
    model = build_pretrain_model(spec, vocab, image_token)
    engine, _, ds_config = build_engine(model, spec, dist_info, args.micro_batch)
    counter.follow(engine)
    zero = ds_config["zero_optimization"]
    counts = param_counts(model.parameters(), zero.get("stage3_param_persistence_threshold", 0))
    gathers = None
    if zero["stage"] == 3:
        gathers = zero3_gathers(
            model,
            Zero3Settings.from_config(zero),
            args.micro_batches,
            embedding_grads=spec.model.gradient_checkpointing,
        )
    volume = step_volume(zero["stage"], counts, args.micro_batches, 4, gathers)  # fp32 on CPU
    predicted = {
        kind: getattr(volume, kind) for kind in ("all_gather", "reduce_scatter", "all_reduce") if getattr(volume, kind)
    }
    batches = [
        {
            **synthetic_micro_batch(config, args.micro_batch, args.text_tokens, seed=dist_info.rank * 100 + i),
            "num_samples": args.micro_batch,
        }
        for i in range(args.micro_batches)
    ]
    for _ in range(args.warmup):
        train_step(engine, batches, dist_info.device)
    counter.reset()
    counter.on = True
    for _ in range(args.steps):
        train_step(engine, batches, dist_info.device)
    counter.on = False
    measured = {kind: counter.bytes[kind] / args.steps for kind in sorted(counter.bytes)}
    calls = {kind: counter.calls[kind] / args.steps for kind in sorted(counter.calls)}
    phases = {f"{kind}/{phase}": size / args.steps for (kind, phase), size in sorted(counter.by_phase.items())}
    trace = compare_traces(engine, model, spec) if zero["stage"] == 3 else None
    engine.destroy()
    common.forget_module(model)
    return {
        "variant": name,
        "template": template,
        "trainable": trainable,
        "overrides": overrides,
        "world_size": world,
        "micro_batches_per_step": args.micro_batches,
        "params": counts.__dict__,
        "zero3_thresholds": (Zero3Settings.from_config(zero).__dict__ if zero["stage"] == 3 else None),
        "measured_bytes_per_step": measured,
        "measured_bytes_by_phase": phases,
        "calls_per_step": calls,
        "predicted_bytes_per_step": predicted,
        "trace": trace,
        "predicted_all_gather_by_phase": (
            {"forward": gathers.forward * 4, "backward": gathers.backward * 4, "step": gathers.persistent * 4}
            if gathers
            else None
        ),
    }


def compare_traces(engine, model, spec) -> dict:
    """The module trace DeepSpeed's coordinator recorded (module names, forward then backward) against
    the one `cosctl.plan.gathers` replays. Reads the coordinator's private trace (DeepSpeed 0.19.8)."""
    from cosctl.plan.trace import call_tree, micro_batch_events

    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    names = {id(module): name for name, module in model.named_modules()}
    recorded = [names.get(id(m), "?") for m in coordinator._PartitionedParameterCoordinator__submodule_order]
    events = micro_batch_events(call_tree(model, embedding_grads=spec.model.gradient_checkpointing))
    replayed = [node.name for kind, node, _ in events if kind == "fetch"]
    return {"modules": len(recorded), "matches": recorded == replayed, "recorded": recorded, "replayed": replayed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (default 2)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated, from " + ", ".join(VARIANTS))
    parser.add_argument("--micro-batches", type=int, default=2, help="micro-batches per step per rank")
    parser.add_argument("--micro-batch", type=int, default=2, help="samples per micro-batch")
    parser.add_argument("--text-tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    common.add_set_argument(parser, "every variant's spec")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if "RANK" not in os.environ and args.nproc > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            __file__,
            *(argv if argv is not None else sys.argv[1:]),
        ]
        os.execvp(command[0], command)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    counter = Counter()
    install(counter)
    from cosctl.common.dist import init_distributed

    dist_info = init_distributed()
    common.quiet_logs()
    rows = [run_variant(name, args, dist_info, counter) for name in args.variants.split(",")]
    if dist_info.rank == 0:
        print(format_table(rows))
        common.write_report(args.json, {"command": " ".join(sys.argv), "rows": rows})


def format_table(rows: list[dict]) -> str:
    """Measured against predicted bytes per step, per collective kind, and ZeRO-3's all-gather by phase
    (small all-reduces of the loss, counts and gradient norm are measured but not predicted)."""
    lines = []
    for row in rows:
        measured, predicted = row["measured_bytes_per_step"], row["predicted_bytes_per_step"]
        cells = [
            (kind, measured.get(kind, 0), predicted.get(kind, 0)) for kind in sorted(set(measured) | set(predicted))
        ]
        if row.get("predicted_all_gather_by_phase"):
            by_phase = row["measured_bytes_by_phase"]
            cells += [
                (f"  all-gather in the {phase}", by_phase.get(f"all_gather/{phase}", 0), want)
                for phase, want in row["predicted_all_gather_by_phase"].items()
            ]
        for kind, got, want in cells:
            ratio = f"{got / want:.4f}" if want else "-"
            lines.append(
                [
                    row["variant"],
                    row["world_size"],
                    row["micro_batches_per_step"],
                    kind,
                    f"{got:,.0f}",
                    f"{want:,.0f}",
                    ratio,
                ]
            )
    header = [
        "variant",
        "ranks",
        "micro-batches",
        "collective",
        "measured B/step",
        "predicted B/step",
        "measured/predicted",
    ]
    return common.markdown_table(header, lines, "lrrlrrr")


if __name__ == "__main__":
    main()
