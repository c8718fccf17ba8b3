//! Inputs beyond WebDataset: Parquet shards in the Hugging Face datasets layout (written
//! by pyarrow), and image folders (ImageFolder layout, or flat), locally and on S3.

mod common;

use std::collections::BTreeMap;

use common::servers::S3;
use common::*;

/// Writes `n` demo samples per Parquet file with pyarrow, HF style (image struct) or as a
/// plain binary column with a key column; row 3 of the first file has a null image.
fn write_parquet(dir: &std::path::Path, files: usize, n: usize, hf_struct: bool) {
    let demo = demo_samples();
    let raw = dir.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    for (i, s) in demo.iter().take(files * n).enumerate() {
        std::fs::write(raw.join(format!("{i:04}-{}-{}.png", s.key, s.label)), &s.png).unwrap();
    }
    let script = r#"
import os, sys, pyarrow as pa, pyarrow.parquet as pq
raw, out, files, n, hf = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
names = sorted(os.listdir(raw))
for f in range(files):
    rows = names[f * n:(f + 1) * n]
    data = [open(os.path.join(raw, r), "rb").read() for r in rows]
    keys = ["-".join(r[:-4].split("-")[1:-1]) for r in rows]
    labels = [int(r[:-4].split("-")[-1]) for r in rows]
    if f == 0:
        data[3] = None
    if hf:
        image = pa.array([None if d is None else {"bytes": d, "path": k + ".png"} for d, k in zip(data, keys)],
                         type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": image, "label": pa.array(labels, pa.int64())})
    else:
        table = pa.table({"jpg": pa.array(data, pa.binary()), "cls": pa.array(labels, pa.int32()), "__key__": keys})
    pq.write_table(table, os.path.join(out, f"train-{f:05d}-of-{files:05d}.parquet"), row_group_size=16)
"#;
    let o = std::process::Command::new(repo().join(".venv/bin/python"))
        .args(["-c", script])
        .arg(&raw)
        .arg(dir)
        .args([files.to_string(), n.to_string(), (hf_struct as u8).to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

fn labels_by_key() -> BTreeMap<String, i64> {
    demo_samples().into_iter().map(|s| (s.key, s.label)).collect()
}

#[test]
fn parquet_shards_in_the_hugging_face_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("hf");
    std::fs::create_dir(&data).unwrap();
    write_parquet(&data, 2, 40, true);
    let out = tmp.path().join("out");
    let p = write_pipeline(tmp.path(), &format!("{}/", data.display()), &out.to_string_lossy(), "");
    let o = run_dtta(&["run", p.to_str().unwrap(), "--set", "input.format=parquet"]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = committed_rows(&out);
    assert_eq!(rows.len(), 80, "one row per Parquet row");
    let truth = labels_by_key();
    let null = rows.iter().filter(|r| r.status == "no_image").count();
    assert_eq!(null, 1, "the null image is reported");
    for r in rows.iter().filter(|r| r.status == "ok") {
        assert_eq!(r.label, Some(truth[&r.key]), "key from image.path, label from `label`");
    }
    let correct = rows
        .iter()
        .filter(|r| r.pred_after.is_some() && r.pred_after == r.label)
        .count();
    assert!(correct > 70, "{correct}/79 correct");
}

#[test]
fn parquet_with_binary_column_and_key_column_on_s3() {
    let s3 = S3::start();
    s3.create_bucket("lake");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("plain");
    std::fs::create_dir(&data).unwrap();
    write_parquet(&data, 1, 30, false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = s3.store("lake");
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "parquet") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).unwrap();
            rt.block_on(object_store::ObjectStoreExt::put(
                store.as_ref(),
                &object_store::path::Path::from(format!("data/{name}")),
                bytes.into(),
            ))
            .unwrap();
        }
    }
    let out = tmp.path().join("out");
    let p = write_pipeline(tmp.path(), "s3://lake/data/*.parquet", &out.to_string_lossy(), "");
    let mut cmd = dtta();
    cmd.envs(s3.env());
    let o = cmd
        .args(["run", p.to_str().unwrap(), "--set", "input.format=parquet"])
        .args([
            "--set",
            "input.parquet.image_column=jpg",
            "--set",
            "input.parquet.label_column=cls",
        ])
        .args(["--set", "input.parquet.key_column=__key__"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let rows = committed_rows(&out);
    assert_eq!(rows.len(), 30);
    let truth = labels_by_key();
    assert!(rows
        .iter()
        .all(|r| truth.get(&r.key) == r.label.as_ref() || r.status != "ok"));

    // A wrong column name fails the shard with a message naming the columns.
    let o = dtta()
        .envs(s3.env())
        .args([
            "run",
            p.to_str().unwrap(),
            "--set",
            "input.format=parquet",
            "--set",
            "output.url=/tmp/dtta-never",
        ])
        .args([
            "--set",
            "input.parquet.image_column=picture",
            "--set",
            "runtime.shard_retries=0",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no column `picture`") && err.contains("jpg, cls, __key__"),
        "{err}"
    );
}

#[test]
fn image_folders_with_and_without_class_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("imagefolder");
    let demo: Vec<_> = demo_samples().into_iter().step_by(7).take(90).collect();
    for s in &demo {
        let dir = root.join(s.label.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{}.png", s.key)), &s.png).unwrap();
    }
    std::fs::write(root.join("README.txt"), "not an image").unwrap();
    let run_folder = |p: &std::path::Path, setting: &str| {
        run_dtta(&[
            "run",
            p.to_str().unwrap(),
            "--set",
            "input.format=folder",
            "--set",
            setting,
        ])
    };
    let out = tmp.path().join("out");
    let p = write_pipeline(tmp.path(), &format!("{}/", root.display()), &out.to_string_lossy(), "");
    let o = run_folder(&p, "input.folder.shard_size=25");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(committed_files(&out).len(), 4, "90 images in shards of 25");
    let rows = committed_rows(&out);
    assert_eq!(rows.len(), 90);
    // Folders "0".."9" sort to classes 0..9: the labels are the digits.
    let truth = labels_by_key();
    for r in &rows {
        let key = r.key.rsplit('/').next().unwrap();
        assert_eq!(r.label, Some(truth[key]), "{}", r.key);
    }
    let again = run_folder(&p, "input.folder.shard_size=25");
    assert_stdout_has(&again, "4 skipped");

    let out2 = tmp.path().join("out-flat");
    let p = write_pipeline(
        tmp.path(),
        &format!("{}/3/", root.display()),
        &out2.to_string_lossy(),
        "",
    );
    let o = run_folder(&p, "input.folder.labels=none");
    assert!(o.status.success(), "{}", text(&o));
    let rows = committed_rows(&out2);
    assert!(!rows.is_empty() && rows.iter().all(|r| r.label.is_none() && r.status == "ok"));
}
