"""The report of benchmarks/db_scaling.py: val bits per byte against database size for RETRO,
RETRO-fit and the trained baseline (seed mean with min and max), the gain per seed, the overlap
buckets per size, tokens per second and each stage's wall time; a table (Markdown) and a PNG.

    python benchmarks/db_scaling_report.py WORK [--docs]   # --docs: also docs/BENCHMARKS.md + PNG

Only what is measured is reported: a size or a seed whose runs are not finished is shown as such.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from pathlib import Path
from datetime import datetime, timezone
from statistics import mean
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from db_scaling import KINDS, MIN_MATCH_DIR  # noqa: E402

KIND_NAMES = {"retro": "RETRO", "retrofit": "RETRO-fit"}
ALPHAS = (0.125, 0.25, 0.5, 0.75, 1.0)


def load(work: Path) -> dict[str, Any]:
    """Plan, database records and evaluation results of a WORK folder, keyed by (kind, multiple, seed)."""
    plan = json.loads((work / "plan.json").read_text())
    res = work / "results"
    dbs = {m: json.loads((res / f"db-x{m}.json").read_text()) for m in plan["multiples"]
           if (res / f"db-x{m}.json").exists()}
    near = json.loads((res / "neighbour-distances.json").read_text()) if (res / "neighbour-distances.json").exists() else {}
    for m, db in dbs.items():
        if str(m) in near:
            db["neighbours"] = near[str(m)]
    evals: dict[tuple[str, int, int], dict[str, Any]] = {}
    for path in res.glob("*-x*-seed*.json"):
        m = re.fullmatch(r"(\w+)-x(\d+)-seed(\d+)\.json", path.name)
        if m and m.group(1) in KINDS:
            evals[(m.group(1), int(m.group(2)), int(m.group(3)))] = json.loads(path.read_text())
    longer: dict[tuple[int, int], dict[str, Any]] = {}  # (seed, steps) -> evaluation (--longer)
    for path in (res / "longer").glob("retro-x*-seed*-steps*.json"):
        m = re.fullmatch(r"retro-x(\d+)-seed(\d+)-steps(\d+)\.json", path.name)
        if m and int(m.group(1)) == max(plan["multiples"]):
            longer[(int(m.group(2)), int(m.group(3)))] = json.loads(path.read_text())
    variants: dict[tuple[str, str], dict[str, Any]] = {}  # (kind, name) -> sets, seed -> evaluation (--variant)
    for spec in (res / "variants").glob("*.json"):
        if re.search(r"-x\d+-seed\d+\.json$", spec.name):
            continue
        s = json.loads(spec.read_text())
        evs = {}
        for path in (res / "variants").glob(f"{s['kind']}-{s['name']}-x{max(plan['multiples'])}-seed*.json"):
            m = re.fullmatch(rf"{re.escape(s['kind'])}-{re.escape(s['name'])}-x\d+-seed(\d+)\.json", path.name)
            if m:
                evs[int(m.group(1))] = json.loads(path.read_text())
        variants[(s["kind"], s["name"])] = {"sets": s["sets"], "evals": evs}
    min_match: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}  # (run, share) -> seed -> evaluation
    for path in (res / MIN_MATCH_DIR).glob("*-mm*.json"):
        m = re.fullmatch(r"(.+)-x(\d+)-seed(\d+)-mm([\d.]+)\.json", path.name)
        if m and int(m.group(2)) == max(plan["multiples"]):
            min_match.setdefault((m.group(1), float(m.group(4))), {})[int(m.group(3))] = json.loads(path.read_text())
    return {"plan": plan, "dbs": dbs, "evals": evals, "longer": longer, "variants": variants, "min_match": min_match}


def same_path_shares(work: Path, multiples: Sequence[int]) -> dict[int, float]:
    """Per size: the share of the pool's bytes (training + val files) whose relative path is also
    a retrieval-only file of the database at that size. With --retrieval-corpus another release
    of the corpus, such a file is the same source file in another version: the pool's
    near-duplicates, which is what retrieval can copy from. From the slice folders db_scaling
    links (WORK/corpus/retrieval-xM), so sizes measured in an earlier session count too."""
    pool = work / "corpus" / "pool"
    sizes = {p.relative_to(pool).as_posix(): p.stat().st_size for p in pool.rglob("*") if p.is_file()}
    total, seen, out = max(1, sum(sizes.values())), set(), {}
    for m in sorted(multiples):
        part = work / "corpus" / f"retrieval-x{m}"
        seen |= {p.relative_to(part).as_posix() for p in part.rglob("*") if p.is_file()} if part.is_dir() else set()
        out[m] = sum(b for rel, b in sizes.items() if rel in seen) / total
    return out


def training_length(data: dict[str, Any], work: Path) -> list[str]:
    """The --longer table: at the largest database, the sweep's runs beside the longer ones of the
    same seeds (baseline, RETRO, and what RETRO's own neighbours add over none and the control)."""
    longer = data.get("longer") or {}
    if not longer:
        return []
    import yaml

    largest = max(data["plan"]["multiples"])
    seeds = sorted({s for s, _ in longer})
    cfg = work / "runs" / f"retro-x{largest}-seed{seeds[0]}" / "config.yaml"
    conf = yaml.safe_load(cfg.read_text()) if cfg.exists() else {}
    plan_steps = int(conf["max_steps"]) if conf else None
    per_step = int(conf["batch_size"]) * int(conf["seq_len"]) if conf else 0  # tokens a step trains on
    by_steps: dict[int | None, list[dict[str, Any]]] = {}
    for seed in seeds:
        if ("retro", largest, seed) in data["evals"]:
            by_steps.setdefault(plan_steps, []).append(data["evals"][("retro", largest, seed)])
    for (seed, steps), ev in sorted(longer.items(), key=lambda kv: kv[0][1]):
        by_steps.setdefault(steps, []).append(ev)
    out = ["", f"Training length, at the largest database (x{largest}; seeds {', '.join(map(str, seeds))}; "
           "`--longer`): bits per byte", "",
           "| steps | tokens trained on | baseline | RETRO | gain | RETRO vs no retrieval | RETRO vs control |",
           "|---:|---:|---|---|---|---|---|"]
    for steps, evs in by_steps.items():
        seen = (steps or 0) * per_step
        out.append(f"| {steps if steps is not None else '?'} | {f'{seen:,}' if seen else '-'} | "
                   f"{spread([e['bits_per_byte_baseline'] for e in evs])} | {spread([e['bits_per_byte'] for e in evs])} | "
                   f"{spread([e['bits_per_byte_baseline'] - e['bits_per_byte'] for e in evs])} | "
                   f"{spread([e['bits_per_byte_no_retrieval'] - e['bits_per_byte'] for e in evs])} | "
                   f"{spread([e['bits_per_byte_other_neighbours'] - e['bits_per_byte'] for e in evs])} |")
    return out


def low_overlap_gains(evals: Sequence[dict[str, Any]]) -> list[float]:
    """Each evaluation's gain over its baseline on the val chunks at overlap <= 12.5% (ALPHAS[0])."""
    return [o["bits_per_byte_baseline"] - o["bits_per_byte_retrieval"] for e in evals
            for o in e.get("overlap") or [] if o["alpha"] == ALPHAS[0]]


def variant_table(data: dict[str, Any]) -> list[str]:
    """The --variant runs at the largest database, each kind's plan run first, seed mean [min, max]."""
    variants = data.get("variants") or {}
    if not variants:
        return []
    largest = max(data["plan"]["multiples"])
    out = ["", f"Variants at the largest database (x{largest}; `--variant`, outside the plan), beside the plan's "
           "run of the same kind and seeds: bits per byte, and gains in bpb (positive = better)", "",
           "| run | settings on top of the plan's | seeds | bpb | gain over the baseline | gain at overlap <= 12.5% "
           "| vs no retrieval | vs control |", "|---|---|---:|---|---|---|---|---|"]
    for kind, name in sorted({(k, "") for k, _ in variants} | set(variants), key=lambda kn: (kn[0], kn[1] != "", kn[1])):
        if name:
            label, sets, evs = f"{KIND_NAMES[kind]} {name}", ", ".join(f"`{s}`" for s in variants[(kind, name)]["sets"]), \
                list(variants[(kind, name)]["evals"].values())
        else:
            label, sets = f"{KIND_NAMES[kind]} (the plan's)", "-"
            evs = [e for (k, m, _), e in sorted(data["evals"].items()) if k == kind and m == largest]
        low = low_overlap_gains(evs)
        out.append(f"| {label} | {sets} | {len(evs)} | {spread([e['bits_per_byte'] for e in evs])} | "
                   f"{spread([e['bits_per_byte_baseline'] - e['bits_per_byte'] for e in evs])} | {spread(low)} | "
                   f"{spread([e['bits_per_byte_no_retrieval'] - e['bits_per_byte'] for e in evs])} | "
                   f"{spread([e['bits_per_byte_other_neighbours'] - e['bits_per_byte'] for e in evs if e.get('bits_per_byte_other_neighbours') is not None])} |")
    return out


def trained_share(sets: Sequence[str]) -> float:
    """The model.neighbour_min_match a run trained with: the last --set of it, else the default 0."""
    values = [x.split("=", 1)[1] for x in sets if x.startswith("model.neighbour_min_match=")]
    return float(values[-1]) if values else 0.0


def min_match_table(data: dict[str, Any]) -> list[str]:
    """--eval-min-match: each run at the largest database as trained, then scored with each
    stricter neighbour_min_match (the same weights), seed mean [min, max] of the gains in bpb."""
    found = data.get("min_match") or {}
    if not found:
        return []
    largest, plan_sets = max(data["plan"]["multiples"]), data["plan"].get("sets") or []
    out = ["", f"A stricter neighbour filter at evaluation only (x{largest}; `--eval-min-match`, outside the plan): "
           "each run as trained, then its same weights scored with another `model.neighbour_min_match` "
           "(retro.evaluate --neighbour-min-match); gains in bpb, positive = better", "",
           "| run | neighbour_min_match | seeds | gain over the baseline | gain at overlap <= 12.5% | "
           "val tokens at overlap <= 12.5% | there, vs its weights without retrieval |",
           "|---|---:|---:|---|---|---:|---|"]
    for run in sorted({r for r, _ in found}, key=lambda r: (r.split("-")[0], r)):
        kind, _, name = run.partition("-")
        if name:
            variant = (data.get("variants") or {}).get((kind, name), {})
            trained, sets = list(variant.get("evals", {}).values()), variant.get("sets", [])
        else:
            trained, sets = [e for (k, m, _), e in sorted(data["evals"].items()) if k == kind and m == largest], []
        label = KIND_NAMES.get(kind, kind) + (f" {name}" if name else "")
        rows = [(f"{trained_share([*plan_sets, *sets]):g} (trained)", trained)]
        rows += [(f"{share:g}", [e for _, e in sorted(found[(r, share)].items())])
                 for r, share in sorted(found) if r == run]
        for share, evs in rows:
            low = [o for e in evs for o in e.get("overlap") or [] if o["alpha"] == ALPHAS[0]]
            tokens = f"{round(mean(o['tokens'] for o in low)):,}" if low else "-"
            out.append(f"| {label} | {share} | {len(evs)} | "
                       f"{spread([e['bits_per_byte_baseline'] - e['bits_per_byte'] for e in evs])} | "
                       f"{spread(low_overlap_gains(evs))} | {tokens} | "
                       f"{spread([o['bits_per_byte_no_retrieval'] - o['bits_per_byte_retrieval'] for o in low])} |")
    return out


def disjoint_buckets(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """An evaluation's cumulative overlap buckets (overlap <= alpha) as disjoint ones (previous
    alpha < overlap <= alpha): tokens, bytes and each variant's bits per byte in that range."""
    out, prev = [], None
    for b in sorted(ev.get("overlap") or [], key=lambda o: o["alpha"]):
        cur = {"low": prev["alpha"] if prev else 0.0, "alpha": b["alpha"],
               "tokens": b["tokens"] - (prev["tokens"] if prev else 0), "bytes": b["bytes"] - (prev["bytes"] if prev else 0)}
        for v in ("retrieval", "no_retrieval", "baseline"):
            key = f"bits_per_byte_{v}"
            bits = b[key] * b["bytes"] - (prev[key] * prev["bytes"] if prev else 0.0)
            cur[key] = bits / cur["bytes"] if cur["bytes"] else float("nan")
        out.append(cur)
        prev = b
    return out


def copying(data: dict[str, Any]) -> list[str]:
    """Does RETRO read its neighbours? At the largest database, by disjoint overlap bucket: where a
    neighbour holds most of the chunk (overlap > 75%: 48+ of 64 tokens in one run), a model that
    copies scores far below the same weights without retrieval."""
    largest = max(data["plan"]["multiples"])
    groups: dict[str, list[dict[str, Any]]] = {}
    sweep = [e for (k, m, _), e in sorted(data["evals"].items()) if k == "retro" and m == largest and e.get("overlap")]
    if sweep:
        groups["sweep"] = sweep
    for (_, steps), ev in sorted((data.get("longer") or {}).items(), key=lambda kv: kv[0][1]):
        if ev.get("overlap"):
            groups.setdefault(f"{steps} steps", []).append(ev)
    if not groups:
        return []
    out = ["", f"RETRO by overlap with its neighbours (disjoint buckets), at the largest database (x{largest}), "
           "seed mean: bits per byte", "",
           "| runs | overlap | val tokens | RETRO | no retrieval | baseline | RETRO vs no retrieval |",
           "|---|---|---:|---|---|---|---|"]
    for name, evs in groups.items():
        per = [disjoint_buckets(e) for e in evs]
        for i, b in enumerate(per[0]):
            cells = [[p[i][f"bits_per_byte_{v}"] for p in per] for v in ("retrieval", "no_retrieval", "baseline")]
            out.append(f"| {name} | {b['low']:.1%} < o <= {b['alpha']:.1%} | {b['tokens']:,} | "
                       f"{mean(cells[0]):.3f} | {mean(cells[1]):.3f} | {mean(cells[2]):.3f} | "
                       f"{spread([n - r for n, r in zip(cells[1], cells[0])])} |")
    return out


def spread(values: Sequence[float]) -> str:
    """'mean [min, max]' over seeds, or '-' where nothing was measured."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{mean(values):.4f} [{min(values):.4f}, {max(values):.4f}]"


def tokens_per_s(run: Path) -> float | None:
    """The mean training throughput a run logged (metrics.jsonl)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    rates = [r["tokens_per_s"] for r in map(json.loads, path.read_text().splitlines()) if r.get("tokens_per_s")]
    return mean(rates) if rates else None


def summary(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per database size: tokens, each kind's bpb over seeds, the baseline's, the gains."""
    plan, evals = data["plan"], data["evals"]
    rows = []
    for m in plan["multiples"]:
        db = data["dbs"].get(m)
        row: dict[str, Any] = {"multiple": m, "db_tokens": db["train_tokens"] if db else None,
                               "measured_multiple": db["train_tokens"] / db["training_tokens"] if db else None}
        for kind in KINDS:
            got = [evals[(kind, m, s)] for s in plan["seeds"] if (kind, m, s) in evals]
            row[kind] = [e["bits_per_byte"] for e in got]
            row[f"{kind}_gain"] = [e["bits_per_byte_baseline"] - e["bits_per_byte"] for e in got]
            row[f"{kind}_seeds"] = len(got)
            # what the retrieved text itself buys: the same weights without it, and with other
            # sequences' neighbours (the control); a gain over the baseline without these is the
            # CCA layers' capacity, not retrieval
            row[f"{kind}_vs_none"] = [e["bits_per_byte_no_retrieval"] - e["bits_per_byte"] for e in got]
            row[f"{kind}_vs_control"] = [e["bits_per_byte_other_neighbours"] - e["bits_per_byte"] for e in got
                                         if e.get("bits_per_byte_other_neighbours") is not None]
            row[f"{kind}_overlap"] = {a: [next(o for o in e["overlap"] if o["alpha"] == a) for e in got
                                          if e.get("overlap")] for a in ALPHAS}
            if kind == "retro":
                row["baseline"] = [e["bits_per_byte_baseline"] for e in got]
        rows.append(row)
    return rows


def share_checks(gains: Sequence[float], baselines: Sequence[float], spread_base: float | None) -> str:
    """The goal's two checks of the gain at one size: >= 3% of the baseline's bpb with every seed,
    and the mean gain >= 3x the spread of the baseline's seeds."""
    rel = [g / b for g, b in zip(gains, baselines)]
    ok3 = all(x >= 0.03 for x in rel)
    ratio = (mean(gains) / spread_base) if spread_base else None
    return (f"gain {min(rel):+.2%} to {max(rel):+.2%} of the baseline's bpb over seeds "
            f"({'met' if ok3 else 'not met'}: >= 3% with every seed); mean gain / baseline seed spread "
            + (f"{ratio:.1f}x" if ratio is not None else "-") + f" ({'met' if ratio and ratio >= 3 else 'not met'}: >= 3x)")


def low_check(low: Sequence[float]) -> str:
    """The goal's check at overlap <= 12.5%: above zero with every seed."""
    return f"gain {spread(low)} ({'met' if min(low) > 0 else 'not met'}: above zero with every seed)"


def goal(rows: list[dict[str, Any]], variants: dict[tuple[str, str], dict[str, Any]] | None = None,
         largest: int | None = None) -> list[str]:
    """Issue 21's goal, checked on what is measured: at the largest size with every seed, RETRO and
    RETRO-fit at least 3% bpb better than the baseline, the mean gain at least 3x the baseline
    seeds' spread, the gain rising with each size, and above zero at overlap <= 12.5%. The
    ``variants`` (--variant, run at the plan's ``largest`` size) are checked once that size is."""
    done = [r for r in rows if r["retro_gain"]]
    if not done:
        return ["Goal: nothing measured yet."]
    last = done[-1]
    spread_base = max(last["baseline"]) - min(last["baseline"]) if len(last["baseline"]) > 1 else None
    out = [f"Goal, checked at the largest database measured so far ({last['db_tokens']:,} tokens, "
           f"{last['retro_seeds']} seeds):"]
    for kind, name in KIND_NAMES.items():
        if not last[f"{kind}_gain"]:
            out.append(f"- {name}: not measured at this size")
            continue
        means = [round(mean(r[f"{kind}_gain"]), 4) for r in done if r[f"{kind}_gain"]]  # as shown
        rising = all(b > a for a, b in zip(means, means[1:]))
        out.append(f"- {name}: {share_checks(last[f'{kind}_gain'], last['baseline'], spread_base)}; "
                   f"mean gain by size {', '.join(f'{m:+.4f}' for m in means)} "
                   + ("(one size so far)" if len(means) < 2 else f"({'rising' if rising else 'not rising'} with each size)"))
    for kind, name in KIND_NAMES.items():
        low = [o["bits_per_byte_baseline"] - o["bits_per_byte_retrieval"]
               for o in last.get(f"{kind}_overlap", {}).get(ALPHAS[0], [])]
        if low:
            out.append(f"- {name} at overlap <= 12.5%: {low_check(low)}")
    if largest is not None and last.get("multiple") == largest:
        for (kind, name), v in sorted((variants or {}).items()):
            evs = list(v["evals"].values())
            if not evs:
                continue
            low = low_overlap_gains(evs)
            out.append(f"- {KIND_NAMES[kind]} {name} (variant, {len(evs)} seeds): "
                       f"{share_checks([e['bits_per_byte_baseline'] - e['bits_per_byte'] for e in evs], [e['bits_per_byte_baseline'] for e in evs], spread_base)}"
                       + (f"; at overlap <= 12.5%: {low_check(low)}" if low else ""))
    return out


def utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def markdown(data: dict[str, Any], work: Path, tag: str | None = None) -> str:
    plan, rows = data["plan"], summary(data)
    out = [f"Plan: {len(plan['seeds'])} seeds {plan['seeds']}, config {plan['config']} "
           f"{' '.join('--set ' + s for s in plan['sets'])}, corpus `{Path(plan['corpus']).name}` ({plan['glob']}), "
           f"{plan['pool_mb']} MB of training + validation documents (val fraction {plan['val_fraction']}).", "",
           "| DB tokens | x training | baseline bpb | RETRO bpb | RETRO gain | RETRO-fit bpb | RETRO-fit gain | seeds |",
           "|---:|---:|---|---|---|---|---|---|"]
    for r in rows:
        tokens = f"{r['db_tokens']:,}" if r["db_tokens"] else "(not built)"
        mult = f"{r['measured_multiple']:.1f}" if r["measured_multiple"] else f"({r['multiple']})"
        out.append(f"| {tokens} | {mult} | {spread(r['baseline'])} | {spread(r['retro'])} | {spread(r['retro_gain'])} | "
                   f"{spread(r['retrofit'])} | {spread(r['retrofit_gain'])} | {r['retro_seeds']} / {r['retrofit_seeds']} |")
    out += ["", "Gain: baseline bpb minus the model's, per seed (the same seed's baseline); positive = better.", "",
            "Overlap buckets (paper section 4.4): the gain over the baseline on the val chunks whose overlap "
            "with their neighbours (those the model attends to) is <= alpha, seed mean [min, max].", "",
            "| DB tokens | model | " + " | ".join(f"alpha {a:.1%}" for a in ALPHAS) + " |",
            "|---:|---|" + "---|" * len(ALPHAS)]
    for r in rows:
        for kind, name in (("retro", "RETRO"), ("retrofit", "RETRO-fit")):
            cells = [spread([o["bits_per_byte_baseline"] - o["bits_per_byte_retrieval"] for o in r[f"{kind}_overlap"][a]])
                     for a in ALPHAS]
            out.append((f"| {r['db_tokens']:,} | " if r["db_tokens"] else "| (not built) | ") + f"{name} | "
                       + " | ".join(cells) + " |")
    out += ["", "What the retrieved text itself buys (seed mean [min, max], bpb): RETRO's own neighbours against "
            "the same weights without retrieval and against other sequences' neighbours (the control); how "
            "close the val chunks' nearest database chunks are (exact search: mean squared L2 of rank 1 "
            "and 2 in the embedder's space, lower is closer; the share of rank-1 neighbours from "
            "retrieval-only data); the share of val tokens in chunks that overlap their "
            "neighbours by more than 12.5%; the share of the pool's bytes (training + val files) whose "
            "file has a same-path file in the retrieval-only data (with another release of the corpus as "
            "retrieval corpus: its near-duplicates).", "",
            "| DB tokens | RETRO vs no retrieval | RETRO vs control | RETRO-fit vs no retrieval | "
            "RETRO-fit vs control | neighbour distance r1 / r2 | from retrieval-only | val tokens overlap > 12.5% "
            "| pool bytes with a same-path file |",
            "|---:|---|---|---|---|---|---|---|---|"]
    twins = same_path_shares(work, plan["multiples"])
    for r in rows:
        db = data["dbs"].get(r["multiple"])
        if not db:
            continue
        nq = db.get("neighbours")
        dist = " / ".join(f"{d:.3f}" for d in nq["mean_distance_by_rank"]) if nq else "-"
        share = f"{nq['share_from_retrieval_only']:.1%}" if nq else "-"
        over = [1 - o["tokens"] / full["tokens"] for o, full in zip(r["retro_overlap"][ALPHAS[0]], r["retro_overlap"][1.0])]
        out.append(f"| {db['train_tokens']:,} | {spread(r['retro_vs_none'])} | {spread(r['retro_vs_control'])} | "
                   f"{spread(r['retrofit_vs_none'])} | {spread(r['retrofit_vs_control'])} | {dist} | {share} | "
                   f"{(f'{mean(over):.1%}') if over else '-'} | {twins[r['multiple']]:.1%} |")
    out += ["", "| DB tokens | knn recall | wall time per stage (s) | RETRO tokens/s |", "|---:|---|---|---|"]
    for r in rows:
        db = data["dbs"].get(r["multiple"])
        if not db:
            continue
        recall = (db.get("knn", {}).get("recall") or {}).get(f"recall@{db.get('knn', {}).get('k', 2)}")
        stages = stage_seconds(db)
        rates = [t for s in data["plan"]["seeds"]
                 if (t := tokens_per_s(work / "runs" / f"retro-x{r['multiple']}-seed{s}")) is not None]
        out.append(f"| {db['train_tokens']:,} | {recall if recall is not None else '-'} | {stages} | "
                   f"{mean(rates):,.0f} |" if rates else f"| {db['train_tokens']:,} | {recall} | {stages} | - |")
    out += training_length(data, work)
    out += variant_table(data)
    out += min_match_table(data)
    out += copying(data)
    out += ["", *goal(rows, data.get("variants"), max(plan["multiples"]))]
    stamps = [f.stat().st_mtime for f in (work / "results").glob("*.json")]
    if stamps:
        out += ["", f"Measured from {utc((work / 'plan.json').stat().st_mtime)} to {utc(max(stamps))}, "
                "resumed across sessions (wall times above are per step, as the driver timed them). Commands:", "",
                "```bash", "bash benchmarks/fetch_corpora.sh CORPORA", command(plan),
                *sorted({f"{command(plan)} --longer {steps} --longer-seeds {len({s for s, t in data['longer'] if t == steps})}"
                         for _, steps in data.get("longer", {})}),
                *[f"{command(plan)} " + " ".join(f"--variant {shlex.quote(f'{kind}:{name}:{s}')}" for s in v["sets"])
                  for (kind, name), v in sorted((data.get("variants") or {}).items())],
                *min_match_commands(data, command(plan)),
                "python benchmarks/db_scaling_report.py WORK --docs" + (f" --tag {tag}" if tag else ""), "```"]
    return "\n".join(out) + "\n"


def min_match_commands(data: dict[str, Any], sweep: str) -> list[str]:
    """The --eval-min-match command that gives the table's rows (with the variants it scored)."""
    found = data.get("min_match") or {}
    if not found:
        return []
    shares = ",".join(f"{x:g}" for x in sorted({x for _, x in found}))
    named = sorted({tuple(r.partition("-")[::2]) for r, _ in found if "-" in r})
    flags = " ".join(f"--variant {shlex.quote(f'{kind}:{name}:{s}')}" for kind, name in named
                     for s in (data.get("variants") or {}).get((kind, name), {}).get("sets", []))
    return [f"{sweep} --eval-min-match {shares}" + (f" {flags}" if flags else "")]


def stage_seconds(db: dict[str, Any]) -> str:
    """Each step's seconds at one size. Records with ``step_invocations`` sum every invocation
    (db_scaling.StepClock); older ones hold the last invocation of each step only (a step resumed
    after a kill shows what was left), marked so; the oldest only the size's total."""
    steps = db.get("step_seconds")
    if steps is None:
        return f"{db['wall_seconds']:.0f} in all"
    runs = db.get("step_invocations")
    text = ", ".join(f"{s} {v:.0f}" + (f" ({runs[s]} runs)" if runs and runs.get(s, 1) > 1 else "")
                     for s, v in steps.items())
    return text if runs is not None else text + " (last run of each step only)"


def command(plan: dict[str, Any]) -> str:
    """The db_scaling.py command that gives this plan (the corpus folder named by its last part)."""
    args = [f"--corpus CORPORA/{Path(plan['corpus']).name}", f"--glob '{plan['glob']}'", f"--pool-mb {plan['pool_mb']:g}",
            f"--val-fraction {plan['val_fraction']:g}", f"--multiples {','.join(map(str, plan['multiples']))}",
            f"--seeds {','.join(map(str, plan['seeds']))}", f"--config {plan['config']}",
            *(f"--set {x}" for x in plan["sets"]), f"--vocab-size {plan['vocab_size']}",
            f"--chunk-size {plan['chunk_size']}", f"--seq-len {plan['seq_len']}",
            *(f"--{k}-args '{' '.join(plan[f'{k}_args'])}'" for k in ("embed", "index", "knn", "eval") if plan[f"{k}_args"]),
            *([] if plan.get("retrofit", True) else ["--no-retrofit"]),
            *([f"--retrieval-corpus CORPORA/{Path(plan['retrieval_corpus']).name}"] if plan.get("retrieval_corpus") else []),
            *([f"--retrieval-order {plan['retrieval_order']}"] if plan.get("retrieval_order") else [])]
    return "python benchmarks/db_scaling.py --work WORK " + " ".join(args)


def plot(data: dict[str, Any], path: Path) -> bool:
    """Val bpb against database tokens (log x), seed mean with min-max bars; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in summary(data) if r["db_tokens"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label in (("baseline", "baseline (no retrieval)"), ("retro", "RETRO"), ("retrofit", "RETRO-fit")):
        pts = [(r["db_tokens"], r[key]) for r in rows if r[key]]
        if not pts:
            continue
        x = [p[0] for p in pts]
        y = [mean(p[1]) for p in pts]
        err = [[mean(v) - min(v) for _, v in pts], [max(v) - mean(v) for _, v in pts]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("retrieval database tokens")
    ax.set_ylabel("val bits per byte (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("--docs", action="store_true", help="also write docs/BENCHMARKS.md's section and docs/db_scaling.png")
    p.add_argument("--tag", help="name the docs section and PNG after this too (a sweep with --set overrides)")
    a = p.parse_args(argv)
    data = load(a.work)
    text = markdown(data, a.work, a.tag)
    (a.work / "report.md").write_text(text)
    drawn = plot(data, a.work / "db_scaling.png")
    print(text)
    if a.docs:
        from report import DOCS, machine, write_section

        section, png_name, title = docs_names(data["plan"], a.tag)
        if drawn:
            shutil.copyfile(a.work / "db_scaling.png", DOCS.parent / png_name)
        write_section(section, f"## {title}\n\nMachine: {machine()}\n\n{text}"
                      + (f"\n![val bpb against database tokens]({png_name})\n" if drawn else ""), DOCS)
    return 0


def docs_names(plan: dict[str, Any], tag: str | None = None) -> tuple[str, str, str]:
    """(BENCHMARKS.md section, PNG name, heading) of a plan's report: a sweep whose retrieval-only
    data comes from another corpus, or one given a ``tag`` (``--tag``: e.g. a sweep with ``--set``
    overrides), gets its own, named after them, so reporting it never overwrites another sweep's."""
    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")

    other = plan.get("retrieval_corpus")
    parts = ([slug(Path(other).name) or "other"] if other else []) + ([slug(tag)] if tag else [])
    if not parts:
        return "db-scaling", "db_scaling.png", "Retrieval against database size"
    name = "-".join(parts)
    title = "Retrieval against database size" + (f", retrieval-only data from {parts[0]}" if other else "")
    if tag and plan.get("sets"):
        title += f", with {', '.join(plan['sets'])}"
    return f"db-scaling-{name}", f"db_scaling_{name.replace('.', '_').replace('-', '_')}.png", title

if __name__ == "__main__":
    sys.exit(main())
