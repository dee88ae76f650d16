"""Host memory per rank of a 2-rank ZeRO-3 `cosctl pretrain` (the paper-scale recipe, fp32 on CPU) on
folders laid out as users have them: a `CLIPModel` with ViT-L/14 geometry (narrow) and a Llama of a few
hundred MB saved by transformers in safetensors shards. Each rank reads and keeps only its part of the
model while building and training, and rank 0 publishes `model/` one tensor at a time, never the whole
gathered model; what it publishes is the source's weights, bit for bit.

Memory is each rank's anonymous memory (RssAnon: what the rank holds itself; pages of files it maps,
which the page cache shares, excluded), sampled from outside every 10 ms for the whole run and split
into phases by what the run logs and writes (docs/design.md §6)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

from cos_model import CosForConditionalGeneration
from cos_model.loading import read_checkpoint
from cos_model.saved import load_model_folder
from cosctl.data.records import load_tokenizer
from cosctl.data.synth import synthesize
from tests.harness import RECIPES, REPO, env, kill_tree

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

GIB = 2**30
VIT_L14_NARROW = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4, patch_size=14, image_size=224
)
CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)
# 1024 wide, 6 blocks: 0.29 GiB in fp32, in 100 MB shards.
LLAMA = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=6,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
# Over a rank's partition while building (the engine's own structures), and over one gathered tensor
# while publishing (ZeRO-3's gather buffers and the heap they fragment). The fault these guard against
# is a whole copy of the model (0.29 GiB here) or more.
BUILD_SLACK_GIB = 0.1
PUBLISH_SLACK_GIB = 0.2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A CLIPModel folder, a sharded Llama folder one row short of the tokenizer (the `<image>` row is
    added), and a 224-px synthetic set."""
    root = tmp_path_factory.mktemp("memory")
    synthesize(root / "data", num_samples=16, seed=0, image_size=224)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(vision_config=VIT_L14_NARROW, text_config=CLIP_TEXT, projection_dim=16)).save_pretrained(
        root / "clip"
    )
    tokenizer = load_tokenizer(root / "data" / "tokenizer")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) - 1, **LLAMA)).save_pretrained(
        root / "llm", max_shard_size="100MB"
    )
    tokenizer.save_pretrained(root / "llm")
    assert len(list((root / "llm").glob("*.safetensors"))) >= 4
    return root


class RankMemory(threading.Thread):
    """Samples the anonymous memory of every rank of a launcher (its descendants that torchrun gave a
    RANK) until `stop()`: (seconds since start, rank, GiB) per sample; and the second `marker` first
    existed (the final checkpoint's commit)."""

    def __init__(self, launcher: int, marker: Path):
        super().__init__(daemon=True)
        self.launcher, self.marker = psutil.Process(launcher), marker
        self.started, self.samples, self.marker_s = time.monotonic(), [], None
        self._done = threading.Event()

    def ranks(self) -> dict[int, int]:
        found = {}
        try:
            children = self.launcher.children(recursive=True)
        except psutil.Error:  # the launcher has exited
            return found
        for proc in children:
            try:
                environ = proc.environ()
            except psutil.Error:
                continue
            if "RANK" in environ:
                found[int(environ["RANK"])] = proc.pid
        return found

    def run(self) -> None:
        while not self._done.is_set():
            now = time.monotonic() - self.started
            if self.marker_s is None and self.marker.exists():
                self.marker_s = now
            for rank, pid in self.ranks().items():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():  # an exiting rank has no RssAnon line
                    if line.startswith("RssAnon:"):
                        self.samples.append((now, rank, int(line.split()[1]) / 2**20))
            time.sleep(0.01)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def peaks(self, since: float = 0.0, until: float = float("inf")) -> dict[int, float]:
        """Each rank's highest sample in [since, until)."""
        found: dict[int, float] = {}
        for when, rank, gib in self.samples:
            if since <= when < until:
                found[rank] = max(found.get(rank, 0.0), gib)
        return found

    def first(self, rank: int, since: float) -> float:
        """The rank's first sample at or after `since`."""
        return next(gib for when, r, gib in self.samples if r == rank and when >= since)


@pytest.fixture(scope="module")
def pretrain(folders):
    """`cosctl pretrain recipes/vicuna7b/pretrain.yaml --nproc 2` for two steps, its ranks' memory
    sampled throughout; the times its log lines first appeared."""
    root = folders
    overrides = [
        f"model.vision.path={root / 'clip'}",
        f"model.text.path={root / 'llm'}",
        f"model.tokenizer={root / 'llm'}",
        f"data.root={root / 'data'}",
        "data.train=train.json",
        "data.eval=eval.json",
        "data.num_workers=0",
        "deepspeed.precision=fp32",
        "optim.num_steps=2",
        "batch.samples_per_step=4",
        "batch.tokens_per_micro_batch=4096",
        "checkpoint.every_steps=null",
        "checkpoint.every_minutes=null",
        "eval.every_steps=null",
        "slurm.gpus_per_node=0",
    ]
    output = root / "out"
    command = [sys.executable, "-m", "cosctl", "pretrain", str(RECIPES / "vicuna7b" / "pretrain.yaml")]
    command += ["--nproc", "2", "--run-dir", str(root / "run"), "--output", str(output)]
    command += [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.Popen(
        command, cwd=REPO, env=env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    memory = RankMemory(proc.pid, output / "checkpoints" / "latest")
    memory.start()
    lines: list[tuple[float, str]] = []
    try:
        deadline = time.monotonic() + 600
        for line in proc.stdout:
            lines.append((time.monotonic() - memory.started, line))
            assert time.monotonic() < deadline, "cosctl pretrain took more than 10 minutes"
        proc.wait(timeout=60)
    finally:
        memory.stop()
        if proc.poll() is None:
            kill_tree(proc.pid)
    log = "".join(line for _, line in lines)
    assert proc.returncode == 0, log[-5000:]

    def first(text: str) -> tuple[float, str]:
        return next((when, line) for when, line in lines if text in line)

    return {"root": root, "memory": memory, "first": first, "log": log}


def sizes(root: Path) -> tuple[float, float]:
    """One copy of the model (both source folders' weights; fp32 as the run) and the largest file of
    either, in GiB."""
    files = [*(root / "llm").glob("*.safetensors"), *(root / "clip").glob("*.safetensors")]
    return sum(f.stat().st_size for f in files) / GIB, max(f.stat().st_size for f in files) / GIB


def before_build_gib(log_line: str) -> float:
    """The anonymous memory a rank held before the build (the highest of the ranks), as cosctl logs it."""
    return float(log_line.split("anonymous ")[1].split(" GiB before")[0])


def test_each_rank_reads_and_holds_half_the_model_while_building_and_training(pretrain):
    """Up to the final checkpoint, no rank's anonymous memory exceeds half the model + the largest
    checkpoint file + 1 GiB; building the model and the engine add to what a rank held before the build
    its half of the model and no whole copy (DeepSpeed used to convert a whole model on every rank)."""
    model, shard = sizes(pretrain["root"])
    memory = pretrain["memory"]
    built_s, built_line = pretrain["first"]("model built in")
    engine_s, _ = pretrain["first"]("trainable parameters")
    assert memory.marker_s is not None and memory.marker_s > engine_s > built_s
    training = memory.peaks(until=memory.marker_s)
    assert sorted(training) == [0, 1]
    for rank, peak in training.items():
        assert peak <= model / 2 + shard + 1, (rank, peak, model, shard)
    before = before_build_gib(built_line)
    for rank, peak in memory.peaks(until=engine_s).items():
        assert peak - before <= model / 2 + BUILD_SLACK_GIB, (rank, peak, before, model)


def test_rank0_publishes_without_a_second_copy(pretrain):
    """While `model/` is written, rank 0's anonymous memory stays within its partition + the largest
    checkpoint file + 1 GiB, and grows by one gathered tensor at a time, never by a copy of the model."""
    model, shard = sizes(pretrain["root"])
    memory = pretrain["memory"]
    publishing = memory.peaks(since=memory.marker_s)[0]
    assert publishing <= model / 2 + shard + 1, (publishing, model, shard)
    largest = max(t.numel() * t.element_size() for t in read_checkpoint(pretrain["root"] / "llm").values()) / GIB
    start = memory.first(0, memory.marker_s)
    assert publishing - start <= largest + PUBLISH_SLACK_GIB, (publishing, start, largest, model)


def test_the_published_model_is_the_sources_weights_bit_for_bit(pretrain):
    """The published folder, read by transformers and exactly by cos_model, holds the CLIP folder's
    vision weights and the sharded Llama's (its `<image>` row added) bit for bit, and the bridge of the
    final checkpoint's gathered trainable weights."""
    root = pretrain["root"]
    folder = root / "out" / "model"
    published = read_checkpoint(folder)
    by_transformers = CosForConditionalGeneration.from_pretrained(folder).state_dict()
    exactly = load_model_folder(folder).state_dict()
    assert sorted(by_transformers) == sorted(exactly) == sorted(published)
    for key, tensor in published.items():
        assert torch.equal(by_transformers[key], tensor) and torch.equal(exactly[key], tensor), key
    llm = read_checkpoint(root / "llm")
    for key, tensor in llm.items():
        stored = published[f"language_model.{key}"]
        assert torch.equal(stored[: tensor.shape[0]], tensor), key
        assert stored.shape[0] == tensor.shape[0] + (key in ("model.embed_tokens.weight", "lm_head.weight"))
    vision = read_checkpoint(root / "clip", prefix="vision_model.", strip_prefix=True)
    tower = {key.removeprefix("vision_tower."): t for key, t in published.items() if key.startswith("vision_tower.")}
    assert tower and all(torch.equal(tensor, vision[key]) for key, tensor in tower.items())
    latest = (root / "out" / "checkpoints" / "latest").read_text().strip()
    trained = read_checkpoint(root / "out" / "checkpoints" / latest / "trainable")
    assert sorted(trained) == sorted(k for k in published if k.startswith(("resampler.", "projector.")))
    assert all(torch.equal(published[key], tensor) for key, tensor in trained.items())
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (2, 2)
