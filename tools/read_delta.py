"""Reads a dtta output's two Delta tables with engines other than dtta, and prints what
they see as one JSON object (tests/delta_readers.rs compares it with dtta's own view).

Usage: python tools/read_delta.py OUTPUT [--version N | --all-versions]

OUTPUT is a local folder or an s3:// URL; for S3 the usual AWS_* variables give the
endpoint and credentials (AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true for a loopback server).
With --version N, the predictions table is read at version N (steps at its latest, the
documented rule: predictions first, then steps).

For each table and each reader (the `deltalake` package; Polars' read_delta; DuckDB's
delta extension, which is built on the Delta project's Rust kernel, loaded from the
`duckdb-extension-delta` and `-httpfs` wheels since this machine cannot download them)
it prints
the version read, the row count and the rows per shard; for predictions also the
number of rows whose pred_after equals the label, and the sorted (shard, key) pairs.
With --all-versions it adds "versions": the predictions table as each reader sees it at
every version from 0 to the latest (one process, since starting one takes seconds).

Ends with os._exit: deltalake 1.6 with pyarrow 26 aborts at interpreter exit after a
scan ("terminate called without an active exception"), after all work is done.
"""
import argparse
import json
import os
import sys
from collections import Counter

import duckdb
import duckdb_extension_delta
import duckdb_extension_httpfs
import polars as pl
from deltalake import DeltaTable


def storage_options(url):
    if not url.startswith("s3://"):
        return None
    keys = ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ALLOW_HTTP"]
    opts = {k: os.environ[k] for k in keys if k in os.environ}
    # Delta's S3 writer would ask for a lock; reading needs none.
    opts["AWS_S3_ALLOW_UNSAFE_RENAME"] = "true"
    return opts


def duckdb_with_delta(url):
    """A DuckDB connection with the delta extension loaded from its wheel (the build for
    this duckdb's version), and for S3 also httpfs (S3 secrets are its type) and a secret
    made of the same AWS_* variables."""
    con = duckdb.connect()
    for module in [duckdb_extension_delta] + ([duckdb_extension_httpfs] if url.startswith("s3://") else []):
        name = module.__name__.removeprefix("duckdb_extension_")
        folder = os.path.join(os.path.dirname(module.__file__), "extensions", f"v{duckdb.__version__}")
        con.sql(f"LOAD '{os.path.join(folder, name)}.duckdb_extension'")
    if url.startswith("s3://"):
        endpoint = os.environ["AWS_ENDPOINT_URL"]
        scheme, host = endpoint.split("://", 1)
        con.sql(
            f"""CREATE SECRET (TYPE S3, KEY_ID '{os.environ["AWS_ACCESS_KEY_ID"]}',
            SECRET '{os.environ["AWS_SECRET_ACCESS_KEY"]}', REGION '{os.environ.get("AWS_REGION", "us-east-1")}',
            ENDPOINT '{host}', URL_STYLE 'path', USE_SSL {str(scheme == "https").lower()})"""
        )
    return con


def describe(rows, version, predictions):
    shards = Counter(rows["shard"].to_list())
    seen = {"version": version, "rows": rows.height, "shards": dict(sorted(shards.items()))}
    if predictions:
        seen["correct_after"] = int((rows["pred_after"] == rows["label"]).sum())
        seen["keys"] = sorted([s, k] for s, k in zip(rows["shard"].to_list(), rows["key"].to_list()))
    return seen


def read(base, table, version, opts, con):
    uri = f"{base}/{table}"
    dt = DeltaTable(uri, version=version, storage_options=opts)
    columns = ["shard", "key", "pred_after", "label"] if table == "predictions" else ["shard", "key"]
    via_deltalake = pl.from_arrow(dt.to_pyarrow_dataset().to_table(columns=columns))
    via_polars = pl.read_delta(uri, version=version, storage_options=opts, columns=columns)
    at = "" if version is None else f", version := {int(version)}"
    via_duckdb = con.sql(f"SELECT {', '.join(columns)} FROM delta_scan('{uri}'{at})").pl()
    # DuckDB does not say which version it read; the rows are what is compared.
    return {
        "deltalake": describe(via_deltalake, dt.version(), table == "predictions"),
        "polars": describe(via_polars, dt.version(), table == "predictions"),
        "duckdb": describe(via_duckdb, dt.version(), table == "predictions"),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("output")
    ap.add_argument("--version", type=int)
    ap.add_argument("--all-versions", action="store_true")
    args = ap.parse_args()
    base = args.output.rstrip("/")
    opts = storage_options(base)
    con = duckdb_with_delta(base)
    seen = {
        "predictions": read(base, "predictions", args.version, opts, con),
        "steps": read(base, "steps", None, opts, con),
    }
    if args.all_versions:
        latest = seen["predictions"]["deltalake"]["version"]
        seen["versions"] = [read(base, "predictions", v, opts, con) for v in range(latest + 1)]
    json.dump(seen, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
