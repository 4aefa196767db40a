"""Index and selection time of download_coco.py on a train2017-sized annotation file (no images).

    python benchmarks/bench_large_split_download.py            # 118,287 images, 591,753 captions

Generates a synthetic captions_train2017.json with the real file's sizes and fields (about 90 MB,
annotations in shuffled order like the real one), then, in a fresh process so that peak memory
is the script's own, times the functions download_coco.main() runs before any image request:
reading the cached json, the one-pass caption index and the seeded shuffle, and takes the first
20,000 images as a large NUM_IMAGES would. For contrast it times the tutorial's per-image scan
over all annotations on a few images and extrapolates it.
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

N_IMAGES, N_CAPTIONS = 118_287, 591_753  # the real captions_train2017.json
WORDS = ["a", "an", "the", "man", "woman", "dog", "cat", "pizza", "table", "bus", "train", "sitting",
         "standing", "on", "in", "next", "to", "with", "of", "red", "large", "small"]  # fmt: skip


def make_annotation_file(path: Path, n_images: int, n_captions: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    images = [
        {
            "license": rng.randint(1, 8),
            "file_name": f"{i:012d}.jpg",
            "coco_url": f"http://images.cocodataset.org/train2017/{i:012d}.jpg",
            "height": 480,
            "width": 640,
            "date_captured": "2013-11-14 17:02:52",
            "flickr_url": f"http://farm4.staticflickr.com/1/{i}_abc_z.jpg",
            "id": i,
        }
        for i in range(1, n_images + 1)
    ]
    # Five captions each, and the remainder as sixth captions, as in the real file.
    owners = [im["id"] for im in images for _ in range(5)] + rng.sample(
        range(1, n_images + 1), n_captions - 5 * n_images
    )
    rng.shuffle(owners)
    annotations = [
        {
            "image_id": owner,
            "id": k,
            "caption": " ".join(rng.choices(WORDS, k=rng.randint(8, 14))).capitalize() + ".",
        }
        for k, owner in enumerate(owners, start=1)
    ]
    with open(path, "w") as f:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations}, f)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM starts afresh at exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def measure(cache: Path, num_images: int) -> dict:
    """Runs in a fresh process: the script's own steps, in the order main() runs them."""
    import common
    import download_coco as dl

    rss_before = peak_rss_mb()
    cfg = common.configure(vars(dl), ["--SPLIT=train2017", f"--ANNOTATIONS_DIR={cache}"])
    t0 = time.perf_counter()
    annotations = dl.load_annotations(dl.fetch_captions_json(None, cfg))  # cached: no request made
    t1 = time.perf_counter()
    index = dl.index_captions(annotations)
    t2 = time.perf_counter()
    pool = dl.shuffled_pool(index, seed=dl.SEED)
    chosen = pool[:num_images]
    t3 = time.perf_counter()
    # The tutorial's way: for each chosen image, scan every annotation for its captions.
    id_of = {im["file_name"]: im["id"] for im in annotations["images"]}
    s0 = time.perf_counter()
    for name in chosen[:5]:
        _ = [a["caption"] for a in annotations["annotations"] if a["image_id"] == id_of[name]]
    scan = (time.perf_counter() - s0) / 5
    return {
        "images_with_captions": len(index),
        "captions": sum(map(len, index.values())),
        "load_s": t1 - t0,
        "index_s": t2 - t1,
        "select_s": t3 - t2,
        "total_s": t3 - t0,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": rss_before,
        "scan_per_image_s": scan,
        "num_images": num_images,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=20_000, help="how many to select from the pool")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the measuring child process
    opts = parser.parse_args()
    if opts.measure:
        print(json.dumps(measure(Path(opts.measure), opts.num_images)))
        return
    with tempfile.TemporaryDirectory() as d:
        cache = Path(d)
        path = cache / "captions_train2017.json"
        t = time.perf_counter()
        make_annotation_file(path, N_IMAGES, N_CAPTIONS)
        print(
            f"generated {path.name}: {N_IMAGES:,} images, {N_CAPTIONS:,} captions, "
            f"{path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t:.1f}s"
        )
        child = subprocess.run(
            [sys.executable, __file__, f"--measure={cache}", f"--num-images={opts.num_images}"],
            capture_output=True,
            text=True,
            check=True,
        )
    r = json.loads(child.stdout.strip().splitlines()[-1])
    assert (r["images_with_captions"], r["captions"]) == (N_IMAGES, N_CAPTIONS), r
    print(f"read json      {r['load_s']:6.2f} s")
    print(f"index captions {r['index_s']:6.2f} s   (one pass over {r['captions']:,} captions)")
    print(
        f"select {r['num_images']:,}   {r['select_s']:6.2f} s   "
        f"(seeded shuffle of {r['images_with_captions']:,} images)"
    )
    print(
        f"peak memory    {r['peak_rss_mb']:6.0f} MB  "
        f"(process RSS; {r['rss_after_imports_mb']:.0f} MB after imports)"
    )
    hours = r["scan_per_image_s"] * r["num_images"] / 3600
    print(
        f"tutorial per-image scan: {r['scan_per_image_s'] * 1000:.0f} ms per image, "
        f"~{hours:.1f} h for {r['num_images']:,} images"
    )
    print(
        f"index + selection: {r['index_s'] + r['select_s']:.2f} s, "
        f"with reading the json: {r['total_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
