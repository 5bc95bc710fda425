"""Bounded end-to-end TIGER run on Amazon Beauty (CPU friendly), through the real Dagster assets.

    python -m animind_assets.benchmarks.tiger_beauty                    # bounded CPU run (defaults below)
    python -m animind_assets.benchmarks.tiger_beauty --preset paper --train-seconds 0 --test-users 0   # full run (GPU)

Stages (each a ``dg.materialize`` of the project's assets, in a scratch data folder so nothing of
``data/`` is touched): beauty_items + beauty_interactions (prepared split, inter.json order) ->
beauty_embeddings (offline MiniLM) -> beauty_semantic_ids (RQ-VAE 3x256 + disambiguation) ->
tiger_model[own], tiger_model[reference] (same config and time budget) -> tiger_eval. Prints wall time
per stage and the metrics table (TIGER paper, tiger-cf, popularity, own IDs, reference IDs).

Presets: ``paper`` = TIGER's Beauty model (4+4 layers, d_model 128, 6x64 heads, ff 1024, dropout 0.1);
``cpu`` (default) = the same family scaled down for a shared 2-core CPU (2+2 layers, 4x32 heads,
ff 512), trained under a wall-clock budget.

On a busy shared CPU set ``OMP_WAIT_POLICY=PASSIVE`` (done here before torch is imported): with the
default active spin-waiting, two OpenMP threads that are descheduled by other processes' work were
measured several times slower than one thread.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from animind_assets.quiet import dagster_console_run_config

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PRESETS = {
    "paper": dict(d_model=128, d_kv=64, num_heads=6, d_ff=1024, num_layers=4, num_decoder_layers=4, dropout=0.1),
    "cpu": dict(d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2, dropout=0.1),
    "cpu_medium": dict(d_model=128, d_kv=32, num_heads=4, d_ff=512, num_layers=2, num_decoder_layers=2, dropout=0.1),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--id-sources", default="own,reference", help="tiger_model partitions to train and evaluate")
    p.add_argument("--train-seconds", type=float, default=600.0, help="training budget per model (0 = none)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--lr-schedule", default="constant")
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--eval-every-steps", type=int, default=700)
    p.add_argument("--val-users", type=int, default=1000)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--test-users", type=int, default=8000, help="seeded subset of the 22,363 test users (0 = all)")
    p.add_argument("--beams", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantizer-epochs", type=int, default=25)
    p.add_argument("--order", default="inter_json", choices=["inter_json", "user_sequence"])
    p.add_argument("--data-dir", default="", help="scratch data folder (default: a new temp folder)")
    p.add_argument("--mlflow", action="store_true", help="track runs in <data-dir>/mlflow.db")
    p.add_argument("--upstream-only", action="store_true", help="stop after beauty_semantic_ids")
    p.add_argument("--verbose", action="store_true", help="print Dagster's event lines (DEBUG) between the stage lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from animind_assets.lib.data.amazon import beauty_dir

    if not (beauty_dir() / "inter.json").exists():
        print(f"../shared/data/beauty not found at {beauty_dir()}: nothing to run", file=sys.stderr)
        return 2
    data = Path(args.data_dir or tempfile.mkdtemp(prefix="animind-tiger-")).resolve()
    data.mkdir(parents=True, exist_ok=True)
    os.environ["ANIMIND_DATA_DIR"] = str(data)

    import dagster as dg
    import torch

    from animind_assets.defs.beauty.beauty_embeddings import beauty_embeddings
    from animind_assets.defs.beauty.beauty_interactions import beauty_interactions
    from animind_assets.defs.beauty.beauty_items import beauty_items
    from animind_assets.defs.beauty.beauty_semantic_ids import beauty_semantic_ids
    from animind_assets.defs.beauty.tiger_eval import tiger_eval
    from animind_assets.defs.beauty.tiger_model import tiger_model
    from animind_assets.lib.retrieval.tiger import metrics_table
    from animind_assets.resources import AniMindDuckDBIOManager, ArtifactStoreResource, DuckDBWarehouse, MlflowResource, ParquetExports

    torch.set_num_threads(args.threads)
    db = str(data / "animind.duckdb")
    resources = {
        "io_manager": AniMindDuckDBIOManager(database=db, schema="main"),
        "warehouse": DuckDBWarehouse(database=db, schema="main"),
        "artifacts": ArtifactStoreResource(root=str(data / "artifacts")),
        "exports": ParquetExports(root=str(data / "exports")),
        "mlflow": MlflowResource(enabled=args.mlflow, tracking_uri=f"sqlite:///{data / 'mlflow.db'}"),
    }
    instance = dg.DagsterInstance.ephemeral()
    all_assets = [beauty_items, beauty_interactions, beauty_embeddings, beauty_semantic_ids, tiger_model, tiger_eval]
    sources = [s.strip() for s in args.id_sources.split(",") if s.strip()]
    model_cfg = {
        **PRESETS[args.preset],
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup_steps,
        "lr_schedule": args.lr_schedule, "max_history": args.max_history, "max_train_seconds": args.train_seconds,
        "eval_every_steps": args.eval_every_steps, "val_users": args.val_users, "val_beams": max(10, min(args.beams, 20)),
        "patience": args.patience, "num_threads": args.threads, "resume": False,
    }
    src = {"source": "prepared", "order": args.order}
    timings: dict[str, float] = {}

    def run(name: str, selection, run_config: dict, partition_key: str | None = None) -> None:
        t0 = time.perf_counter()
        res = dg.materialize(all_assets, selection=selection, resources=resources, instance=instance,
                             run_config={**dagster_console_run_config(args.verbose), "ops": run_config},
                             partition_key=partition_key, raise_on_error=True)
        timings[name] = time.perf_counter() - t0
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {'ok' if res.success else 'FAILED'} in {timings[name]:.0f}s", flush=True)

    print(f"data folder: {data}\nmodel preset {args.preset}: {PRESETS[args.preset]}, threads {args.threads}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, cuda={torch.cuda.is_available()}", flush=True)
    t_all = time.perf_counter()
    run("beauty_items + beauty_interactions", [beauty_items, beauty_interactions],
        {"beauty_items": {"config": src}, "beauty_interactions": {"config": src}})
    if "own" in sources:
        run("beauty_embeddings", [beauty_embeddings], {"beauty_embeddings": {"config": {"batch_size": 128}}})
        run("beauty_semantic_ids", [beauty_semantic_ids],
            {"beauty_semantic_ids": {"config": {"epochs": args.quantizer_epochs, "num_threads": args.threads}}})
    if args.upstream_only:
        sids = resources["warehouse"].read_table("beauty_semantic_ids")
        print(sids.head(5), "\ndistinct 3-code prefixes:", sids.select(["code_l1", "code_l2", "code_l3"]).unique().height)
        return 0
    for s in sources:
        run(f"tiger_model[{s}]", [tiger_model], {"tiger_model": {"config": model_cfg}}, partition_key=s)
    run("tiger_eval", [tiger_eval], {"tiger_eval": {"config": {
        "id_sources": sources, "beams": args.beams, "test_users": args.test_users, "num_threads": args.threads,
        "batch_size": 128}}})
    total = time.perf_counter() - t_all

    table = resources["warehouse"].read_table("tiger_eval")
    rows = {r["model"]: r for r in table.iter_rows(named=True)}
    print("\nAmazon Beauty, leave-one-out test (last item), ranking over all 12,101 items; "
          f"sequence order: {args.order}; {int(table['test_users'].max())} test users, {args.beams} beams")
    print(metrics_table(rows, ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "invalid_id_rate", "unconstrained_invalid_id_rate")))
    print("\nper model: steps, train seconds, best validation Recall@10")
    for r in rows.values():
        if r["kind"] == "measured":
            print(f"  {r['model']:<42} steps {r['train_steps']:>6}  train {r['train_seconds']:>6.0f}s  "
                  f"best val R@10 {r['best_val_recall@10']:.4f}  params {r['parameters']:,}  eval {r['eval_seconds']:.0f}s")
    print("\nwall time per stage:")
    for k, v in timings.items():
        print(f"  {k:<36} {v:>7.0f}s")
    print(f"  {'TOTAL':<36} {total:>7.0f}s ({total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
