#!/usr/bin/env python3
"""`zsad detect`'s steady-state throughput against the backbone's own (issue 25).

The check: zero-shot ViT-B/16 over 900x900 PNGs with maps and heatmaps written should run at
0.95 or more of the throughput of the image tower alone, i.e. decoding, resizing, map
post-processing and PNG encoding must hide behind the model.

  python3 scripts/bench_detect_throughput.py                       # MVTec bottle from ../shared
  python3 scripts/bench_detect_throughput.py --images DIR --precision f32 --json out.json

Steady state without a clock inside zsad: `zsad detect` runs twice, over the first --warm
images and over all N; (t_all - t_warm) / (N - warm) is the time per image once the model is
loaded, the text encoded and the pipeline full (loading, set-up and the first passes cancel).
The backbone is `cargo bench --bench encoder` on ViT-B-16@224 with the batch detect uses
(5 on a CPU at 224: `--batch-size 0`), per image. Both use every CPU of the machine
(RAYON_NUM_THREADS unset unless --threads). Standard library only.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODER_LINE = re.compile(r"^(?P<name>\S+)\s+(?P<ms>[0-9.]+) ms")


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def images_under(root):
    found = []
    for d, _, files in os.walk(root):
        found += [os.path.join(d, f) for f in files if f.lower().endswith(".png")]
    return sorted(found)


def run_detect(zsad, images, precision, batch, out, env):
    cmd = [zsad, "detect", "-", "--model", "random:ViT-B-16", "--preset", "zero-shot",
           "--precision", precision, "--batch-size", str(batch), "--out", out, "--quiet"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, input="\n".join(images) + "\n", text=True, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit("zsad detect failed (%d): %s" % (p.returncode, p.stderr[-2000:]))
    written = [f for _, _, fs in os.walk(os.path.join(out, "heatmaps")) for f in fs]
    if len(written) != len(images):
        sys.exit("zsad detect wrote %d heatmaps for %d images" % (len(written), len(images)))
    return wall


def backbone_ms(precision, batch, runs, env):
    env = dict(env, ZSAD_BENCH_PRECISION=precision, ZSAD_BENCH_BATCH=str(batch),
               ZSAD_BENCH_RUNS=str(runs), ZSAD_BENCH_VV="0")
    p = subprocess.run(["cargo", "bench", "--bench", "encoder", "--", "ViT-B-16@224"], cwd=REPO,
                       env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit("encoder bench failed: %s" % p.stderr[-2000:])
    for line in p.stdout.splitlines():
        m = ENCODER_LINE.match(line.strip())
        if m and m.group("name") == "ViT-B-16@224":
            return float(m.group("ms"))
    sys.exit("no ViT-B-16@224 line in the encoder bench's output:\n" + p.stdout)


def main():
    flags = cpu_flags()
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=os.path.join(REPO, "..", "shared", "data", "mvtec_ad",
                                                     "bottle", "test"),
                    help="folder of PNGs (default: ../shared's MVTec bottle test images)")
    ap.add_argument("--precision", choices=("f32", "bf16"), default="bf16" if bf16 else "f32",
                    help="default: bf16 where the CPU has AVX512-BF16 or AMX-BF16")
    ap.add_argument("--warm", type=int, default=10, help="images of the short run (default 10)")
    ap.add_argument("--batch", type=int, default=5, help="images per pass, both sides (default 5)")
    ap.add_argument("--runs", type=int, default=10, help="encoder bench passes (default 10)")
    ap.add_argument("--threads", type=int, help="RAYON_NUM_THREADS for both sides")
    ap.add_argument("--zsad", help="a built zsad binary (default: target/release/zsad, built first)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    for flag, value, least in (("--warm", args.warm, 1), ("--batch", args.batch, 0),
                               ("--runs", args.runs, 1), ("--threads", args.threads or 1, 1)):
        if value < least:
            ap.error("%s %d: at least %d" % (flag, value, least))
    images = images_under(args.images)
    if len(images) < args.warm + 10:
        sys.exit("%s holds %d PNGs; need at least %d (--warm + 10)" %
                 (args.images, len(images), args.warm + 10))
    env = dict(os.environ)
    if args.threads:
        env["RAYON_NUM_THREADS"] = str(args.threads)
    if not args.zsad:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO, check=True)
    subprocess.run(["cargo", "bench", "--bench", "encoder", "--no-run", "--quiet"], cwd=REPO,
                   check=True, capture_output=True)
    zsad = args.zsad or os.path.join(REPO, "target", "release", "zsad")

    with tempfile.TemporaryDirectory(prefix="zsad-throughput-") as tmp:
        # The page cache warmed for both runs alike.
        for path in images:
            with open(path, "rb") as f:
                f.read()
        t_warm = run_detect(zsad, images[:args.warm], args.precision, args.batch,
                            os.path.join(tmp, "warm"), env)
        t_all = run_detect(zsad, images, args.precision, args.batch,
                           os.path.join(tmp, "all"), env)
    detect_ms = (t_all - t_warm) / (len(images) - args.warm) * 1000.0
    model_ms = backbone_ms(args.precision, args.batch, args.runs, env)
    ratio = model_ms / detect_ms
    result = {
        "cpu": cpu_name(), "threads": args.threads or os.cpu_count(),
        "precision": args.precision, "batch": args.batch, "images": len(images),
        "warm_images": args.warm, "detect_wall_s": {"warm": t_warm, "all": t_all},
        "detect_ms_per_image": detect_ms, "backbone_ms_per_image": model_ms,
        "detect_images_per_second": 1000.0 / detect_ms,
        "backbone_images_per_second": 1000.0 / model_ms,
        "fraction_of_backbone": ratio,
    }
    print("CPU: %s, %s threads, %s, batch %d, %d images (%s)" %
          (result["cpu"], result["threads"], args.precision, args.batch, len(images), args.images))
    print("| | ms per image | images/s |")
    print("|---|---|---|")
    print("| backbone alone (encoder bench, ViT-B-16@224) | %.1f | %.2f |" % (model_ms, 1000 / model_ms))
    print("| `zsad detect` steady state (maps + heatmaps) | %.1f | %.2f |" % (detect_ms, 1000 / detect_ms))
    print("detect / backbone throughput: %.3f (goal >= 0.95)" % ratio)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
