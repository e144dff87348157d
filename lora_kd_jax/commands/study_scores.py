"""What `reproduce` reports of each run beyond its metrics.json: its best checkpoint scored on CoLA's in-domain and
out-of-domain dev sets and on both together (GLUE's CoLA dev MCC), per seed of a seeded run with mean and spread."""
from __future__ import annotations

import json
from pathlib import Path

from lora_kd_jax.commands import evaluation
from lora_kd_jax.core.seed_stats import stats
from lora_kd_jax.runs import rundir
from lora_kd_jax.runs.seed_dirs import SEED_DIR_PREFIX, seed_dirs


SCORED_SETS = ("in_domain", "out_of_domain")


def seeded_scores(run_dir: Path, limit: int = 0) -> dict:
    """`checkpoint_scores` of each seed dir of a seeded run: {'per_seed': {seed: scores}, key: stats over seeds}."""
    per_seed = {int(d.name[len(SEED_DIR_PREFIX):]): checkpoint_scores(d, limit)
                for d in seed_dirs(run_dir)}
    keys = [k for k in next(iter(per_seed.values())) if k not in ("glue_rows", "limit")]
    first = next(iter(per_seed.values()))
    return {**{k: stats([s[k] for s in per_seed.values()]) for k in keys},
            "glue_rows": first["glue_rows"], "limit": limit, "per_seed": per_seed}


def checkpoint_scores(run_dir: Path, limit: int = 0) -> dict:
    """The best checkpoint on the in-domain and out-of-domain dev sets (each cut to its first `limit` rows, as the
    run's data.limit cut them) and on both together (GLUE's CoLA dev set: its MCC from the summed confusion counts),
    scored by `lora_kd_jax.commands.evaluation`. Kept in RUN_DIR/evaluation.json, which is reused while it is newer than the
    run's metrics.json and covers the same sets and limit."""
    cached = run_dir / evaluation.EVALUATION_FILE
    record = None
    if cached.is_file() and cached.stat().st_mtime >= (run_dir / rundir.METRICS_FILE).stat().st_mtime:
        try:
            record = json.loads(cached.read_text())
        except json.JSONDecodeError:
            record = None
        sets = record.get("sets", {}) if isinstance(record, dict) else {}
        if (record is None or record.get("which") != "best"
                or any(sets.get(name, {}).get("limit") != limit for name in SCORED_SETS)):
            record = None
    if record is None:
        clf, reports = evaluation.evaluate_run(run_dir, SCORED_SETS, which="best", limit=limit)
        record = evaluation.evaluation_record(clf, reports)
        evaluation.write_evaluation(run_dir, record)
    sets = record["sets"]
    out = {f"{name}_{m}": sets[name][m] for name in SCORED_SETS for m in ("accuracy", "mcc")}
    out["glue_mcc"] = evaluation.combined_mcc([sets[name]["confusion"] for name in SCORED_SETS])
    out["glue_rows"] = sum(sets[name]["rows"] for name in SCORED_SETS)
    out["limit"] = limit
    return out
