"""Reads a dtta output's two Delta tables with engines other than dtta, and prints what
they see as one JSON object (tests/delta_readers.rs compares it with dtta's own view).

Usage: python tools/read_delta.py OUTPUT [--version N | --all-versions]

OUTPUT is a local folder or an s3:// URL; for S3 the usual AWS_* variables give the
endpoint and credentials (AWS_ENDPOINT_URL, AWS_ALLOW_HTTP=true for a loopback server).
With --version N, the predictions table is read at version N (steps at its latest, the
documented rule: predictions first, then steps).

For each table and each reader (the `deltalake` package; Polars' read_delta) it prints
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


def describe(rows, version, predictions):
    shards = Counter(rows["shard"].to_list())
    seen = {"version": version, "rows": rows.height, "shards": dict(sorted(shards.items()))}
    if predictions:
        seen["correct_after"] = int((rows["pred_after"] == rows["label"]).sum())
        seen["keys"] = sorted([s, k] for s, k in zip(rows["shard"].to_list(), rows["key"].to_list()))
    return seen


def read(base, table, version, opts):
    uri = f"{base}/{table}"
    dt = DeltaTable(uri, version=version, storage_options=opts)
    columns = ["shard", "key", "pred_after", "label"] if table == "predictions" else ["shard", "key"]
    via_deltalake = pl.from_arrow(dt.to_pyarrow_dataset().to_table(columns=columns))
    via_polars = pl.read_delta(uri, version=version, storage_options=opts, columns=columns)
    return {
        "deltalake": describe(via_deltalake, dt.version(), table == "predictions"),
        "polars": describe(via_polars, dt.version(), table == "predictions"),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("output")
    ap.add_argument("--version", type=int)
    ap.add_argument("--all-versions", action="store_true")
    args = ap.parse_args()
    base = args.output.rstrip("/")
    opts = storage_options(base)
    seen = {
        "predictions": read(base, "predictions", args.version, opts),
        "steps": read(base, "steps", None, opts),
    }
    if args.all_versions:
        latest = seen["predictions"]["deltalake"]["version"]
        seen["versions"] = [read(base, "predictions", v, opts) for v in range(latest + 1)]
    json.dump(seen, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
