"""Start-up time of train_blip.py at train2017 scale: from process start to the first optimizer step.

    python benchmarks/bench_startup.py                       # 20,000 images: a first run, then a rerun
    python benchmarks/bench_startup.py --N_IMAGES=118287     # the whole of train2017
    python benchmarks/bench_startup.py --WORK_DIR=/tmp/sb    # keep the data folder for the next call

The data is bench_large_split_train.py's: a captions.json of N_IMAGES entries whose files are hard
links to the 40 real COCO train2017 JPEGs of ../shared/coco_mirror (so each one is a real JPEG that
must be checked), and a tiny BLIP at the real 384 x 384 input with the real processor.

Each run is `python train_blip.py ... --MAX_STEPS=1 --LOG_EVERY=1` in a child process, into the same
OUTPUT_DIR with --RESUME=None, so the second run is a rerun over the same images (the image check's
cache in OUTPUT_DIR applies) but trains from scratch. Reported per run:
- to_first_step_s: process start to the "step 1" log line, timed here (imports included);
- cpu_to_first_step_s: the CPU seconds train_blip.py (and its DataLoader worker) had used by then,
  which the load of other users of a shared machine does not inflate;
- first_step_s: train_blip's own figure in train_results.json (main() start to the end of step 1);
- the time at which each start-up stage's line appeared;
and the load average, since the machine may be shared. Results: benchmarks/results/bench_startup.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402

N_IMAGES = 20_000  # entries in captions.json (train2017 has 118,287)
RUNS = 2  # runs into the same OUTPUT_DIR: the first checks every image, the others are reruns
SOURCE_IMAGES = str(REPO.parent / "shared" / "coco_mirror" / "train2017")  # real JPEGs to link to
PROCESSOR_DIR = str(REPO.parent / "shared" / "blip_processor")  # the real BLIP processor
IMAGE_SIZE = 384  # model input, as BLIP-base
WORK_DIR = None  # None: a temporary folder, removed afterwards | a folder to keep (reused if filled)
EXTRA_ARGS = []  # more --NAME=value for train_blip.py

# Lines of train_blip.py that mark the start-up stages, in the order they appear.
MARKS = {
    "== train_blip.py ==": "config printed (imports done)",
    "precision:": "precision chosen",
    "warning: skipped": "images checked (some skipped)",
    "images:": "images checked",
    "model:": "model loaded",
    "data:": "tokenized and split",
    "prefix cache:": "prefix cache planned",
    "epoch 1 step 1:": "first optimizer step",
}


def cpu_seconds(proc) -> float:
    """CPU time (user + system) of a process and its live children (the DataLoader worker): on a shared
    machine, a figure that the other users' load does not inflate the way it inflates wall time."""
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def timed_run(cmd: list[str], env: dict) -> dict:
    import psutil

    stages, log = [], []
    start = time.perf_counter()
    child = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    proc = psutil.Process(child.pid)
    for line in child.stdout:
        log.append(line.rstrip("\n"))
        for part in line.replace("\r", "\n").split("\n"):
            for key, stage in MARKS.items():
                if part.strip().startswith(key) and not any(s["stage"] == stage for s in stages):
                    stages.append(
                        {
                            "stage": stage,
                            "t_s": round(time.perf_counter() - start, 2),
                            "cpu_s": round(cpu_seconds(proc), 2),
                            "line": part.strip()[:140],
                        }
                    )
    child.wait()
    first = next((s for s in stages if s["stage"] == "first optimizer step"), {})
    return {
        "returncode": child.returncode,
        "wall_s": round(time.perf_counter() - start, 1),
        "to_first_step_s": first.get("t_s"),
        "cpu_to_first_step_s": first.get("cpu_s"),
        "stages": stages,
        "log_tail": log[-30:],
    }


def main(argv=None):
    settings = {k: v for k, v in globals().items() if k.isupper() and k not in ("REPO", "MARKS")}
    cfg = common.configure(settings, argv, __doc__)
    common.print_config(cfg, "bench_startup.py")
    from bench_large_split_train import build_data, source_images

    from conftest import build_tiny_blip

    work = Path(cfg["WORK_DIR"] or tempfile.mkdtemp(prefix="bench_startup_"))
    work.mkdir(parents=True, exist_ok=True)
    n = cfg["N_IMAGES"]
    try:
        t = time.perf_counter()
        sources, what = source_images(Path(cfg["SOURCE_IMAGES"]), work)
        data_dir = work / f"data{n}"
        build_data(data_dir, n, sources)
        print(f"data: {n:,} images, hard links to {what}; ready in {time.perf_counter() - t:.1f} s")
        model_dir = work / "model"
        if not (model_dir / "config.json").is_file():
            build_tiny_blip(model_dir, Path(cfg["PROCESSOR_DIR"]), image_size=cfg["IMAGE_SIZE"])
        out_dir = work / f"out{n}"
        shutil.rmtree(out_dir, ignore_errors=True)  # the first run must check every image
        cmd = [
            sys.executable,
            str(REPO / "train_blip.py"),
            f"--MODEL_ID={model_dir}",
            f"--DATA_DIR={data_dir}",
            f"--OUTPUT_DIR={out_dir}",
            "--RESUME=None",
            "--EPOCHS=1",
            "--MAX_STEPS=1",
            "--LOG_EVERY=1",
            "--VAL_FRACTION=0.001",
            "--NUM_SAMPLE_CAPTIONS=0",
            *cfg["EXTRA_ARGS"],
        ]
        print("running (each time):", " ".join(cmd))
        env = dict(
            os.environ,
            MPLBACKEND="Agg",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        runs = []
        for k in range(cfg["RUNS"]):
            load_before = os.getloadavg()
            run = timed_run(cmd, env)
            if run["returncode"] != 0:
                print("\n".join(run["log_tail"]))
                raise common.UserError(f"train_blip.py failed with exit code {run['returncode']} (log above)")
            results = json.loads((out_dir / "train_results.json").read_text())
            run.update(
                kind="first run" if k == 0 else "rerun",
                first_step_s=results.get("first_step_s"),
                load_average_before=[round(x, 2) for x in load_before],
                load_average_after=[round(x, 2) for x in os.getloadavg()],
            )
            runs.append(run)
            print(
                f"\n{run['kind']}: process start -> first optimizer step {run['to_first_step_s']} s, "
                f"{run['cpu_to_first_step_s']} CPU s (main() -> step 1: {run['first_step_s']} s); "
                f"whole run {run['wall_s']} s; load average {run['load_average_before'][0]:.2f} before, "
                f"{run['load_average_after'][0]:.2f} after"
            )
            for s in run["stages"]:
                print(f"  {s['t_s']:7.2f} s {s['cpu_s']:7.2f} CPU s  {s['stage']}: {s['line'][:90]}")
    finally:
        if not cfg["WORK_DIR"]:
            shutil.rmtree(work, ignore_errors=True)
    report = {"config": cfg, "n_images": n, "cpu_count": os.cpu_count(), "runs": runs}
    out = REPO / "benchmarks" / "results" / f"bench_startup_{n}.json"
    common.atomic_write_json(out, report)
    reruns = "".join(f", rerun {r['to_first_step_s']} s" for r in runs[1:])
    print(
        f"\n{n:,} images: first run {runs[0]['to_first_step_s']} s{reruns} from process start to the first "
        f"optimizer step; written {out.relative_to(REPO)}"
    )
    return report


if __name__ == "__main__":
    common.cli(main)()
