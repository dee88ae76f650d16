"""Checks a training command makes before it starts any rank or builds anything, so that a mistake
costs seconds and reads as one line: the data files and model folders exist (`cosctl.spec.paths.check_paths`, what
`cosctl validate` checks too), the trackers the spec names are installed, and the output store is
reachable with the credentials at hand and writable (a probe object is written and deleted).

A store that is down or refuses the credentials is reported as such (`StorageError`), never as
"no checkpoint"; the training stages would otherwise find it minutes later, after the model build.
"""

from __future__ import annotations

import time
import uuid

from ..checkpoint.layout import PREFIX, split_checkpoint_uri
from ..common.errors import SpecError, StorageError, StoreUnavailable, TransientStorageError
from ..spec.paths import check_paths
from ..spec.specs import TrainingSpec
from ..storage import ObjectNotFound, open_store

PROBE_PREFIX = ".cosctl-preflight"


def preflight(spec: TrainingSpec, output: str, resume: str = "auto") -> None:
    """Raise the first problem found, as one line naming the key, path or URI."""
    problems = check_paths(spec) + spec.tracking.missing_packages()
    if problems:
        raise SpecError(problems[0])
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


__all__ = ["check_store_writable", "preflight"]
