"""Streaming training data: images read shard by shard (a Hub dataset with `streaming=True`, local parquet shards or
local WebDataset tar shards) without materializing the dataset, split over processes and data-loader workers,
shuffled with a buffer, and resumed exactly where a killed run stopped.

The stream of one (process, data-loader worker) pair is the same every time it is read: epoch `e` is the `datasets`
pipeline `dataset.shuffle(seed, buffer_size)` (shard order and a shuffle buffer, both seeded), split over the
processes with `datasets.distributed.split_dataset_by_node`, `set_epoch(e)`, and the worker's share of the process's
shards. Each worker reads its epochs one after the other without end (training stops at `max_steps`), so the
processes never wait for each other at an epoch boundary, and every epoch holds every image exactly once over all
processes and workers.

Exact resume. Each example carries its position `(epoch, worker, index in the worker's epoch)`; the batches the Trainer
takes are counted in the main process ([`StreamingLoader`]) and every checkpoint stores, per process, where each
worker stands (`stream_state_{rank}.json`, [`StreamStateCallback`]). A resumed run ([`StreamingImageDataset.load_state`])
replays each worker's epoch up to that position without decoding an image (images are decoded by the collator) and
goes on from there. `IterableDataset.state_dict()` of `datasets` is not used for this: it restores the reader's
position but not the content of the shuffle buffer (the examples in the buffer at the checkpoint would be lost for
that epoch), and it is not updated in data-loader workers without torchdata's `StatefulDataLoader`. The cost of the
replay is reading (not decoding) the part of the current epoch each worker had read.
"""

import collections
import glob
import hashlib
import json
import logging
import os

import datasets
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import TrainerCallback

from ..io_utils import write_json_atomically

logger = logging.getLogger(__name__)
STREAM_POSITION = "__stream_position__"  # (epoch, worker, index in the worker's epoch) of an example
STATE_FILE = "stream_state_{rank}.json"
SHARD_EXTENSIONS = (".parquet", ".tar")


def _local_shards(source: str) -> list[str] | None:
    """The parquet or tar files of a local folder, file or glob pattern (sorted), or `None` when `source` is not
    local."""
    if os.path.isdir(source):
        files = [
            path
            for extension in SHARD_EXTENSIONS
            for path in glob.glob(os.path.join(source, "**", f"*{extension}"), recursive=True)
        ]
    elif glob.has_magic(source) or os.path.isfile(source):
        files = glob.glob(source, recursive=True)
    else:
        return None
    if not files:
        raise ValueError(
            f"--train_data {source}: no {' or '.join(SHARD_EXTENSIONS)} shards found. Streaming reads parquet shards "
            "or WebDataset tar shards (one file per shard), or a Hub dataset id."
        )
    kinds = {os.path.splitext(path)[1] for path in files}
    if len(kinds) > 1 or not kinds <= set(SHARD_EXTENSIONS):
        raise ValueError(
            f"--train_data {source}: found {sorted(kinds)} files; streaming reads one kind of shard, parquet or tar."
        )
    return sorted(files)


def _fingerprint(source: str, split: str, files: list[str] | None) -> str:
    """What identifies the stream's content for the run manifest: names and sizes of local shards, or the Hub id."""
    digest = hashlib.sha256(f"{source}:{split}".encode())
    for path in files or []:
        digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}".encode())
    return digest.hexdigest()


def load_streaming_dataset(source: str, image_column: str = "image", split: str = "train") -> datasets.IterableDataset:
    """The `split` of `source` as a `datasets.IterableDataset`, images left undecoded (the collator decodes them).

    `source` is a Hub dataset id (read with `streaming=True`), or a local folder, file or glob pattern of parquet shards
    or WebDataset tar shards (one shard per file; in a tar shard the files of one sample share a key, e.g.
    `000001.jpg`, `000001.cls`, and the image column is named after the image's extension: `--image_column jpg`).
    Raises `ValueError` naming the available columns when `image_column` is not one of them.
    """
    files = _local_shards(source)
    try:
        if files is None:
            dataset = load_dataset(source, split=split, streaming=True)
        else:
            builder = "parquet" if files[0].endswith(".parquet") else "webdataset"
            dataset = load_dataset(builder, data_files={split: files}, split=split, streaming=True)
    except ValueError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise ValueError(
            f"Could not stream the dataset {source!r} (split {split!r}): it is not a folder or pattern of parquet / "
            f"tar shards and not a dataset available from the Hugging Face Hub. Original error: {error}"
        ) from error
    features = dataset.features  # None for some Hub datasets: their columns are known once read
    columns = list(features) if features is not None else list(next(iter(dataset)).keys())
    if image_column not in columns:
        raise ValueError(
            f"Dataset {source!r} has no column {image_column!r}; its columns are {columns}. Pass the name of the image "
            "column with --image_column (in WebDataset shards: the image's extension, e.g. jpg or png)."
        )
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    dataset._hf_distill_fingerprint = _fingerprint(source, split, files)
    return dataset


class StreamingImageDataset(IterableDataset):
    """The training stream of one process: endless, epoch after epoch, of examples tagged with their position (see
    the module docstring).

    Args:
        dataset (`datasets.IterableDataset`): the whole stream, e.g. from [`load_streaming_dataset`].
        seed (`int`): seed of the shard order and of the shuffle buffer (the epoch is added by `set_epoch`).
        shuffle_buffer_size (`int`): examples in the shuffle buffer; 0 reads the shards in order without shuffling.
        rank, world_size (`int`): this process and the number of processes.
    """

    def __init__(
        self, dataset: datasets.IterableDataset, seed: int, shuffle_buffer_size: int, rank: int, world_size: int
    ):
        if shuffle_buffer_size < 0:
            raise ValueError(f"--shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}.")
        self.dataset = dataset
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.rank, self.world_size = rank, world_size
        self._fingerprint = getattr(dataset, "_hf_distill_fingerprint", None)  # recorded in the run manifest
        self.num_workers = None  # set by the loader
        self.start = {}  # worker -> [epoch, index]: where each worker's stream starts (a resumed run)
        self.position = {}  # worker -> [epoch, index]: the next example of each worker the Trainer has not taken
        self.next_worker = 0  # the worker whose batch the Trainer takes next
        self.state_loaded = False

    @property
    def num_shards_per_process(self) -> int:
        """Shards each process reads: its share when the number of shards is a multiple of the world size, else all
        of them (each process then keeps one example out of `world_size`)."""
        shards = self.dataset.num_shards
        return shards // self.world_size if shards % self.world_size == 0 else shards

    def epoch_dataset(self, epoch: int) -> datasets.IterableDataset:
        """The `datasets` pipeline of this process for `epoch` (a new object: `set_epoch` never changes another)."""
        dataset = self.dataset
        if self.shuffle_buffer_size > 0:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        dataset = split_dataset_by_node(dataset, rank=self.rank, world_size=self.world_size)
        dataset.set_epoch(epoch)
        return dataset

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, start = self.start.get(worker, (0, 0))
        while True:
            count = 0
            for index, example in enumerate(self.epoch_dataset(epoch)):  # in a worker: its share of the shards
                count += 1
                if index >= start:
                    yield {**example, STREAM_POSITION: (epoch, worker, index)}
            if count == 0:
                raise RuntimeError(
                    f"Data-loader worker {worker} of process {self.rank} read no example in epoch {epoch}: the stream "
                    f"has {self.dataset.num_shards} shards, too few for {self.world_size} processes x "
                    f"{max(1, self.num_workers or 0)} workers. Use fewer --dataloader_num_workers or more shards."
                )
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------ position in checkpoints

    def state(self) -> dict:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "shuffle_buffer_size": self.shuffle_buffer_size,
            "positions": {str(worker): list(position) for worker, position in sorted(self.position.items())},
            "next_worker": self.next_worker,
        }

    def save_state(self, checkpoint: str) -> None:
        write_json_atomically(os.path.join(checkpoint, STATE_FILE.format(rank=self.rank)), self.state())

    def load_state(self, checkpoint: str, num_workers: int) -> None:
        """Resume from the position saved in `checkpoint` by this process (`num_workers`: the run's
        `--dataloader_num_workers`, which must be the saved one: each worker's stream depends on it)."""
        path = os.path.join(checkpoint, STATE_FILE.format(rank=self.rank))
        if not os.path.isfile(path):
            raise ValueError(
                f"{checkpoint} has no {os.path.basename(path)}: it was not written by a streaming run, so the position "
                "in the stream is unknown. Resume it with the data options it was trained with."
            )
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        saved = {key: state[key] for key in ("world_size", "num_workers", "seed", "shuffle_buffer_size")}
        current = {
            "world_size": self.world_size,
            "num_workers": num_workers,
            "seed": self.seed,
            "shuffle_buffer_size": self.shuffle_buffer_size,
        }
        changed = [f"{key} {saved[key]} -> {current[key]}" for key in saved if saved[key] != current[key]]
        if changed:
            raise ValueError(
                f"{path}: the stream was read with other settings ({', '.join(changed)}); resuming would not continue "
                "where it stopped. Resume with the settings of that run (e.g. the same --dataloader_num_workers)."
            )
        self.start = {int(worker): tuple(position) for worker, position in state["positions"].items()}
        self.position = {worker: list(position) for worker, position in self.start.items()}
        self.next_worker = state["next_worker"]
        self.state_loaded = True
        logger.info("Resuming the stream of process %d at %s (epoch, example) per worker", self.rank, self.start)


class PositionCollator:
    """`collate` for examples that may carry [`STREAM_POSITION`]: the batch gets their positions under that key as a
    list of tuples (plain integers: moving the batch to the device leaves them on the host, no sync)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples: list[dict]) -> dict:
        positions = [example.pop(STREAM_POSITION) for example in examples if STREAM_POSITION in example]
        batch = self.collate(examples)
        if positions:
            batch[STREAM_POSITION] = positions
        return batch


class StreamingLoader:
    """The Trainer's training loader over a [`StreamingImageDataset`]: hands the batches on in the order of an
    uninterrupted run and records, for each batch the Trainer takes, the position of the next example of its worker.

    Workers take turns (`DataLoader` round robin). A new `DataLoader` starts with worker 0, an interrupted run stopped
    before another one (`dataset.next_worker`): batches of the workers before it are held (at most `num_workers - 1`)
    until their turn comes, so a resumed run trains on the batches of an uninterrupted one in the same order.
    """

    def __init__(self, loader, dataset: StreamingImageDataset):
        self.loader = loader
        self.dataset = dataset

    def __iter__(self):
        dataset = self.dataset
        num_workers = max(1, dataset.num_workers or 0)
        held = {worker: collections.deque() for worker in range(num_workers)}
        batches = iter(self.loader)
        while True:
            turn = dataset.next_worker
            while not held[turn]:
                batch = next(batches, None)
                if batch is None:
                    return
                positions = batch.pop(STREAM_POSITION)  # one worker's examples, in stream order
                held[positions[-1][1]].append((batch, positions[-1]))
            batch, (epoch, worker, index) = held[turn].popleft()
            dataset.position[worker] = [epoch, index + 1]
            dataset.next_worker = (worker + 1) % num_workers
            yield batch


def streaming_train_dataloader(trainer) -> StreamingLoader:
    """The training loader of `trainer` over its [`StreamingImageDataset`]: each process reads its own share (no
    batch dispatching from the main process, no second split by accelerate), batches moved to the device."""
    from accelerate.data_loader import prepare_data_loader

    dataset, args = trainer.train_dataset, trainer.args
    if args.dataloader_persistent_workers:
        raise ValueError(
            "--dataloader_persistent_workers is not supported with streaming data (the stream never ends: workers are "
            "started once anyway); leave it off."
        )
    if args.dataloader_num_workers > dataset.num_shards_per_process:
        raise ValueError(
            f"--dataloader_num_workers {args.dataloader_num_workers} is more than the {dataset.num_shards_per_process} "
            f"shards each of the {dataset.world_size} processes reads: some workers would have nothing to read. Use "
            "fewer workers, or split the data into more shards."
        )
    dataset.num_workers = args.dataloader_num_workers
    loader = DataLoader(
        dataset,
        batch_size=trainer._train_batch_size,
        collate_fn=PositionCollator(trainer.data_collator),
        num_workers=args.dataloader_num_workers,
        pin_memory=args.dataloader_pin_memory,
        prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None,
    )
    loader = prepare_data_loader(
        loader,
        trainer.accelerator.device,
        num_processes=1,
        process_index=0,
        put_on_device=True,
        dispatch_batches=False,
    )  # this process's share already: one "process" for accelerate
    return StreamingLoader(loader, dataset)


class StreamStateCallback(TrainerCallback):
    """Writes each process's stream position into every checkpoint, and refuses a resumed run that did not load it."""

    def __init__(self, dataset: StreamingImageDataset):
        self.dataset = dataset

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and not self.dataset.state_loaded:
            raise ValueError(
                f"Training resumes at step {state.global_step} but the stream position was not restored: call "
                "`train_dataset.load_state(checkpoint, num_workers)` before `trainer.train` (the recipes do)."
            )

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)  # every process writes its own file (before CheckpointCompletion's barrier)
        self.dataset.save_state(folder)


def load_streaming_train_dataset(
    source: str,
    image_column: str,
    split: str,
    training_args,
    shuffle_buffer_size: int = 1000,
    max_samples: int | None = None,
) -> StreamingImageDataset:
    """The training stream of this process for a recipe's `--streaming` (`training_args`: its `TrainingArguments`,
    for the seed, the processes and `max_steps`, which a stream needs: it has no length)."""
    if training_args.max_steps is None or training_args.max_steps <= 0:
        raise ValueError(
            "--streaming: the stream has no length, so the number of training steps cannot be derived from epochs. "
            "Pass --max_steps N (e.g. epochs x images / global batch size)."
        )
    dataset = load_streaming_dataset(source, image_column, split)
    fingerprint = dataset._hf_distill_fingerprint
    if max_samples is not None:
        dataset = dataset.take(max_samples)
        dataset._hf_distill_fingerprint = f"{fingerprint}:take{max_samples}"
    return StreamingImageDataset(
        dataset, training_args.seed, shuffle_buffer_size, training_args.process_index, training_args.world_size
    )


__all__ = [
    "STREAM_POSITION",
    "PositionCollator",
    "StreamStateCallback",
    "StreamingImageDataset",
    "StreamingLoader",
    "load_streaming_dataset",
    "load_streaming_train_dataset",
    "streaming_train_dataloader",
]
