"""Writer / reader processes of the Parquet table concurrency tests (no Dagster import: they start fast
under the 'spawn' method)."""

from __future__ import annotations

import polars as pl

from animind_assets.lib.common.parquet_tables import ParquetTableStore, TableNotFoundError

ROUNDS = 10
ROWS = 20_000


def frame(partition: str, round_: int, rows: int = ROWS) -> pl.DataFrame:
    """Rows that say which partition and which round wrote them (a torn write would mix rounds)."""
    return pl.DataFrame(
        {
            "item_id": pl.arange(0, rows, eager=True).cast(pl.Int64),
            "shard": pl.Series([partition] * rows, dtype=pl.Utf8),
            "round": pl.Series([round_] * rows, dtype=pl.Int32),
        }
    ).with_columns(
        pl.concat_list([pl.lit(float(round_)), (pl.col("item_id") % 7).cast(pl.Float64)]).cast(pl.List(pl.Float32)).alias("vec")
    )


def check_version(df: pl.DataFrame, partition: str) -> int:
    """One consistent version of ``partition``: all rows from one round, none lost. Returns the round."""
    assert df.height == ROWS, (partition, df.height)
    assert df["shard"].unique().to_list() == [partition]
    rounds = df["round"].unique().to_list()
    assert len(rounds) == 1, f"{partition}: rows of several writes mixed: {rounds}"
    assert df["item_id"].to_list() == list(range(ROWS))
    return rounds[0]


def writer(root: str, options: dict, table: str, partition: str, barrier, rounds: int) -> None:
    store = ParquetTableStore(root, options)
    location = store.location(table, partition)
    barrier.wait(timeout=120)
    for r in range(rounds):
        store.write(location, frame(partition, r), partition=partition)


def reader(root: str, options: dict, table: str, partitions: list[str], barrier, stop, errors) -> None:
    store = ParquetTableStore(root, options)
    barrier.wait(timeout=120)
    seen = 0
    while not stop.is_set():
        for p in partitions:
            try:
                check_version(store.read(store.location(table, p)), p)
                seen += 1
            except TableNotFoundError:
                pass  # not committed yet
            except Exception as exc:  # noqa: BLE001 - reported to the test
                errors.put(f"{p}: {type(exc).__name__}: {exc}")
                return
    if not seen:
        errors.put("the reader never saw a committed version while the writers ran")
