"""Inputs as large corpora ship: compressed JSONL and text, Parquet, documents of any size.

Reference tests: a streamed document equals the whole file decoded at once (chunk_store.chunk.text_files
.decode_bytes) for any block size; pieces do not depend on how the text arrives; every format
round-trips through a build; hostile archives are counted skips that lose nothing else.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from chunk_store import ChunkStore
from chunk_store.chunk.input_formats import RecordReport, TextStream, input_format, iter_jsonl
from chunk_store.manifest import load_manifest
from chunk_store.chunk.text_files import decode_bytes
from chunk_store.tokenization.sentencepiece import iter_pieces
from tests.fixtures import full_manifest, random_text
from index_builder.cli import main as cli
from tests.fixtures import chunk_argv

PIECES = [b"a", b"b c", b"\r", b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xff", "é".encode(), "😀".encode(),
          b" ", b"\t", b"\x00", b"\xe2\x82"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.integers(1, 9), st.floats(0.0, 0.5))
def test_a_streamed_text_equals_the_whole_file_decoded(tmp_path_factory, parts: list[bytes], block: int,
                                                       frac: float) -> None:
    data = b"".join(parts)
    path = tmp_path_factory.mktemp("s") / "x.txt"
    path.write_bytes(data)
    stream = TextStream(str(path), frac, block=block)
    text = "".join(stream)
    ref = decode_bytes(data, frac)
    assert stream.reason == ref.reason
    if ref.text is not None:
        assert text == ref.text
        assert stream.invalid_bytes == ref.invalid_bytes
        assert stream.sha256 is not None and stream.size == len(data)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="ab \n", max_size=300), st.integers(4, 40), st.lists(st.integers(1, 50), max_size=20))
def test_pieces_do_not_depend_on_how_the_text_arrives(text: str, piece: int, cuts: list[int]) -> None:
    blocks, at = [], 0
    for c in cuts:
        blocks.append(text[at:at + c])
        at += c
    blocks.append(text[at:])
    whole = list(iter_pieces([text], piece))
    assert list(iter_pieces(blocks, piece)) == whole
    assert "".join(whole) == text
    assert all(len(p) <= piece for p in whole)


def test_formats_are_named_by_their_suffixes() -> None:
    kinds = {name: (f.kind, f.compression) for name in
             ("a.txt", "a.txt.gz", "a.rst.zst", "a.jsonl", "a.jsonl.gz", "a.json.gz", "a.JSONL.ZST",
              "a.parquet", "a.json") for f in [input_format(name)]}
    assert kinds == {"a.txt": ("text", None), "a.txt.gz": ("text", "gz"), "a.rst.zst": ("text", "zst"),
                     "a.jsonl": ("jsonl", None), "a.jsonl.gz": ("jsonl", "gz"), "a.json.gz": ("jsonl", "gz"),
                     "a.JSONL.ZST": ("jsonl", "zst"), "a.parquet": ("parquet", None), "a.json": ("text", None)}


def tok_argv(src: Path, db: Path, tokenizer: Path, *extra: str) -> list[str]:
    """chunk_argv with a given sentencepiece model instead of a trained one."""
    return ["chunk", "--input", str(src), "--out", str(db), "--tokenizer", str(tokenizer), "--chunk-size", "16",
            "--seq-len", "64", "--val-fraction", "0.25", *extra]


def _docs(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [random_text(rng, rng.randint(1, 25)) + ("\r\nend\r" if i % 5 == 0 else "") for i in range(n)]


def _jsonl(texts: list[str], field: str = "text") -> bytes:
    return b"".join(json.dumps({field: t, "id": i}).encode() + b"\n" for i, t in enumerate(texts))


def _normal(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _texts(db: Path) -> dict[tuple[str, int | None], str]:
    """(file name, line or row) -> document text, over both splits."""
    out = {}
    for split in ("train", "val"):
        store = ChunkStore.open(db, split)
        for d in range(store.num_docs):
            src = store.doc_source(d)
            out[(os.path.basename(src["source"]), src.get("line", src.get("row")))] = store.doc_text(d)
    return out


def _write_formats(folder: Path, texts: list[str]) -> None:
    folder.mkdir(parents=True)
    (folder / "one.txt.gz").write_bytes(gzip.compress(texts[0].encode()))
    (folder / "two.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(texts[1].encode()))
    (folder / "plain.txt").write_text(texts[2], newline="")
    (folder / "a.jsonl").write_bytes(_jsonl(texts[3:13], "body"))
    (folder / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(texts[13:23], "body")))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl(texts[23:33], "body")))
    (folder / "d.json.gz").write_bytes(gzip.compress(_jsonl(texts[33:43], "body")))
    table = pa.table({"body": texts[43:83], "n": list(range(40))})
    pq.write_table(table, folder / "e.parquet", row_group_size=7)


def test_every_input_format_round_trips(tmp_path: Path) -> None:
    texts = _docs(83)
    _write_formats(tmp_path / "in", texts)
    db = tmp_path / "db"
    assert cli(chunk_argv(tmp_path / "in", db, "--text-field", "body", "--workers", "2")) == 0
    m = full_manifest(db)
    assert m["skipped"] == [] and m["stages"]["chunk"]["params"]["text_field"] == "body"
    expected = {("one.txt.gz", None): texts[0], ("two.txt.zst", None): texts[1], ("plain.txt", None): texts[2]}
    for name, lo in (("a.jsonl", 3), ("b.jsonl.gz", 13), ("c.jsonl.zst", 23), ("d.json.gz", 33)):
        expected.update({(name, i + 1): texts[lo + i] for i in range(10)})
    expected.update({("e.parquet", i + 1): texts[43 + i] for i in range(40)})
    assert _texts(db) == {k: _normal(v) for k, v in expected.items()}
    assert all(len(i["sha256"]) == 64 for i in m["inputs"]) and len(m["inputs"]) == 8

    # tiny work units: the big JSONL and Parquet files are cut (byte ranges, row groups): same bytes
    small = tmp_path / "db_small_units"
    assert cli(tok_argv(tmp_path / "in", small, db / "tokenizer.model", "--text-field", "body",
                        "--unit-mb", "0.0005")) == 0
    ref = tmp_path / "db_ref"
    assert cli(tok_argv(tmp_path / "in", ref, db / "tokenizer.model", "--text-field", "body")) == 0
    for split in ("train", "val"):
        for name in ("chunks.npy", "doc_ids.npy", "documents.jsonl"):
            rel = f"shards/000000/{split}/{name}"
            assert (small / rel).read_bytes() == (ref / rel).read_bytes(), rel


def test_hostile_archives_are_counted_skips_and_lose_nothing_else(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    texts = _docs(30, seed=2)
    (src / "ok.txt").write_text(texts[0])
    good = gzip.compress(_jsonl(texts[1:21]))
    (src / "truncated.jsonl.gz").write_bytes(good[: len(good) * 2 // 3])
    (src / "garbage.txt.gz").write_bytes(b"\x1f\x8b" + os.urandom(300))
    (src / "garbage.jsonl.zst").write_bytes(os.urandom(200))
    (src / "nul.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(b"text\x00more"))
    (src / "not.parquet").write_bytes(b"PAR1 but no footer" * 10)
    pq.write_table(pa.table({"other": ["x", "y"]}), src / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), src / "ints.parquet")
    pq.write_table(pa.table({"text": ["fine row", None, "  "]}), src / "nulls.parquet")
    (src / "mixed.jsonl").write_bytes(b'{"text": 5}\n{"text": ["a"]}\n[1, 2]\n' + b"[" * 100_000 + b"\n"
                                      + json.dumps({"text": texts[21]}).encode() + b"\n")
    db = tmp_path / "db"
    assert cli(chunk_argv(src, db, "--workers", "2")) == 0
    m = full_manifest(db)
    by_file = Counter((os.path.basename(s["path"]), s["reason"]) for s in m["skipped"])
    assert by_file == Counter({("truncated.jsonl.gz", "corrupt_archive"): 1, ("garbage.txt.gz", "corrupt_archive"): 1,
                               ("garbage.jsonl.zst", "corrupt_archive"): 1, ("nul.txt.zst", "binary"): 1,
                               ("not.parquet", "corrupt_archive"): 1, ("nocol.parquet", "missing_text_field"): 1,
                               ("ints.parquet", "non_string_text"): 1, ("nulls.parquet", "non_string_text"): 1,
                               ("nulls.parquet", "empty"): 1, ("mixed.jsonl", "non_string_text"): 2,
                               ("mixed.jsonl", "jsonl_bad_line"): 2})
    got = _texts(db)
    assert got[("ok.txt", None)] == _normal(texts[0])
    assert got[("nulls.parquet", 1)] == "fine row"
    assert got[("mixed.jsonl", 5)] == _normal(texts[21])
    kept = [k for k in got if k[0] == "truncated.jsonl.gz"]  # the records before the cut stand
    assert kept and all(got[k] == _normal(texts[k[1]]) for k in kept)
    assert all(i["sha256"] for i in m["inputs"])  # a corrupt file is still recorded by its bytes
    assert cli(chunk_argv(src, db)) == 0  # and the re-run is a no-op


def test_jsonl_byte_ranges_read_whole_lines_only(tmp_path: Path) -> None:
    data = _jsonl(["one", "two", "three"])
    (tmp_path / "x.jsonl").write_bytes(data)
    cut = data.index(b"\n") + 1
    a, b = RecordReport(), RecordReport()
    first = [r.text for r in iter_jsonl(str(tmp_path / "x.jsonl"), a, start=0, end=cut)]
    rest = [(r.text, r.line) for r in iter_jsonl(str(tmp_path / "x.jsonl"), b, start=cut, first_line=2)]
    assert first == ["one"] and rest == [("two", 2), ("three", 3)]
    assert a.size == cut and a.sha256 is None


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec (the test process's own peak)
PEAK_SCRIPT = """
import sys
from index_builder.cli import main
rc = main(sys.argv[1:])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(int(hwm.split()[1]) // 1024, flush=True)
sys.exit(rc)
"""


def _peak_mb(argv: list[str]) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *argv], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


def test_one_huge_document_streams_in_bounded_memory(tmp_path: Path) -> None:
    """One-line documents of 3 MB and 24 MB: the peak RSS does not grow with the document."""
    rng = random.Random(0)
    words = [random_text(rng, 1).replace("\n", " ")[:12] for _ in range(500)]
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "sample.txt").write_text(" ".join(words * 20))
    assert cli(chunk_argv(tok_dir, tmp_path / "tokdb", "--workers", "1")) == 0
    peaks = []
    for mb in (3, 24):
        src = tmp_path / f"in{mb}"
        src.mkdir()
        line = " ".join(rng.choice(words) for _ in range(mb << 17))
        (src / "one_line.txt").write_text(line[: mb << 20])
        db = tmp_path / f"db{mb}"
        peaks.append(_peak_mb(tok_argv(src, db, tmp_path / "tokdb" / "tokenizer.model", "--workers", "1")))
        store = ChunkStore.open(db, "train" if load_manifest(db)["counts"]["train"]["docs"] else "val")
        assert store.num_docs == 1 and store.doc_text(0) == line[: mb << 20]
        del line
    assert peaks[1] - peaks[0] < 40, f"peak RSS {peaks} MB for 3 MB and 24 MB one-line documents"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 7), st.integers(0, 5))
def test_doc_id_blocks_match_a_repeat_in_blocks_of_bounded_size(counts: list[int], rows: int, first: int) -> None:
    from unittest import mock

    import numpy as np

    from chunk_store.chunk import part_files

    with mock.patch.object(part_files, "READ_ROWS", rows):
        blocks = list(part_files.doc_id_blocks(np.array(counts, dtype=np.int64), first))
    assert all(len(b) <= 4 * rows for b in blocks)
    expected = np.repeat(np.arange(first, first + len(counts)), counts)
    assert np.array_equal(np.concatenate(blocks), expected)
