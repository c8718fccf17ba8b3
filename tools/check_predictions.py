"""Checks a dtta output against PyTorch: the same bundle, the same shards, in Python.

Usage: python tools/check_predictions.py OUTPUT_DIR SHARDS_DIR BUNDLE_DIR

Reads the committed predictions as a Delta table with the `deltalake` package, and with
DuckDB's delta extension (tools/read_delta.py loads it), recomputes every prediction with torch.jit on
images decoded by PIL, and fails unless every sample appears exactly once with the same
predicted class, and every row and commit names the bundle's digest. Prints the
accuracy. Grayscale bundles only (the demo).

Ends with os._exit: deltalake 1.6 with pyarrow 26 aborts at interpreter exit after a
scan ("terminate called without an active exception"), after all work is done.
"""
import glob
import hashlib
import io
import json
import os
import sys
import tarfile

from deltalake import DeltaTable
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import tomllib
from PIL import Image

from read_delta import duckdb_with_delta


def bundle_sha256(bundle):
    """The bundle digest (README, "Provenance"), computed here independently of dtta."""
    entries = []
    for root, _, files in os.walk(bundle, followlinks=True):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            entries.append((os.path.relpath(path, bundle).encode(), digest))
    listing = b"".join(digest.encode() + b"  " + rel + b"\n" for rel, digest in sorted(entries))
    return hashlib.sha256(listing).hexdigest()


def main():
    out, shards, bundle = sys.argv[1:4]
    dt = DeltaTable(os.path.join(out, "predictions"))
    # The files as written (deltalake's own scan reads the Delta schema's plain strings).
    files = dt.file_uris()
    table = pq.read_table(files)
    rows = table.to_pylist()
    assert dt.to_pyarrow_dataset().to_table().num_rows == len(rows)
    markers = [json.loads(tags["dtta.commit"]) for tags in add_tags(dt)]
    assert len(markers) == len(files), "every file of the snapshot carries its commit record"

    # DuckDB with its delta extension: the table as the Delta project's kernel reads it.
    table_url = os.path.abspath(os.path.join(out, "predictions"))
    duck = dict(duckdb_with_delta(table_url).sql(f"SELECT key, pred_after FROM delta_scan('{table_url}')").fetchall())
    assert len(duck) == len(rows), f"duckdb sees {len(duck)} rows, pyarrow {len(rows)}"

    spec = tomllib.load(open(os.path.join(bundle, "bundle.toml"), "rb"))
    pre = spec["classifier"]["preprocess"]
    model = torch.jit.load(os.path.join(bundle, spec["classifier"]["file"])).eval()
    images, labels = {}, {}
    for path in sorted(glob.glob(os.path.join(shards, "*.tar"))):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if ext == "png":
                    images[key] = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
                elif ext == "cls":
                    labels[key] = int(data)
    keys = sorted(images)
    x = torch.from_numpy(np.stack([images[k] for k in keys])).unsqueeze(1)
    x = (x / 255.0 - pre["mean"][0]) / pre["std"][0]
    with torch.no_grad():
        expected = dict(zip(keys, model(x).argmax(1).tolist()))

    # The adaptive-compute columns, on every row: the source spends no denoiser pass.
    assert str(table.schema.field("denoiser_evals").type) == "int64", table.schema
    assert str(table.schema.field("stop_reason").type) == "string", table.schema
    if all(r["method"] == "source" for r in rows):
        assert all(r["denoiser_evals"] == 0 and r["stop_reason"] == "none" for r in rows)

    seen = [r["key"] for r in rows]
    assert len(seen) == len(set(seen)), "a key appears twice"
    assert set(seen) == set(keys), f"{len(set(keys) - set(seen))} keys missing"
    mismatched = [r["key"] for r in rows if r["pred_after"] != expected[r["key"]]]
    assert not mismatched, f"{len(mismatched)} predictions differ from PyTorch, e.g. {mismatched[:5]}"
    assert all(duck[k] == expected[k] for k in keys), "duckdb disagrees"
    digest = bundle_sha256(bundle)
    lineage = table.schema.field("bundle_sha256").type
    assert pa.types.is_dictionary(lineage), f"bundle_sha256 is {lineage}, not dictionary-encoded"
    assert set(table.column("bundle_sha256").to_pylist()) == {digest}, "rows name another bundle"
    assert all(m["bundle_sha256"] == digest for m in markers), "a commit names another bundle"
    facts = [h["dtta"] for h in dt.history() if "dtta" in h]
    assert facts and all(f["bundle_sha256"] == digest for f in facts), "a commit's facts name another bundle"
    acc = np.mean([expected[k] == labels[k] for k in keys])
    print(f"ok: {len(rows)} rows, each key once, predictions equal PyTorch's; top-1 {100 * acc:.2f}%")


def add_tags(dt):
    """The tags of the snapshot's add actions, read from the log as any Delta reader does."""
    log = os.path.join(dt.table_uri.removeprefix("file://"), "_delta_log")
    live = {}
    for path in sorted(glob.glob(os.path.join(log, "*.json"))):
        version = int(os.path.basename(path).split(".")[0])
        if version > dt.version():
            continue
        for line in open(path):
            action = json.loads(line)
            if "add" in action:
                live[action["add"]["path"]] = action["add"].get("tags") or {}
            if "remove" in action:
                live.pop(action["remove"]["path"], None)
    return list(live.values())


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)
