"""What a botocore failure means, as the project's storage errors (each naming the object URI):

    NoSuchBucket                                  -> BucketNotFound (a setup mistake, not an empty run)
    NoSuchKey / 404                               -> ObjectNotFound (the only "absent")
    5xx, 429, throttling codes                    -> TransientStorageError (a retry is safe)
    connect / read timeouts, refused endpoint     -> StoreUnavailable (the endpoint does not answer)
    a body cut off mid-stream                     -> TransientStorageError
    no credentials, 403 and other client errors   -> StorageError

Messages carry the error code, the HTTP status and the server's message, none of which can hold a
credential.
"""

from __future__ import annotations

from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from .base import BucketNotFound, ObjectNotFound, StorageError, StoreUnavailable, TransientStorageError

TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}
MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
# A body cut off, reset or stalled while being read: resumable with a ranged GET.
STREAM_ERRORS = (HTTPClientError, BotoConnectionError, IncompleteReadError)


def storage_error(err: Exception, where: str, bucket: str, action: str, attempts: int) -> StorageError:
    """The storage error for a botocore failure of `action` on `where` (an object or store URI)."""
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(
            f"{where}: {action}: no usable S3 credentials; set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    if isinstance(err, ClientError):
        info = err.response.get("Error", {})
        code = str(info.get("Code") or "")
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code == "NoSuchBucket":
            return BucketNotFound(f"{where}: {action}: bucket {bucket!r} does not exist at this endpoint")
        if code in MISSING_CODES:
            return ObjectNotFound(f"{where}: no such object")
        text = f"{where}: {action} failed: {code or 'error'} (HTTP {status})"
        if info.get("Message"):
            text += f": {info['Message']}"
        transient = status >= 500 or status == 429 or code in TRANSIENT_CODES
        return (TransientStorageError if transient else StorageError)(text)
    if isinstance(err, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        return StoreUnavailable(
            f"{where}: {action} failed: the endpoint does not answer ({type(err).__name__} after {attempts} attempts)"
        )
    if isinstance(err, STREAM_ERRORS):
        return TransientStorageError(f"{where}: {action} failed: {type(err).__name__}: {err}")
    return StorageError(f"{where}: {action} failed: {type(err).__name__}: {err}")
