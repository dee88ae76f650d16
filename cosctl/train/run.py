"""What a training run is made of (docs/design.md §1), and putting it together: `setup_run` joins the process
group, opens the run's output store (once), builds the stage's model and tokenizer, reads the data, wraps the
model in its DeepSpeed engine and makes the checkpointer; `Run` holds the result for the loop in
`cosctl.train.loop`. Also the token budget's three origins (`choose_budget`) and the loaders it sizes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..checkpoint.checkpointer import Checkpointer, Restored
from ..common.dist import Dist, all_reduce, init_distributed
from ..common.log import log, setup_logging
from ..data.prepare import load_split, split_source
from ..data.records import LengthStats, length_stats
from ..data.tokenstore import StoreRecords
from ..plan.resolve import Resolved, World, model_shape, resolve
from ..spec.specs import TrainingSpec
from ..stages import TrainingStage, stage_for
from ..stages.base import trainable_summary
from ..storage import ObjectStore, open_store
from .autobatch import probe_micro_batch
from .batching import check_budget_fits, eval_micro_batches, longest_sample
from .engine import build_engine, zero3_partition
from .loader import MicroBatchDataset, StepLoader

RESOLVED_FILE = "resolved.json"  # under the run dir: what the run resolved its spec to (`cosctl plan`'s numbers)


@dataclass(frozen=True)
class Budget:
    """Padded tokens per micro-batch per rank, and where the number came from: the spec, the `auto`
    probe, or the checkpoint a resumed run continues (its data order only exists at that budget)."""

    tokens: int
    origin: Literal["spec", "probe", "checkpoint"]


@dataclass(frozen=True)
class HeldOutBatch:
    """A collated held-out micro-batch and the image name of each row of its `pixel_values`, in order
    (None where the image failed to load: that row is blank and the sample's labels are ignored). A
    text-only micro-batch has no rows and no names."""

    inputs: dict
    images: tuple[str | None, ...]


@dataclass
class Run:
    """Everything the loop needs, built once per process by `setup_run`."""

    spec: TrainingSpec
    dist: Dist
    store: ObjectStore  # the run's output: checkpoints and the published artefact
    run_dir: Path  # local: metrics, TensorBoard, staging
    stage: TrainingStage  # its tokenizer, model and cos_config are built
    engine: object  # deepspeed.DeepSpeedEngine
    scheduler: object
    checkpointer: Checkpointer
    train_examples: StoreRecords  # memory-mapped prepared records (cosctl.data.tokenstore)
    eval_examples: StoreRecords | None
    trainable: dict[str, int]  # trainable parameters per top-level module
    resolved: Resolved  # the spec's numbers on this world and data (`cosctl plan` prints the same)

    @property
    def lengths(self) -> LengthStats:
        return length_stats(self.train_examples)

    def train_loader(self, budget: Budget, position: dict | None = None) -> StepLoader:
        """This rank's stream of optimizer steps over the training examples, at `position` if resuming."""
        loader = StepLoader(
            self.train_examples,
            image_size=self.stage.cos_config.image_size,
            pad_token_id=self.stage.tokenizer.pad_token_id,
            tokens_per_micro_batch=budget.tokens,
            samples_per_step=self.spec.batch.samples_per_step,
            seed=self.spec.run.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=self.spec.data.num_workers,
            packing=self.spec.batch.packing,
            max_bad_fraction=self.spec.data.max_bad_fraction,
        )
        if position is not None:
            loader.load_state_dict(position)
        return loader

    def eval_batches(self, budget: Budget) -> list[HeldOutBatch]:
        """The held-out micro-batches, collated once: every rank evaluates the same ones (a held-out set
        may be smaller than one micro-batch per rank, and ZeRO-3 forwards are collective)."""
        if self.eval_examples is None:
            return []
        return held_out_batches(
            self.eval_examples,
            image_size=self.stage.cos_config.image_size,
            pad_token_id=self.stage.tokenizer.pad_token_id,
            tokens_per_micro_batch=budget.tokens,
            num_batches=self.spec.eval.num_batches,
        )


def held_out_batches(
    examples, *, image_size: int, pad_token_id: int, tokens_per_micro_batch: int, num_batches: int
) -> list[HeldOutBatch]:
    """The first `num_batches` micro-batches of held-out `examples` (a prepared store's records, or
    `cosctl.train.loader.ExampleRecords`) in file order, collated as training collates them, each with the
    names of its images."""
    dataset = MicroBatchDataset(examples, None, image_size, pad_token_id)
    held_out = []
    for micro in eval_micro_batches(examples, tokens_per_micro_batch, num_batches):
        inputs, failed = dataset.load(micro)
        failed_indices = {index for index, _ in failed}
        for _, reason in failed:
            log.warning("%s; the held-out sample counts in no eval loss", reason)
        names = [(index, dataset.records.image(index)) for index in micro.indices]
        images = tuple(None if index in failed_indices else name for index, name in names if name is not None)
        held_out.append(HeldOutBatch(inputs, images))
    return held_out


def setup_run(spec: TrainingSpec, *, run_dir: Path, output: str) -> Run:
    """Process group -> output store -> stage (tokenizer, model) -> data -> engine -> checkpointer."""
    dist_info = init_distributed()
    setup_logging(dist_info.rank, spec.stage)
    run_dir = Path(run_dir)
    store = open_store(output, spec.storage.to_settings())
    started, before = time.monotonic(), [host_rss_gib(), host_rss_gib("RssAnon")]
    stage = stage_for(spec).build(run_dir / "staging", dist_info, zero3_partition(spec, dist_info))
    _log_build(time.monotonic() - started, before, dist_info)
    train_examples = _load_split(spec, stage, spec.data.train, spec.data.max_bad_fraction)
    evaluated = spec.data.eval is not None and spec.eval.every_steps
    eval_examples = _load_split(spec, stage, spec.data.eval, 1.0) if evaluated else None
    check_budget(spec, train_examples, eval_examples)  # before the engine: not when that step comes
    resolved = _resolve(spec, stage, train_examples, dist_info, run_dir)
    engine, scheduler, trainable = _build_checked_engine(spec, stage, resolved, dist_info)
    checkpointer = Checkpointer(spec, store, run_dir / "staging", dist_info, stage.write_trainable)
    return Run(
        spec,
        dist_info,
        store,
        run_dir,
        stage,
        engine,
        scheduler,
        checkpointer,
        train_examples,
        eval_examples,
        trainable,
        resolved,
    )


def _resolve(spec: TrainingSpec, stage: TrainingStage, train: StoreRecords, dist_info: Dist, run_dir: Path) -> Resolved:
    """The spec resolved on this world and the prepared training split (`cosctl.plan.resolve`: the
    numbers `cosctl plan` prints), logged and written to `<run dir>/resolved.json` by rank 0."""
    lora = trainable_summary(stage.model).get("lora", 0)
    shape = model_shape(stage.model, stage.cos_config, spec, lora)
    world = World(dist_info.world_size, dist_info.device.type)
    resolved = resolve(spec, shape, world, length_stats(train), len(train))
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESOLVED_FILE).write_text(json.dumps(resolved.to_dict(), indent=1, sort_keys=True))
    micro = resolved.samples_per_micro_batch
    log.info(
        f"resolved on {world.size} rank(s): {resolved.samples_per_step} samples per step "
        f"({resolved.samples_per_rank} on the busiest rank), {resolved.steps_per_epoch} steps per epoch, "
        f"{resolved.mean_text_tokens} text tokens per sample on average, "
        + (f"~{micro} samples per micro-batch" if micro else "micro-batches probed (auto)")
        + f", {resolved.flops.model:.3g} model FLOPs per sample"
    )
    return resolved


def check_budget(spec: TrainingSpec, train: StoreRecords, held_out: StoreRecords | None) -> None:
    """Refuse, at start, a fixed `batch.tokens_per_micro_batch` (or `auto`'s explicit cap) below the
    longest training or held-out sample. `auto` without a cap never is: it is raised to the longest."""
    budget, setting = spec.batch.tokens_per_micro_batch, "batch.tokens_per_micro_batch"
    if budget == "auto":
        if spec.batch.max_tokens_per_micro_batch is None:
            return
        budget, setting = spec.batch.max_tokens_per_micro_batch, "batch.max_tokens_per_micro_batch"
    _check_fits(spec, train, held_out, budget, setting)


def _check_fits(spec: TrainingSpec, train, held_out, tokens: int, setting: str) -> None:
    for name, records in ((spec.data.train, train), (spec.data.eval, held_out)):
        if records is not None:
            check_budget_fits(records, tokens, setting, name)


def choose_budget(run: Run, restored: Restored | None) -> Budget:
    """The token budget: the checkpoint's when resuming its data order, else the spec's number, else
    (`auto`) the probed one, never below the longest example (training or held-out)."""
    if restored is not None and restored.loader_state is not None:
        tokens = int(restored.loader_state["tokens_per_micro_batch"])
        setting = "tokens_per_micro_batch (the checkpoint's)"
        _check_fits(run.spec, run.train_examples, run.eval_examples, tokens, setting)
        return Budget(tokens, "checkpoint")
    spec = run.spec
    if spec.batch.tokens_per_micro_batch != "auto":
        return Budget(spec.batch.tokens_per_micro_batch, "spec")
    lengths = run.lengths
    probe = probe_micro_batch(
        run.engine,
        run.stage.cos_config,
        lengths.min_text_tokens,
        memory_fraction=spec.batch.memory_fraction,
        max_tokens=spec.batch.max_tokens_per_micro_batch,
        max_samples=run.resolved.samples_per_rank,
        device=run.dist.device,
    )
    log.info(probe.summary())
    splits = [records for records in (run.train_examples, run.eval_examples) if records is not None]
    longest = max(longest_sample(records)[1] for records in splits)
    return Budget(max(probe.tokens_per_micro_batch, longest), "probe")


def host_rss_gib(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS), its peak so far (VmHWM) or its anonymous part (RssAnon:
    what the process holds itself, file pages it maps excluded), in GiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def _log_build(seconds: float, before_gib: list[float], dist_info: Dist) -> None:
    """How long building the model took and the highest host memory any rank reached doing it, and the
    anonymous memory it holds after it (collective): the figures that say whether a node's ranks fit in
    its memory. `before_gib`: resident and anonymous memory before the build."""
    figures = [seconds, *before_gib, host_rss_gib("VmHWM"), host_rss_gib("RssAnon")]
    slowest, before, before_anon, peak, anon = all_reduce(figures, dist_info.device, op="max")
    log.info(
        f"model built in {slowest:.1f} s; host memory per rank {before:.2f} GiB before, peak "
        f"{peak:.2f} GiB; anonymous {before_anon:.2f} GiB before, {anon:.2f} GiB after "
        f"(highest of {dist_info.world_size} ranks)"
    )


def _load_split(spec: TrainingSpec, stage: TrainingStage, name: str, max_bad_fraction: float) -> StoreRecords:
    """The split's prepared token store (prepared now, over all ranks, unless a run already did),
    memory-mapped on every rank (docs/design.md §5)."""
    source = split_source(spec.data, name, spec.storage.to_settings())
    return load_split(
        source,
        stage.tokenizer,
        num_visual_tokens=stage.cos_config.num_visual_tokens,
        max_bad_fraction=max_bad_fraction,
        workers=spec.data.num_workers,
    )


def _build_checked_engine(spec: TrainingSpec, stage: TrainingStage, resolved: Resolved, dist_info: Dist):
    """The DeepSpeed engine around the stage's model, with the resolved config; refuses a trainable set
    other than the stage's."""
    # DeepSpeed uses the micro-batch size only for its batch bookkeeping; auto is probed on the engine.
    engine, scheduler, ds_config = build_engine(stage.model, spec, dist_info, resolved.samples_per_micro_batch or 1)
    if ds_config != resolved.deepspeed:
        raise RuntimeError("the engine's DeepSpeed config differs from the resolved one")
    trainable = trainable_summary(engine.module)
    log.info("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in sorted(trainable.items())))
    if spec.optim.lr_by_module:
        own = ", ".join(f"{module} {lr:g}" for module, lr in sorted(spec.optim.lr_by_module.items()))
        log.info(f"peak learning rates: {own}, the rest {spec.optim.lr:g}")
    if set(trainable) != stage.trainable_groups():
        raise RuntimeError(
            f"trainable modules {sorted(trainable)} differ from the spec's {sorted(stage.trainable_groups())}"
        )
    return engine, scheduler, trainable
