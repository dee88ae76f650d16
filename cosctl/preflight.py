"""Checks a training command makes before it starts any rank or builds anything, so that a mistake
costs seconds and reads as one line: the data files and model folders exist, and the output store is
reachable with the credentials at hand and writable (a probe object is written and deleted).

A store that is down or refuses the credentials is reported as such (`StorageError`), never as
"no checkpoint"; the training stages would otherwise find it minutes later, after the model build.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from .checkpoint import PREFIX, split_checkpoint_uri
from .errors import SpecError, StorageError, StoreUnavailable, TransientStorageError
from .spec import PretrainSpec, TrainingSpec
from .storage import ObjectNotFound, open_store

PROBE_PREFIX = ".cosctl-preflight"


def preflight(spec: TrainingSpec, output: str, resume: str = "auto") -> None:
    """Raise the first problem found, as one line naming the key, path or URI."""
    for problem in missing_paths(spec):
        raise SpecError(problem)
    check_store_writable(output, spec)
    if resume not in ("auto", "never"):
        run, name = split_checkpoint_uri(resume)
        if name is None:
            raise SpecError(f"--resume {resume}: expected auto, never or RUN/checkpoints/step_NNNNNNNN")
        store = open_store(run, spec.storage.to_settings())
        try:
            store.get_bytes(f"{PREFIX}/{name}/manifest.json", 0, 1)
        except ObjectNotFound:
            raise StorageError(f"--resume {resume}: no committed checkpoint there (no manifest.json)") from None


def missing_paths(spec: TrainingSpec) -> list[str]:
    """One line per local path the spec names that does not exist (data root, record files, tokenizer
    and model folders); `s3://` locations are checked by the stores, not here."""
    problems = []

    def need(key: str, path: str | None, kind: str = "file") -> None:
        if path is None or "://" in path:
            return
        exists = Path(path).is_dir() if kind == "folder" else Path(path).is_file()
        if not exists:
            problems.append(f"{key}: {path} is not an existing {kind}")

    root = spec.data.root
    if "://" not in root:
        need("data.root", root, "folder")
        if Path(root).is_dir():
            need("data.train", str(Path(root) / spec.data.train))
            if spec.data.eval is not None:
                need("data.eval", str(Path(root) / spec.data.eval))
    if isinstance(spec, PretrainSpec):
        need("model.tokenizer", spec.model.tokenizer, "folder")
        need("model.vision.path", spec.model.vision.path, "folder")
        need("model.text.path", spec.model.text.path, "folder")
    return problems


def check_store_writable(output: str, spec: TrainingSpec) -> None:
    """List the run's checkpoints and write + delete a probe object: wrong credentials, a missing
    bucket, a read-only folder or an endpoint that does not answer each fail here, naming the URI."""
    store = open_store(output, spec.storage.to_settings())
    probe = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    _retrying_transient(lambda: store.list(PREFIX + "/"))
    try:
        _retrying_transient(lambda: store.put_bytes(b"cosctl preflight", probe))
    except StorageError as err:
        raise StorageError(f"{output}: not writable: {err}") from None
    _retrying_transient(lambda: store.delete(probe))


def _retrying_transient(action, attempts: int = 3, delay_s: float = 1.0):
    """A store call, tried again after a short wait when it failed in a way that is safe to retry
    (throttling, 5xx); an endpoint that does not answer is not retried here (it already used up its
    timeout)."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except TransientStorageError as err:
            if isinstance(err, StoreUnavailable) or attempt == attempts:
                raise
            time.sleep(delay_s * attempt)


__all__ = ["check_store_writable", "missing_paths", "preflight"]
