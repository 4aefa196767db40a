"""Memory and start-up time of train_blip.py's data pipeline on a train2017-sized captions.json.

    python benchmarks/bench_large_split_train.py                  # 118,287 images, about 10 min here
    python benchmarks/bench_large_split_train.py --MAX_STEPS=100  # stream more batches

What it builds (in a temporary folder, removed afterwards):
- DATA_DIR with a captions.json of N_IMAGES entries (the real train2017 count), each naming its
  own file. The files are hard links to the 40 real COCO train2017 JPEGs of ../shared/coco_mirror
  (about 160 kB, 640x480 each), so every entry is a real image that must be opened and decoded, yet
  the folder costs 7 MB of disk. (Without ../shared, synthetic 640x480 JPEGs stand in.)
- A BLIP small enough for CPU (conftest.build_tiny_blip) but at the real 384 x 384 input, with the
  real processor, so every image goes through the real resize and normalisation.

What it runs: `python train_blip.py --MODEL_ID=<that> --DATA_DIR=<that> --MAX_STEPS=...` in a
child process, exactly as a user would, while this process samples the child's memory (its own
RSS and that of its DataLoader worker) every 50 ms and notes it at each line the child prints.
Reported: the peak RSS, the RSS at each stage (after imports, after the image check, after the
first and the last logged step), the time of each stage, and what holding the images in RAM would
have cost instead. Results go to benchmarks/results/bench_large_split_train.json.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import common  # noqa: E402

# ---- data
N_IMAGES = 118_287  # entries in captions.json (the real train2017 has 118,287 images)
SOURCE_IMAGES = str(REPO.parent / "shared" / "coco_mirror" / "train2017")  # real JPEGs to link to
PROCESSOR_DIR = str(REPO.parent / "shared" / "blip_processor")  # the real BLIP processor
IMAGE_SIZE = 384  # model input, as BLIP-base; the processor resizes every image to this
WORK_DIR = None  # None: a temporary folder, removed afterwards | a folder to keep (reused if filled)

# ---- the training run
MAX_STEPS = 50  # optimizer steps to stream (BATCH_SIZE images each)
BATCH_SIZE = 4  # train_blip.py's default
NUM_WORKERS = 1  # train_blip.py's default: one DataLoader process decodes images
VAL_FRACTION = 0.001  # about 118 validation images (validation runs once, at the stop)
EXTRA_ARGS = []  # more --NAME=value for train_blip.py, e.g. ["--PREFIX_CACHE=off"]
HEADER_SAMPLE = 5000  # files timed with a header-only check, for comparison with the full decode

WORDS = ["a", "an", "the", "man", "woman", "dog", "cat", "pizza", "table", "bus", "train", "sitting",
         "standing", "on", "in", "next", "to", "with", "of", "red", "large", "small"]  # fmt: skip


def build_data(data_dir: Path, n: int, sources: list[Path], seed: int = 0) -> dict:
    """captions.json with n entries, each file a hard link to one of `sources` (a few real JPEGs)."""
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    captions = {}
    for i in range(n):
        name = f"{i + 1:012d}.jpg"
        target = data_dir / name
        if not target.exists():
            os.link(
                sources[i % len(sources)], target
            )  # ext4 allows 65,000 links per file: 40 sources suffice
        captions[name] = " ".join(rng.choices(WORDS, k=rng.randint(8, 14))).capitalize() + "."
    common.atomic_write_json(data_dir / "captions.json", captions)
    return captions


def source_images(folder: Path, work: Path) -> tuple[list[Path], str]:
    found = sorted(folder.glob("*.jpg"))
    if found:
        local = work / "sources"  # copies on our own filesystem, so hard links always work
        local.mkdir(parents=True, exist_ok=True)
        for f in found:
            if not (local / f.name).exists():
                shutil.copy2(f, local / f.name)
        return sorted(local.glob("*.jpg")), f"{len(found)} real COCO train2017 JPEGs from {folder}"
    from PIL import Image

    local = work / "sources"
    local.mkdir(parents=True, exist_ok=True)
    for k in range(40):
        Image.effect_noise((640, 480), 30 + k).convert("RGB").save(
            local / f"synthetic_{k:02d}.jpg", quality=85
        )
    return sorted(local.glob("*.jpg")), "40 synthetic 640x480 JPEGs (../shared absent)"


def header_check_rate(data_dir: Path, names: list[str]) -> float:
    """Files per second for a header-only check (open, read the size, no decode)."""
    from PIL import Image

    start = time.perf_counter()
    for name in names:
        with Image.open(data_dir / name) as im:
            _ = im.width * im.height
    return len(names) / (time.perf_counter() - start)


class Sampler:
    """Samples a process tree's RSS (the child and, separately, its own children) every 50 ms."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak_main, self.peak_workers, self.stop = psutil.Process(pid), 0.0, 0.0, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def now(self) -> tuple[float, float]:
        import psutil

        try:
            main = self.proc.memory_info().rss / 2**20
            workers = sum(c.memory_info().rss for c in self.proc.children(recursive=True)) / 2**20
        except psutil.Error:
            return 0.0, 0.0
        return main, workers

    def run(self):
        while not self.stop:
            main, workers = self.now()
            self.peak_main, self.peak_workers = max(self.peak_main, main), max(self.peak_workers, workers)
            time.sleep(0.05)


def run_training(cmd: list[str], env: dict) -> dict:
    """Run train_blip.py, noting the time and RSS at the lines that mark its stages."""
    marks = {
        "== train_blip.py ==": "imports done",
        "warning: skipped": "images checked (some skipped)",
        "trainable params": "images checked, model loaded",
        "data:": "tokenized and split",
        "prefix cache:": "prefix cache planned",
        "epoch 1 step": "step",
        "done:": "done",
    }
    start = time.perf_counter()
    child = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    sampler = Sampler(child.pid)
    stages, log = [], []
    for line in child.stdout:
        log.append(line.rstrip("\n"))
        for part in line.replace("\r", "\n").split("\n"):
            for key, stage in marks.items():
                if part.strip().startswith(key) or (key == "epoch 1 step" and key in part):
                    main, workers = sampler.now()
                    stages.append(
                        {
                            "stage": stage,
                            "line": part.strip()[:160],
                            "t_s": round(time.perf_counter() - start, 1),
                            "rss_mb": round(main),
                            "worker_rss_mb": round(workers),
                        }
                    )
    child.wait()
    sampler.stop = True
    sampler.thread.join()
    return {
        "returncode": child.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "stages": stages,
        "peak_rss_mb": round(sampler.peak_main),
        "peak_worker_rss_mb": round(sampler.peak_workers),
        "log_tail": log[-40:],
    }


def main(argv=None):
    settings = {k: v for k, v in globals().items() if k not in ("REPO", "WORDS")}  # not settings
    cfg = common.configure(settings, argv, __doc__)
    common.print_config(cfg, "bench_large_split_train.py")
    if not Path(cfg["PROCESSOR_DIR"]).is_dir():
        raise common.UserError(
            f"PROCESSOR_DIR={cfg['PROCESSOR_DIR']!r} not found: the real BLIP processor is needed"
        )
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    work = Path(cfg["WORK_DIR"] or tempfile.mkdtemp(prefix="bench_large_split_"))
    try:
        from conftest import build_tiny_blip

        t = time.perf_counter()
        sources, what = source_images(Path(cfg["SOURCE_IMAGES"]), work)
        captions = build_data(work / "data", cfg["N_IMAGES"], sources)
        size_mb = (work / "data" / "captions.json").stat().st_size / 2**20
        print(
            f"data: {len(captions):,} entries in captions.json ({size_mb:.1f} MB), hard links to {what}; "
            f"built in {time.perf_counter() - t:.1f} s"
        )
        model_dir = work / "model"
        if not (model_dir / "config.json").is_file():
            build_tiny_blip(model_dir, Path(cfg["PROCESSOR_DIR"]), image_size=cfg["IMAGE_SIZE"])
        rate = header_check_rate(work / "data", sorted(captions)[: cfg["HEADER_SAMPLE"]])

        cmd = [
            sys.executable,
            str(REPO / "train_blip.py"),
            f"--MODEL_ID={model_dir}",
            f"--DATA_DIR={work / 'data'}",
            f"--OUTPUT_DIR={work / 'out'}",
            "--RESUME=None",
            "--EPOCHS=1",
            f"--MAX_STEPS={cfg['MAX_STEPS']}",
            f"--BATCH_SIZE={cfg['BATCH_SIZE']}",
            f"--NUM_WORKERS={cfg['NUM_WORKERS']}",
            f"--VAL_FRACTION={cfg['VAL_FRACTION']}",
            "--NUM_SAMPLE_CAPTIONS=0",
            "--LOG_EVERY=10",
            *cfg["EXTRA_ARGS"],
        ]
        print("running:", " ".join(cmd))
        env = dict(
            os.environ,
            MPLBACKEND="Agg",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        run = run_training(cmd, env)
        if run["returncode"] != 0:
            print("\n".join(run["log_tail"]))
            raise common.UserError(f"train_blip.py failed with exit code {run['returncode']} (log above)")
        results = json.loads((work / "out" / "train_results.json").read_text())
    finally:
        if not cfg["WORK_DIR"]:
            shutil.rmtree(work, ignore_errors=True)

    n = cfg["N_IMAGES"]
    decoded_gb = n * 640 * 480 * 3 / 1e9
    pixels_gb = n * 3 * cfg["IMAGE_SIZE"] ** 2 * 4 / 1e9
    for s in run["stages"]:
        if s["stage"] != "step" or s is run["stages"][-1] or "step 10:" in s["line"]:
            print(
                f"  {s['t_s']:7.1f} s  RSS {s['rss_mb']:6d} MB (worker {s['worker_rss_mb']:5d} MB)  "
                f"{s['stage']}: {s['line'][:90]}"
            )
    steps = [s for s in run["stages"] if s["stage"] == "step"]
    checked = next((s for s in run["stages"] if s["stage"].startswith("images checked")), None)
    report = {
        "config": cfg,
        "n_images": n,
        "captions_json_mb": round(size_mb, 1),
        "sources": what,
        "train_blip_cmd": cmd,
        "run": run,
        "train_results": results,
        "images_streamed": results["optimizer_steps"] * cfg["BATCH_SIZE"],
        "check_images_s": checked["t_s"] - run["stages"][0]["t_s"] if checked else None,
        "header_only_files_per_s": round(rate),
        "if_held_decoded_gb": round(decoded_gb, 1),
        "if_held_as_pixel_tensors_gb": round(pixels_gb, 1),
    }
    out = REPO / "benchmarks" / "results" / "bench_large_split_train.json"
    common.atomic_write_json(out, report)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if checked:
        print(
            f"start-up image check: {report['check_images_s']:.0f} s for {n:,} images "
            f"({n / max(report['check_images_s'], 1e-9):.0f} images/s); "
            f"a header-only check runs at {rate:,.0f} files/s "
            f"(~{n / rate:.0f} s)"
        )
    if steps:
        print(
            f"RSS at the first logged step {steps[0]['rss_mb']} MB, at the last {steps[-1]['rss_mb']} MB "
            f"({report['images_streamed']} images streamed)"
        )
    print(
        f"holding the images instead: {decoded_gb:.0f} GB decoded at 640x480, "
        f"{pixels_gb:.0f} GB as {cfg['IMAGE_SIZE']}px fp32 tensors"
    )
    print(
        f"peak RSS with a {n:,}-entry captions.json: {run['peak_rss_mb']} MB (main process), "
        f"{run['peak_worker_rss_mb']} MB (DataLoader worker); written {out.relative_to(REPO)}"
    )
    return report


if __name__ == "__main__":
    common.cli(main)()
