"""One image file, read safely: never a FIFO or a device, never more than `MAX_IMAGE_FILE_BYTES`, never a read
that hangs the run (`READ_SECONDS`), never a decompression bomb decoded."""

from __future__ import annotations

import os
import queue
import stat
import threading
import warnings
from typing import Any

from PIL import Image as PILImage

READ_SECONDS = 60.0  # one image file's read; a slower one (a hung network mount) is skipped like a broken file
MAX_IMAGE_FILE_BYTES = 1 << 30  # a larger "image" is refused unread (an uncompressed 179-megapixel RGB is 0.5 GiB)


def read_regular_file(path: str) -> bytes:
    """The bytes of `path` if it is a regular file of at most `MAX_IMAGE_FILE_BYTES`. A FIFO, device or socket is
    refused without a read: opening a FIFO waits for a writer and reading a device may never end. Opened
    non-blocking, then checked, so a file swapped for a FIFO after a check cannot block either."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise OSError(f"not a regular file (a FIFO, device or socket): {path}")
        if status.st_size > MAX_IMAGE_FILE_BYTES:
            raise OSError(f"{status.st_size} bytes, over the {MAX_IMAGE_FILE_BYTES} bytes an image file may have")
        return file.read()


class BoundedCalls:
    """Runs calls in a helper thread and waits at most `seconds` for each: one that never returns (a read from a hung
    network filesystem) costs an abandoned daemon thread and a `TimeoutError`, not the run; the next call gets a new
    thread. One helper per process (a forked loader worker starts its own)."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.requests: queue.SimpleQueue | None = None

    @staticmethod
    def serve(requests: queue.SimpleQueue) -> None:
        while True:
            function, args, answer = requests.get()
            try:
                answer.put((function(*args), None))
            except BaseException as error:  # handed to the caller, who raises it
                answer.put((None, error))

    def __call__(self, seconds: float, function: Any, *args: Any) -> Any:
        if self.pid != os.getpid():
            self.requests, self.pid = queue.SimpleQueue(), os.getpid()
            threading.Thread(target=self.serve, args=(self.requests,), daemon=True, name="bounded-calls").start()
        answer: queue.SimpleQueue = queue.SimpleQueue()
        self.requests.put((function, args, answer))
        try:
            result, error = answer.get(timeout=seconds)
        except queue.Empty:
            self.pid = None  # that thread is stuck in the call: the next call starts another
            raise TimeoutError(f"{getattr(function, '__name__', 'the call')}{args} took more than {seconds:g} s") \
                from None  # fmt: skip
        if error is not None:
            raise error
        return result


bounded = BoundedCalls()


def read_image_file(path: str) -> bytes:
    """`read_regular_file(path)`, given at most `READ_SECONDS`: the rule that no single image can hang the run."""
    return bounded(READ_SECONDS, read_regular_file, path)


def loaded(image: PILImage.Image) -> PILImage.Image:
    """`image` with its pixels read; a decompression bomb raises instead of being decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        image.load()
    return image
