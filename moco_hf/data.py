"""Image datasets from `datasets` (Hub ids, image folders, parquet or arrow files) as two-crop micro-batches.

Two ways to read them, both a pure function of the settings, so that a resumed run sees exactly the data an
uninterrupted one would:

* a dataset with random access (not `--streaming`) is read in one `GlobalOrder` (`MicroBatchKeys` +
  `MapStyleBatches`): every epoch a permutation of the rows, each image's augmentation seeded by (seed, epoch,
  position), whatever the number of processes and workers;
* a stream (`StreamBatches`) is sharded per process with `split_dataset_by_node` and per DataLoader worker by
  `datasets` itself; each image's augmentation is seeded by (seed, epoch, rank, worker, position).

Images are decoded here (not by `datasets`), so that one that fails to decode is skipped and counted rather than
fatal.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from datasets import (
    Array2D,
    Array3D,
    ClassLabel,
    Dataset,
    DatasetDict,
    Image,
    IterableDataset,
    IterableDatasetDict,
    LargeList,
    List,
    ReadInstruction,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)
from datasets.distributed import split_dataset_by_node
from PIL import Image as PILImage
from PIL import ImageOps

from .bands import decode_bands, stored_bands
from .errors import DataError, first_line
from .image_files import loaded, read_image_file

HUB_CIFAR10 = "uoft-cs/cifar10"  # the default dataset
DEFAULT_DATASET_VARIABLE = "MOCO_HF_DEFAULT_DATASET"  # e.g. a local copy of it, for machines without the Hub
LOCAL_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}


def default_dataset_name() -> str:
    """The dataset of a run or an evaluation that names none: the Hub's CIFAR-10, or what the environment variable
    `MOCO_HF_DEFAULT_DATASET` names (the repository's scripts point it to their local copy of CIFAR-10)."""
    return os.environ.get(DEFAULT_DATASET_VARIABLE) or HUB_CIFAR10


def load_image_splits(
    name: str, streaming: bool, config_name: str | None = None, cache_dir: str | None = None, file_split: str = "train"
) -> DatasetDict | IterableDatasetDict:
    """Every split of `name`: a Hub id, a folder (parquet/arrow files, an image folder, or a `save_to_disk` folder)
    or one data file (loaded as split `file_split`)."""
    path = Path(name)
    try:
        if path.is_file() and path.suffix in LOCAL_FORMATS:
            return load_dataset(LOCAL_FORMATS[path.suffix], data_files={file_split: str(path)}, streaming=streaming,
                                cache_dir=cache_dir)  # fmt: skip
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # Dataset.save_to_disk
            saved = load_from_disk(str(path))
            saved = saved if isinstance(saved, DatasetDict) else DatasetDict({file_split: saved})
            return IterableDatasetDict({k: v.to_iterable_dataset() for k, v in saved.items()}) if streaming else saved
        loaded = load_dataset(name, config_name, streaming=streaming, cache_dir=cache_dir)
    except Exception as error:  # datasets raises many types here; the user needs one line
        if path.is_dir():
            refuse_unreadable_files(path)  # name the file when one file is the cause
        where = "local path" if path.exists() else "Hub dataset id (or local path; none exists here)"
        cause = root_cause(error)
        raise DataError(
            f"could not load `dataset_name` {name!r} as a {where}: {type(cause).__name__}: {first_line(cause)}"
        ) from error
    return loaded


def root_cause(error: BaseException) -> BaseException:
    """The first error of the chain (datasets wraps the reader's own in "An error occurred while generating ...")."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    return error


def refuse_unreadable_files(folder: Path) -> None:
    """One line naming the first file under `folder` that makes `datasets` refuse the whole folder: a name that is
    not UTF-8, or a parquet file whose footer cannot be read. Called once loading failed, so a good folder is not
    walked twice."""
    import pyarrow.parquet as pq

    for directory, _, names in os.walk(folder):
        for name in sorted(names):
            file = Path(directory) / name
            try:
                str(file).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{os.fsencode(file)!r}: its name is not UTF-8, which `datasets` cannot read; rename "
                                "or remove it.") from None  # fmt: skip
            if file.suffix == ".parquet":
                try:
                    pq.read_metadata(file)
                except Exception as error:
                    raise DataError(f"{file}: not a readable parquet file ({type(error).__name__}: "
                                    f"{first_line(error)}); replace or remove it.") from None  # fmt: skip


def load_image_dataset(
    name: str, split: str, streaming: bool, config_name: str | None = None, cache_dir: str | None = None
) -> Dataset | IterableDataset:
    """Split `split` of `name` (see `load_image_splits`); a single data file is read as that split."""
    splits = load_image_splits(name, streaming, config_name, cache_dir, file_split=split)
    if split not in splits:
        raise DataError(f"dataset {name!r} has no split {split!r}; its splits are {sorted(splits.keys())}.")
    return splits[split]


def select_split(splits: DatasetDict, spec: str, dataset_name: str) -> Dataset:
    """The rows that `spec` names in `datasets`' split notation: a split (`train`), or a slice of one (`train[:48]`,
    `train[10%:20%]`, several joined with `+`)."""
    try:
        instructions = ReadInstruction.from_spec(spec).to_absolute({name: len(split) for name, split in splits.items()})
    except (ValueError, AssertionError) as error:
        raise DataError(f"split {spec!r} of {dataset_name!r}: {first_line(error)} (its splits are "
                        f"{sorted(splits)}).") from error  # fmt: skip
    parts = [splits[part.splitname].select(range(part.from_, part.to)) for part in instructions]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def split_base_name(spec: str) -> str:
    """The split a spec reads: `train` for `train[:48]`."""
    return spec.split("[", 1)[0].split("+", 1)[0].strip()


def hold_out_rows(
    dataset: Dataset, count: int, label_column: str, seed: int, split: str, dataset_name: str, what: str
) -> tuple[Dataset, Dataset, bool, str]:
    """`dataset` (split `split` of `dataset_name`) split into the rest and `count` seeded rows held out of it (the
    `what`, e.g. "kNN queries"), each class in proportion when the labels are a `ClassLabel` (the first rows of a
    folder sorted by class would hold out whole classes); whether they are, and how results name the held-out rows."""
    if count < 1:
        raise DataError(f"split {split!r} of {dataset_name!r} has {len(dataset)} images: too few to hold {what} out "
                        "of it.")  # fmt: skip
    stratify = label_column if isinstance(dataset.features[label_column], ClassLabel) else None
    try:
        parts = dataset.train_test_split(test_size=count, seed=seed, stratify_by_column=stratify)
    except ValueError:  # a class with a single image cannot be split both ways: a plain seeded sample
        parts, stratify = dataset.train_test_split(test_size=count, seed=seed), None
    return parts["train"], parts["test"], stratify is not None, f"{split}, {count} held out (seed {seed})"


def take_rows(dataset: Dataset | IterableDataset, start: int, count: int | None) -> Dataset | IterableDataset:
    """Rows `start` to `start + count` (to the end when `count` is None), streamed or not."""
    if isinstance(dataset, IterableDataset):
        rest = dataset.skip(start) if start else dataset
        return rest if count is None else rest.take(count)
    end = len(dataset) if count is None else min(len(dataset), start + count)
    return dataset.select(range(min(start, end), end))


FINGERPRINT_ROWS = 8


def dataset_fingerprint(dataset: Dataset | IterableDataset, image_column: str, rows: int | None) -> str:
    """What identifies a dataset wherever it lies, for resume: its row count and a digest of its first
    `FINGERPRINT_ROWS` rows, image content included (read from the file when a row holds a path) and file paths
    left out, so the same data under another path has the same fingerprint and other data another one."""
    digest = hashlib.sha256()
    head = take_rows(dataset, 0, FINGERPRINT_ROWS)
    files = holds_image_files(head.features[image_column])
    head = ImageReader.prepare(head, image_column)
    for row in head:
        image = row.pop(image_column)
        if not files:  # an array: its values and shape
            digest.update(repr(np.shape(image)).encode() + np.ascontiguousarray(image).tobytes())
        image = image if files and image else {}
        content = image.get("bytes")
        if content is None and image.get("path"):
            try:
                content = read_image_file(image["path"])
            except OSError as error:  # TimeoutError included
                content = f"unreadable: {type(error).__name__}".encode()
        digest.update(content or b"")
        digest.update(repr(sorted(row.items())).encode())
    return f"{'?' if rows is None else rows} rows, sha256 of the first {FINGERPRINT_ROWS} {digest.hexdigest()[:16]}"


ARRAY_FEATURES = (Array2D, Array3D, List, LargeList)  # columns that may hold an image as an array of values


def holds_image_files(feature: Any) -> bool:
    """Whether a column holds image files: of type `datasets.Image`, or its storage struct {bytes, path}."""
    return isinstance(feature, Image) or (isinstance(feature, dict) and {"bytes", "path"} <= feature.keys())


def find_image_column(dataset: Dataset | IterableDataset, image_column: str | None) -> str:
    """`image_column` if given (checked), else the only column of type `datasets.Image`, else (none of that type)
    the only column holding arrays (`Array2D`, `Array3D`, nested lists)."""
    features = dataset.features or {}
    if image_column is not None:
        if image_column not in features:
            raise DataError(
                f"`image_column` {image_column!r} is not a column of the dataset; its columns are {sorted(features)}."
            )
        return image_column
    candidates = [name for name, feature in features.items() if isinstance(feature, Image)]
    candidates = candidates or [name for name, feature in features.items() if isinstance(feature, ARRAY_FEATURES)]
    if len(candidates) != 1:
        what = "no column of type Image or array" if not candidates else f"several image columns {candidates}"
        raise DataError(f"the dataset has {what} (columns: {sorted(features)}); pass `image_column` NAME.")
    return candidates[0]


def find_label_column(dataset: Dataset | IterableDataset, label_column: str | None) -> str:
    """`label_column` if given, else the only `ClassLabel` column, else a column named `label`/`labels`."""
    features = dataset.features or {}
    if label_column is not None:
        if label_column not in features:
            raise DataError(f"`label_column` {label_column!r} is not a column; the columns are {sorted(features)}.")
        return label_column
    candidates = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
    candidates = candidates or [name for name in ("label", "labels") if name in features]
    if len(candidates) != 1:
        raise DataError(f"cannot tell the label column among {sorted(features)}; pass `label_column` NAME.")
    return candidates[0]


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """RGB whatever the mode: palette/alpha over black, 16/32-bit integers and floats scaled to 8 bits
    (`eight_bit_grey`), CMYK and grey converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = PILImage.fromarray(eight_bit_grey(np.asarray(image)), mode="L")
    elif image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = PILImage.new("RGBA", image.size, (0, 0, 0, 255))
        image = PILImage.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def eight_bit_grey(array: np.ndarray) -> np.ndarray:
    """Single-channel pixels of any depth as uint8, from the range their values show: floats in [0, 1] (else taken
    as [0, 255]); integers as 8-bit when they stay under 256, 16-bit under 65536, else the full int32 range."""
    peak = float(array.max(initial=0))
    if array.dtype.kind == "f":
        top = 1.0 if peak <= 1.0 else 255.0
    else:
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else float(np.iinfo(np.int32).max)
    return (np.nan_to_num(array.astype(np.float64)) * (255.0 / top)).round().clip(0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ImageReader:
    """How stored images become what the augmentations take. An RGB model (`num_channels` 3) reading image files
    gets upright 8-bit RGB PIL images (`to_rgb`), as torchvision's recipes expect; any other band count, or images
    held as arrays, gets float `(C, H, W)` tensors at the images' own bit depth (`moco_hf.bands`). An image with
    another band count than `num_channels`, or with NaN or infinite values, is undecodable: counted and replaced."""

    num_channels: int = 3
    band_layout: str = "auto"
    bands: bool = False
    array_dtype: str | None = None  # the stored type of an array column (`datasets` hands integers out as int64)

    @classmethod
    def for_column(cls, dataset: Dataset | IterableDataset, column: str, num_channels: int = 3,
                   band_layout: str = "auto") -> ImageReader:  # fmt: skip
        feature = (dataset.features or {}).get(column)
        if holds_image_files(feature):
            return cls(num_channels, band_layout, bands=num_channels != 3)
        while isinstance(feature, (List, LargeList)):  # nested lists of values: the innermost value's type
            feature = feature.feature
        return cls(num_channels, band_layout, bands=True, array_dtype=getattr(feature, "dtype", None))

    @staticmethod
    def prepare(dataset: Dataset | IterableDataset, column: str) -> Dataset | IterableDataset:
        """`dataset` with `column` as the reader takes it: image files undecoded (bytes or path), arrays as numpy."""
        feature = dataset.features[column]
        if holds_image_files(feature):
            return dataset.cast_column(column, Image(decode=False)) if isinstance(feature, Image) else dataset
        return dataset.with_format("numpy")

    def __call__(self, value: Any) -> tuple[PILImage.Image | torch.Tensor | None, str | None]:
        """The image, or None and the reason it cannot be used."""
        if not self.bands:
            return decode_image_or_reason(value)
        try:
            value = self.stored(value)
        except Exception as error:  # an unreadable file, values of no number type: counted like a broken image
            return None, f"{type(error).__name__}: {first_line(error)}"
        return decode_bands(value, self.num_channels, self.band_layout)

    def stored(self, value: Any) -> Any:
        """A row's image as stored: a file's bytes (read from its path), or an array of the column's type."""
        if isinstance(value, dict):
            return {"bytes": read_image_file(value["path"])} if not value.get("bytes") and value.get("path") else value
        if self.array_dtype is not None and value is not None:
            return np.asarray(value).astype(self.array_dtype, copy=False)
        return value

    def check_band_count(self, dataset: Dataset | IterableDataset, column: str, rows: int = 100,
                         trained: bool = False) -> None:  # fmt: skip
        """Stop with one line when the first readable image of `column` has another band count than the model
        (`trained`: a model that exists, being evaluated): the wrong data or the wrong `num_channels`, not a few
        bad files. (Later ones are counted and skipped.)"""
        if not self.bands:
            return
        for row in take_rows(self.prepare(dataset, column), 0, rows):
            try:
                shape = stored_bands(self.stored(row[column]), self.num_channels, self.band_layout).shape
            except Exception:  # unreadable: counted when training reaches it
                continue
            if shape[0] != self.num_channels:
                advice = "evaluate it on images of its bands" if trained else f"pass `num_channels` {shape[0]}"
                raise DataError(
                    f"the first readable image of column {column!r} has {shape[0]} band(s) (shape {shape}, "
                    f"`band_layout` {self.band_layout}) but the model takes {self.num_channels} (`num_channels`): "
                    f"{advice}, or convert the images."
                )
            return


RGB_READER = ImageReader()


def decode_image(value: Any) -> PILImage.Image | None:
    """A `datasets.Image(decode=False)` value (bytes or path) as an RGB PIL image; None if it cannot be decoded."""
    return decode_image_or_reason(value)[0]


def decode_image_or_reason(value: Any) -> tuple[PILImage.Image | None, str | None]:
    """`decode_image`, with the reason when it returns None (for the message when nothing decodes)."""
    try:
        if isinstance(value, PILImage.Image):
            image = loaded(value)
        elif isinstance(value, dict) and value.get("bytes"):
            image = loaded(PILImage.open(io.BytesIO(value["bytes"])))
        elif isinstance(value, dict) and value.get("path"):
            image = loaded(PILImage.open(io.BytesIO(read_image_file(value["path"]))))
        else:
            return None, f"no image bytes or path (value {str(value)[:60]})"
        if min(image.size) < 1:
            return None, f"an empty image of size {image.size}"
        return to_rgb(ImageOps.exif_transpose(image)), None  # upright, as datasets.Image decodes it
    except Exception as error:  # a corrupt file must never stop a run: it is counted by the caller
        return None, f"{type(error).__name__}: {first_line(error)}"


def dataset_rows(dataset: Dataset | IterableDataset) -> int | None:
    """Number of rows, when known without reading the data."""
    if hasattr(dataset, "__len__"):
        return len(dataset)
    splits = dataset.info.splits
    return splits[dataset.split].num_examples if splits and dataset.split in splits else None


def as_iterable(dataset: Dataset | IterableDataset, num_shards: int) -> IterableDataset:
    """A map-style dataset as an iterable one with `num_shards` shards; an iterable one unchanged."""
    if isinstance(dataset, IterableDataset):
        return dataset
    return dataset.to_iterable_dataset(num_shards=max(1, min(num_shards, len(dataset))))


def shard_for_process(dataset: IterableDataset, rank: int, world_size: int) -> IterableDataset:
    """This process's part of the stream (by shard when shards divide evenly, else every N-th example)."""
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size) if world_size > 1 else dataset


def usable_workers(dataset: IterableDataset, requested: int) -> int:
    """DataLoader workers beyond the shards this process has would sit idle (`datasets` gives each whole shards)."""
    return max(0, min(requested, dataset.num_shards)) if requested > 0 else 0


def sample_seed(*parts: int) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class StreamPosition:
    """Where a worker stands: which process and worker it is, and how many of its batches to skip (resume)."""

    rank: int
    worker: int
    num_workers: int
    skip_batches: int


class TwoViewAugmentation(Protocol):
    """The two views of MoCo, made in two places: `loader_item` runs in the loader workers on each decoded image and
    `on_device` makes the query and key views of a collated batch on the training device. `TwoCropsTransform` (the
    official code's name) finishes both views in the workers; `OnDeviceTwoCrops` draws their random parameters
    there and applies them to the whole batch on the device. `StreamBatches` (a `datasets` stream) and
    `MapStyleBatches` (a map-style dataset in `GlobalOrder`) feed either."""

    def loader_item(self, image: PILImage.Image, seed: int) -> dict[str, torch.Tensor]: ...

    def on_device(self, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]: ...


def stack_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack tensors of one shape, or `(C, H, W)` images of several sizes: smaller ones are first padded to the
    largest height and width by repeating their last row and column (what a crop at the edge would see if the image
    went on)."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    height, width = max(t.shape[-2] for t in tensors), max(t.shape[-1] for t in tensors)
    batch = tensors[0].new_empty((len(tensors), tensors[0].shape[0], height, width))
    for out, tensor in zip(batch, tensors, strict=True):
        h, w = tensor.shape[-2:]
        out[:, :h, :w] = tensor
        out[:, :h, w:] = tensor[:, :, w - 1 :]
        out[:, h:, :] = out[:, h - 1 : h, :]
    return batch


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: stack_padded([item[name] for item in items]) for name in items[0]}


class StreamBatches(torch.utils.data.IterableDataset):
    """An endless stream of full batches from a `datasets` stream: the collated `loader_item`s of the augmentation
    (the finished views `"query", "key": (B, 3, H, W)`, or pixels and parameters for `OnDeviceTwoCrops`), and
    `"skipped"`.

    Epochs follow one another (with `set_epoch`, so shard order and shuffle buffer change); a batch may span two
    epochs. `skipped` counts the images that failed to decode since the worker's previous batch. Use it in a
    `DataLoader(batch_size=None)`; with W workers, the loader takes batches from them in turn.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        image_column: str,
        two_crops: TwoViewAugmentation,
        batch_size: int,
        seed: int,
        rank: int = 0,
        skip_batches: int = 0,
        reader: ImageReader = RGB_READER,
    ) -> None:
        super().__init__()
        self.dataset = reader.prepare(dataset.select_columns([image_column]), image_column)
        self.image_column, self.reader = image_column, reader
        self.two_crops = two_crops
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.skip_batches = skip_batches

    def _position(self) -> StreamPosition:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader takes batch i from worker i % W as that worker's (i // W)-th batch. A resumed loader starts at
        # worker 0 again, so every worker skips S // W batches and the caller drops the first S % W it receives
        # (`batches_to_drop`): the stream then goes on exactly where the interrupted run stopped.
        return StreamPosition(self.rank, worker, num_workers, self.skip_batches // num_workers)

    def batches_to_drop(self, num_workers: int) -> int:
        """Batches a resumed loader yields first that the interrupted run had already used."""
        return self.skip_batches % max(1, num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Batches, endlessly; a batch `{"error": message}` instead when the stream yields no usable image (the
        consumer raises it: an exception raised in a DataLoader worker would reach the user as a traceback).

        Every row of the stream is one slot of a batch. An undecodable row's slot gets the next decodable image (with
        the seed of its own slot), which is then seen twice: the `MapStyleBatches` rule, so batches stay full and a
        resumed run skips a number of rows, whatever they held."""
        position = self._position()
        to_skip = position.skip_batches * self.batch_size  # rows consumed by the run this one resumes
        items, skipped, epoch, failures = [], 0, 0, UndecodableRun(self.image_column)
        waiting: list[int] = []  # seeds of undecodable slots, filled by the next image that decodes
        while True:
            self.dataset.set_epoch(epoch)
            rows_seen = 0
            for index, row in enumerate(self.dataset):
                rows_seen += 1
                if to_skip:
                    to_skip -= 1
                    continue
                image, reason = self.reader(row[self.image_column])
                if failures.add(reason):
                    yield {"error": failures.message()}
                    return
                seed = sample_seed(self.seed, epoch, position.rank, position.worker, index)
                if image is None:
                    skipped += 1
                    waiting.append(seed)
                    continue
                for slot_seed in [*waiting, seed]:
                    items.append(self.two_crops.loader_item(image, slot_seed))
                    if len(items) == self.batch_size:
                        yield {**collate(items), "skipped": skipped}
                        items, skipped = [], 0
                waiting = []
            if rows_seen == 0:
                yield {
                    "error": f"worker {position.worker} of process {position.rank} received no rows: the dataset is "
                    "empty, or has fewer shards than workers (lower `dataloader_num_workers`)."
                }
                return
            epoch += 1


@dataclass(frozen=True)
class GlobalOrder:
    """Which rows of a map-style dataset each training step reads: every epoch is one permutation of the rows
    (seeded by the run's seed and the epoch), cut into global batches of `global_batch` images; within a step,
    micro-batch m of process r is the slice `(m * world + r) * micro_batch` onwards. The images of a step depend
    on the global batch alone, not on the number of processes or loader workers, so that a run resumes on another
    process count at the same position: within the epoch no image seen twice, none skipped. An epoch is whole
    steps (`num_rows // global_batch`); the last rows of each permutation wait for a later epoch's."""

    num_rows: int
    global_batch: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.num_rows // self.global_batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch))
        return torch.randperm(self.num_rows, generator=generator)

    def positions(self, step: int, micro_step: int, rank: int, micro_batch: int, world: int) -> tuple[int, range]:
        """(epoch, positions in that epoch's permutation) of micro-batch `micro_step` of process `rank` at `step`."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        start = step_in_epoch * self.global_batch + (micro_step * world + rank) * micro_batch
        return epoch, range(start, start + micro_batch)


class MicroBatchKeys(torch.utils.data.Sampler):
    """The DataLoader `batch_sampler` of one process: endless lists of `(epoch, position)` keys, one list per
    micro-batch, from step `start_step` on (a resumed run starts where its checkpoint stopped)."""

    def __init__(self, order: GlobalOrder, micro_batch: int, rank: int, world: int, accumulation: int,
                 start_step: int) -> None:  # fmt: skip
        self.order, self.micro_batch, self.rank, self.world = order, micro_batch, rank, world
        self.accumulation, self.start_step = accumulation, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            for micro_step in range(self.accumulation):
                epoch, positions = self.order.positions(step, micro_step, self.rank, self.micro_batch, self.world)
                yield [(epoch, position) for position in positions]
            step += 1


class MapStyleBatches(torch.utils.data.Dataset):
    """Two-crop micro-batches of a map-style dataset, read in `GlobalOrder` (see `MicroBatchKeys`).

    The augmentation of the image at position p of epoch e is seeded by (seed, e, p): the data is the same whatever
    the number of processes and workers. An image that cannot be decoded is counted in `"skipped"` and its slot
    gets the next decodable image in the epoch's order (seeded by the slot), so that every micro-batch stays full, as
    the batch shuffle and split BatchNorm need; that image is then seen twice. `StreamBatches` follows the same rule.
    """

    def __init__(self, dataset: Dataset, image_column: str, two_crops: TwoViewAugmentation, order: GlobalOrder,
                 reader: ImageReader = RGB_READER) -> None:  # fmt: skip
        self.dataset = reader.prepare(dataset.select_columns([image_column]), image_column)
        self.image_column, self.two_crops, self.order, self.reader = image_column, two_crops, order, reader
        self.cached_epoch, self.cached_permutation = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, epoch: int) -> torch.Tensor:
        if epoch != self.cached_epoch:
            self.cached_epoch, self.cached_permutation = epoch, self.order.permutation(epoch)
        return self.cached_permutation

    def __getitems__(self, keys: list[tuple[int, int]]) -> dict[str, Any]:
        """The collated micro-batch of `keys`, or `{"error": message}` when no image nearby decodes."""
        epoch = keys[0][0]
        rows = self.rows(epoch)
        values = self.dataset[rows[[position for _, position in keys]].tolist()][self.image_column]
        items, skipped, failures = [], 0, UndecodableRun(self.image_column)
        for (_, position), value in zip(keys, values, strict=True):
            image, reason = self.reader(value)
            skipped += image is None
            attempt = 0
            while image is None:  # the next rows of the permutation, until one decodes
                attempt += 1
                if failures.add(reason):
                    return {"error": failures.message()}
                value = self.dataset[int(rows[(position + attempt) % len(rows)])][self.image_column]
                image, reason = self.reader(value)
            failures.add(None)
            items.append(self.two_crops.loader_item(image, sample_seed(self.order.seed, epoch, position)))
        return {**collate(items), "skipped": skipped}


def keep_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader `collate_fn` for datasets that collate their own batches (`MapStyleBatches.__getitems__`)."""
    return batch


class UndecodableRun:
    """Counts images that fail to decode one after another; too many in a row means none will."""

    LIMIT = 1000

    def __init__(self, column: str) -> None:
        self.column, self.in_a_row, self.reasons = column, 0, []

    def add(self, reason: str | None) -> bool:
        """Record one image (`reason` None: it decoded); True once the limit of failures in a row is reached."""
        if reason is None:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        if len(self.reasons) < 3 and reason not in self.reasons:  # the first distinct reasons
            self.reasons.append(reason)
        return self.in_a_row >= self.LIMIT

    def message(self) -> str:
        return (f"{self.in_a_row} images in a row of column {self.column!r} could not be decoded (first: "
                f"{'; '.join(self.reasons)}); check `image_column` and the files it points to.")  # fmt: skip


def init_loader_worker(_worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: one intra-op thread per worker (they run in parallel already), and SIGINT and
    SIGTERM left to the main process, which saves a checkpoint (a Ctrl-C reaches the whole process group; a worker
    that died of it would make the save fail). Workers still exit with the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def close_loader(batches: Iterator[Any]) -> None:
    """Shut down a DataLoader iterator's workers now. Call it however the loop ends: an exception's traceback keeps
    the iterator alive until the interpreter exits, and there multiprocessing would wait forever on workers that
    ignore SIGTERM (`init_loader_worker`). Told to stop, they exit by themselves."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's own clean stop (absent without workers)
    if shutdown is not None:
        shutdown()


def usable_images(
    dataset: Dataset | IterableDataset, image_column: str, reader: ImageReader = RGB_READER
) -> Iterator[tuple[dict[str, Any], PILImage.Image | torch.Tensor]]:
    """(row, image) of every row whose image `reader` can use, in order; the others are left out."""
    for row in reader.prepare(dataset, image_column):
        image, _ = reader(row[image_column])
        if image is not None:
            yield row, image


def labelled_images(
    dataset: Dataset | IterableDataset, image_column: str, label_column: str, limit: int | None,
    reader: ImageReader = RGB_READER,
) -> Iterator[tuple[PILImage.Image | torch.Tensor, int]]:  # fmt: skip
    """(image, label) pairs of the first `limit` rows that `reader` can use; the others are left out."""
    for taken, (row, image) in enumerate(usable_images(dataset, image_column, reader)):
        if limit is not None and taken >= limit:
            return
        yield image, int(row[label_column])
