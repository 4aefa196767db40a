"""Training speed: the tutorial's loop vs train_blip.py, same model, data and machine, one run.

    python benchmarks/bench_train.py                      # both paths, about 10 minutes on 2 CPU cores
    python benchmarks/bench_train.py --RUN=baseline       # only the tutorial's loop
    python benchmarks/bench_train.py --OURS_ARGS='["--BATCH_SIZE=8"]'   # pass settings to train_blip.py

Model: the full BLIP-base architecture, `BlipConfig()` with random weights (224M parameters: the real
cost), built once into MODEL_DIR together with the real processor. Data: mirror images served over
local HTTP to download_coco.py (the real pipeline), so the captions carry the tutorial's mistakes.
Each path runs in its own subprocess, so its memory is its own: peak RSS is os.wait4's ru_maxrss
(the largest single process), peak PSS sums the process tree (DataLoader workers included, shared
pages counted once), sampled every second. The last line is the ratio of samples/s.

The baseline runs twice: as written, and with denormal floats flushed to zero (one line,
torch.set_flush_denormal, which train_blip.py also does). Random weights produce tiny gradients
that x86 CPUs handle ~100x slower, which may not happen with real weights; the last line compares
with the flushed baseline, so that artefact never inflates the ratio.

Roofline (benchmarks/roofline.py): before the paths run, a short probe times the model's own
matmul shapes (4 x 577 tokens by 768x768, 768x3072, 3072x768) in the precision train_blip.py's
PRECISION resolves to (and in fp32 for the baseline), best of CEILING_REPEATS, all threads. Model
FLOPs per sample are counted with torch's FlopCounterMode (a matmul counts 2*M*N*K; elementwise
work is not counted): for ours, one optimizer step of train_blip.py's own path with the prefix
cache filled (the steady state its samples/s measures); for the baseline, its first (untimed)
sample. Achieved GFLOP/s = counted FLOPs x measured samples/s, shown as a share of the ceiling.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))
sys.path.insert(0, str(_REPO / "benchmarks"))

import roofline  # noqa: E402

import common  # noqa: E402
import families  # noqa: E402

# ---- model and data
MODEL_DIR = ".cache/blip-random-base"  # built once from BlipConfig() + PROCESSOR_DIR if absent (gitignored)
PROCESSOR_DIR = "../shared/blip_processor"  # the real BLIP-base processor files
MIRROR_DIR = "../shared/coco_mirror"  # a COCO-layout folder, served on 127.0.0.1 to download_coco.py
DATA_DIR = ".cache/bench-train-data"  # where download_coco.py writes the images and captions.json
NUM_IMAGES = 32  # training images (>= 8); both paths read the same captions.json
# ---- the tutorial's recipe (both paths)
LORA_R = 16  # LoRA rank
LORA_ALPHA = 32  # LoRA scale numerator
LORA_DROPOUT = 0.05  # dropout on the LoRA input
LORA_TARGETS = list(families.Blip.lora_targets)  # the tutorial's target modules
LR = 3e-5  # AdamW learning rate
GRAD_ACCUM = 4  # samples per optimizer step in the baseline (batch size 1)
# ---- baseline timing
BASELINE_WARMUP = 4  # untimed samples first (a multiple of GRAD_ACCUM)
BASELINE_SAMPLES = 16  # timed samples (a multiple of GRAD_ACCUM)
BASELINE_FLUSH_DENORMALS = [False, True]  # baseline runs: as written (False), with flushed denormals (True)
# ---- ours
OURS_EPOCHS = 3  # train_blip.py epochs; it reports samples/s after the first (prefix cache warm)
OURS_ARGS = []  # extra --NAME=value settings for train_blip.py, e.g. ["--BATCH_SIZE=8"]
# ---- roofline
ROOFLINE = True  # probe the matmul ceiling first and count model FLOPs (adds ~1 minute)
CEILING_REPEATS = 8  # timed calls per matmul shape in the ceiling probe (the best one counts)
# ---- run
RUN = "both"  # both | baseline | ours  (baseline-child: used internally for the baseline subprocess)
RESULTS_PATH = "benchmarks/results/train.json"  # all figures, machine and commands (gitignored)


# ----------------------------------------------------------------------------- setup
def repo_path(path: str | Path) -> Path:
    """Relative paths are relative to the repository, wherever the benchmark is started from."""
    path = Path(path)
    return path if path.is_absolute() else _REPO / path


def ensure_random_blip(model_dir: Path, processor_dir: Path) -> Path:
    """Save BlipConfig() (BLIP-base shapes, seeded random weights) plus the real processor, once."""
    if (model_dir / "config.json").exists():
        return model_dir
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    if not (processor_dir / "tokenizer_config.json").exists():
        raise common.UserError(f"no BLIP processor in {processor_dir}; set --PROCESSOR_DIR")
    print(f"building the random BLIP-base model in {model_dir} (once)")
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(dir=model_dir.parent if model_dir.parent.exists() else None, prefix=".blip-"))
    BlipForConditionalGeneration(BlipConfig()).save_pretrained(tmp)
    BlipProcessor.from_pretrained(processor_dir).save_pretrained(tmp)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, model_dir)  # whole or absent
    return model_dir


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def download_data(mirror: Path, data_dir: Path, num_images: int) -> Path:
    """Run download_coco.py against the mirror on a local HTTP server (images already there are kept)."""
    import download_coco

    if not (mirror / "annotations").is_dir():
        raise common.UserError(f"no COCO mirror at {mirror}; set --MIRROR_DIR")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(mirror)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        download_coco.main(
            [
                f"--COCO_BASE_URL=http://127.0.0.1:{server.server_address[1]}",
                "--SPLIT=val2017",
                f"--NUM_IMAGES={num_images}",
                "--NUM_TEST_IMAGES=1",
                f"--OUTPUT_DIR={data_dir}",
                f"--SAMPLES_DIR={data_dir}-samples",
                f"--ANNOTATIONS_DIR={data_dir}-annotations",
            ]
        )
    finally:
        server.shutdown()
        server.server_close()
    return data_dir


def machine() -> dict:
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "bf16_native": common.cpu_supports_bf16(),
        "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


# ----------------------------------------------------------------------------- the tutorial's loop
def tutorial_loop(cfg: dict, model_dir: Path, data_dir: Path) -> dict:
    """Batch size 1, fp32, the processor called per sample in the loop, LoRA via peft, AdamW with
    gradient accumulation. Written out plainly, the way the tutorial does it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    torch.manual_seed(0)
    # The tutorial does not flush denormals. Random weights make tiny gradients that x86 handles
    # ~100x slower, which real weights may not; the True variant shows how much of the ratio that is.
    flush = bool(cfg["BASELINE_FLUSH_DENORMALS"][0])  # a child runs one variant
    torch.set_flush_denormal(flush)
    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir)
    lora = LoraConfig(
        r=cfg["LORA_R"],
        lora_alpha=cfg["LORA_ALPHA"],
        lora_dropout=cfg["LORA_DROPOUT"],
        target_modules=list(cfg["LORA_TARGETS"]),
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["LR"])
    captions = list(json.loads((data_dir / "captions.json").read_text()).items())

    model.train()
    n_warm, n_timed, accum = cfg["BASELINE_WARMUP"], cfg["BASELINE_SAMPLES"], cfg["GRAD_ACCUM"]
    flops = None
    for i in range(n_warm + n_timed):
        if i == n_warm:
            start = time.perf_counter()
        file_name, caption = captions[i % len(captions)]
        image = Image.open(data_dir / file_name).convert("RGB")
        inputs = processor(images=image, text=caption, return_tensors="pt")
        # The first (untimed) sample's forward and backward are counted: the baseline's FLOPs per sample.
        with roofline.FlopCount() if i == 0 and cfg["ROOFLINE"] else contextlib.nullcontext() as count:
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            (loss / accum).backward()
        if count is not None:
            flops = {
                "flops_per_sample": count.total,
                "caption_tokens": [int(inputs["input_ids"].shape[1])],
                "by_op_gflop": {k: round(v / 1e9, 2) for k, v in count.by_op.items()},
            }
        if (i + 1) % accum == 0:
            optimizer.step()
            optimizer.zero_grad()
        print(f"baseline sample {i + 1}/{n_warm + n_timed} loss {loss.item():.3f}", flush=True)
    elapsed = time.perf_counter() - start
    return {
        "samples_per_s": n_timed / elapsed,
        "timed_samples": n_timed,
        "timed_s": elapsed,
        "batch_size": 1,
        "precision": "fp32",
        "flush_denormals": flush,
        "flops": flops,
    }


# ----------------------------------------------------------------------------- subprocesses
def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process and its children (DataLoader workers): shared pages are
    split between the processes that map them, so forked workers are not counted twice."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_full_info().pss
    return total / 2**20


def run_measured(cmd: list[str], log_path: Path) -> dict:
    """Run cmd (output to log_path and our stdout); return its exit code, wall time and peak memory."""
    start = time.perf_counter()
    peak_pss = [0.0]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=_REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done = threading.Event()

        def sample():  # once a second: cheap, and memory peaks last many seconds here
            while not done.wait(1.0):
                peak_pss[0] = max(peak_pss[0], tree_pss_mb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for line in proc.stdout:
            log.write(line)
            line = line.rstrip().split("\r")[-1]  # the last state of a progress bar
            if line and not line.endswith(("it/s]", "s/it]")):  # bars stay in the log file
                print("  | " + line[:160], flush=True)
        done.set()
        sampler.join()
        # wait4 gives this child's own rusage, so each path's peak RSS is its own.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "peak_tree_pss_mb": peak_pss[0],
        "command": " ".join(cmd),
        "log": str(log_path),
    }


def baseline_in_subprocess(cfg: dict, out: Path, flush_denormals: bool) -> dict:
    name = "baseline_flushed" if flush_denormals else "baseline"
    result_file = out / f"{name}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--RUN=baseline-child",
        f"--RESULTS_PATH={result_file}",
        f"--BASELINE_FLUSH_DENORMALS=[{flush_denormals}]",
    ]
    for key in (
        "MODEL_DIR",
        "DATA_DIR",
        "BASELINE_WARMUP",
        "BASELINE_SAMPLES",
        "LR",
        "GRAD_ACCUM",
        "LORA_R",
        "LORA_ALPHA",
        "LORA_DROPOUT",
        "ROOFLINE",
    ):
        cmd.append(f"--{key}={cfg[key]}")
    cmd.append(f"--LORA_TARGETS={json.dumps(list(cfg['LORA_TARGETS']))}")
    run = run_measured(cmd, out / f"{name}.log")
    if run["returncode"] != 0:
        raise common.UserError(f"the baseline failed (exit {run['returncode']}); see {run['log']}")
    return {**json.loads(result_file.read_text())["baseline"], **run}


def ours_in_subprocess(cfg: dict, out: Path, model_dir: Path, data_dir: Path) -> dict:
    """train_blip.py's own code path with its defaults (the tutorial's LoRA and optimiser)."""
    script = _REPO / "train_blip.py"
    if not script.exists():
        raise common.UserError("train_blip.py is not there yet; run with --RUN=baseline")
    output_dir = out / "train_blip_output"
    cmd = [
        sys.executable,
        str(script),
        f"--MODEL_ID={model_dir}",
        f"--DATA_DIR={data_dir}",
        f"--OUTPUT_DIR={output_dir}",
        f"--EPOCHS={cfg['OURS_EPOCHS']}",
        *cfg["OURS_ARGS"],
    ]
    run = run_measured(cmd, out / "ours.log")
    if run["returncode"] != 0:
        raise common.UserError(f"train_blip.py failed (exit {run['returncode']}); see {run['log']}")
    results = json.loads((output_dir / "train_results.json").read_text())
    settings = json.loads((output_dir / "training_config.json").read_text())
    return {
        "samples_per_s": results["train_samples_per_s"],
        "own_peak_rss_mb": results.get("peak_rss_mb"),
        "settings": {
            k: settings.get(k)
            for k in (
                "BATCH_SIZE",
                "GRAD_ACCUM",
                "PRECISION",
                "LR",
                "LORA_R",
                "LORA_ALPHA",
                "LORA_DROPOUT",
                "LORA_TARGET_MODULES",
            )
        },
        "results": results,
        **run,
    }


# ----------------------------------------------------------------------------- roofline
def ours_precision(cfg: dict) -> str:
    """The precision train_blip.py will run in: its PRECISION (default or from OURS_ARGS), resolved."""
    import train_blip

    return common.resolve_precision(common.configure(vars(train_blip), cfg["OURS_ARGS"])["PRECISION"], "cpu")


def probe_ceilings(cfg: dict, precisions) -> dict:
    """{precision: matmul_ceiling result}; printed as it goes (a few seconds each)."""
    out = {}
    for precision in dict.fromkeys(precisions):
        c = out[precision] = roofline.matmul_ceiling(precision, repeats=cfg["CEILING_REPEATS"])
        print(
            f"matmul ceiling, {precision}: {c['gflops']:.1f} GFLOP/s (F.linear, best of {c['repeats']}, "
            f"{c['threads']} threads; per shape {c['per_shape_gflops']}; load average "
            f"{c['load_average_1min'][0]} -> {c['load_average_1min'][1]})",
            flush=True,
        )
    return out


def add_roofline(cfg: dict, report: dict, model_dir: Path, data_dir: Path, tmp: Path) -> None:
    """Counted FLOPs per sample, achieved GFLOP/s and the share of the ceiling, for each path run."""
    ceilings = report["ceiling"]
    if "ours" in report:
        o = report["ours"]
        precision = o["results"].get("precision") or ours_precision(cfg)
        if precision not in ceilings:  # train_blip.py resolved 'auto' differently from the probe
            ceilings.update(probe_ceilings(cfg, [precision]))
        print("== counting the FLOPs of one steady-state step of train_blip.py ==", flush=True)
        o["flops"] = roofline.train_step_flops(str(model_dir), str(data_dir), cfg["OURS_ARGS"], out_dir=tmp)
        o["roofline"] = roofline.share(
            o["flops"]["flops_per_sample"], o["samples_per_s"], ceilings[precision]
        )
        epochs_s = sum(o["results"].get("epoch_train_time_s") or [])
        o["outside_epochs_s"] = round(o["wall_s"] - epochs_s, 1)  # load, cache plan, validation, saving
    for key in ("baseline", "baseline_flushed"):
        if report.get(key, {}).get("flops"):
            b = report[key]
            b["roofline"] = roofline.share(
                b["flops"]["flops_per_sample"], b["samples_per_s"], ceilings["fp32"]
            )


# ----------------------------------------------------------------------------- main
def check_config(cfg: dict) -> None:
    if cfg["RUN"] not in ("both", "baseline", "ours", "baseline-child"):
        raise common.UserError(f"RUN={cfg['RUN']!r}; valid values: both, baseline, ours")
    for name in ("BASELINE_WARMUP", "BASELINE_SAMPLES"):
        if cfg[name] <= 0 or cfg[name] % cfg["GRAD_ACCUM"]:
            raise common.UserError(
                f"{name}={cfg[name]} must be a positive multiple of GRAD_ACCUM={cfg['GRAD_ACCUM']}"
            )
    if cfg["NUM_IMAGES"] < 8:
        raise common.UserError(f"NUM_IMAGES={cfg['NUM_IMAGES']} is too few to time; use 8 or more")


def main(argv=None):
    cfg = common.configure(globals(), argv, __doc__)
    common.print_config(cfg, "bench_train.py")
    check_config(cfg)
    model_dir, data_dir = repo_path(cfg["MODEL_DIR"]), repo_path(cfg["DATA_DIR"])
    results_path = repo_path(cfg["RESULTS_PATH"])

    if cfg["RUN"] == "baseline-child":  # inside the subprocess that baseline_in_subprocess starts
        result = {"baseline": tutorial_loop(cfg, model_dir, data_dir), "machine": machine()}
        common.atomic_write_json(results_path, result)
        print(f"baseline: {result['baseline']['samples_per_s']:.3f} samples/s")
        return result

    ensure_random_blip(model_dir, repo_path(cfg["PROCESSOR_DIR"]))
    download_data(repo_path(cfg["MIRROR_DIR"]), data_dir, cfg["NUM_IMAGES"])
    report = {"machine": machine(), "config": cfg, "flop_note": roofline.FLOP_NOTE}
    if cfg["ROOFLINE"]:  # first, on a machine not yet busy with the paths
        wanted = ["fp32"] if cfg["RUN"] in ("both", "baseline") else []
        wanted += [ours_precision(cfg)] if cfg["RUN"] in ("both", "ours") else []
        report["ceiling"] = probe_ceilings(cfg, wanted)
    # "baseline": the tutorial's loop as written; "baseline_flushed": the same with denormals flushed.
    paths = [("baseline_flushed" if f else "baseline", bool(f)) for f in cfg["BASELINE_FLUSH_DENORMALS"]]
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        out = Path(tmp)
        if cfg["RUN"] in ("both", "baseline"):
            for key, flush in paths:
                print(
                    f"== {key}: the tutorial's loop{' with flushed denormals' if flush else ''} ==",
                    flush=True,
                )
                report[key] = baseline_in_subprocess(cfg, out, flush)
        if cfg["RUN"] in ("both", "ours"):
            print("== ours: train_blip.py ==", flush=True)
            report["ours"] = ours_in_subprocess(cfg, out, model_dir, data_dir)
        report["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
        if cfg["ROOFLINE"]:
            add_roofline(cfg, report, model_dir, data_dir, out)
        for key in ("baseline", "baseline_flushed", "ours"):
            report.get(key, {}).pop("log", None)  # the temporary folder is gone after this run

    m = report["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, bf16 native: {m['bf16_native']}, "
        f"load average {m['load_average_1min']} -> {m['load_average_1min_after']}"
    )
    for key in ("baseline", "baseline_flushed", "ours"):
        if key in report:
            r = report[key]
            print(
                f"{key:>16}: {r['samples_per_s']:.3f} samples/s, peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(largest process), peak PSS {r['peak_tree_pss_mb']:.0f} MB (process tree, sampled 1/s)"
            )
    if "ours" in report:
        o = report["ours"]
        same = sorted(o["settings"]["LORA_TARGET_MODULES"] or []) == sorted(cfg["LORA_TARGETS"])
        shown = {k: v for k, v in o["settings"].items() if k != "LORA_TARGET_MODULES"}
        print(
            f"ours: train_blip.py with {shown}, LoRA targets {'as the baseline' if same else 'DIFFERENT'}; "
            f"samples/s per epoch {o['results'].get('epoch_samples_per_s')} "
            f"(the first fills the prefix cache)"
        )
        if "outside_epochs_s" in o:
            outside = o["outside_epochs_s"]
            print(
                f"ours: {o['wall_s']:.1f} s whole process, {outside:.1f} s of it outside training epochs "
                f"({100 * outside / o['wall_s']:.0f}%: start-up, validation, sample captions, saving)"
            )
        for key in ("baseline", "baseline_flushed"):
            if key in report:
                report[f"speedup_vs_{key}"] = o["samples_per_s"] / report[key]["samples_per_s"]
                report[f"extra_rss_mb_vs_{key}"] = o["peak_rss_mb"] - report[key]["peak_rss_mb"]
    if cfg["ROOFLINE"]:
        print(f"roofline ({roofline.FLOP_NOTE}; rate = samples/s above):")
        for key in ("baseline", "baseline_flushed", "ours"):
            if "roofline" in report.get(key, {}):
                print(roofline.describe(key, report[key]["roofline"], "sample"))
        if "time_breakdown" in report.get("ours", {}).get("flops", {}):
            print(
                f"{'ours, profiled':>16}: "
                + roofline.describe_breakdown(report["ours"]["flops"]["time_breakdown"])
            )
    common.atomic_write_json(results_path, report)
    # The headline compares with the flushed baseline where there is one: it is the fairer (the
    # slower figure as written may be an artefact of random weights), and the smaller ratio.
    keys = [k for k in ("baseline", "baseline_flushed") if f"speedup_vs_{k}" in report]
    for key in sorted(keys, key=lambda k: k == "baseline_flushed"):
        b, o = report[key], report["ours"]
        print(f"peak RSS: ours - {key} = {report[f'extra_rss_mb_vs_{key}']:+.0f} MB (target <= +1024 MB)")
        print(
            f"train samples/s: {key} {b['samples_per_s']:.3f}, ours {o['samples_per_s']:.3f}, "
            f"ratio {report[f'speedup_vs_{key}']:.2f}x"
        )
    return report


if __name__ == "__main__":
    common.cli(main)()
