"""GPU paths of the index builder: same code as CPU, bf16 autocast for BERT, fp32 exact search."""

from __future__ import annotations

from chunk_store.layout import DBLayout
from chunk_store.neighbour_shards import load_neighbours
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_exact_search_cuda_equals_cpu():
    from index_builder.index.exact_search import ExactSearchConfig, exact_search

    rng = np.random.default_rng(0)
    shards = [rng.standard_normal((n, 48)).astype(np.float16) for n in (5000, 3000)]
    q = rng.standard_normal((700, 48)).astype(np.float32)
    cfg_cpu = ExactSearchConfig(device="cpu", tile_rows=1024, query_block=256)
    cfg_gpu = ExactSearchConfig(device="cuda", tile_rows=1024, query_block=256)
    i_c, d_c = exact_search(q, shards, 12, cfg_cpu)
    i_g, d_g = exact_search(q, shards, 12, cfg_gpu)
    np.testing.assert_allclose(d_g, d_c, rtol=1e-4, atol=1e-3)
    assert (i_g == i_c).mean() > 0.99


def test_embedder_cuda_bf16_matches_cpu_fp32(tmp_path_factory):
    from index_builder.embed.embedder import Embedder, EmbedderConfig
    from tests.fixtures import minilm_or_random

    model = minilm_or_random(tmp_path_factory)  # random weights of MiniLM's shape on a bare GPU machine
    texts = ["def f(x):\n    return x + 1", "The quick brown fox.", "", "import os, sys"] * 40
    cpu = Embedder(EmbedderConfig(name_or_path=model, device="cpu", dtype="fp32")).embed(texts)
    gpu_e = Embedder(EmbedderConfig(name_or_path=model, device="cuda"))
    assert gpu_e.dtype == "bf16" and gpu_e.device.type == "cuda"
    gpu = gpu_e.embed(texts)
    nz = np.linalg.norm(cpu, axis=1) > 0
    cos = (cpu[nz] * gpu[nz]).sum(1) / np.linalg.norm(cpu[nz], axis=1) / np.linalg.norm(gpu[nz], axis=1)
    assert (cos > 0.99).all() and not gpu[~nz].any()


def test_pipeline_on_cuda_uses_exact_knn_without_faiss_gpu(tmp_path, tmp_path_factory):
    from chunk_store.manifest import load_manifest
    from index_builder import Retriever
    from index_builder.index.stage import faiss_gpu_available
    from index_builder.knn.search_choice import index_has_ivf
    from tests.fixtures import build_index_db, run_cli, shared_tiny_bert

    bert = shared_tiny_bert(tmp_path_factory)
    db = build_index_db(tmp_path / "db", bert, n_docs=20, stages=("embed", "index"))
    assert run_cli(["embed", "--db", db, "--embedder", bert, "--device", "cuda"]) == 0  # no-op: done
    assert run_cli(["knn", "--db", db, "--device", "cuda"]) == 0
    m = load_manifest(db)
    # a tiny DB: an exact pass is within the bound (faiss-gpu takes only an IVF index)
    assert m["stages"]["knn"]["params"]["method"] == (
        "index" if faiss_gpu_available() and index_has_ivf(m) else "exact")
    docs = np.load(DBLayout(db).shard(0).doc_ids("train"))
    nb = load_neighbours(db, "train")[0]
    ok = nb >= 0
    assert not (docs[np.where(ok, nb, 0)] == docs[:, None])[ok].any()
    r = Retriever.open(db, device="cuda")
    assert len(r.search_text(["def f(x): return x"], k=2)[0]) == 2


def test_torch_ivf_search_cuda_equals_cpu():
    """The same lists and nprobe on CUDA (fp32, then the default fp16 GEMM re-scored in fp32)
    give the CPU's neighbours, exclusions applied inside."""
    from index_builder.index.torch_ivf_search import TorchIVFConfig, TorchIVFSearch
    from tests.fixtures.ivf_search import data, ivf_flat

    shards, xf, q = data(5, n=20000, d=48, nq=700)
    index = ivf_flat(xf, 32)
    index.nprobe = 6
    rng = np.random.default_rng(1)
    a = rng.integers(0, len(xf), len(q))
    exclude = np.stack([a, a + 300], axis=1)
    valid = rng.random(len(xf)) > 0.05
    i_c, d_c = TorchIVFSearch(index, shards, TorchIVFConfig(device="cpu")).search(q, 12, exclude, valid)
    for dtype, agree in (("fp32", 0.99), (None, 0.97)):  # None: fp16 on CUDA
        cfg = TorchIVFConfig(device="cuda", dtype=dtype, block_rows=7000, batch_elems=1 << 20)
        i_g, d_g = TorchIVFSearch(index, shards, cfg).search(q, 12, exclude, valid)
        assert (i_g == i_c).mean() > agree, dtype
        same = i_g == i_c
        np.testing.assert_allclose(d_g[same], d_c[same], rtol=1e-4, atol=1e-3)


def test_knn_stage_torch_ivf_search_on_cuda(tmp_path, tmp_path_factory):
    from tests.fixtures.ivf_search import run_knn_torch_ivf

    run_knn_torch_ivf(tmp_path, tmp_path_factory, "cuda")
