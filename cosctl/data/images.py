"""Images of a data split: decoding them into model pixels, checking that they decode, and reading their
bytes from a local folder or from object storage (docs/design.md §5).

    ImageSource("data/llava")                      images/abc.jpg -> data/llava/images/abc.jpg
    ImageSource("s3://bucket/llava", settings)     images/abc.jpg -> s3://bucket/llava/images/abc.jpg,
                                                   through the project's ObjectStore (credentials, retries,
                                                   typed errors), kept in a bounded local cache

A check decodes every pixel (`Image.load` through `convert`): PIL's `verify()` reads only the headers
and chunk checksums, so a JPEG cut short passes it and fails later, in a loader worker.

An `ImageSource` is cheap to pickle: DataLoader workers get the root and settings and open their own
store client on first use.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from ..common.errors import DataError, ObjectNotFound, StorageError
from ..storage import StoreSettings, open_store

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CACHE_BYTES = 2 << 30
FETCH_THREADS = 8  # concurrent GETs per loading process for the images of one micro-batch


def default_cache_dir() -> Path:
    """Local cache for remote data: `$COSCTL_CACHE`, else `~/.cache/cosctl`."""
    return Path(os.environ.get("COSCTL_CACHE") or Path.home() / ".cache" / "cosctl")


def _whole_files_only() -> None:
    """A data image must decode whole. Importing some libraries turns PIL's tolerance of truncated files
    on for the whole process (lmms-eval's task module does): a damaged image would then pass the
    checks and train as grey padding, never counted as bad."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(source: str | Path | bytes, image_size: int) -> torch.Tensor:
    """RGB, bicubic resize to a square, [0, 1], CLIP-normalised: float32 (3, image_size, image_size).
    `source` is a path or the file's bytes. PIL errors propagate (the caller names the file)."""
    _whole_files_only()
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(handle) as image:
        return image_pixels(image, image_size)


def image_pixels(image: Image.Image, image_size: int) -> torch.Tensor:
    """A decoded image as `decode_image` returns it (e.g. one a benchmark harness hands over)."""
    image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std).contiguous()


def decodes(source: str | Path | bytes) -> bool:
    """Whether every pixel of the image decodes (not just its headers, as `Image.verify` checks)."""
    _whole_files_only()
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
        return True
    except Exception:  # PIL raises many types (OSError, SyntaxError, struct.error...) for damage
        return False


class ImageSource:
    """Where a split's images are: a local folder or `s3://BUCKET/PREFIX` (see the module doc).

    `image` names are the records' own: relative to the root, or absolute local paths. Remote bytes are
    cached under `cache_dir` up to `cache_bytes` (oldest-read files evicted first); every process
    using the source (each DataLoader worker) shares that folder.
    """

    def __init__(
        self,
        root: str | Path,
        settings: StoreSettings | None = None,
        cache_dir: str | Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.root = str(root)
        self.remote = self.root.startswith("s3://")
        self.settings = settings
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache_bytes = cache_bytes
        self._store = None
        self._pid = -1
        self._cached_bytes: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_store=None, _pid=-1, _cached_bytes=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def where(self, image: str) -> str:
        """The image's full path or URI, for messages."""
        if not self.remote or Path(image).is_absolute():
            return str(self._local_path(image))
        return f"{self.root.rstrip('/')}/{image}"

    def _local_path(self, image: str) -> Path:
        path = Path(image)
        return path if path.is_absolute() else Path(self.root.removeprefix("file://")) / path

    def _remote_store(self):
        with self._lock:
            if self._store is None or self._pid != os.getpid():  # a forked worker opens its own client
                self._store, self._pid = open_store(self.root, self.settings), os.getpid()
            return self._store

    # --- bytes ---------------------------------------------------------------------------------------

    def read_bytes(self, image: str) -> bytes:
        """The image file's bytes; ObjectNotFound when it does not exist, StorageError when the store
        fails for another reason (after its retries)."""
        if not self.is_remote(image):
            return self._read_local(image)
        cached = self._cache_path(image)
        try:
            data = cached.read_bytes()
            os.utime(cached)  # marks it recently used for eviction
            return data
        except OSError:
            pass
        data = self._fetch(image)
        self._cache_put(cached, data)
        return data

    def is_remote(self, image: str) -> bool:
        """Whether `image` is read from object storage (and cached), not from a local file."""
        return self.remote and not Path(image).is_absolute()

    def _read_local(self, image: str) -> bytes:
        try:
            return self._local_path(image).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{self.where(image)}: no such image") from None
        except OSError as err:
            raise StorageError(f"{self.where(image)}: cannot read: {err}") from err

    def _fetch(self, image: str) -> bytes:
        return self._remote_store().get_bytes(image.lstrip("/"))

    def exists(self, image: str) -> bool:
        if not self.is_remote(image):
            return self._local_path(image).is_file()
        return self._remote_store().size(image.lstrip("/")) is not None

    # --- the bounded cache ---------------------------------------------------------------------------

    def _cache_folder(self) -> Path:
        return self.cache_dir / "images" / hashlib.sha256(self.root.encode()).hexdigest()[:16]

    def _cache_path(self, image: str) -> Path:
        digest = hashlib.sha256(image.encode()).hexdigest()
        return self._cache_folder() / digest[:2] / digest

    def _cache_put(self, path: Path, data: bytes) -> None:
        if self.cache_bytes <= 0 or len(data) > self.cache_bytes:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as err:  # a full or read-only cache only costs speed
            log.warning(
                "image cache %s: cannot write (%s); reading from %s without caching", path.parent, err, self.root
            )
            return
        with self._lock:
            if self._cached_bytes is None:
                self._cached_bytes = self._cache_usage()
            self._cached_bytes += len(data)
            if self._cached_bytes > self.cache_bytes:
                self._cached_bytes = self._evict(int(self.cache_bytes * 0.8))

    def _cache_files(self) -> list[tuple[float, int, Path]]:
        files = []
        for path in self._cache_folder().glob("*/*"):
            try:
                stat = path.stat()
            except OSError:  # another worker evicted it
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        return files

    def _cache_usage(self) -> int:
        return sum(size for _, size, _ in self._cache_files())

    def _evict(self, target: int) -> int:
        """Delete the least recently read files until at most `target` bytes remain; the bytes left."""
        files = sorted(self._cache_files())
        total = sum(size for _, size, _ in files)
        for _, size, path in files:
            if total <= target:
                break
            path.unlink(missing_ok=True)
            total -= size
        return total

    # --- pixels --------------------------------------------------------------------------------------

    def load(self, image: str, image_size: int) -> torch.Tensor:
        """Model pixels of `image`; DataError naming the file when it is missing or does not decode."""
        try:
            data = self.read_bytes(image)
        except ObjectNotFound as err:
            raise DataError(f"{self.where(image)}: image not found ({err})") from err
        try:
            return decode_image(data, image_size)
        except Exception as err:  # PIL raises many types for damaged files
            raise DataError(f"{self.where(image)}: cannot decode image: {err}") from err

    def load_many(self, images: list[str], image_size: int) -> list[torch.Tensor | DataError]:
        """`load` of each image, or the DataError it raised; remote images are fetched concurrently
        (one GET each costs a round trip, so a micro-batch's images are fetched together)."""

        def one(image: str) -> torch.Tensor | DataError:
            try:
                return self.load(image, image_size)
            except DataError as err:
                return err

        if not self.remote or len(images) < 2:
            return [one(image) for image in images]
        with ThreadPoolExecutor(min(FETCH_THREADS, len(images)), "image-get") as pool:
            return list(pool.map(one, images))

    def problem(self, image: str, decode: bool = True) -> str | None:
        """'missing_image', 'unreadable_image' or None. With `decode`, every pixel is decoded; without,
        only existence is checked. Storage failures other than absence propagate (a store that is down
        must not turn every image into a bad record)."""
        if not decode:
            return None if self.exists(image) else "missing_image"
        try:
            data = self.read_bytes(image)
        except ObjectNotFound:
            return "missing_image"
        except StorageError:
            if self.is_remote(image):
                raise
            return "unreadable_image"
        return None if decodes(data) else "unreadable_image"
