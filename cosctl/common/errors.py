"""The errors a user can cause or fix, in one leaf module (no imports), so the CLI can catch them all
without importing torch, transformers or boto3.

Every `UserError` carries one line that names the culprit (file, YAML key, record, object URI); the CLI
prints it once and exits 1. Anything else is a bug and keeps its traceback.

    UserError
      SpecError             a run spec that cannot be used (names the file and the YAML key)
      DataError             data records, images or the tokenizer (names the file and the record)
      CheckpointError       a checkpoint missing, incomplete, corrupt or incompatible (names the file)
        NotPublished        a folder without the manifest of a published artefact (model/, adapter/)
      StorageError          a store operation failed for good (names the object URI)
        ObjectNotFound      the object does not exist: the only error that means "absent"
        BucketNotFound      the bucket does not exist (a setup mistake, not an empty run)
        TransientStorageError  safe to retry: timeouts, 5xx, throttling, connection trouble
          StoreUnavailable  the endpoint does not answer at all (down, silent, unreachable)
      SlurmError            sbatch is missing or refused the job
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user must fix; the message is one line naming the culprit."""


class SpecError(UserError, ValueError):
    """A run spec that cannot be used; the message names the file and the YAML key."""


class DataError(UserError, ValueError):
    """A data problem the user must fix; the message names the file and, when relevant, the record."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or incompatible; the message says which file."""


class NotPublished(CheckpointError):
    """A folder holds no `manifest.json`, so it is not a complete published artefact."""


class StorageError(UserError, RuntimeError):
    """A store operation failed for good (after any retries); the message names the URI."""


class ObjectNotFound(StorageError):
    """The object does not exist. Nothing else may be read as "absent"."""


class BucketNotFound(StorageError):
    """The bucket does not exist: the endpoint or the URI is wrong, which must never read as "no
    checkpoint yet"."""


class TransientStorageError(StorageError):
    """A failure that is safe to retry (timeouts, 5xx, resets, throttling)."""


class StoreUnavailable(TransientStorageError):
    """The store's endpoint does not answer (refused, unreachable, or silent past the timeout)."""


class SlurmError(UserError, RuntimeError):
    """sbatch is missing or refused the job, or the spec cannot run as a SLURM job."""
