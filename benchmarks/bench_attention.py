"""Eager vs SDPA attention (families.enable_blip_sdpa) on the full-size random BLIP-base, fp32 and bf16.

    python benchmarks/bench_attention.py                   # vision forward + LoRA train step, about 5 minutes
    python benchmarks/bench_attention.py --BATCH_SIZE=1 --REPEATS=5

Times (1) the vision encoder's forward without gradients, as in captioning and the prefix cache,
and (2) one training step of the tutorial's LoRA model (forward, backward, AdamW), for eager
attention, SDPA in the vision encoder only, and SDPA everywhere. The variants are timed in
interleaved rounds on copies of the same weights, so a busy machine slows them all alike; each
figure is the median. The last line is the train-step speed-up of SDPA in bf16.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

from bench_train import ensure_random_blip, machine, repo_path  # noqa: E402

import common  # noqa: E402
import families  # noqa: E402

MODEL_DIR = ".cache/blip-random-base"  # the random BLIP-base (built once, as in bench_train.py)
PROCESSOR_DIR = "../shared/blip_processor"  # the real processor, saved into MODEL_DIR
BATCH_SIZE = 4  # images per forward / train step
CAPTION_TOKENS = 20  # caption length in the train step (a typical COCO caption with the mistakes)
REPEATS = 3  # timed calls per variant per round (after one untimed call)
ROUNDS = 2  # interleaved rounds over all variants
PRECISIONS = ["fp32", "bf16"]  # fp32 | bf16 (autocast)
PARTS = ["vision", "train"]  # vision: encoder forward, no grad | train: one LoRA train step
FLUSH_DENORMALS = True  # as train_blip.py: random weights make denormal gradients, ~10x slower in fp32

_VARIANTS = {"eager": None, "sdpa-vision": False, "sdpa-all": True}  # enable_sdpa(text=...)
_LORA_TARGETS = list(families.Blip.lora_targets)  # the tutorial's


def load_variant(model_dir: Path, text, train: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BlipForConditionalGeneration

    torch.manual_seed(0)
    model = BlipForConditionalGeneration.from_pretrained(model_dir)
    if text is not None:
        families.enable_blip_sdpa(model, text=text)
    if not train:
        return model.eval(), None
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=_LORA_TARGETS)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-5)
    return model.train(), optimizer


def step_fn(part: str, model, optimizer, precision: str, batch: dict):
    import torch

    def autocast():
        if precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def vision():
        with torch.no_grad(), autocast():
            model.vision_model(pixel_values=batch["pixel_values"])

    def train():
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return vision if part == "vision" else train


def main(argv=None):
    cfg = common.configure(globals(), argv, __doc__)
    common.print_config(cfg, "bench_attention.py")
    import torch

    torch.set_flush_denormal(cfg["FLUSH_DENORMALS"])
    model_dir = ensure_random_blip(repo_path(cfg["MODEL_DIR"]), repo_path(cfg["PROCESSOR_DIR"]))
    n, t = cfg["BATCH_SIZE"], cfg["CAPTION_TOKENS"]
    torch.manual_seed(0)
    ids = torch.randint(1000, 30000, (n, t))
    ids[:, 0] = 30522  # [DEC]
    batch = {"pixel_values": torch.randn(n, 3, 384, 384), "input_ids": ids, "labels": ids}
    report = {"machine": machine(), "config": cfg, "median_s": {}}
    for part in cfg["PARTS"]:
        variants = {name: load_variant(model_dir, text, part == "train") for name, text in _VARIANTS.items()}
        times = {}
        for _ in range(cfg["ROUNDS"]):
            for precision in cfg["PRECISIONS"]:
                for name, (model, optimizer) in variants.items():
                    fn = step_fn(part, model, optimizer, precision, batch)
                    fn()  # untimed: first call after a precision switch
                    for _ in range(cfg["REPEATS"]):
                        start = time.perf_counter()
                        fn()
                        times.setdefault((precision, name), []).append(time.perf_counter() - start)
        del variants
        for (precision, name), ts in times.items():
            median, eager = statistics.median(ts), statistics.median(times[(precision, "eager")])
            report["median_s"][f"{part}/{precision}/{name}"] = median
            print(
                f"{part:>6} {precision} {name:<12} {median:7.3f} s per batch of {n} "
                f"({n / median:6.2f} images/s; eager / this = {eager / median:.2f}x)",
                flush=True,
            )
    report["machine"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
    m = report["machine"]
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, load average "
        f"{m['load_average_1min']} -> {m['load_average_1min_after']}"
    )
    med = report["median_s"]
    if "train/bf16/eager" in med:
        print(
            f"bf16 train step: eager {med['train/bf16/eager']:.3f} s, "
            f"SDPA {med['train/bf16/sdpa-all']:.3f} s, "
            f"ratio {med['train/bf16/eager'] / med['train/bf16/sdpa-all']:.2f}x"
        )
    return report


if __name__ == "__main__":
    common.cli(main)()
