"""The pretrain stage: a new Chain-of-Sight model from the spec's towers (local folders, or random), its
bridge trained with the few-token chain; publishes `<output>/model/`.

The model config comes from the spec and config.json of the local folders it names (nothing is ever
downloaded); the vocabulary is the tokenizer's, `<image>` included. The model is built lean
(`cos_model.building.build_pretrained`): the towers loaded exactly straight into the run's dtype (under
ZeRO-3 each rank reads only its partition of each tensor), random where a component has no folder, the
bridge initialised once. `model/` is written one tensor at a time (`base.write_model_weights`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from cos_model import CosConfig, CosForConditionalGeneration
from cos_model.building import Partitioner, build_pretrained
from cos_model.loading import CheckpointMismatchError

from ..common.dist import Dist
from ..common.errors import CheckpointError, DataError, SpecError
from ..common.log import log
from ..data.conversation import IMAGE_TOKEN
from ..data.records import load_tokenizer
from ..spec.frozen import thaw
from ..spec.model import config_error_message
from ..spec.specs import PretrainSpec
from ..spec.subconfigs import KNOWN_FIELDS, VISION_MODEL_TYPE, coerce_floats, fields_for
from ..storage import ObjectStore
from .base import TrainingStage, publish_on_main, run_dtype, set_trainable, write_model_weights

# The vocabulary `cosctl plan` assumes before the tokenizer folder exists (Llama's).
ASSUMED_VOCAB_SIZE = 32000


def _local_config(config_class, path: str | None, key: str) -> dict:
    """config.json of a local model folder as a dict ({} for none); nothing is ever downloaded."""
    if path is None:
        return {}
    if not (Path(path) / "config.json").is_file():
        raise SpecError(f"{key}: {path} is not a local model folder with a config.json")
    try:
        return config_class.from_pretrained(path, local_files_only=True).to_dict()
    except (OSError, ValueError) as err:
        raise SpecError(f"{key}: cannot read {path}/config.json: {err}") from None


def pretrain_config(spec: PretrainSpec, vocab_size: int, image_token_id: int) -> CosConfig:
    """The CosConfig `spec.model` describes, for a tokenizer of `vocab_size` tokens whose `<image>` is
    `image_token_id` (reads config.json from local paths; builds no weights)."""
    from transformers import AutoConfig, CLIPVisionConfig

    model = spec.model
    vision = _local_config(CLIPVisionConfig, model.vision.path, "model.vision.path")
    vision.update(
        coerce_floats(thaw(model.vision.config), KNOWN_FIELDS[VISION_MODEL_TYPE]),
        image_size=model.image_size,
        model_type=VISION_MODEL_TYPE,
    )
    text = _local_config(AutoConfig, model.text.path, "model.text.path")
    overrides = thaw(model.text.config)
    model_type = overrides.get("model_type", text.get("model_type"))
    text.update(coerce_floats(overrides, fields_for(model_type) if isinstance(model_type, str) else None))
    # The built LLM's vocabulary grows to the tokenizer's, never shrinks (cos_model.building): the
    # config says so up front, so `cosctl plan` counts the rows the run trains.
    text["vocab_size"] = vocab_size if model.text.path is None else max(text.get("vocab_size", 0), vocab_size)
    try:
        return CosConfig(
            vision_config=vision,
            text_config=text,
            feature_layers=list(model.feature_layers),
            scales=list(model.scales),
            resampler_num_heads=model.resampler_num_heads,
            bridge_init_std=model.bridge_init_std,
            image_token_id=image_token_id,
        )
    except Exception as err:  # transformers' strict configs raise their own error types
        if not isinstance(err, (ValueError, TypeError)) and type(err).__module__.split(".")[0] != "huggingface_hub":
            raise
        raise ValueError(config_error_message(err)) from None


def build_pretrain_model(
    spec: PretrainSpec,
    vocab_size: int,
    image_token_id: int,
    dtype: torch.dtype = torch.float32,
    partition: Partitioner | None = None,
) -> CosForConditionalGeneration:
    """A fresh Chain-of-Sight model, built lean: ViT and LLM loaded exactly from their local folders
    straight into `dtype` (with `partition`, each rank only its part of each tensor), random where a
    component has no folder, the bridge initialised once; the vocabulary grows to the tokenizer's
    (`vocab_size`)."""
    config = pretrain_config(spec, vocab_size=vocab_size, image_token_id=image_token_id)
    try:
        model, reports = build_pretrained(
            config,
            spec.model.vision.path,
            spec.model.text.path,
            dtype,
            vocab_size=vocab_size,
            seed=spec.run.seed,
            partition=partition,
        )
    except CheckpointMismatchError as err:
        raise CheckpointError(str(err)) from None
    for part, report in reports.items():
        for message in report.messages:
            log.info(f"{part}: {message}")
    set_trainable(model, list(spec.model.trainable))
    if spec.model.gradient_checkpointing:
        model.language_model.gradient_checkpointing_enable()
    return model


class PretrainStage(TrainingStage):
    """Pre-training: the bridge (and whatever else the spec trains) with the few-token chain."""

    name = "pretrain"

    def tokenizer_folder(self) -> Path:
        return Path(self.spec.model.tokenizer)

    def model_config(self) -> CosConfig:
        """The config for the spec's tokenizer; before its folder exists (a plan made early), for a
        Llama-sized vocabulary."""
        try:
            tokenizer = load_tokenizer(self.spec.model.tokenizer)
            vocab_size, image_token = len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        except DataError:
            vocab_size, image_token = self.spec.model.text.config.get("vocab_size", ASSUMED_VOCAB_SIZE), 0
        try:
            return pretrain_config(self.spec, vocab_size, image_token)
        except OSError as err:  # transformers' answer to a model.vision.path / model.text.path that is not there
            paths = ", ".join(p for p in (self.spec.model.vision.path, self.spec.model.text.path) if p)
            raise ValueError(f"model: cannot read the config of the local model folders ({paths}): {err}") from None

    def build(self, staging: Path, dist_info: Dist, partition: Partitioner | None = None) -> PretrainStage:
        self.tokenizer = load_tokenizer(self.spec.model.tokenizer)
        image_token = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        dtype = run_dtype(self.spec, dist_info.device.type)
        self.model = build_pretrain_model(self.spec, len(self.tokenizer), image_token, dtype, partition)
        self.cos_config = self.model.config
        return self

    def write_final(self, engine, store: ObjectStore, staging: Path) -> str:
        local = staging / "final" / self.artefact
        if dist.get_rank() == 0:
            shutil.rmtree(local, ignore_errors=True)
        write_model_weights(engine, self.tokenizer, engine.module.config, local)
        return publish_on_main(store, local, self.artefact, 60 * self.spec.storage.max_outage_minutes)
