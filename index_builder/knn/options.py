"""The knn stage's options: its config dataclass and its CLI arguments (the defaults come from
the dataclass, so the CLI and the Python API cannot drift). index_builder.knn.stage re-exports both."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from index_builder.embed.stage import DEFAULT_SHARD_SIZE
from index_builder.knn.incremental import MODES
from index_builder.knn.reverse_refresh import DEPTH


@dataclass(frozen=True)
class KnnConfig:
    """The knn stage's options (the CLI's defaults come from here)."""

    k: int = 2
    extra: int = 10  # extra candidates searched to survive the self/same-document exclusion
    exact: bool | None = None  # exact torch search; None = the rule (index_builder.knn.search_choice)
    device: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    threads: int | None = None  # faiss / torch CPU threads; None = all cores
    exact_pass_rows: int | None = None  # --exact: queries sharing one pass; None = auto
    # after add: None = search the new chunks' rows only, keep the old; "auto" = old rows merge the
    # added chunks where sound, else every row re-searched; "incremental" (refused where unsound); "full"
    refresh: str | None = None
    target_recall: float = 0.95  # nprobe/efSearch: the cheapest whose final neighbours reach it (0: off)
    tune_sample: int = 1000  # train chunks the recall is measured on (against exact search)
    rerank: int | None = None  # candidates a neighbour, re-ranked by true distance; None = by the codes
    # after add, --refresh incremental: old rows an added chunk reaches in the reverse pass
    # (index_builder.knn.reverse_refresh; 0: every old row searches the added chunks instead)
    reverse_depth: int = DEPTH
    search: str | None = None  # hidden: force exact / index / faiss-gpu / torch-ivf (None: the rule)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """knn's own options (--device, --shard-size and --threads are shared: index_builder.cli)."""
    d = KnnConfig
    g = parser.add_argument_group("knn")
    g.add_argument("--k", type=int, default=d.k, help="neighbours per chunk")
    g.add_argument("--extra", type=int, default=d.extra,
                   help="extra candidates searched to survive the self/same-document exclusion")
    g.add_argument("--exact", action=argparse.BooleanOptionalAction, default=d.exact,
                   help="exact torch search instead of the index (default: on CUDA without faiss-gpu, "
                        "only while N*N*dim is small; else the torch IVF search over the index's lists)")
    g.add_argument("--search", default=d.search, choices=("exact", "index", "faiss-gpu", "torch-ivf"),
                   help=argparse.SUPPRESS)  # tests and benchmarks: force one search
    g.add_argument("--exact-pass-rows", type=int, default=d.exact_pass_rows,
                   help="--exact: queries sharing one pass over the embeddings "
                        "(default 262144 on CUDA, one shard on CPU)")
    g.add_argument("--refresh", nargs="?", const="auto", default=d.refresh, choices=MODES,
                   help="after `add`, let the chunks already searched see the new data (default without "
                        "it: search only the new chunks, keep the old rows as they were). auto (the bare "
                        "flag): incremental where the old rows were found under the same k, exclusion, "
                        "method, re-rank and recall target by the same trained index, else full; "
                        "incremental: old rows search only the added train chunks (exactly, or through an "
                        "IVF over them alone) and merge them "
                        "into their lists, exclusions kept (refused where unsound); full: every chunk "
                        "searched again against the grown index (after `index --rebuild`, another --k, ...)")
    g.add_argument("--reverse-depth", type=int, default=d.reverse_depth,
                   help="--refresh incremental on an IVF index with fewer added chunks than old rows: each "
                        "added chunk searches the old rows for this many, and enters the lists of those it "
                        "is nearer than their k-th neighbour (cost grows with the added data); 0: each old "
                        "row searches the added chunks instead (cost grows with the old rows)")
    g.add_argument("--target-recall", type=float, default=d.target_recall,
                   help="search parameters (nprobe/efSearch): the cheapest whose final neighbours, "
                        "exclusions applied, reach this recall@k against exact search (0: the index's own)")
    g.add_argument("--tune-sample", type=int, default=d.tune_sample,
                   help="train chunks the recall is measured on")
    g.add_argument("--rerank", type=int, default=d.rerank,
                   help="ask the index for this many times the candidates and keep the nearest by true "
                        "distance, read from the stored embeddings (default: 16 for 4-bit PQ codes, 4 where the index's codes "
                        "take under a byte a dimension, e.g. PQ; 1 = the codes' own order)")
