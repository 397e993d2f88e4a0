"""Modules that moved to a better room keep their old import paths (INTERFACE.md): each old name
imports the very module at its new name, in a fresh interpreter too, and the two modules that
became packages of the same name (index_builder.embed, index_builder.knn) still hand out the
names they held."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import chunk_store
import index_builder

MOVED = {**chunk_store.MOVED, **index_builder.MOVED}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_the_old_path_is_the_new_module(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_old_paths_in_a_fresh_interpreter() -> None:
    code = ("import chunk_store.build as a, chunk_store.chunk.stage as b; assert a is b\n"
            "from chunk_store.stage import run_stage, Stage\n"
            "from chunk_store.errors import UserError, run_main\n"
            "from index_builder.faiss_index import load_index\n"
            "from index_builder.rerank import true_distances\n"
            "from index_builder.embed import EmbedStage, open_embeddings\n"
            "from index_builder.knn import KnnStage, select_neighbours\n"
            "import index_builder.knn.rerank, index_builder.rerank\n"
            "assert index_builder.knn.rerank is index_builder.rerank\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_packages_that_were_modules_refuse_unknown_names() -> None:
    import index_builder.knn

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        index_builder.knn.nope  # noqa: B018
