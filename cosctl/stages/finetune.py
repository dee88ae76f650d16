"""The finetune stage: the inflated model from `model.source`, fine-tuned with LoRA on the LLM (peft) and
the bridge in full, or the whole LLM when `lora: null`; publishes `<output>/adapter/` (or `model/`).

The source is fetched once per node (its local rank 0, into that node's own folder) and loaded exactly
(`cosctl.artefacts.loading.load_model_folder`). Under ZeRO-3 the adapters are partitioned, so they are
gathered before peft writes them; the adapter records its base (`cosctl.artefacts.published.save_adapter`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cos_model import CosConfig, CosForConditionalGeneration
from cos_model.building import Partitioner

from ..artefacts.loading import load_model_folder
from ..artefacts.published import fetch_model, local_model_folder, save_adapter, source_config
from ..common.dist import Dist, barrier, on_node_main
from ..common.errors import SpecError
from ..data.records import load_tokenizer
from ..spec.sections import LoraSpec
from ..spec.specs import FinetuneSpec
from ..storage import ObjectStore
from .base import (
    TrainingStage,
    gathered,
    publish_on_main,
    run_dtype,
    set_trainable,
    trainable_summary,
    write_model_weights,
    write_trainable_weights,
)

LORA_MODULE_PATTERN = r"(.*\.)?language_model\..*\.({targets})"


def apply_lora(model: CosForConditionalGeneration, lora: LoraSpec, trainable: list[str], seed: int):
    """Wrap the model with peft LoRA on the LLM's projections; the trainable bridge modules go to
    `modules_to_save`, so one peft folder holds everything fine-tuning changed."""
    from peft import LoraConfig, get_peft_model

    set_trainable(model, [])
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=LORA_MODULE_PATTERN.format(targets="|".join(lora.target_modules)),
        modules_to_save=list(trainable) or None,
    )
    torch.manual_seed(seed)  # LoRA A matrices are random: same seed, same init on every rank and run
    peft_model = get_peft_model(model, config)
    if not any("lora_" in n for n, _ in peft_model.named_parameters()):
        raise ValueError(f"lora.target_modules: {lora.target_modules} match no module of the language model")
    return peft_model


def build_finetune_model(
    spec: FinetuneSpec, model_dir: str, dtype: torch.dtype = torch.float32, partition: Partitioner | None = None
):
    """The inflated model from a local folder (with `partition`, each rank reads only its part of each
    tensor), with LoRA (or full LLM training) as the spec says."""
    model = load_model_folder(model_dir, dtype, partition)
    if spec.model.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable()
    if spec.lora is None:
        set_trainable(model, list(spec.model.trainable))
        return model
    return apply_lora(model, spec.lora, list(spec.model.trainable), spec.run.seed)


class FinetuneStage(TrainingStage):
    """Fine-tuning the inflated model: LoRA on the LLM and the bridge in full (or the whole LLM)."""

    name = "finetune"

    def __init__(self, spec: FinetuneSpec):
        super().__init__(spec)
        self.artefact = "model" if spec.lora is None else "adapter"

    def trainable_groups(self) -> set[str]:
        return super().trainable_groups() | ({"lora"} if self.spec.lora is not None else set())

    def tokenizer_folder(self) -> Path:
        folder = local_model_folder(self.spec.model.source)
        if folder is None:
            raise SpecError(
                f"model.source: {self.spec.model.source} is not a local model folder; pass --tokenizer "
                "with the model's tokenizer folder"
            )
        return folder

    def model_config(self) -> CosConfig:
        return source_config(self.spec.model.source, self.spec.storage.to_settings())

    def plan_model(self) -> tuple[nn.Module, int]:
        """The meta model as the run trains it: with its LoRA adapters when the spec has them."""
        model, _ = super().plan_model()
        if self.spec.lora is None:
            return model, 0
        model = apply_lora(model, self.spec.lora, list(self.spec.model.trainable), self.spec.run.seed)
        return model, trainable_summary(model).get("lora", 0)

    def build(self, staging: Path, dist_info: Dist, partition: Partitioner | None = None) -> FinetuneStage:
        # One download per node (its local rank 0) into that node's own folder: a run dir on a shared
        # filesystem would otherwise have every node delete and rewrite the same files at once.
        node_folder = staging / f"node_{dist_info.node:04d}" / "source"
        found = None
        if dist_info.local_rank == 0:
            found = str(fetch_model(self.spec.model.source, self.spec.storage.to_settings(), node_folder))
        barrier()
        self.model_dir = Path(on_node_main(found, dist_info))
        self.tokenizer = load_tokenizer(self.model_dir)
        dtype = run_dtype(self.spec, dist_info.device.type)
        self.model = build_finetune_model(self.spec, str(self.model_dir), dtype, partition)
        self.cos_config = CosConfig.from_pretrained(self.model_dir)
        return self

    def _write_adapter(self, engine, local_dir: Path) -> None:
        # Under ZeRO-3 adapters are partitioned ([0]-shaped): gather them, or peft saves empty tensors.
        with gathered(p for p in engine.module.parameters() if p.requires_grad):
            if dist.get_rank() == 0:
                state = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in engine.module.state_dict().items()
                    if "lora_" in k or "modules_to_save" in k
                }
                save_adapter(engine.module, state, self.tokenizer, self.spec.model.source, local_dir, self.model_dir)

    def write_trainable(self, engine, local_dir: Path) -> None:
        if self.spec.lora is not None:
            return self._write_adapter(engine, local_dir)
        write_trainable_weights(engine, local_dir)

    def write_final(self, engine, store: ObjectStore, staging: Path) -> str:
        local = staging / "final" / self.artefact
        if dist.get_rank() == 0:
            shutil.rmtree(local, ignore_errors=True)
        dist.barrier()
        if self.spec.lora is not None:
            self._write_adapter(engine, local)
        else:
            write_model_weights(engine, self.tokenizer, self.cos_config, local)
        return publish_on_main(store, local, self.artefact, 60 * self.spec.storage.max_outage_minutes)
