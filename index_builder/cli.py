"""retro-build-index: one command, one subcommand a stage (chunk, add, embed, index, knn), plus all,
info and search.

The stages and their order come from the registry (chunk_store.framework.registry): a stage
registered there is a subcommand here, with no change to this file. Each stage module exposes ``add_arguments(parser)`` (its own options; ``--db``/``--out`` are
added here) and ``run(args) -> dict`` (a summary). Options that several stages read
(``--device``, ``--shard-size``, ``--threads``) are declared once per parser, from each module's
``SHARED_OPTIONS``. A ``UserError`` becomes a one-line message on stderr and exit status 2, Ctrl-C
exits 130 with everything already written kept (chunk_store.framework.errors.run_main); every stage resumes
on a re-run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Callable, Sequence

from chunk_store.framework import registry
from chunk_store.framework.errors import UserError, run_main
from chunk_store.manifest import load_manifest


def _stages() -> dict[str, Any]:
    """The registered stages' modules, in order (each imports torch, faiss or transformers only
    when it runs)."""
    return {e.name: importlib.import_module(e.module) for e in registry.stages()}


def info(args: argparse.Namespace) -> dict:
    """The manifest and each stage's status, as JSON on stdout."""
    manifest = load_manifest(args.db)
    status = {
        e.name: ("done" if manifest["stages"].get(e.name, {}).get("finished") else
                 "partial" if e.name in manifest["stages"] else "missing")
        for e in registry.stages() if e.in_all or e.name in manifest["stages"]
    }
    if args.brief:  # the figures a person reads, without the per-file lists
        manifest = {
            "counts": manifest.get("counts"),
            "shards": len(manifest.get("shards") or [None]),
            "chunk_size": manifest.get("chunk_size"),
            "seq_len": manifest.get("seq_len"),
            "stages": {s: rec.get("stats", {}) for s, rec in manifest["stages"].items()},
        }
    print(json.dumps({"db": str(args.db), "status": status, "manifest": manifest}, indent=2))
    return {}


def add_shared_options(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Options that several stages read, declared once per parser (``all`` holds every stage)."""
    from index_builder.embed.stage import DEFAULT_SHARD_SIZE

    g = parser.add_argument_group("shared by several stages")
    if "device" in names:
        g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where BERT (embed) and exact search (knn --exact, the index's recall) "
                            "run; auto = cuda if available")
    if "shard_size" in names:
        g.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                       help="chunks per shard of embeddings and of neighbours (the unit of resume "
                            "and of torchrun sharding)")
    if "threads" in names:
        g.add_argument("--threads", type=int, default=None,
                       help="faiss / torch CPU threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retro-build-index",
        description="Build a RETRO retrieval database: chunk -> embed -> index -> knn.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    stages = _stages()
    for name, module in stages.items():
        entry = registry.entry(name)
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument(*entry.db_flags, dest="db", required=True, help=entry.db_help)
        module.add_arguments(p)
        add_shared_options(p, module.SHARED_OPTIONS)
        p.set_defaults(func=module.run)

    build = {name: m for name, m in stages.items() if registry.entry(name).in_all}
    p = sub.add_parser("all", help="run every stage in order (" + " -> ".join(build) + "); on a built "
                                   "database with new inputs, add them and update the rest")
    p.add_argument("--out", "--db", dest="db", required=True, help="database directory")
    for module in build.values():
        module.add_arguments(p)
    add_shared_options(p, sorted({n for m in build.values() for n in m.SHARED_OPTIONS}))
    p.set_defaults(func=lambda a: run_all(a, stages))

    p = sub.add_parser("info", help="the manifest and stage status, as JSON")
    p.add_argument("--db", required=True)
    p.add_argument("--brief", action="store_true",
                   help="counts and each stage's figures only (no per-file lists)")
    p.set_defaults(func=info)

    p = sub.add_parser("search", help="nearest train chunks of query texts, as JSON (the Retriever)")
    p.add_argument("--db", required=True)
    p.add_argument("--k", type=int, default=2, help="neighbours per query")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (where BERT runs)")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="query texts")
    p.set_defaults(func=search)
    return parser


def search(args: argparse.Namespace) -> dict:
    """Print each query's neighbours (chunk id, doc id, distance, text, continuation) as JSON."""
    from index_builder.retriever import Retriever

    if args.k < 1:
        raise UserError(f"--k must be at least 1, got {args.k}")
    results = Retriever.open(args.db, device=args.device).search_text(args.texts, k=args.k)
    out = [{"query": q, "neighbours": [n.to_dict() for n in ns]} for q, ns in zip(args.texts, results)]
    print(json.dumps(out, indent=2, ensure_ascii=False))
    return {"queries": len(out)}


def run_all(args: argparse.Namespace, stages: dict[str, Any]) -> dict:
    """Every stage in order; a built database whose inputs gained files gets them added (the
    add stage) and the later stages update."""
    from chunk_store.chunk.stage import InputsChanged

    summary = {}
    for name, module in stages.items():
        if not registry.entry(name).in_all:
            continue
        print(f"== {name}", file=sys.stderr)
        try:
            summary[name] = module.run(args)
        except InputsChanged:
            if name != "chunk":
                raise
            print("== add (the database exists: adding what is new)", file=sys.stderr)
            summary["add"] = stages["add"].run(args)
    print(json.dumps({"summary": summary}, indent=2, default=str))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], object] = args.func
    return run_main(f"retro-build-index {args.command}", lambda: func(args),
                    interrupted="interrupted; re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
