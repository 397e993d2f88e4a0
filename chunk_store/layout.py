"""Every path of a retrieval database, named once (see docs/DB_FORMAT.md).

    DB/manifest.json               what was built, with which parameters (chunk_store.manifest)
    DB/tokenizer.model             the sentencepiece model the chunks were made with
    DB/hf_tokenizer/tokenizer.json (+ tokenizer_config.json, special_tokens_map.json) instead,
                                   when chunked with --tokenizer hf:NAME (chunk_store.tokenization.hugging_face)
    DB/<split>/chunks.npy          (num_chunks, chunk_size) token ids     split: train | val
    DB/<split>/doc_ids.npy         (num_chunks,) document of each chunk
    DB/<split>/seq_starts.npy      (num_seqs,) first chunk of each training sequence
    DB/<split>/documents.jsonl     one line per document: where it came from
    DB/<split>/embeddings/NNNNNN.npy       float16 embedding shards (embed)
    DB/<split>/knn_shards/ids_NNNNNN.npy   neighbour shards before assembly (knn's work folder)
                                   (merged_ids_NNNNNN.npy: old rows merged by knn --refresh)
    DB/<split>/neighbours/index.json, ids_NNNNNN.gG.npy, dist_NNNNNN.gG.npy   knn's neighbours,
                                   a pair of files a shard of rows (chunk_store.neighbour_shards);
                                   DB/<split>/neighbours.npy + neighbour_distances.npy in older DBs
    DB/index/knn.index, DB/index/index_infos.json   the faiss index and autofaiss's report
    DB/index/trained.index, part-NNNNN.{ivfdata,ivflists,json}   an IVF index as parts instead
                                   (index_infos.json lists the parts: index_builder.index.parts)
    DB/.chunk_work/plan.json, part_NNNNNNNN/         the chunk stage's work folder: one part a
                                   work unit (PartLayout: part.json, <split>.chunks.bin,
                                   <split>.doc_info.bin, <split>.documents.jsonl); scan_NNNNNNNN.json:
                                   a big file's hash and cuts, read for the plan by one rank
    DB/shards/NNNNNN/<split>/{chunks,doc_ids,seq_starts}.npy, documents.jsonl   one shard's arrays
    DB/shards/NNNNNN/shard.json, inputs.jsonl, skipped.jsonl, repaired.jsonl, digests.npy
                                   its record, per-file records and sorted document digests
                                   (a DB from before shards: one shard, its arrays in DB/<split>/)

Why one module: stages, readers and tests all agree on these names; a file name written as a
bare string anywhere else is a second source of truth that drifts. Temporary files are
``.NAME.tmp-PID`` beside their final name (:func:`temp_path`), renamed into place when whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.model"
HF_TOKENIZER_DIR = "hf_tokenizer"
HF_TOKENIZER_JSON = "tokenizer.json"  # hashed: the tokenizer's identity
HF_TOKENIZER_FILES = (HF_TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json")
CHUNKS = "chunks.npy"
DOC_IDS = "doc_ids.npy"
SEQ_STARTS = "seq_starts.npy"
DOCUMENTS = "documents.jsonl"
NEIGHBOURS = "neighbours.npy"
NEIGHBOUR_DISTANCES = "neighbour_distances.npy"
EMBEDDINGS_DIR = "embeddings"
KNN_SHARDS_DIR = "knn_shards"
INDEX_DIR = "index"
INDEX_FILE = "knn.index"
INDEX_INFOS = "index_infos.json"
INDEX_TRAINED = "trained.index"
INDEX_PART_PREFIX = "part-"
CHUNK_WORK_DIR = ".chunk_work"
CHUNK_PLAN = "plan.json"
CHUNK_PART_PREFIX = "part_"
PART_META = "part.json"  # written last: a part with it is whole
PART_CHUNKS = "chunks.bin"  # raw (n, chunk_size) token rows
PART_DOC_INFO = "doc_info.bin"  # raw DOC_INFO records: chunks, tokens, text digest of each document
PART_PENDING = "pending.bin"  # a streamed document's tokens before its split is known
SHARDS_DIR = "shards"
SHARD_META = "shard.json"
SHARD_INPUTS = "inputs.jsonl"
SHARD_SKIPPED = "skipped.jsonl"
SHARD_REPAIRED = "repaired.jsonl"
DIGESTS = "digests.npy"
TEMP_MARK = ".tmp-"


def temp_path(path: str | os.PathLike, pid: int | None = None) -> Path:
    """``.NAME.tmp-PID`` beside ``path``: a writer's private name until it renames the file in."""
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid() if pid is None else pid}")


def temp_owner(name: str) -> tuple[str, int] | None:
    """(final name, writer pid) of a temporary name made by :func:`temp_path`, else None."""
    if not name.startswith(".") or TEMP_MARK not in name:
        return None
    base, pid = name[1:].rsplit(TEMP_MARK, 1)
    return (base, int(pid)) if pid.isdigit() else None


@dataclass(frozen=True)
class DBLayout:
    """The paths of one database directory."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER

    @property
    def hf_tokenizer(self) -> Path:
        """The folder of a Hugging Face tokenizer's files (HF_TOKENIZER_FILES)."""
        return self.root / HF_TOKENIZER_DIR

    def split(self, split: str) -> Path:
        return self.root / split

    def chunks(self, split: str) -> Path:
        return self.root / split / CHUNKS

    def doc_ids(self, split: str) -> Path:
        return self.root / split / DOC_IDS

    def seq_starts(self, split: str) -> Path:
        return self.root / split / SEQ_STARTS

    def documents(self, split: str) -> Path:
        return self.root / split / DOCUMENTS

    def neighbours(self, split: str) -> Path:
        return self.root / split / NEIGHBOURS

    def neighbour_distances(self, split: str) -> Path:
        return self.root / split / NEIGHBOUR_DISTANCES

    def embeddings_dir(self, split: str) -> Path:
        return self.root / split / EMBEDDINGS_DIR

    def embedding_shard(self, split: str, index: int) -> Path:
        return self.embeddings_dir(split) / f"{index:06d}.npy"

    def knn_shards_dir(self, split: str) -> Path:
        return self.root / split / KNN_SHARDS_DIR

    def knn_shard(self, split: str, index: int) -> tuple[Path, Path]:
        """(neighbour ids, distances) of one shard of queries."""
        folder = self.knn_shards_dir(split)
        return folder / f"ids_{index:06d}.npy", folder / f"dist_{index:06d}.npy"

    def knn_merged_shard(self, split: str, index: int) -> tuple[Path, Path]:
        """(ids, distances) of one shard of old rows merged with the added chunks (knn --refresh)."""
        folder = self.knn_shards_dir(split)
        return folder / f"merged_ids_{index:06d}.npy", folder / f"merged_dist_{index:06d}.npy"

    @property
    def index_dir(self) -> Path:
        return self.root / INDEX_DIR

    @property
    def index(self) -> Path:
        return self.root / INDEX_DIR / INDEX_FILE

    @property
    def index_infos(self) -> Path:
        return self.root / INDEX_DIR / INDEX_INFOS

    def index_build_dir(self, pid: int | None = None) -> Path:
        """Where autofaiss writes before the files are renamed in (a temporary folder)."""
        return temp_path(self.index_dir / "build", pid)

    # ---- shards: a shard folder has a DB's split layout (chunks(split) etc.) plus these

    @property
    def shards_dir(self) -> Path:
        return self.root / SHARDS_DIR

    def shard(self, index: int) -> "DBLayout":
        return DBLayout(self.root / SHARDS_DIR / f"{index:06d}")

    @property
    def shard_meta(self) -> Path:
        return self.root / SHARD_META

    @property
    def inputs_log(self) -> Path:
        return self.root / SHARD_INPUTS

    @property
    def skipped_log(self) -> Path:
        return self.root / SHARD_SKIPPED

    @property
    def repaired_log(self) -> Path:
        return self.root / SHARD_REPAIRED

    @property
    def digests(self) -> Path:
        return self.root / DIGESTS

    @property
    def chunk_work(self) -> Path:
        return self.root / CHUNK_WORK_DIR

    @property
    def chunk_plan(self) -> Path:
        return self.root / CHUNK_WORK_DIR / CHUNK_PLAN

    def chunk_part(self, unit: int) -> Path:
        """The folder of one work unit's part (:class:`PartLayout`), renamed into place when whole."""
        return self.root / CHUNK_WORK_DIR / f"{CHUNK_PART_PREFIX}{unit:08d}"

    # ---- the index as parts (index_builder.index.parts): one trained, empty IVF and the parts'
    # on-disk inverted lists, each part a range of global train chunk ids

    @property
    def index_trained(self) -> Path:
        """The trained IVF without vectors (quantizer, codec, OPQ), shared by every part."""
        return self.root / INDEX_DIR / INDEX_TRAINED

    def index_part_data(self, part: int) -> Path:
        """A part's codes and ids (faiss OnDiskInvertedLists data), memory-mapped for search."""
        return self.root / INDEX_DIR / f"{INDEX_PART_PREFIX}{part:05d}.ivfdata"

    def index_part_lists(self, part: int) -> Path:
        """A part's list sizes and offsets into its data (faiss write_InvertedLists)."""
        return self.root / INDEX_DIR / f"{INDEX_PART_PREFIX}{part:05d}.ivflists"

    def index_part_record(self, part: int) -> Path:
        """A part's record (the chunk-id range it holds), written last: a part with it is whole."""
        return self.root / INDEX_DIR / f"{INDEX_PART_PREFIX}{part:05d}.json"

    # ---- knn's finished neighbours, one pair of files a shard of rows (chunk_store.neighbour_shards)

    def neighbours_dir(self, split: str) -> Path:
        """DB/<split>/neighbours/: the per-shard neighbour files and their index."""
        return self.root / split / "neighbours"

    def neighbour_index(self, split: str) -> Path:
        """DB/<split>/neighbours/index.json: shards -> row ranges, k, generation."""
        return self.neighbours_dir(split) / "index.json"

    def neighbour_shard(self, split: str, index: int, generation: int) -> tuple[Path, Path]:
        """(ids, distances) of one shard of rows as written by knn run ``generation`` (a rewritten
        shard gets new names: the index switches to it atomically)."""
        folder = self.neighbours_dir(split)
        return folder / f"ids_{index:06d}.g{generation}.npy", folder / f"dist_{index:06d}.g{generation}.npy"


@dataclass(frozen=True)
class PartLayout:
    """The files of one chunk-stage part folder (final or temporary)."""

    root: Path

    @property
    def meta(self) -> Path:
        return self.root / PART_META

    @property
    def pending(self) -> Path:
        return self.root / PART_PENDING

    def chunks(self, split: str) -> Path:
        return self.root / f"{split}.{PART_CHUNKS}"

    def doc_info(self, split: str) -> Path:
        return self.root / f"{split}.{PART_DOC_INFO}"

    def documents(self, split: str) -> Path:
        return self.root / f"{split}.{DOCUMENTS}"
