"""The pretraining DataModule: a corpus source to padded batches of segment pairs.

    source (text files | hub dataset | stdlib sample) --> token cache (sentence token ids,
    memory-mapped; built whole in `setup()` for local files, filled while streaming for hub
    datasets) --> SegmentPairStream (per worker: documents n % G == g, pairs, shuffle buffer)
    --> collate_pairs (dynamic padding) --> ResumableDataLoader
    --> {"input_ids", "token_type_ids", "attention_mask"}: [B, L] int64

`pretokenize=False` tokenizes in the workers on every pass and caches nothing.

Validation (`val_batches` > 0): a fixed list of batches of held-out text, built once in `setup()`
(validation.py), from `val_paths` or from the documents held out of the corpus (holdout.py:
every round(1/`val_fraction`)-th, never trained on); `val_dataloader()` gives each rank its share.

Arguments are validated in the constructor where possible and in `setup()` otherwise (tokenizer,
files, empty corpus, training text shorter than one batch per rank); problems raise `UserError`
naming the problem and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os

import lightning as L

from lmdistill.data import token_cache, validation
from lmdistill.data.dataset import SegmentPairStream, collate_pairs
from lmdistill.data.holdout import default_fraction, holdout_every
from lmdistill.data.loader import ResumableDataLoader
from lmdistill.data.sample import default_cache_dir, ensure_sample_corpus
from lmdistill.data.segments import PairTemplate, plain_backend
from lmdistill.data.sources import (
    DOCUMENT_FORMATS,
    SOURCES,
    StreamSpec,
    hub_spec,
    iter_documents,
    local_spec,
    resolve_paths,
)
from lmdistill.errors import UserError

MIN_SEQ_LENGTH = 8


def load_tokenizer(name_or_path: str):
    """A fast tokenizer via AutoTokenizer (never remote code), or a UserError."""
    from transformers import AutoTokenizer

    expanded = os.path.expanduser(name_or_path)
    # Hub names are "name" or "owner/name"; anything else that does not exist is a bad path.
    looks_local = expanded.startswith((os.sep, ".")) or expanded.count("/") > 1
    if looks_local and not os.path.exists(expanded):
        raise UserError(
            f"tokenizer path {name_or_path!r} does not exist; point data.tokenizer (or the "
            "teacher) at a directory with tokenizer files or a hub name"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(expanded, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load tokenizer {name_or_path!r} ({str(err).splitlines()[0]}); give a local "
            "tokenizer directory, or a hub name with the hub reachable"
        ) from None
    if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        raise UserError(
            f"tokenizer {name_or_path!r} is not a fast tokenizer; give one with a tokenizer.json"
        )
    if tokenizer.pad_token_id is None:
        raise UserError(f"tokenizer {name_or_path!r} has no pad token; give a tokenizer with one")
    return tokenizer


class PretrainingDataModule(L.LightningDataModule):
    """Segment pairs for task-agnostic distillation; see the module docstring."""

    def __init__(
        self,
        source: str,
        tokenizer: str,
        paths: list[str] | None = None,
        hf_path: str | None = None,
        hf_name: str | None = None,
        hf_split: str = "train",
        text_field: str = "text",
        document_format: str = "blank_line",
        batch_size: int = 32,
        max_seq_length: int = 128,
        short_seq_prob: float = 0.1,
        shuffle_buffer: int = 1000,
        num_workers: int = 1,
        seed: int = 0,
        cache_dir: str | None = None,
        pretokenize: bool = True,
        val_paths: list[str] | None = None,
        val_fraction: float | None = None,
        val_batches: int | None = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise UserError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")
        if document_format not in DOCUMENT_FORMATS:
            raise UserError(
                f"unknown document_format {document_format!r}; use one of "
                f"{', '.join(DOCUMENT_FORMATS)}"
            )
        if source == "text" and not paths:
            raise UserError("source=text needs data paths; set data.paths=[files, globs or dirs]")
        if source == "hub" and not hf_path:
            raise UserError(
                "source=hub needs a dataset name; set data.hf_path (e.g. wikimedia/wikipedia)"
            )
        if batch_size < 1:
            raise UserError(f"batch_size {batch_size} is below 1; set data.batch_size >= 1")
        if max_seq_length < MIN_SEQ_LENGTH:
            raise UserError(
                f"max_seq_length {max_seq_length} is below {MIN_SEQ_LENGTH}; set data.max_seq_length >= {MIN_SEQ_LENGTH}"
            )
        if not 0.0 <= short_seq_prob <= 1.0:
            raise UserError(f"short_seq_prob {short_seq_prob} is not in [0, 1]; set it in [0, 1]")
        if shuffle_buffer < 0 or num_workers < 0:
            raise UserError(
                "shuffle_buffer and num_workers must be >= 0; fix data.shuffle_buffer / data.num_workers"
            )
        val_batches = int(val_batches or 0)
        if val_batches < 0:
            raise UserError(
                f"data.val_batches={val_batches} is below 0; give a number of validation "
                "batches, or 0 for no validation"
            )
        val_paths = list(val_paths) if isinstance(val_paths, (list, tuple)) else val_paths
        if not val_batches and (val_paths or val_fraction is not None):
            raise UserError(
                "data.val_paths/data.val_fraction choose validation text but data.val_batches=0 "
                "switches validation off; set data.val_batches > 0, or leave both null"
            )
        if val_paths and val_fraction is not None:
            raise UserError(
                "data.val_paths and data.val_fraction both choose the validation text; give one "
                "(val_fraction=null with val_paths)"
            )
        self.val_batches = val_batches
        self.val_paths = ([val_paths] if isinstance(val_paths, str) else val_paths) or None
        self.val_fraction = val_fraction
        # K: training skips documents n % K == 0 (0: nothing held out: no split, or val_paths)
        self.holdout = 0
        if val_batches and not self.val_paths:
            fraction = default_fraction(source) if val_fraction is None else float(val_fraction)
            self.holdout = holdout_every(fraction)
        self.val_spec: StreamSpec | None = None
        self.val_cache: token_cache.TokenCache | None = None
        self._val_batches: list[dict] | None = None  # all ranks' batches, built for _val_world
        self._val_world = 1
        self._checked_worlds: set[int] = set()  # world sizes whose ranks all get a batch
        self.source = source
        self.tokenizer_name = tokenizer
        self.paths = (
            list(paths) if isinstance(paths, (list, tuple)) else ([paths] if paths else None)
        )
        self.hf_path, self.hf_name, self.hf_split = hf_path, hf_name, hf_split
        self.text_field = text_field
        self.document_format = "blank_line" if source == "sample" else document_format
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.short_seq_prob = short_seq_prob
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.pretokenize = pretokenize
        self.cache: token_cache.TokenCache | None = None
        self.spec: StreamSpec | None = None
        self.template: PairTemplate | None = None
        self.pad_token_id: int | None = None

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def setup(self, stage: str | None = None) -> None:
        if self.spec is not None:
            return
        tokenizer = load_tokenizer(self.tokenizer_name)
        model_max = tokenizer.model_max_length
        if model_max and model_max < 1_000_000 and self.max_seq_length > model_max:
            raise UserError(
                f"max_seq_length {self.max_seq_length} exceeds the tokenizer's model maximum "
                f"{model_max}; set data.max_seq_length <= {model_max}"
            )
        self.template = PairTemplate.from_tokenizer(tokenizer)
        self.pad_token_id = int(tokenizer.pad_token_id)
        if self.source == "text":
            spec = local_spec(resolve_paths(self.paths), self.document_format, self._facts_dir())
        elif self.source == "sample":
            spec = local_spec([ensure_sample_corpus(self.cache_dir)], "blank_line")
        else:
            spec = hub_spec(self.hf_path, self.hf_name, self.hf_split)
        self._check_not_empty(spec)
        if self.pretokenize:
            self.cache = self._token_cache(spec, tokenizer)
        if self.val_batches and self.val_paths:
            val_files = resolve_paths(self.val_paths, "data.val_paths")
            self.val_spec = local_spec(val_files, self.document_format, self._facts_dir())
            self._check_not_empty(self.val_spec, "data.val_paths")
            self.val_cache = (
                self._token_cache(self.val_spec, tokenizer) if self.pretokenize else None
            )
        elif self.val_batches:
            self.val_spec, self.val_cache = spec, self.cache
        self.spec = spec
        if self.val_batches:  # an empty held-out part fails here, before training
            self._build_validation(self._rank_world()[1])
        self._check_one_batch(self._rank_world()[1])

    def _check_one_batch(self, world_size: int) -> None:
        """A UserError unless every rank's training part gives at least one full batch (else an
        epoch would end without a step, and the next one too, forever; a DDP rank without
        pairs would leave the others waiting). Checked once per world size: `setup()` may run
        before the trainer knows its ranks, `train_dataset()` checks again once it does."""
        if world_size in self._checked_worlds:
            return
        for rank in range(world_size):  # reads the cache where it holds the documents
            stream = self._pair_stream(
                spec=self.spec, shuffle_buffer=0, seed=self.seed, rank=rank,
                world_size=world_size, cache=self.cache, holdout=self.holdout,
            )  # fmt: skip
            pairs = sum(1 for _ in itertools.islice(stream, self.batch_size))
            if pairs < self.batch_size:
                held, fix = "", "add text or lower data.batch_size"
                if self.holdout:
                    held = f" (1 document in {self.holdout} held out)"
                    fix += ", lower data.val_fraction or give data.val_paths"
                raise UserError(
                    f"the training text{held} gives {pairs} segment pair(s) on rank {rank} of "
                    f"{world_size}, fewer than one batch (data.batch_size={self.batch_size}); {fix}"
                )
        self._checked_worlds.add(world_size)

    def _tokens_root(self) -> str:
        """`<cache_dir>/tokens`: the token caches."""
        return os.path.join(os.path.expanduser(self.cache_dir or default_cache_dir()), "tokens")

    def _facts_dir(self) -> str:
        """Where the corpus files' hashes and UTF-8 checks are remembered (`file_facts`)."""
        return os.path.join(self._tokens_root(), "file-facts")

    def _token_cache(self, spec: StreamSpec, tokenizer) -> token_cache.TokenCache:
        """The keyed cache; local corpora are tokenized into it now (once, under a lock)."""
        backend = plain_backend(tokenizer)
        key = token_cache.cache_key(
            spec,
            self.document_format,
            self.text_field,
            backend.to_str(),
            token_cache.SHARD_DOCUMENTS,
            self._facts_dir(),
        )
        root = self._tokens_root()
        cache = token_cache.TokenCache(
            os.path.join(root, key),
            token_cache.SHARD_DOCUMENTS,
            max(backend.get_vocab_size(with_added_tokens=True), len(tokenizer)),
        )
        if spec.data_files is not None:  # local files: tokenized whole now
            try:
                with quiet_datasets():
                    token_cache.build_cache(
                        cache, spec, self.document_format, self.text_field, backend
                    )
            except OSError as err:
                raise UserError(
                    f"cannot write the token cache under {root} ({err.strerror}); set "
                    "data.cache_dir (or paths.cache_dir) to a writable directory, or "
                    "data.pretokenize=false"
                ) from None
            except Exception as err:  # noqa: BLE001 - a record the loader cannot read
                first_line = str(err).splitlines()[0] if str(err) else ""
                raise UserError(
                    f"cannot read corpus {', '.join(spec.data_files)} ({type(err).__name__}: "
                    f"{first_line}); fix or leave out the file with the bad record"
                ) from None
        return cache

    def _check_not_empty(self, spec: StreamSpec, setting: str = "data.paths") -> None:
        try:
            with quiet_datasets():
                documents = iter_documents(spec, self.document_format, self.text_field)
                first = next(documents, None)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 - any loader failure is reported the same way
            where = ", ".join(spec.data_files) if spec.data_files else spec.builder
            fix = "check the files, data.document_format and data.text_field"
            if not spec.data_files:
                fix = "check data.hf_path, data.hf_name, data.hf_split and data.text_field"
            if not spec.data_files and _unreachable_hub(err):
                fix = ("a hub corpus is read from the Hugging Face hub the first time: unset "
                       "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE or connect, or use data=text with "
                       "local files")  # fmt: skip
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise UserError(
                f"cannot read corpus {where} ({type(err).__name__}: {first_line}); {fix}"
            ) from None
        if first is None:
            where = ", ".join(spec.data_files) if spec.data_files else spec.builder
            raise UserError(
                f"corpus is empty: no text in {where}; give files with text ({setting}) "
                "or check data.text_field / data.document_format"
            )

    def train_dataset(self, epoch: int = 0) -> SegmentPairStream:
        self.setup()
        rank, world = self._rank_world()
        self._check_one_batch(world)
        return self._pair_stream(
            spec=self.spec, shuffle_buffer=self.shuffle_buffer, seed=self.seed, rank=rank,
            world_size=world, epoch=epoch, cache=self.cache, holdout=self.holdout,
        )  # fmt: skip

    def _pair_stream(self, **settings) -> SegmentPairStream:
        """Segment pairs of this corpus's tokenizer and format, with the part-specific `settings`."""
        return SegmentPairStream(
            tokenizer=os.path.expanduser(self.tokenizer_name),  # as load_tokenizer reads it
            template=self.template,
            document_format=self.document_format,
            text_field=self.text_field,
            max_seq_length=self.max_seq_length,
            short_seq_prob=self.short_seq_prob,
            **settings,
        )

    def corpus_record(self) -> dict:
        """What identifies the training text: its files (absolute; null for a hub corpus) and the
        token cache key, a hash of their contents, the tokenizer and the format (null without
        the cache)."""
        self.setup()
        files = list(self.spec.data_files) if self.spec.data_files is not None else None
        key = os.path.basename(self.cache.root) if self.cache is not None else None
        return {"files": files, "token_cache": key}

    @property
    def validates(self) -> bool:
        """Whether this data module gives validation batches (`val_batches` > 0)."""
        return self.val_batches > 0

    def validation_dataset(self) -> SegmentPairStream:
        """The held-out documents' pairs, in document order, from a fixed seed (validation.py)."""
        self.setup()
        return self._pair_stream(
            spec=self.val_spec,
            shuffle_buffer=0,
            seed=validation.VALIDATION_SEED,
            cache=self.val_cache,
            holdout=1 if self.val_paths else self.holdout,
            part="validation",
        )

    def _build_validation(self, world_size: int) -> list[dict]:
        if self._val_batches is None or self._val_world != world_size:
            count = validation.batches_for_ranks(self.val_batches, world_size)
            self._val_batches = validation.build_batches(
                self.validation_dataset(), self.batch_size, count, self.pad_token_id, world_size
            )
            self._val_world = world_size
        return self._val_batches

    def val_dataloader(self) -> validation.FixedBatches | list:
        """This rank's share of the fixed validation batches; [] (no validation) when off."""
        if not self.val_batches:
            return []
        self.setup()
        rank, world = self._rank_world()
        return validation.FixedBatches(self._build_validation(world), rank, world)

    def train_dataloader(self) -> ResumableDataLoader:
        return ResumableDataLoader(
            self.train_dataset(),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=functools.partial(collate_pairs, pad_id=self.pad_token_id),
            persistent_workers=False,
        )


@contextlib.contextmanager
def quiet_datasets():
    """Silence `datasets`' own log of a file it cannot read: the UserError made of the exception
    is the one line the user sees."""
    from datasets.utils import logging as ds_logging

    verbosity = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)


def _unreachable_hub(err: Exception) -> bool:
    """Whether loading a hub corpus failed for want of the hub (offline mode, no connection), not
    for a wrong config or split of a dataset that was found (locally or in the cache)."""
    return "Offline" in type(err).__name__ or isinstance(err, ConnectionError)
