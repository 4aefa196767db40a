"""Captioning speed: the tutorial's one-image-at-a-time loop vs inference.py, same model and images.

    python benchmarks/bench_caption.py                     # both paths, a few minutes on 2 CPU cores
    python benchmarks/bench_caption.py --OURS_BATCH_SIZE=16 --NUM_IMAGES=32

Model: the random BLIP-base from bench_train.py (MODEL_DIR, built once) with a LoRA adapter of the
tutorial's shape (ADAPTER_DIR, built once), loaded the way each path loads it. Random weights never
emit [SEP], and sampling could stop anywhere, so both paths generate exactly NEW_TOKENS tokens per
image (min_new_tokens = max_new_tokens): the same work. Timing covers opening and preprocessing the
images too, after one untimed warm-up. Each path runs in its own subprocess. The ratio is last.

Roofline (benchmarks/roofline.py): first a short probe times the model's matmul shapes (4 x 577
tokens by 768x768, 768x3072, 3072x768; best of CEILING_REPEATS, all threads) in fp32 and in the
precision OURS_PRECISION resolves to. Each path's warm-up (one real generate() of its own path:
one image for the baseline, one batch for ours) runs under torch's FlopCounterMode; FLOPs per
image = that count / images (a matmul counts 2*M*N*K). Achieved GFLOP/s = FLOPs per image x
images/s, shown as a share of the ceiling in the precision that path ran in.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

import roofline  # noqa: E402
from bench_train import ensure_random_blip, machine, repo_path, run_measured  # noqa: E402

import common  # noqa: E402
import families  # noqa: E402

# ---- model and images
MODEL_DIR = ".cache/blip-random-base"  # the random BLIP-base (built once, as in bench_train.py)
PROCESSOR_DIR = "../shared/blip_processor"  # the real processor, saved into MODEL_DIR
ADAPTER_DIR = ".cache/blip-random-base-lora"  # an untrained LoRA of the tutorial's shape (built once)
MIRROR_DIR = "../shared/coco_mirror"  # images are read from its val2017/
NUM_IMAGES = 16  # images captioned by each path (the first ones by name)
# ---- decoding (both paths)
NEW_TOKENS = 20  # every caption is exactly this many new tokens
TEMPERATURE = 0.9  # the tutorial's sampling
TOP_P = 0.9  # the tutorial's sampling
# ---- ours (inference.py)
OURS_BATCH_SIZE = 8  # images per generate() call
OURS_PRECISION = "auto"  # auto (bf16 where native and faster) | fp32 | bf16
# ---- roofline
ROOFLINE = True  # probe the matmul ceiling first and count the FLOPs of each path's warm-up generate()
CEILING_REPEATS = 8  # timed calls per matmul shape in the ceiling probe (the best one counts)
# ---- run
RUN = "both"  # both | baseline | ours | levers  (baseline-child / ours-child: internal, the subprocesses)
RESULTS_PATH = "benchmarks/results/caption.json"  # all figures, machine and commands (gitignored)

_LORA_TARGETS = list(families.Blip.lora_targets)  # the tutorial's


def ensure_adapter(model_dir: Path, adapter_dir: Path) -> Path:
    """Save an untrained LoRA adapter (r16, alpha 32, the tutorial's targets) for MODEL_DIR, once."""
    if (adapter_dir / "adapter_config.json").exists():
        return adapter_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BlipForConditionalGeneration, BlipProcessor

    torch.manual_seed(0)
    model = get_peft_model(
        BlipForConditionalGeneration.from_pretrained(model_dir),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=_LORA_TARGETS),
    )
    tmp = Path(tempfile.mkdtemp(dir=adapter_dir.parent, prefix=".lora-"))
    model.save_pretrained(tmp)
    BlipProcessor.from_pretrained(model_dir).save_pretrained(tmp)
    os.replace(tmp, adapter_dir)
    return adapter_dir


def image_paths(mirror: Path, n: int) -> list[Path]:
    paths = sorted((mirror / "val2017").glob("*.jpg"))[:n]
    if len(paths) < n:
        raise common.UserError(
            f"only {len(paths)} images in {mirror / 'val2017'}; lower NUM_IMAGES or set MIRROR_DIR"
        )
    return paths


# ----------------------------------------------------------------------------- the two paths
def tutorial_captions(cfg: dict, paths: list[Path]) -> dict:
    """The tutorial's inference: base + adapter with peft, then one image at a time, fp32, sampling."""
    import torch
    from peft import PeftModel
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model_dir, adapter_dir = repo_path(cfg["MODEL_DIR"]), repo_path(cfg["ADAPTER_DIR"])
    processor = BlipProcessor.from_pretrained(model_dir)
    base = BlipForConditionalGeneration.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    settings = dict(
        do_sample=True,
        temperature=cfg["TEMPERATURE"],
        top_p=cfg["TOP_P"],
        min_new_tokens=cfg["NEW_TOKENS"],
        max_new_tokens=cfg["NEW_TOKENS"],
    )

    def caption(path):
        image = Image.open(path).convert("RGB")
        inputs = processor(images=image, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, **settings)
        assert ids.shape[1] == 1 + cfg["NEW_TOKENS"], ids.shape  # [DEC] + the forced tokens
        return processor.decode(ids[0], skip_special_tokens=True)

    torch.manual_seed(0)
    with roofline.FlopCount() if cfg["ROOFLINE"] else contextlib.nullcontext() as count:
        caption(paths[0])  # warm-up (counted: one real generate() of one image)
    start = time.perf_counter()
    captions = [caption(p) for p in paths]
    elapsed = time.perf_counter() - start
    return {
        "images_per_s": len(paths) / elapsed,
        "timed_s": elapsed,
        "images": len(paths),
        "batch_size": 1,
        "precision": "fp32",
        "example": captions[0],
        "flops": flops_of(count, 1),
    }


def flops_of(count, images: int) -> dict | None:
    if count is None:
        return None
    return {
        "flops_per_image": count.total / images,
        "images_counted": images,
        "by_op_gflop": {k: round(v / 1e9, 2) for k, v in count.by_op.items()},
    }


def our_captions(cfg: dict, paths: list[Path]) -> dict:
    """inference.py's path: its loader (which switches attention to SDPA), then caption_images in
    batches at its precision."""
    import torch

    import inference

    model, family, _ = inference.load_captioner(repo_path(cfg["ADAPTER_DIR"]))
    settings = dict(
        do_sample=True,
        temperature=cfg["TEMPERATURE"],
        top_p=cfg["TOP_P"],
        num_beams=1,
        min_new_tokens=cfg["NEW_TOKENS"],
        max_new_tokens=cfg["NEW_TOKENS"],
    )
    batch = cfg["OURS_BATCH_SIZE"]
    dtype = inference.set_precision(model, cfg["OURS_PRECISION"], "cpu")

    # Warm-up on one batch (counted: one real generate() of inference's path), checking that every
    # caption really is NEW_TOKENS tokens long.
    torch.manual_seed(0)
    warm = [common.open_image(p) for p in paths[:batch]]
    with roofline.FlopCount() if cfg["ROOFLINE"] else contextlib.nullcontext() as count:
        pixels = family.pixel_values(warm).to(dtype)
        ids, _ = inference.generate_ids(model, family, pixels, **settings)
    assert ids.shape[1] == 1 + cfg["NEW_TOKENS"], ids.shape

    start = time.perf_counter()
    images = [common.open_image(p) for p in paths]
    captions = inference.caption_images(model, family, images, batch_size=batch, **settings)
    elapsed = time.perf_counter() - start
    return {
        "images_per_s": len(paths) / elapsed,
        "timed_s": elapsed,
        "images": len(paths),
        "batch_size": batch,
        "precision": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
        "example": captions[0],
        "flops": flops_of(count, len(warm)),
    }


# ----------------------------------------------------------------------------- levers (prototypes)
def static_cache(model, max_length: int):
    """A static self-attention KV cache with an ordinary cross-attention cache. generate(
    cache_implementation="static") cannot be used on BLIP: it sizes the cross-attention cache to
    max_length too, and the 577 image tokens overflow it (IndexError in StaticLayer.update)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache, StaticCache

    text = families.base_model(model).text_decoder.config
    return EncoderDecoderCache(StaticCache(config=text, max_cache_len=max_length), DynamicCache())


def measure_levers(cfg: dict, paths: list[Path]) -> dict:
    """Each captioning lever on the same batch in one process, greedy, with an exactness check
    against inference.py's path: time of the vision tower and of decoding, a static KV cache,
    bf16 for the vision tower only, batch size, and what beams add (FLOPs counted)."""
    import torch

    import inference

    model, family, _ = inference.load_captioner(repo_path(cfg["ADAPTER_DIR"]))
    base = families.base_model(model)
    images = [common.open_image(p) for p in paths[: cfg["OURS_BATCH_SIZE"]]]
    pixels = family.pixel_values(images)
    greedy = dict(
        num_beams=1, do_sample=False, min_new_tokens=cfg["NEW_TOKENS"], max_new_tokens=cfg["NEW_TOKENS"]
    )
    out, n = {"images": len(images), "load_average_1min": [round(os.getloadavg()[0], 2)]}, len(images)

    def timed(fn):
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start

    with torch.inference_mode():
        stages = family.vision_stages(base)
        reference, t_all = timed(lambda: inference.generate_ids(model, family, pixels, **greedy)[0])
        embeds, t_vision = timed(lambda: families.run_stages(stages, pixels))
        _, t_decode = timed(lambda: family.generate_from_embeds(base, embeds, **greedy))
        out["inference_path_s_per_image"] = round(t_all / n, 3)
        out["vision_s_per_image"] = round(t_vision / n, 3)
        out["decode_s_per_image"] = round(t_decode / n, 3)
        # static self-attention cache (prototype; generate's own cache_implementation="static" fails)
        ids, t_static = timed(
            lambda: family.generate_from_embeds(
                base, embeds, past_key_values=static_cache(model, 1 + cfg["NEW_TOKENS"]), **greedy
            )
        )
        out["static_cache"] = {
            "decode_s_per_image": round(t_static / n, 3),
            "exact": torch.equal(ids, reference),
        }
        # bf16 vision tower only, on one image (on a CPU without native bf16 this is emulated and slow)
        one = pixels[:1]
        fp32_one, t32 = timed(lambda: families.run_stages(stages, one))
        base.vision_model.to(torch.bfloat16)
        try:
            bf16_one, t16 = timed(lambda: families.run_stages(stages, one.bfloat16()).float())
        finally:
            base.vision_model.to(torch.float32)
        ids16 = family.generate_from_embeds(base, bf16_one, **greedy)
        out["bf16_vision"] = {
            "fp32_vision_s": round(t32, 3),
            "bf16_vision_s": round(t16, 3),
            "max_abs_diff": float((bf16_one - fp32_one).abs().max()),
            "same_caption": torch.equal(ids16, reference[:1]),
        }
        # batch size: the same images one batch of n vs batches of n/2
        half = max(1, n // 2)
        _, t_half = timed(
            lambda: [
                inference.generate_ids(model, family, pixels[i : i + half], **greedy)
                for i in range(0, n, half)
            ]
        )
        out["batch"] = {
            f"batch_{n}_images_per_s": round(n / t_all, 3),
            f"batch_{half}_images_per_s": round(n / t_half, 3),
        }
        # beams: what 3 beams cost over 1 (counted FLOPs per image and time), on one image
        beams = {}
        for k in (1, 3):
            with roofline.FlopCount() as count:
                _, t = timed(
                    lambda k=k: family.generate_from_embeds(base, embeds[:1], **{**greedy, "num_beams": k})
                )
            beams[f"beams_{k}"] = {"decode_gflop": round(count.total / 1e9, 1), "decode_s": round(t, 3)}
        out["beams"] = beams
    out["load_average_1min"].append(round(os.getloadavg()[0], 2))
    return out


def in_subprocess(cfg: dict, which: str, out: Path) -> dict:
    result_file = out / f"{which}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--RUN={which}-child",
        f"--RESULTS_PATH={result_file}",
    ]
    cmd += [
        f"--{k}={cfg[k]}"
        for k in (
            "MODEL_DIR",
            "ADAPTER_DIR",
            "MIRROR_DIR",
            "NUM_IMAGES",
            "NEW_TOKENS",
            "TEMPERATURE",
            "TOP_P",
            "OURS_BATCH_SIZE",
            "OURS_PRECISION",
            "ROOFLINE",
        )
    ]
    run = run_measured(cmd, out / f"{which}.log")
    if run["returncode"] != 0:
        tail = Path(run["log"]).read_text().strip().splitlines()[-1:]
        raise common.UserError(f"the {which} path failed (exit {run['returncode']}): {tail}")
    run.pop("log")
    return {**json.loads(result_file.read_text())[which], **run}


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = common.configure(globals(), argv, __doc__)
    common.print_config(cfg, "bench_caption.py")
    valid = ("both", "baseline", "ours", "levers", "baseline-child", "ours-child")
    if cfg["RUN"] not in valid:
        raise common.UserError(f"RUN={cfg['RUN']!r}; valid values: {', '.join(valid[:3])}")
    if cfg["NUM_IMAGES"] < 1 or cfg["OURS_BATCH_SIZE"] < 1 or cfg["NEW_TOKENS"] < 1:
        raise common.UserError("NUM_IMAGES, OURS_BATCH_SIZE and NEW_TOKENS must be positive")
    paths = image_paths(repo_path(cfg["MIRROR_DIR"]), cfg["NUM_IMAGES"])
    results_path = repo_path(cfg["RESULTS_PATH"])

    if cfg["RUN"] == "levers":
        result = measure_levers(cfg, paths)
        print(json.dumps(result, indent=1))
        common.atomic_write_json(results_path, {"levers": result, "machine": machine(), "config": cfg})
        return result
    if cfg["RUN"].endswith("-child"):  # inside a subprocess that in_subprocess started
        which = cfg["RUN"].removesuffix("-child")
        result = {which: (tutorial_captions if which == "baseline" else our_captions)(cfg, paths)}
        common.atomic_write_json(results_path, result)
        return result

    model_dir = ensure_random_blip(repo_path(cfg["MODEL_DIR"]), repo_path(cfg["PROCESSOR_DIR"]))
    ensure_adapter(model_dir, repo_path(cfg["ADAPTER_DIR"]))
    report = {"machine": machine(), "config": cfg, "flop_note": roofline.FLOP_NOTE}
    if cfg["ROOFLINE"]:  # first, on a machine not yet busy with the paths
        import bench_train

        wanted = ["fp32"] if cfg["RUN"] in ("both", "baseline") else []
        if cfg["RUN"] in ("both", "ours"):
            wanted.append(common.resolve_precision(cfg["OURS_PRECISION"], "cpu"))
        report["ceiling"] = bench_train.probe_ceilings(cfg, wanted)
    with tempfile.TemporaryDirectory(prefix="bench_caption_") as tmp:
        for which in ("baseline", "ours"):
            if cfg["RUN"] in ("both", which):
                what = "one image at a time, fp32" if which == "baseline" else "inference.py"
                print(f"== {which}: {what} ==", flush=True)
                report[which] = in_subprocess(cfg, which, Path(tmp))
    report["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)

    m = report["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, bf16 native: {m['bf16_native']}, "
        f"load average {m['load_average_1min']} -> {m['load_average_1min_after']}"
    )
    for which in ("baseline", "ours"):
        if which in report:
            r = report[which]
            print(
                f"{which:>8}: {r['images_per_s']:.3f} images/s (batch {r['batch_size']}, {r['precision']}, "
                f"{cfg['NEW_TOKENS']} tokens each), peak RSS {r['peak_rss_mb']:.0f} MB"
            )
    if cfg["ROOFLINE"]:
        print(f"roofline ({roofline.FLOP_NOTE}; rate = images/s above):")
        for which in ("baseline", "ours"):
            r = report.get(which, {})
            if r.get("flops"):
                if r["precision"] not in report["ceiling"]:
                    report["ceiling"].update(bench_train.probe_ceilings(cfg, [r["precision"]]))
                r["roofline"] = roofline.share(
                    r["flops"]["flops_per_image"], r["images_per_s"], report["ceiling"][r["precision"]]
                )
                print(roofline.describe(which, r["roofline"], "image"))
    if "baseline" in report and "ours" in report:
        report["speedup"] = report["ours"]["images_per_s"] / report["baseline"]["images_per_s"]
    common.atomic_write_json(results_path, report)
    if "speedup" in report:
        print(
            f"caption images/s: baseline {report['baseline']['images_per_s']:.3f}, "
            f"ours {report['ours']['images_per_s']:.3f}, ratio {report['speedup']:.2f}x"
        )
    return report


if __name__ == "__main__":
    common.cli(main)()
