#!/usr/bin/env python3
"""Prints the decode + preprocess comparison, dtta against PIL, and checks the goals.

Reads target/bench/preprocess.json (cargo bench --bench preprocess) and
target/bench/preprocess_pil.json (bench/pil_preprocess.py), prints one table per size
class and the goals, and writes the ratios to target/bench/preprocess_report.json.
Exit status 0 whatever the verdicts: a benchmark reports, it does not gate.

The "vs PIL" column sets decode-only against PIL's decode-only, every other row against
PIL's full path. Images/s per core is images over CPU seconds on both sides (so other load on the machine
does not count); the 1 -> 2 thread (or process) scaling is shown twice: per-core rate at
2 against 1 (near 1.0 when the work itself scales linearly) and wall-clock images/s at
2 against 1 (near 2.0 only when two cores are free).
"""

import argparse
import json
import os
import sys

GOALS = {
    "imagenet_vs_pil": 1.7,  # dtta pipeline / PIL full, per core, ImageNet-like
    "imagenet_vs_decode_only": 1.15,  # dtta pipeline time / dtta decode-only time
    "camera_vs_pil": 3.0,  # dtta pipeline / PIL full, per core, camera-size
}


def rate(side, cls, path, n="1"):
    try:
        return side["classes"][cls]["timings"][path][n]
    except KeyError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtta", default="target/bench/preprocess.json")
    ap.add_argument("--pil", default="target/bench/preprocess_pil.json")
    ap.add_argument("--out", default="target/bench/preprocess_report.json")
    args = ap.parse_args()
    with open(args.dtta) as f:
        dtta = json.load(f)
    with open(args.pil) as f:
        pil = json.load(f)

    report = {"classes": {}, "goals": {}}
    rows = [
        ("PIL decode only", pil, "decode_only"),
        ("PIL full (torchvision)", pil, "full"),
        ("dtta decode only", dtta, "decode_only"),
        ("dtta full-scale decode + view", dtta, "full"),
        ("dtta pipeline (scaled decode)", dtta, "scaled"),
        ("dtta scaled, no margin", dtta, "scaled_no_margin"),
    ]
    for cls, c in dtta["classes"].items():
        # Decode rows compare with PIL's decode, pipeline rows with PIL's full path.
        pil_ref = {"decode_only": rate(pil, cls, "decode_only"), "full": rate(pil, cls, "full")}
        print(
            f"\n{cls}: {c['images']} JPEGs, {c['megapixels_avg']:.2f} MP on average, "
            f"{c['bits_per_pixel']:.2f} bits/pixel"
        )
        print(
            f"  {'path':32s} {'img/s/core':>10s} {'ms/img':>8s} {'vs PIL':>7s}"
            f" {'2 thr/core':>10s} {'per-core 1->2':>13s} {'wall 1->2':>9s}"
        )
        out = {}
        for label, side, path in rows:
            one, two = rate(side, cls, path), rate(side, cls, path, "2")
            if one is None:
                continue
            r1 = one["images_per_s_per_core"]
            ref = pil_ref["decode_only" if path == "decode_only" else "full"]
            vs_pil = r1 / ref["images_per_s_per_core"] if ref else float("nan")
            per_core_scaling = two["images_per_s_per_core"] / r1 if two else float("nan")
            wall_scaling = two["wall_images_per_s"] / one["wall_images_per_s"] if two else float("nan")
            print(
                f"  {label:32s} {r1:10.1f} {1e3 / r1:8.3f} {vs_pil:6.2f}x"
                f" {two['images_per_s_per_core'] if two else float('nan'):10.1f}"
                f" {per_core_scaling:12.2f}x {wall_scaling:8.2f}x"
            )
            out[f"{side['side']}/{path}"] = {
                "images_per_s_per_core": r1,
                "ms_per_image_per_core": 1e3 / r1,
                "vs_pil": vs_pil,
                "per_core_scaling_1_to_2": per_core_scaling,
                "wall_scaling_1_to_2": wall_scaling,
            }
        for path, e in c.get("scaled_error", {}).items():
            v = e["vs_full"]
            print(
                f"  {path} vs full-scale path: max {v['max_abs_levels']:.1f} mean {v['mean_abs_levels']:.2f}"
                f" 8-bit levels (max {v['max_abs_normalized']:.3f} mean {v['mean_abs_normalized']:.4f}"
                f" normalized); DCT reductions {e['dct_reductions']}"
            )
        if c.get("full_vs_pil"):
            v = c["full_vs_pil"]
            print(
                f"  dtta full-scale path vs PIL's tensor: max {v['max_abs_levels']:.1f}"
                f" mean {v['mean_abs_levels']:.2f} 8-bit levels (decoders and resize rounding)"
            )
        out["scaled_error"] = c.get("scaled_error")
        out["full_vs_pil"] = c.get("full_vs_pil")
        report["classes"][cls] = out

    def goal(name, cls, value, target, higher_is_better, text):
        met = value >= target if higher_is_better else value <= target
        report["goals"][name] = {"class": cls, "value": value, "target": target, "met": met}
        print(f"  {'MET    ' if met else 'NOT MET'} {text}")

    print("\nGoals (per core, pipeline = what `prepare` runs):")
    c = report["classes"]
    if "imagenet" in c and "dtta/scaled" in c["imagenet"]:
        v = c["imagenet"]["dtta/scaled"]["vs_pil"]
        goal("imagenet_vs_pil", "imagenet", v, GOALS["imagenet_vs_pil"], True, f"ImageNet-like: {v:.2f}x PIL (goal >= 1.7x)")
        t = c["imagenet"]["dtta/scaled"]["ms_per_image_per_core"] / c["imagenet"]["dtta/decode_only"]["ms_per_image_per_core"]
        goal(
            "imagenet_vs_decode_only",
            "imagenet",
            t,
            GOALS["imagenet_vs_decode_only"],
            False,
            f"ImageNet-like: {100 * (t - 1):+.0f}% over decode-only (goal within +15%)",
        )
    if "camera" in c and "dtta/scaled" in c["camera"]:
        v = c["camera"]["dtta/scaled"]["vs_pil"]
        goal("camera_vs_pil", "camera", v, GOALS["camera_vs_pil"], True, f"camera-size: {v:.2f}x PIL (goal >= 3x)")
        e = (c["camera"].get("scaled_error") or {}).get("scaled")
        if e:
            v = e["vs_full"]
            print(
                f"          camera-size scaled vs full-scale: mean {v['mean_abs_levels']:.2f}, "
                f"max {v['max_abs_levels']:.0f} 8-bit levels"
            )
    loads = [x for x in (dtta.get("loadavg"), pil.get("loadavg")) if x]
    if loads:
        print(f"  (load average when measured: dtta {dtta.get('loadavg')}, PIL {pil.get('loadavg')};"
              f" {dtta.get('available_parallelism')} CPUs)")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
