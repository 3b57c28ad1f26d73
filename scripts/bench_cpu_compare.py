#!/usr/bin/env python3
"""zsad against OpenVINO and PyTorch on this machine's CPU, in one run: the CLIP image tower
forward at ViT-B/16@224 and ViT-L/14@518, f32 and (where the CPU has AVX512-BF16 or AMX-BF16)
bf16, same thread count and batch for every engine. Prints ms per image, GFLOP/s and the
ratios zsad/OpenVINO and zsad/PyTorch as a Markdown table; --json writes everything.

  scripts/bench_cpu_compare.sh [--setup] [options]         (entry point: picks the venv)
  python scripts/bench_cpu_compare.py --threads 2 --json out.json
  python scripts/bench_cpu_compare.py --models b16 --precisions f32 --engines pytorch,openvino

The engines, all on one model: transformers' CLIPVisionModel with random weights of the real
shapes, built by scripts/time_pytorch.py's vision_model (ViT-B/16 at 224; ViT-L/14-336 run at
518 px with the position embedding interpolated, 37x37+1 = 1370 tokens):
  pytorch    eager, torch.inference_mode(); bf16 = torch.autocast("cpu", dtype=torch.bfloat16)
  openvino   openvino.convert_model of that same module, reshaped to the static input shape,
             compiled for CPU with INFERENCE_PRECISION_HINT f32|bf16, INFERENCE_NUM_THREADS N,
             PERFORMANCE_HINT LATENCY (the properties as compiled are read back into the JSON,
             with the kernels each layer type got, e.g. brgemm_avx512_amx)
  onnxruntime (only with --engines ...,onnxruntime; f32 only) torch.onnx.export of the module
  zsad       `cargo bench --bench encoder -- <config>` (or --zsad-bin, a built bench binary)
             with RAYON_NUM_THREADS=N, OMP_NUM_THREADS=N, ZSAD_BENCH_RUNS, ZSAD_BENCH_BATCH,
             ZSAD_BENCH_PRECISION; its "<config>  X ms/image (median of R, min Y)" line is
             parsed. zsad builds its own random weights of the same shapes (speed does not
             depend on the values), so its outputs are not compared; PyTorch's and OpenVINO's
             are (max abs difference of last_hidden_state, same seed, same input).

Each Python engine runs in its own process (no engine's idle thread pool beside another's),
with one warm-up pass (two for OpenVINO), then timed passes until at least --min-runs passes
and --min-time seconds (at most --max-runs); the figure is the median pass divided by the
batch. zsad's pass count is picked the same way from the other engines' time in that cell.
With --rounds R the whole sequence repeats R times and each figure is the best round's
(--stat min: the fastest single pass instead of the median, for hosts shared with other work).
"""
import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# key: (time_pytorch.VISION arch, image size, zsad bench config name, label)
MODELS = {
    "b16": ("ViT-B-16", 224, "ViT-B-16@224", "ViT-B/16@224"),
    "l14": ("ViT-L-14-336", 518, "ViT-L-14-336@518", "ViT-L/14@518"),
}
ENGINES = ("zsad", "openvino", "pytorch", "onnxruntime")
FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                     "amx_tile", "amx_bf16", "amx_int8")


def vit_gflop(arch, size):
    """Multiply-add FLOPs (x2) of one CLIPVisionModel forward, per image, in GFLOP.

    With P = (size/patch)^2 patches, T = P + 1 tokens, width d, MLP width m, L layers:
        patch embedding   2 * P * d * (3 * patch^2)
        per layer         2 * T * (4 d^2 + 2 d m)      q, k, v, out projections and the MLP
                        + 4 * T^2 * d                  Q K^T and (softmax) V, all heads
        total = patch embedding + L * per layer
    LayerNorm, softmax, GELU, biases and the position-embedding resize are not counted. This
    is benches/encoder.rs's count without its 2*d*embed visual projection (CLIPVisionModel has
    none; it is < 0.01% of the total). ViT-B/16@224: 35.1 GFLOP, ViT-L/14@518: 1013 GFLOP.
    """
    from time_pytorch import VISION
    d, layers, _, m, patch, _ = VISION[arch]
    p = (size // patch) ** 2
    t = p + 1
    flops = 2 * p * d * 3 * patch * patch + layers * (2 * t * (4 * d * d + 2 * d * m) + 4 * t * t * d)
    return flops / 1e9


# ---------------------------------------------------------------------------------------------
# Machine description


def cpu_info():
    info = {"model_name": None, "flags": {}, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)), "physical_cores": None,
            "kernel": platform.release(), "hypervisor": None}
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and info["model_name"] is None:
                    info["model_name"] = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
                elif key in ("vendor_id", "cpu family", "model", "stepping") and key not in info:
                    info[key] = val.strip()
    except OSError:
        pass
    info["flags"] = {f: f in flags for f in FLAGS_OF_INTEREST}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "Model name":
                info["model_name"] = val.strip()
            elif key.strip() == "Hypervisor vendor":
                info["hypervisor"] = val.strip()
        out = subprocess.run(["lscpu", "-p=core,socket"], capture_output=True, text=True,
                             check=True).stdout
        info["physical_cores"] = len({l for l in out.splitlines() if l and not l.startswith("#")})
    except (OSError, subprocess.CalledProcessError):
        pass
    # A VM often shows only "Intel(R) Xeon(R) Processor": the family/model says which one.
    intel = {"85": "Skylake/Cascade Lake/Cooper Lake-SP", "106": "Ice Lake-SP",
             "143": "Sapphire Rapids", "207": "Emerald Rapids", "173": "Granite Rapids"}
    amd = {"25": "Zen 3/Zen 4", "26": "Zen 5"}
    if info.get("vendor_id") == "GenuineIntel" and info.get("cpu family") == "6":
        info["microarchitecture"] = intel.get(info.get("model"))
    elif info.get("vendor_id") == "AuthenticAMD":
        info["microarchitecture"] = amd.get(info.get("cpu family"))
    else:
        info["microarchitecture"] = None
    info["has_bf16"] = info["flags"]["avx512_bf16"] or info["flags"]["amx_bf16"]
    return info


def versions():
    v = {"python": platform.python_version()}
    for mod in ("torch", "openvino", "transformers", "numpy", "onnxruntime"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "?")
        except Exception:  # noqa: BLE001 - an absent or broken module is reported, not fatal
            v[mod] = None
    for name, cmd in (("rustc", ["rustc", "--version"]),
                      ("zsad_commit", ["git", "-C", REPO, "rev-parse", "--short", "HEAD"])):
        try:
            v[name] = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            v[name] = None
    try:
        lock = open(os.path.join(REPO, "Cargo.lock")).read()
        m = re.search(r'name = "candle-core"\nversion = "([^"]+)"', lock)
        v["candle_core"] = m.group(1) if m else None
    except OSError:
        v["candle_core"] = None
    return v


# ---------------------------------------------------------------------------------------------
# Workers (one process per engine and cell)


def measure(fn, warmup, min_runs, min_time, max_runs):
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < min_runs or (sum(times) < min_time and len(times) < max_runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def build_tower(arch, size):
    """time_pytorch.py's CLIPVisionModel (seed 0) in a module that takes the pixels alone."""
    import torch
    from time_pytorch import VISION, vision_model

    model = vision_model(arch)
    interp = size != VISION[arch][5]

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values, interpolate_pos_encoding=interp)
            return out.last_hidden_state, out.pooler_output

    return Tower().eval()


def make_input(batch, size):
    import torch
    g = torch.Generator().manual_seed(1234)
    return torch.randn(batch, 3, size, size, generator=g)


def worker(args):
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    arch, size, _, _ = MODELS[args.model]
    px = make_input(args.batch, size)
    res = {"engine": args.worker}
    t0 = time.perf_counter()
    tower = build_tower(arch, size)
    res["build_s"] = time.perf_counter() - t0
    timing = dict(warmup=1, min_runs=args.min_runs, min_time=args.min_time, max_runs=args.max_runs)

    if args.worker == "pytorch":
        def run():
            with torch.inference_mode():
                if args.precision == "bf16":
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        return tower(px)
                return tower(px)
        first = run()[0].float().numpy()
        res["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        res["times_s"] = measure(run, **timing)

    elif args.worker == "openvino":
        import openvino as ov
        t0 = time.perf_counter()
        with torch.inference_mode():
            ov_model = ov.convert_model(tower, example_input=(px,))
        ov_model.reshape(list(px.shape))
        config = {"INFERENCE_PRECISION_HINT": args.precision,
                  "INFERENCE_NUM_THREADS": args.threads,
                  "PERFORMANCE_HINT": "LATENCY"}
        for kv in args.ov_config or []:
            k, _, v = kv.partition("=")
            config[k] = v
        compiled = ov.Core().compile_model(ov_model, "CPU", config)
        res["convert_compile_s"] = time.perf_counter() - t0
        res["config_requested"] = {k: str(v) for k, v in config.items()}
        props = {}
        for k in ("INFERENCE_PRECISION_HINT", "INFERENCE_NUM_THREADS", "PERFORMANCE_HINT",
                  "NUM_STREAMS", "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING",
                  "EXECUTION_MODE_HINT", "DYNAMIC_QUANTIZATION_GROUP_SIZE", "EXECUTION_DEVICES"):
            try:
                props[k] = str(compiled.get_property(k))
            except Exception:  # noqa: BLE001 - a property this version lacks
                pass
        res["config_compiled"] = props
        # Which kernel and precision each compute layer got (shows AMX / bf16 use; OpenVINO's
        # fused attention and element-wise chains are "Subgraph").
        kernels = {}
        for op in compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            layer = rt["layerType"].astype(str)
            if layer not in ("Const", "Input", "Output", "Reshape", "Transpose", "Reorder",
                             "Gather", "Concatenation"):
                key = "%s: %s %s" % (layer, rt["primitiveType"].astype(str),
                                     rt["runtimePrecision"].astype(str))
                kernels[key] = kernels.get(key, 0) + 1
        res["kernels"] = kernels
        req = compiled.create_infer_request()
        req.set_input_tensor(ov.Tensor(np.ascontiguousarray(px.numpy())))
        req.infer()
        first = np.array(req.get_output_tensor(0).data, dtype=np.float32)
        timing["warmup"] = 2
        res["times_s"] = measure(req.infer, **timing)

    elif args.worker == "onnxruntime":
        import onnxruntime as ort
        path = os.path.join(args.tmp, "tower-%s.onnx" % args.model)
        t0 = time.perf_counter()
        if not os.path.exists(path):
            with torch.inference_mode():
                torch.onnx.export(tower, (px,), path, input_names=["pixel_values"],
                                  output_names=["last_hidden_state", "pooler_output"],
                                  opset_version=17, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        res["convert_compile_s"] = time.perf_counter() - t0
        feed = {"pixel_values": px.numpy()}
        first = sess.run(["last_hidden_state"], feed)[0]
        res["times_s"] = measure(lambda: sess.run(None, feed), **timing)
    else:
        raise SystemExit("unknown worker %r" % args.worker)

    np.save(args.dump, first)
    with open(args.out, "w") as f:
        json.dump(res, f)


# ---------------------------------------------------------------------------------------------
# zsad (the encoder bench)

ZSAD_LINE = re.compile(
    r"^(?P<name>\S+)\s+(?P<ms>[\d.]+) ms/image \(median of (?P<runs>\d+), min (?P<min>[\d.]+)\)"
    r"\s+(?P<gflops>[\d.]+) GFLOP/s")
ZSAD_HEADER = re.compile(r"^threads: (?P<threads>\d+), precision: (?P<precision>\w+)"
                         r"(?:, batch: (?P<batch>\d+))?")


def parse_zsad(stdout, config):
    """The encoder bench's line for `config` (exact name: its filter is a substring match, so
    "ViT-B-16@224" also runs and prints "ViT-B-16@224+vv", which is skipped here)."""
    header, line = None, None
    for raw in stdout.splitlines():
        m = ZSAD_HEADER.match(raw.strip())
        if m:
            header = m
        m = ZSAD_LINE.match(raw.strip())
        if m and m.group("name") == config:
            line = m
    if line is None:
        raise RuntimeError("no line for %s in the encoder bench's output:\n%s" % (config, stdout))
    return {"ms_median": float(line.group("ms")), "ms_min": float(line.group("min")),
            "runs": int(line.group("runs")), "zsad_gflops": float(line.group("gflops")),
            "header_threads": int(header.group("threads")) if header else None,
            "header_precision": header.group("precision") if header else None,
            "header_batch": int(header.group("batch")) if header and header.group("batch") else None}


def zsad_command(args, config):
    if args.zsad_bin:
        return [args.zsad_bin, config]
    cmd = ["cargo", "bench", "--bench", "encoder"]
    if args.zsad_features:
        cmd += ["--features", args.zsad_features]
    return cmd + ["--", config]


def zsad_env(args, precision, batch, runs):
    env = dict(os.environ)
    env.update({
        "RAYON_NUM_THREADS": str(args.threads),   # rayon's pool and candle's (same variable)
        "OMP_NUM_THREADS": str(args.threads),     # oneDNN, with --zsad-features onednn
        "ZSAD_BENCH_RUNS": str(runs),
        "ZSAD_BENCH_BATCH": str(batch),
        "ZSAD_BENCH_PRECISION": precision,
        # Asks the bench to skip the "+vv" configurations; a bench that does not read it runs
        # them too (more time, same figures).
        "ZSAD_BENCH_VV": "0",
    })
    return env


def run_zsad(args, model, precision, batch, runs):
    _, _, config, _ = MODELS[model]
    cmd = zsad_command(args, config)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=zsad_env(args, precision, batch, runs),
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError("%s failed (%d):\n%s\n%s" % (" ".join(cmd), p.returncode,
                                                       p.stdout[-3000:], p.stderr[-3000:]))
    res = parse_zsad(p.stdout, config)
    if res["header_threads"] not in (None, args.threads):
        raise RuntimeError("zsad ran on %s threads, not %d" % (res["header_threads"], args.threads))
    if res["header_precision"] not in (None, precision):
        raise RuntimeError("zsad ran in %s, not %s" % (res["header_precision"], precision))
    if res["header_batch"] not in (None, batch):
        raise RuntimeError("zsad ran batch %s, not %d" % (res["header_batch"], batch))
    res["wall_s"] = time.perf_counter() - t0
    res["command"] = "RAYON_NUM_THREADS=%d OMP_NUM_THREADS=%d ZSAD_BENCH_RUNS=%d ZSAD_BENCH_BATCH=%d " \
        "ZSAD_BENCH_PRECISION=%s ZSAD_BENCH_VV=0 %s" % (args.threads, args.threads, runs, batch,
                                                        precision, " ".join(cmd))
    return res


# ---------------------------------------------------------------------------------------------
# Orchestration


def run_worker(args, engine, model, precision, batch, tmp, tag):
    out = os.path.join(tmp, "%s.json" % tag)
    dump = os.path.join(tmp, "%s.npy" % tag)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model", model,
           "--precision", precision, "--batch", str(batch), "--threads", str(args.threads),
           "--min-runs", str(args.min_runs), "--min-time", str(args.min_time),
           "--max-runs", str(args.max_runs), "--out", out, "--dump", dump, "--tmp", tmp]
    for kv in args.ov_config or []:
        cmd += ["--ov-config", kv]
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError("%s worker failed (%d):\n%s" % (engine, p.returncode, p.stderr[-4000:]))
    with open(out) as f:
        res = json.load(f)
    times = res.pop("times_s")
    res["runs"] = len(times)
    res["ms_median"] = statistics.median(times) * 1e3 / batch
    res["ms_min"] = min(times) * 1e3 / batch
    res["wall_s"] = time.perf_counter() - t0
    res["dump"] = dump
    return res


def fmt_ms(ms):
    return "%.0f" % ms if ms >= 100 else "%.1f" % ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="threads for every engine (default: every CPU this process may use)")
    ap.add_argument("--models", default="b16,l14", help="b16 (ViT-B/16@224), l14 (ViT-L/14@518)")
    ap.add_argument("--precisions", default=None,
                    help="f32,bf16 (default: f32, plus bf16 where /proc/cpuinfo has avx512_bf16 or amx_bf16)")
    ap.add_argument("--engines", default="zsad,openvino,pytorch",
                    help="any of zsad,openvino,pytorch,onnxruntime (onnxruntime: f32 only)")
    ap.add_argument("--batch5", action="store_true", help="also batch 5 (per-image times) for ViT-B/16")
    ap.add_argument("--min-runs", type=int, default=5, help="timed passes at least (default 5)")
    ap.add_argument("--min-time", type=float, default=3.0, help="timed seconds at least (default 3)")
    ap.add_argument("--max-runs", type=int, default=50, help="timed passes at most (default 50)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything; the best round counts")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="the figure per round: median pass (default) or fastest pass (noisy hosts)")
    ap.add_argument("--zsad-bin", help="a built encoder bench binary (target/release/deps/encoder-*) "
                    "instead of `cargo bench --bench encoder`")
    ap.add_argument("--zsad-features", help="cargo features for zsad's bench, e.g. onednn")
    ap.add_argument("--ov-config", action="append", metavar="KEY=VALUE",
                    help="extra OpenVINO compile property (repeatable)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep-going", action="store_true", help="report an engine that fails and go on")
    # worker mode (internal)
    ap.add_argument("--worker", choices=ENGINES[1:], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, HERE)

    if args.worker:
        worker(args)
        return

    cpu = cpu_info()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error("unknown model %r (b16, l14)" % m)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ENGINES:
            ap.error("unknown engine %r (%s)" % (e, ", ".join(ENGINES)))
    if args.precisions:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        if "bf16" in precisions and not cpu["has_bf16"]:
            print("note: this CPU has neither avx512_bf16 nor amx_bf16; bf16 runs emulated",
                  file=sys.stderr)
    else:
        precisions = ["f32"] + (["bf16"] if cpu["has_bf16"] else [])
    for p in precisions:
        if p not in ("f32", "bf16"):
            ap.error("unknown precision %r (f32, bf16)" % p)

    cells = []
    for m in models:
        for p in precisions:
            for b in ([1, 5] if (m == "b16" and args.batch5) else [1]):
                arch, size, config, label = MODELS[m]
                cells.append({"model": m, "label": label, "zsad_config": config, "image_size": size,
                              "precision": p, "batch": b, "gflop_per_image": vit_gflop(arch, size),
                              "engines": {}})

    ver = versions()
    print("# zsad vs OpenVINO vs PyTorch, CLIP image tower forward (scripts/bench_cpu_compare.py)")
    print("CPU: %s (family %s model %s stepping %s%s; %s); %d logical CPUs, %s physical cores; kernel %s" % (
        cpu["model_name"], cpu.get("cpu family"), cpu.get("model"), cpu.get("stepping"),
        ": " + cpu["microarchitecture"] if cpu["microarchitecture"] else "",
        "VM: " + cpu["hypervisor"] if cpu["hypervisor"] else "bare metal",
        cpu["logical_cpus"], cpu["physical_cores"], cpu["kernel"]))
    print("flags: " + ", ".join("%s %s" % (f, "yes" if v else "no") for f, v in cpu["flags"].items()))
    print("versions: " + ", ".join("%s %s" % (k, v) for k, v in ver.items() if v))
    print("threads: %d for every engine; passes: >= %d and >= %.1f s (<= %d), %s; rounds: %d"
          % (args.threads, args.min_runs, args.min_time, args.max_runs,
             "median" if args.stat == "median" else "fastest pass", args.rounds))
    sys.stdout.flush()

    if "zsad" in engines and not args.zsad_bin:
        print("building zsad's encoder bench (cargo bench --bench encoder --no-run) ...", file=sys.stderr)
        cmd = ["cargo", "bench", "--bench", "encoder", "--no-run"]
        if args.zsad_features:
            cmd += ["--features", args.zsad_features]
        subprocess.run(cmd, cwd=REPO, check=True)

    tmp = tempfile.mkdtemp(prefix="zsad-cpu-compare-")
    order = [e for e in ("pytorch", "openvino", "onnxruntime", "zsad") if e in engines]
    try:
        for rnd in range(args.rounds):
            for cell in cells:
                for engine in order:
                    if engine == "onnxruntime" and cell["precision"] != "f32":
                        continue
                    tag = "%s-%s-%s-b%d-r%d" % (engine, cell["model"], cell["precision"], cell["batch"], rnd)
                    print("[round %d] %s %s b%d: %s ..." % (rnd + 1, cell["label"], cell["precision"],
                                                            cell["batch"], engine), file=sys.stderr, end=" ")
                    sys.stderr.flush()
                    try:
                        if engine == "zsad":
                            others = [r["ms_median"] * cell["batch"] / 1e3
                                      for e, rs in cell["engines"].items() if e != "zsad"
                                      for r in rs["rounds"]]
                            runs = args.min_runs
                            if others:
                                runs = max(runs, min(args.max_runs, math.ceil(args.min_time / min(others))))
                            res = run_zsad(args, cell["model"], cell["precision"], cell["batch"], runs)
                        else:
                            res = run_worker(args, engine, cell["model"], cell["precision"],
                                             cell["batch"], tmp, tag)
                    except Exception as err:  # noqa: BLE001
                        if not args.keep_going:
                            raise
                        res = {"error": str(err)[-2000:]}
                        print("FAILED", file=sys.stderr)
                    else:
                        print("%.1f ms/image median, %.1f fastest (%d passes)" % (
                            res["ms_median"], res["ms_min"], res["runs"]), file=sys.stderr)
                    cell["engines"].setdefault(engine, {"rounds": []})["rounds"].append(res)

        # Best round per engine, GFLOP/s from one FLOP count for all, ratios, agreement.
        import numpy as np
        for cell in cells:
            for engine, rs in cell["engines"].items():
                ok = [r for r in rs["rounds"] if "ms_median" in r]
                if ok:
                    rs["ms"] = min(r["ms_" + args.stat] for r in ok)
                    rs["ms_min"] = min(r["ms_min"] for r in ok)
                    rs["gflops"] = cell["gflop_per_image"] / (rs["ms"] / 1e3)
            ms = {e: rs["ms"] for e, rs in cell["engines"].items() if "ms" in rs}
            cell["ratios"] = {}
            for other in ("openvino", "pytorch", "onnxruntime"):
                if "zsad" in ms and other in ms:
                    cell["ratios"]["zsad/" + other] = ms["zsad"] / ms[other]
        ref = {}
        for cell in cells:
            pt = cell["engines"].get("pytorch", {}).get("rounds", [{}])[0].get("dump")
            if cell["precision"] == "f32" and pt:
                ref[(cell["model"], cell["batch"])] = np.load(pt)
        for cell in cells:
            r = ref.get((cell["model"], cell["batch"]))
            cell["agreement"] = {}
            if r is None:
                continue
            for engine in ("pytorch", "openvino", "onnxruntime"):
                rounds = cell["engines"].get(engine, {}).get("rounds", [])
                if rounds and rounds[0].get("dump"):
                    out = np.load(rounds[0]["dump"])
                    cell["agreement"][engine] = float(np.abs(out - r).max())
            for rs in cell["engines"].values():
                for rr in rs["rounds"]:
                    rr.pop("dump", None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # Markdown table.
    has_ort = "onnxruntime" in engines
    print()
    print("| model | precision | batch | zsad ms/image | OpenVINO | PyTorch |%s zsad/OpenVINO | zsad/PyTorch |"
          % (" ONNX Runtime |" if has_ort else ""))
    print("|---|---|---|---|---|---|%s---|---|" % ("---|" if has_ort else ""))
    for cell in cells:
        def col(engine):
            rs = cell["engines"].get(engine)
            if rs is None:
                return "–"
            if "ms" not in rs:
                return "failed"
            return "%s (%.0f GFLOP/s)" % (fmt_ms(rs["ms"]), rs["gflops"])
        def ratio(key):
            v = cell["ratios"].get(key)
            return "–" if v is None else "%.2f×" % v
        row = [cell["label"], cell["precision"], str(cell["batch"]), col("zsad"), col("openvino"),
               col("pytorch")]
        if has_ort:
            row.append(col("onnxruntime") if cell["precision"] == "f32" else "–")
        row += [ratio("zsad/openvino"), ratio("zsad/pytorch")]
        print("| " + " | ".join(row) + " |")
    print()
    print("GFLOP per image: " + ", ".join(sorted({"%s %.1f" % (c["label"], c["gflop_per_image"])
                                                  for c in cells})))
    print("Goal (issue 25): zsad/OpenVINO <= 0.90 in every cell: " + (
        "met" if cells and all(c["ratios"].get("zsad/openvino", 9) <= 0.9 for c in cells)
        else "not met" if all("zsad/openvino" in c["ratios"] for c in cells) else "not measured"))
    for cell in cells:
        if cell["agreement"]:
            print("%s %s b%d, max |last_hidden_state - PyTorch f32|: %s" % (
                cell["label"], cell["precision"], cell["batch"],
                ", ".join("%s %.2e" % kv for kv in cell["agreement"].items())))
        ov = cell["engines"].get("openvino", {}).get("rounds", [{}])[0]
        if ov.get("kernels"):
            print("%s %s b%d, OpenVINO kernels: %s" % (cell["label"], cell["precision"], cell["batch"],
                                                       "; ".join("%s x%d" % kv for kv in sorted(ov["kernels"].items()))))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "versions": ver,
                       "settings": {k: getattr(args, k) for k in
                                    ("threads", "min_runs", "min_time", "max_runs", "rounds", "stat",
                                     "zsad_bin", "zsad_features", "ov_config")},
                       "engines": engines, "cells": cells}, f, indent=1)
        print("\nwrote " + args.json)


if __name__ == "__main__":
    main()
