"""A Chain-of-Sight model in lmms-eval, the harness MLLM papers report VQAv2, GQA, TextVQA, POPE, MME and
MMBench through (`pip install 'cosctl[lmms]'`).

    cosctl eval RUN --harness lmms-eval --tasks pope,mme       what `run_harness` runs, in process
    python -m lmms_eval --model cosctl --model_args pretrained=RUN --tasks pope   the same model, registered
                                                   through the `lmms_eval.models` entry point (pyproject.toml)

`CosLMM` answers lmms-eval's `generate_until` requests as `cosctl eval` answers records
(`cosctl.evaluate.generation`): the model any run output or export is (`cosctl.artefacts.loading`, local
or `s3://`), each request turned into a one-turn LLaVA record whose prompt is `build_prompt`'s (the
training ids up to the answer; `<image>\\n` goes before a question that has an image and no placeholder,
as LLaVA-1.5 writes its eval prompts), its image through `cosctl.data.images.image_pixels`, batches
planned by `plan_batches` (longest prompt first, `batch_size` at a time) and greedy decoding with the KV
cache (`generate_batch`). Over the same records, with the same batch size, the harness's outputs are
`cosctl eval`'s predictions. A task's `until` strings cut an answer after it is generated (lmms-eval's
contract; the default is "\\n\\n"); its `max_new_tokens` is kept, and a request for sampling is decoded
greedily all the same, with one warning.

One process: a run under several ranks (torchrun, accelerate) is refused; `cosctl eval --nproc` shards
`cosctl eval`'s own records.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from lmms_eval.api.model import lmms

from ..common.errors import DataError, UserError
from ..common.log import log
from ..data.conversation import IMAGE_TOKEN
from ..data.images import image_pixels
from .generation import cos_config, generate_batch, plan_batches
from .records import EvalPrompt, build_prompt

MODEL_NAME = "cosctl"
DEFAULT_MAX_NEW_TOKENS = 32  # `cosctl eval`'s default, for a task that sets none
LOG_FORMAT = "{time:HH:mm:ss} | {level: <8} | {name}:{line} - {message}"


def manifest():
    """lmms-eval's registration of `CosLMM` as `--model cosctl` (the `lmms_eval.models` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.{CosLMM.__name__}")


def harness_record(key: str, question: str, has_image: bool) -> dict:
    """The one-turn LLaVA record of a harness request: `<image>\\n` before a question with an image and
    no placeholder; the answer is a stand-in (a prompt ends where the answer's ids begin)."""
    if has_image and IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n{question}"
    record = {"id": key, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "-"}]}
    return {**record, "image": key} if has_image else record


def cut_at_stops(text: str, until: list[str]) -> str:
    """`text` up to the first of the `until` strings (lmms-eval's stop sequences), stripped."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()


def _stops(gen_kwargs: dict) -> tuple[str, ...]:
    until = gen_kwargs.get("until") or ()
    return (until,) if isinstance(until, str) else tuple(until)


class CosLMM(lmms):
    """lmms-eval's `--model cosctl`: `pretrained` is an export folder or a run output (`model/` or
    `adapter/`), local or `s3://`; `batch_size` records are generated together (as `cosctl eval
    --batch-size`); `max_new_tokens` is used where a task sets none."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        batch_size: int | str = 8,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        device: str | None = None,
        **unused,
    ) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("lmms-eval --model cosctl runs in one process; start it without torchrun/accelerate")
        from ..artefacts.loading import load_for_eval

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        with tempfile.TemporaryDirectory(prefix="cosctl-lmms-") as scratch:
            loaded = load_for_eval(str(pretrained), Path(scratch), dtype=dtype)
        self.model = loaded.model.to(self.device).eval()
        self.tokenizer = loaded.tokenizer
        self.config = cos_config(self.model)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self._warned_sampling = False
        log.info(f"lmms-eval: {pretrained} ({loaded.kind}) on {self.device}, batch size {self.batch_size}")

    def _prompt(self, key: str, question: str, visuals: list) -> EvalPrompt:
        record = harness_record(key, question, bool(visuals))
        return build_prompt(record, self.tokenizer, self.config.num_visual_tokens, "")

    def _visuals(self, request) -> list:
        context, _, doc_to_visual, doc_id, task, split = request.args
        visuals = [v for v in (doc_to_visual(self.task_dict[task][split][doc_id]) or []) if v is not None]
        if len(visuals) > 1:
            raise DataError(f"{task} document {doc_id}: {len(visuals)} images; a Chain-of-Sight record has one")
        return visuals

    def _check_decoding(self, gen_kwargs: dict) -> None:
        sampling = gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature") or 0) > 0
        if sampling and not self._warned_sampling:
            log.warning("lmms-eval asked for sampling; --model cosctl decodes greedily, as cosctl eval does")
            self._warned_sampling = True

    def generate_until(self, requests) -> list[str]:
        """Each request's greedy answer, cut at its `until` strings. Requests are grouped by their
        generation settings, ordered by (task, split, document) within a group, and batched as
        `cosctl eval` batches records."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            gen_kwargs = request.args[1]
            self._check_decoding(gen_kwargs)
            max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            groups[(max_new, _stops(gen_kwargs))].append(index)
        answers: list[str | None] = [None] * len(requests)
        for (max_new_tokens, until), members in groups.items():
            members.sort(key=lambda i: (requests[i].args[4], requests[i].args[5], requests[i].args[3]))
            visuals = [self._visuals(requests[i]) for i in members]
            prompts = [
                self._prompt(str(i), requests[i].args[0], images) for i, images in zip(members, visuals, strict=True)
            ]
            for batch in plan_batches([len(prompt.input_ids) for prompt in prompts], self.batch_size):
                pixels = [image_pixels(visuals[j][0], self.config.image_size) for j in batch if visuals[j]]
                texts = generate_batch(
                    self.model,
                    self.tokenizer,
                    [prompts[j] for j in batch],
                    torch.stack(pixels) if pixels else None,
                    max_new_tokens=max_new_tokens,
                    device=self.device,
                    synced=False,
                )
                for j, text in zip(batch, texts, strict=True):
                    answers[members[j]] = cut_at_stops(text, list(until))
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("--model cosctl generates answers (generate_until tasks); no loglikelihood")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("--model cosctl answers one turn per request")


@contextmanager
def _argv(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def harness_args(
    model: str,
    tasks: str,
    *,
    out: Path,
    include_path: Path | None,
    batch_size: int,
    max_new_tokens: int,
    limit: int | None,
) -> list[str]:
    """lmms-eval's own command line for `cosctl eval MODEL --harness lmms-eval` (samples logged)."""
    args = ["--model", MODEL_NAME, "--model_args", f"pretrained={model},max_new_tokens={max_new_tokens}"]
    args += ["--tasks", tasks, "--batch_size", str(batch_size), "--output_path", str(out), "--log_samples"]
    if include_path is not None:
        args += ["--include_path", str(include_path)]
    return args + (["--limit", str(limit)] if limit is not None else [])


def run_harness(argv: list[str]) -> dict:
    """Run lmms-eval in this process with `--model cosctl` registered (a source checkout has no entry
    point): its argument parsing, task loading, scoring, table and files under `--output_path`. Returns
    its results (per task: every metric); an unknown task is a `UserError`, other errors are raised as
    they are (lmms-eval's own CLI would print them and exit 0)."""
    import loguru
    from lmms_eval.__main__ import cli_evaluate_single, parse_eval_args
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.utils import make_table

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    with _argv(["lmms-eval", *argv]):
        _, args = parse_eval_args()
    # lmms-eval logs through loguru to the stdout it saw on import; send it to the stderr of now.
    loguru.logger.remove()
    loguru.logger.add(lambda message: sys.stderr.write(message), level=args.verbosity, format=LOG_FORMAT)
    try:
        results, _ = cli_evaluate_single(args)
    except ValueError as err:
        if str(err).startswith("Tasks not found"):
            missing = str(err).split(". Try", 1)[0]
            raise UserError(f"--tasks: {missing} (lmms-eval's names; --include-path for your own)") from None
        raise
    print(make_table(results))
    return results
