"""Which faiss index to build for N train chunks: a pure rule whose training cost is known.

Why not autofaiss's choice at every size: past a few million vectors it picks keys such as
``OPQ256_512,IVF16384_HNSW32,PQ256x8`` and trains them on the first vectors of the folder with
a sample that grows with N, on what is in practice one core: on a 2-core machine the 4M-chunk
index took too long to finish (docs/BENCHMARKS.md). The rule here bounds every training cost:

- up to ``hnsw_max`` vectors (and while HNSW32 fits ``--max-index-memory``) autofaiss keeps its
  choice (HNSW32 on this range): no training, insertion O(N log N) (docs/BENCHMARKS.md);
- past that, ``IVF{nlist}_HNSW32`` with nlist ~ 2 sqrt(N) up to 2^30 vectors (2^16 lists) and
  ~ 4 sqrt(N) beyond (a power of two, within [nlist_min, nlist_max = 2^20]): :func:`ivf_nlist`
  says why. The coarse k-means sees ``per_centroid`` sampled vectors per centroid (a random
  sample of the whole DB, not its first rows), at most ``KMEANS_SAMPLE_MAX`` in all (fewer a
  centroid as nlist grows past 2^18), so it costs O(nlist * sample * dim * iterations) whatever
  N is; past 2^16 lists it is faiss's two-level k-means (sqrt(nlist) groups, then each group's
  share of the lists within it: index_builder.index.ivf_build.train_coarse) unless a GPU runs
  the flat one; assignment is an HNSW search;
- the codes: 4-bit PQ, ``dim / 8`` sub-quantizers (``dim / 16`` bytes a vector) after an OPQ
  rotation, wherever they fit the budget (``fast_scan``): knn and the Retriever search them with
  faiss's SIMD fast scan (index_builder.index.fast_scan) and re-rank 16x the candidates by true
  distance; on real text (1.46M MiniLM chunks) that met recall@2 0.95 at the same nprobe as SQ8
  at 4-5x SQ8's queries/s, in a tenth of the memory (docs/BENCHMARKS.md, "Index keys on real
  text"). Otherwise (``fast_scan=False``, or a budget under dim / 16 bytes) SQ8 (dim bytes a
  vector, recall close to exact, trained by a min/max pass) when it fits, else PQ with the most
  8-bit sub-quantizers that fit;
- OPQ only where it pays: before a PQ whose sub-quantizers span >= ``opq_min_dsub`` dimensions
  (coarse codes, where balancing the variance across sub-spaces helps), never widening the
  vectors (OPQ{m}_{dim}, not autofaiss's OPQ256_512), trained on a bounded sample.

Issue 9 (sharded databases) calls :func:`choose_index` per shard: it depends on numbers only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from chunk_store.framework.errors import UserError

ID_BYTES = 8  # an IVF list stores an int64 id beside each code
HNSW_M = 32
OPQ_TRAIN_MAX = 65536  # vectors the OPQ rotation trains on (faiss's PQ trains on 256 per centroid)
NLIST_MAX = 1 << 20
WIDE_LISTS_FROM = 1 << 30  # vectors past which lists are ~4 sqrt(N) rather than ~2 sqrt(N)
KMEANS_SAMPLE_MAX = 1 << 24  # the coarse k-means' sample, whatever nlist and N (25 GB fp32 at 384 d)
TWO_LEVEL_FROM = 1 << 16  # lists from which a CPU k-means is faiss's two-level one
FAISS_MIN_PER_LIST = 39  # faiss warns below 39 training vectors a centroid


@dataclass(frozen=True)
class IndexPlan:
    """What the index stage builds: ``builder`` "autofaiss" (``key`` None: its choice) or "ivf"."""

    builder: str
    key: str | None
    nlist: int = 0
    train_size: int = 0  # vectors sampled for the coarse k-means (and the codec)
    codec: str = ""
    opq: bool = False
    kmeans: str = ""  # "flat" or "two-level" (the CPU's k-means past TWO_LEVEL_FROM lists)
    bytes_per_vector: float = 0.0
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def hnsw_bytes(n: int, dim: int, m: int = HNSW_M) -> float:
    """HNSW{m},Flat: fp32 vectors plus ~2m int32 links a vector at level 0 (+ upper levels)."""
    return n * (4 * dim + 2 * m * 4 * 1.07)


def ivf_nlist(n: int, nlist_min: int = 1024, nlist_max: int = NLIST_MAX) -> int:
    """The number of lists for ``n`` vectors, a power of two.

    Up to 2^30 vectors ~2 sqrt(N) (2^16 lists at most): the flat k-means costs nlist x sample,
    the sample grows with nlist, so nlist^2, and faiss's 4-16 sqrt(N) would quadruple it for a
    search that scans fewer vectors a list, which the recall tuner's nprobe makes up at this size.
    Beyond, ~4 sqrt(N) (faiss's lower end: 2^18 lists at 5e9): the sample is capped
    (KMEANS_SAMPLE_MAX), so more lists cost the k-means linearly, while a query's scan (nprobe x
    N / nlist codes) would otherwise grow with sqrt(N): at 5e9 vectors and 2 sqrt(N), 35k codes a
    list, 2.2M for nprobe 64."""
    target = (2 if n <= WIDE_LISTS_FROM else 4) * math.sqrt(max(n, 1))
    return int(min(nlist_max, max(nlist_min, 2 ** round(math.log2(target)))))


def kmeans_sample(n: int, nlist: int, per_centroid: int, memory_cap: int) -> int:
    """Vectors the coarse k-means trains on: ``per_centroid`` a list, within a quarter of
    --current-memory (``memory_cap`` vectors) unless that leaves fewer than faiss's 39 a list,
    and never more than KMEANS_SAMPLE_MAX (past 2^18 lists: fewer than 64 a list, 16 at 2^20)."""
    return int(min(n, nlist * per_centroid, max(memory_cap, nlist * FAISS_MIN_PER_LIST), KMEANS_SAMPLE_MAX))


def pq_m(dim: int, budget_bytes: float) -> int:
    """The most PQ sub-quantizers (8 bits each) whose codes fit ``budget_bytes`` a vector; they
    must divide dim. At least the smallest divisor >= 4 (a coarser code is not worth an index)."""
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= 256]
    fit = [m for m in divisors if m <= budget_bytes]
    return max(fit) if fit else min(m for m in divisors if m >= min(4, dim))


def fast_scan_m(dim: int) -> int:
    """Sub-quantizers of the 4-bit fast-scan codes: ``dim / 8`` (8 dimensions each, as measured
    on real text), 0 where ``dim`` is not a multiple of 16 (fast scan packs two 4-bit codes a byte)."""
    return dim // 8 if dim % 16 == 0 and dim >= 16 else 0


def choose_index(n: int, dim: int, max_index_memory: float, current_memory: float,
                 hnsw_max: int = 1_000_000, per_centroid: int = 64, opq_min_dsub: int = 8,
                 nlist_min: int = 1024, nlist_max: int = NLIST_MAX, fast_scan: bool = True) -> IndexPlan:
    """The plan for ``n`` vectors of ``dim`` within the two memory budgets (bytes).

    ``current_memory`` bounds the training sample (fp32, with room for the k-means' work) as well.
    ``fast_scan``: past the HNSW range, 4-bit OPQ + PQ codes searched by fast scan where they fit
    (False: the SQ8 / 8-bit PQ rule alone).
    """
    if n <= hnsw_max and hnsw_bytes(n, dim) <= max_index_memory:
        return IndexPlan("autofaiss", None, bytes_per_vector=4 * dim + 2 * HNSW_M * 4,
                         reason=f"{n} <= hnsw_max {hnsw_max} and HNSW32 fits: autofaiss's choice")
    nlist = min(ivf_nlist(n, nlist_min, nlist_max), max(1, n // FAISS_MIN_PER_LIST))
    sample_cap = int(current_memory * 0.25 // (4 * dim))  # a quarter of the budget for the sample
    train_size = kmeans_sample(n, nlist, per_centroid, sample_cap)
    kmeans = "two-level" if nlist >= TWO_LEVEL_FROM else "flat"
    why_lists = (f"nlist {nlist} ~ {2 if n <= WIDE_LISTS_FROM else 4} sqrt(N) "
                 f"({'<=' if n <= WIDE_LISTS_FROM else '>'} 2^30 vectors), {kmeans} k-means on "
                 f"{train_size} sampled vectors ({train_size / nlist:.0f} a list"
                 + (f", capped at {KMEANS_SAMPLE_MAX}" if train_size == KMEANS_SAMPLE_MAX else "") + "); ")
    coarse_bytes = nlist * (4 * dim + 2 * HNSW_M * 4)
    per_vector = (max_index_memory - coarse_bytes) / n - ID_BYTES
    quantizer = f"IVF{nlist}_HNSW{HNSW_M}"
    m4 = fast_scan_m(dim) if fast_scan else 0
    if m4 and per_vector >= m4 / 2:
        opq4 = dim // m4 >= opq_min_dsub  # 8 dims a sub-quantizer: OPQ at the default (measured: needed)
        key = (f"OPQ{m4}_{dim}," if opq4 else "") + f"{quantizer},PQ{m4}x4np"
        return IndexPlan("ivf", key, nlist, train_size, f"PQ{m4}x4", opq4, kmeans, m4 / 2 + ID_BYTES,
                         reason=why_lists + f"{n} > hnsw_max or HNSW over budget; 4-bit PQ{m4}"
                                + (" after OPQ" if opq4 else "") + f" ({m4 // 2} B a vector of "
                                f"{per_vector:.0f} available), searched by fast scan and re-ranked: on "
                                "real text 4-5x SQ8's queries/s at the same recall")
    if per_vector >= dim:
        return IndexPlan("ivf", f"{quantizer},SQ8", nlist, train_size, "SQ8", False, kmeans, dim + ID_BYTES,
                         reason=why_lists + f"{n} > hnsw_max or HNSW over budget; SQ8 fits "
                                f"({per_vector:.0f} B a vector available)")
    m = pq_m(dim, per_vector)
    opq = dim // m >= opq_min_dsub
    key = (f"OPQ{m}_{dim}," if opq else "") + f"{quantizer},PQ{m}x8np"
    return IndexPlan("ivf", key, nlist, train_size, f"PQ{m}x8", opq, kmeans, m + ID_BYTES,
                     reason=why_lists + f"{per_vector:.0f} B a vector available: PQ{m}"
                            + (f", OPQ as {dim // m} dims a sub-quantizer" if opq else ""))


def parse_memory(text: str | int | float) -> float:
    """'2G', '512M', '1.5T' or a number of bytes -> bytes."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip().upper().removesuffix("B")
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    try:
        if s and s[-1] in units:
            return float(s[:-1]) * units[s[-1]]
        return float(s)
    except ValueError:
        raise UserError(f"not a memory size: {text!r} (e.g. 2G, 512M)") from None
