"""Fine-tune BLIP image captioning with LoRA on coco_sample/: the tutorial's recipe, done carefully.

Run (after `python download_coco.py`):
    python train_blip.py                                    # the tutorial: 60 epochs, LoRA r16, lr 3e-5
    python train_blip.py --EPOCHS=3 --OUTPUT_DIR=/tmp/try   # any UPPER_CASE constant: --NAME=value
    python train_blip.py --MODEL_ID=/path/to/local/blip     # offline: a local copy of the model
    accelerate launch --multi_gpu --num_processes 2 train_blip.py   # several GPUs (see README for nodes)
    torchrun --nproc_per_node 2 train_blip.py               # several processes, on GPUs or on CPU (gloo)

Ctrl-C saves a checkpoint; running the same command again continues from it (RESUME="auto").
Outputs in OUTPUT_DIR: the LoRA adapter (peft format) and processor, training_config.json,
metrics.jsonl, loss_curve.png, train_results.json and checkpoints/.

How a step works: the collator puts BLIP's [DEC] token at position 0 (as generate() does) and
masks pads out of the labels. The loss is each caption's mean token loss, averaged over the
captions of an optimizer step, so BATCH_SIZE=4 computes the same gradient as the tutorial's
batch 1 x 4 accumulation steps. Vision layers in front of the first trainable one are frozen
and deterministic, so their output is computed once per image and reused every epoch.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import io
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

UserError = common.UserError

# ---- model and data
MODEL_ID = "Salesforce/blip-image-captioning-base"  # hub id or local folder (model + processor)
DATA_DIR = "coco_sample"  # folder with captions.json ({file_name: caption}) and the images
OUTPUT_DIR = "blip_coco_finetuned"  # adapter, processor, logs, plots and checkpoints go here
VAL_FRACTION = 0.1  # share of images held out for validation (seeded); 0 = none
MAX_CAPTION_TOKENS = 64  # longer captions are cut; the cut caption keeps its [SEP]
AUGMENT = False  # True: a random 80-100% crop of each image every epoch (turns the prefix cache off)

# ---- LoRA
USE_LORA = True  # False: full fine-tune of every parameter (saves a whole model)
LORA_R = 16  # rank of the LoRA update
LORA_ALPHA = 32  # LoRA scaling numerator (scale = alpha / r)
LORA_DROPOUT = 0.05  # dropout on the LoRA branch input
LORA_TARGET_MODULES = [  # full module names (the tutorial's), or "all-linear"
    *[f"vision_model.encoder.layers.{i}.self_attn.qkv" for i in (6, 7, 8, 9)],
    *[f"text_decoder.bert.encoder.layer.{i}.attention.self.{p}" for i in (5, 6) for p in ("query", "key", "value")],
]
FREEZE_VISION = False  # True: freeze the whole vision encoder and drop vision LoRA targets

# ---- optimisation (defaults = the tutorial: AdamW, lr 3e-5, effective batch 4, 60 epochs, constant lr)
EPOCHS = 60  # passes over the training images
BATCH_SIZE = 4  # images per forward pass, per process
GRAD_ACCUM = 1  # forward passes per optimizer step; effective batch = BATCH_SIZE * GRAD_ACCUM * processes
LR = 3e-5  # AdamW learning rate
WEIGHT_DECAY = 0.01  # AdamW decoupled weight decay (0.01 = torch's default, as in the tutorial)
LR_SCHEDULE = "constant"  # constant | linear | cosine | ... (any transformers.get_scheduler name)
WARMUP_STEPS = 0  # optimizer steps of linear warm-up (with "constant" this means constant_with_warmup)
MAX_GRAD_NORM = 1.0  # clip the gradient norm to this; None = no clipping
SEED = 42  # seeds the split, the data order, LoRA init and dropout
MAX_STEPS = None  # stop after this many optimizer steps in total (quick tries, tests, benchmarks); None = off

# ---- speed
PRECISION = "auto"  # auto (bf16 where the hardware runs it natively, else fp32) | fp32 | bf16 | fp16 (CUDA)
NUM_WORKERS = 1  # DataLoader processes decoding images; 0 = decode in the main process
PREFIX_CACHE = "auto"  # auto: cache frozen vision layers in RAM, or on disk above the bound | disk | off
PREFIX_CACHE_MAX_MB = 1024  # RAM bound for that cache, per process; above it the cache goes to a file
NUM_THREADS = None  # torch CPU threads per process; None = torch's default (one per core)
FLUSH_DENORMALS = True  # CPU: treat floats below 1e-38 as zero; no visible effect, but avoids a 5x slowdown
SDPA = True  # run attention on torch's scaled_dot_product_attention (same results, faster); False = eager

# ---- checkpoints and logging
SAVE_EVERY_EPOCHS = 1  # checkpoint every N epochs (the last epoch is always saved)
SAVE_EVERY_STEPS = 0  # also checkpoint every N optimizer steps; 0 = off
KEEP_CHECKPOINTS = 2  # how many recent checkpoints to keep in OUTPUT_DIR/checkpoints
RESUME = "auto"  # auto: continue from the newest checkpoint if any | a checkpoint folder | None: start fresh
LOG_EVERY = 10  # one log line every N optimizer steps
NUM_SAMPLE_CAPTIONS = 3  # validation images captioned (greedy) after every epoch

# Settings that must match for a checkpoint to be continued (others, like EPOCHS, may change).
_RESUME_MUST_MATCH = ("MODEL_ID", "DATA_DIR", "USE_LORA", "LORA_R", "LORA_ALPHA", "LORA_DROPOUT",
                     "FREEZE_VISION", "BATCH_SIZE", "GRAD_ACCUM", "SEED", "VAL_FRACTION",
                     "MAX_CAPTION_TOKENS", "AUGMENT")


# ----------------------------------------------------------------------------- data
def check_config(cfg: dict) -> None:
    """Settings that cannot work fail in one line, before any loading."""
    for name in ("EPOCHS", "BATCH_SIZE", "GRAD_ACCUM", "KEEP_CHECKPOINTS", "LOG_EVERY", "SAVE_EVERY_EPOCHS"):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise UserError(f"{name}={cfg[name]!r}: must be a positive integer")
    if not 0 <= cfg["VAL_FRACTION"] < 1:
        raise UserError(f"VAL_FRACTION={cfg['VAL_FRACTION']!r}: must be in [0, 1)")
    if cfg["PREFIX_CACHE"] not in ("auto", "disk", "off"):
        raise UserError(f"PREFIX_CACHE={cfg['PREFIX_CACHE']!r}; valid values: auto, disk, off")


def load_dataset(data_dir, rank: int, world: int, log=print):
    """captions.json plus the images that decode; each process checks its share, all get the result."""
    from accelerate.utils import gather_object

    captions = read_captions(data_dir)
    good, skipped = check_images(data_dir, {n: captions[n] for n in sorted(captions)[rank::world]},
                                 progress=rank == 0)
    if world > 1:
        good = sorted(gather_object(good))
        skipped = sorted(gather_object(skipped))
    if skipped:
        log(skipped_warning(skipped, len(captions)))
    if not good:
        raise UserError(f"no usable images in {data_dir} ({len(captions)} captions, all skipped): "
                        "run `python download_coco.py` or fix DATA_DIR")
    return good, skipped


def read_captions(data_dir) -> dict[str, str]:
    """captions.json as {file_name: caption}, or a UserError that says what is wrong with it."""
    path = Path(data_dir) / "captions.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `python download_coco.py` first, or set DATA_DIR")
    try:
        captions = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(captions, dict):
        raise UserError(f"{path}: expected a mapping {{file_name: caption}}, got a JSON {type(captions).__name__}")
    for name, caption in captions.items():
        if not isinstance(caption, str):
            raise UserError(f"{path}: the caption of {name!r} is a {type(caption).__name__}, not a string")
    return captions


def check_images(data_dir, captions: dict[str, str], threads: int = 4, progress: bool = False):
    """Decode every image once, up front, so bad files are reported together before training.
    Nothing is kept: training reads the images from disk again when it needs them.

    Returns (good [(path, caption)], skipped [(file_name, reason)]); both sorted by file name.
    """
    from tqdm.auto import tqdm

    def problem(name):
        if not captions[name].strip():
            return "empty caption"
        path = Path(data_dir) / name
        if not path.is_file():
            return "missing file"
        try:
            common.open_image(path)
        except UserError as e:
            return str(e).split(": ", 1)[-1]
        return None

    names, problems = sorted(captions), []
    bar = tqdm(total=len(names), desc="check images", unit="img", disable=not progress or len(names) < 1000)
    with ThreadPoolExecutor(max(1, threads)) as pool:  # decoding releases the GIL
        for start in range(0, len(names), 1024):  # in chunks: no million pending futures
            problems += pool.map(problem, names[start:start + 1024])
            bar.update(len(names[start:start + 1024]))
    bar.close()
    good = [(str(Path(data_dir) / n), captions[n]) for n, p in zip(names, problems) if p is None]
    skipped = [(n, p) for n, p in zip(names, problems) if p is not None]
    return good, skipped


def skipped_warning(skipped, total: int, limit: int = 20) -> str:
    """One line that names every skipped file (the first `limit` of them, then a count)."""
    shown = "; ".join(f"{n} ({why})" for n, why in skipped[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"warning: skipped {len(skipped)} of {total} images: {shown}{more}"


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of range(n); validation gets round(n * val_fraction) items, at least 1 when asked."""
    order = random.Random(f"{seed}-split").sample(range(n), n)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def tokenize_captions(tokenizer, captions: list[str], max_tokens: int) -> list:
    """Token ids once per caption, as small int32 arrays (a Python list of ints costs ~10x more per
    caption with 100k captions). Truncation happens before [SEP] is added, so [SEP] survives."""
    import numpy as np

    ids = []
    for start in range(0, len(captions), 4096):
        ids += [np.asarray(x, dtype=np.int32) for x in
                tokenizer(captions[start:start + 4096], truncation=True, max_length=max_tokens).input_ids]
    return ids


def random_crop(image, rng: random.Random, min_area: float = 0.8):
    """The AUGMENT transform: a crop of 80-100% of the area at a random place (captions stay true)."""
    scale = math.sqrt(rng.uniform(min_area, 1.0))
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    x, y = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
    return image.crop((x, y, x + w, y + h))


class CaptionImages:
    """A map-style dataset: item i is {"index", "input_ids", "pixel_values"}.

    Images are read from disk when asked for, so memory does not grow with the dataset. Items in
    `skip_images` (their vision prefix is cached) come without pixels: no decoding at all.
    """

    def __init__(self, paths, token_ids, image_processor, augment=False, seed=0):
        self.paths, self.token_ids, self.image_processor = paths, token_ids, image_processor
        self.augment, self.seed, self.epoch = augment, seed, 0
        self.skip_images = frozenset()

    def __len__(self):
        return len(self.paths)

    def pixels(self, i):
        image = common.open_image(self.paths[i])
        if self.augment:
            image = random_crop(image, random.Random(f"{self.seed}-{self.epoch}-{i}"))
        return self.image_processor(images=image, return_tensors="pt").pixel_values[0]

    def __getitem__(self, i):
        pixel_values = None if i in self.skip_images else self.pixels(i)
        return {"index": i, "input_ids": self.token_ids[i], "pixel_values": pixel_values}


# ----------------------------------------------------------------------------- BLIP-specific pieces
def collate(examples, pad_token_id: int, bos_token_id: int) -> dict:
    """Batch with per-batch padding. BLIP generates after a [DEC] token (bos_token_id), not [CLS],
    so position 0 becomes [DEC]; labels are the input ids with every pad set to -100."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
        attention_mask[row, : len(e["input_ids"])] = 1
    input_ids[:, 0] = bos_token_id
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    with_pixels = [row for row, e in enumerate(examples) if e.get("pixel_values") is not None]
    return {
        "index": torch.tensor([e["index"] for e in examples]),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        # Only items whose vision prefix is not cached carry pixels; `pixel_rows` says which.
        "pixel_rows": torch.tensor(with_pixels, dtype=torch.long),
        "pixel_values": torch.stack([examples[r]["pixel_values"] for r in with_pixels]) if with_pixels else None,
    }


def default_lora_targets() -> list[str]:
    """The tutorial's targets: q/k/v of vision layers 6-9 and of text layers 5-6."""
    return list(LORA_TARGET_MODULES)


def vision_stages(blip) -> list:
    """BLIP's vision tower as a list of callables: embeddings, each encoder layer, final layer norm.
    Running them in order is exactly `blip.vision_model(pixel_values).last_hidden_state`."""
    vision = blip.vision_model
    return [vision.embeddings, *vision.encoder.layers, vision.post_layernorm]


def frozen_prefix_length(blip) -> tuple[int, str]:
    """How many leading vision stages are frozen and deterministic (no trainable parameter, no active
    dropout), so their output is a pure function of the image. Returns (k, reason if k == 0)."""
    import torch

    for k, stage in enumerate(vision_stages(blip)):
        if any(p.requires_grad for p in stage.parameters()):
            return k, "the vision embeddings are trained" if k == 0 else ""
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in stage.modules()):
            return k, "the vision embeddings have dropout" if k == 0 else ""
    return len(vision_stages(blip)), ""


def prefix_shape(blip, k: int) -> tuple[int, ...]:
    """Shape of one image's cached prefix after k vision stages. With k = 0 (the first stage is
    trained) the cache still saves decoding and preprocessing: it holds the pixel values."""
    vc = blip.config.vision_config
    if k == 0:
        return (3, vc.image_size, vc.image_size)
    return ((vc.image_size // vc.patch_size) ** 2 + 1, vc.hidden_size)


def caption_loss(logits, labels, label_smoothing: float = 0.0):
    """Next-token cross-entropy, averaged over each caption's own tokens: one loss per caption."""
    import torch.nn.functional as F

    targets = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                 reduction="none", label_smoothing=label_smoothing)
    return token_loss.sum(1) / (targets != -100).sum(1).clamp(min=1)


def _make_caption_model_class():
    import torch

    class CaptionModel(torch.nn.Module):
        """BLIP's captioning forward, split after `prefix_stages` vision stages so that a cached
        prefix can be fed in. Returns one loss per caption. (Accelerate wraps this module.)"""

        def __init__(self, model, prefix_stages: int):
            super().__init__()
            self.model, self.prefix_stages = model, prefix_stages

        def blip(self):
            return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

        def vision_prefix(self, pixel_values):
            h = pixel_values
            for stage in vision_stages(self.blip())[: self.prefix_stages]:
                h = stage(h)
            return h

        def forward(self, input_ids, attention_mask, labels, pixel_values=None, vision_prefix=None):
            blip = self.blip()
            stages = vision_stages(blip)
            h = pixel_values if vision_prefix is None else vision_prefix
            for stage in stages if vision_prefix is None else stages[self.prefix_stages:]:
                h = stage(h)
            logits = blip.text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=h, use_cache=False).logits
            return caption_loss(logits, labels, blip.config.text_config.label_smoothing)

    return CaptionModel


# ----------------------------------------------------------------------------- LoRA
def resolve_targets(model, targets, freeze_vision: bool):
    """Check every target names a module (else name the nearest real ones) and drop vision targets
    when FREEZE_VISION. Returns (targets for LoraConfig, exclude regex or None, dropped names)."""
    targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    if targets == ["all-linear"]:
        if freeze_vision:
            return "all-linear", r".*vision_model\..*", ["every vision_model linear layer"]
        return "all-linear", None, []
    names = [n for n, _ in model.named_modules() if n]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            near = difflib.get_close_matches(t, names, n=3, cutoff=0.3)
            raise UserError(f"LORA_TARGET_MODULES: {t!r} matches no module of the model; "
                            f"nearest real names: {', '.join(near) or '(none)'}")
    dropped = [t for t in targets if freeze_vision and t.startswith("vision_model")]
    kept = [t for t in targets if t not in dropped]
    if not kept:
        raise UserError("FREEZE_VISION=True dropped every LoRA target: add text targets to LORA_TARGET_MODULES")
    return kept, None, dropped


def apply_lora(model, cfg, base_ref: str, log=print):
    """LoraConfig -> get_peft_model -> print_trainable_parameters(), the idiom peft users know."""
    from peft import LoraConfig, get_peft_model

    targets, exclude, dropped = resolve_targets(model, cfg["LORA_TARGET_MODULES"], cfg["FREEZE_VISION"])
    if dropped:
        log(f"FREEZE_VISION=True: vision encoder frozen; dropped vision LoRA targets: {', '.join(dropped)}")
    lora_config = LoraConfig(r=cfg["LORA_R"], lora_alpha=cfg["LORA_ALPHA"], lora_dropout=cfg["LORA_DROPOUT"],
                             target_modules=targets, exclude_modules=exclude, bias="none")
    try:
        model = get_peft_model(model, lora_config)
    except ValueError as e:
        raise UserError(f"LORA_TARGET_MODULES: {e}") from None
    model.peft_config["default"].base_model_name_or_path = base_ref  # what inference loads as the base
    return model


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def store_frozen_linears_in(model, dtype) -> int:
    """Keep frozen nn.Linear weights in the autocast dtype. Autocast rounds them to that dtype on every
    use anyway, so results are identical; this only saves the per-step cast and half their memory.
    Weights shared with another module (BLIP ties the LM head to the word embeddings) are left alone."""
    import torch

    seen, shared = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (shared if id(p) in seen else seen).add(id(p))
    converted = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and id(module.weight) not in shared:
            for p in (module.weight, module.bias):
                if p is not None and not p.requires_grad:
                    p.data = p.data.to(dtype)
                    converted += p.numel()
    return converted


# ----------------------------------------------------------------------------- data order and sharding
def deal_columns(n_items: int, effective_batch: int, world_size: int, seed: int) -> list[list[int]]:
    """Deal the training items, once, into `effective_batch` columns (item i lands in column i % E
    of a seeded shuffle). Each epoch shuffles every column on its own, and optimizer step k takes the
    k-th item of every column. Process r owns a fixed block of columns, so its shard (and its prefix
    cache) never changes, and 1 process x batch 4 sees the same steps as 2 processes x batch 2.
    With several processes the list wraps around so every process has the same number of steps."""
    order = random.Random(f"{seed}-deal").sample(range(n_items), n_items)
    while world_size > 1 and len(order) % effective_batch:
        order.append(order[len(order) % n_items])
    return [order[c::effective_batch] for c in range(effective_batch)]


def epoch_steps(columns, epoch: int, seed: int, rank: int, batch_size: int, grad_accum: int):
    """This process's optimizer steps for one epoch: a list of (n_global, micro_batches), where
    n_global counts the items of the step over all processes and micro_batches has exactly
    grad_accum lists of item positions (empty ones, only in a short last step, come first)."""
    cols = [random.Random(f"{seed}-{epoch}-{c}").sample(col, len(col)) for c, col in enumerate(columns)]
    per_rank = batch_size * grad_accum
    mine = cols[rank * per_rank:(rank + 1) * per_rank]
    steps = []
    for k in range(max(len(c) for c in cols)):
        micro = [[c[k] for c in mine[j * batch_size:(j + 1) * batch_size] if k < len(c)] for j in range(grad_accum)]
        steps.append((sum(k < len(c) for c in cols), sorted(micro, key=len)))
    return steps


# ----------------------------------------------------------------------------- the frozen-prefix cache
class PrefixCache:
    """Output of the frozen vision stages for this process's images, computed once, reused every epoch.

    Lives in RAM when it fits in max_mb, else in a file read back per batch (the OS page cache, not
    this process, holds it). Exact: the same function of the same image gives the same numbers.
    """

    def __init__(self, indices, shape, dtype, mode: str, path: Path | None = None):
        import torch

        self.slot = {i: s for s, i in enumerate(sorted(set(indices)))}
        self.shape, self.dtype, self.mode, self.path = tuple(shape), dtype, mode, path
        self.item_bytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        self.filled = set()
        if mode == "ram":
            self.store = torch.empty((len(self.slot), *self.shape), dtype=dtype)
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self.fd, len(self.slot) * self.item_bytes)

    @staticmethod
    def plan(n_items: int, item_bytes: int, max_mb: float, requested: str, spill_dir: Path) -> tuple[str, str]:
        """Choose 'ram' | 'disk' | 'off' and say why, in one line."""
        need_mb = n_items * item_bytes / 2**20
        if requested == "disk" or need_mb > max_mb:
            free_mb = shutil.disk_usage(spill_dir).free / 2**20
            if free_mb > 2 * need_mb + 1024:
                why = "PREFIX_CACHE='disk'" if requested == "disk" else f"above PREFIX_CACHE_MAX_MB={max_mb:g}"
                return "disk", f"prefix cache: {need_mb:.0f} MB on disk in {spill_dir} ({why})"
            return "off", (f"prefix cache: off ({need_mb:.0f} MB is above PREFIX_CACHE_MAX_MB={max_mb:g} "
                           f"and only {free_mb:.0f} MB of disk is free)")
        return "ram", f"prefix cache: {need_mb:.0f} MB in RAM (bound PREFIX_CACHE_MAX_MB={max_mb:g})"

    def has(self, i: int) -> bool:
        return i in self.filled

    def put(self, indices, values):
        values = values.detach().to("cpu", self.dtype).contiguous()
        for i, v in zip(indices, values):
            if self.mode == "ram":
                self.store[self.slot[i]] = v
            else:  # raw bytes; viewing as int16/int32 lets numpy carry bf16 too
                os.pwrite(self.fd, v.view(_int_view(self.dtype)).numpy().tobytes(), self.slot[i] * self.item_bytes)
            self.filled.add(i)

    def get(self, indices):
        import torch

        if self.mode == "ram":
            return self.store[torch.tensor([self.slot[i] for i in indices])]
        rows = [torch.frombuffer(bytearray(os.pread(self.fd, self.item_bytes, self.slot[i] * self.item_bytes)),
                                 dtype=self.dtype).view(self.shape) for i in indices]
        return torch.stack(rows)

    def close(self):
        if self.mode == "disk":
            os.close(self.fd)
            Path(self.path).unlink(missing_ok=True)


def plan_prefix_cache(cfg, blip, k: int, why_not: str, precision: str, indices, spill_path: Path):
    """The prefix cache for these dataset indices (this process's train and validation images), or
    None; plus its mode and the one line that says what it holds, where, or why it is off."""
    import torch

    if cfg["PREFIX_CACHE"] == "off":
        return None, "off", "prefix cache: off (PREFIX_CACHE='off')"
    if cfg["AUGMENT"]:
        return None, "off", "prefix cache: off (AUGMENT=True changes the images every epoch)"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    shape = prefix_shape(blip, k)
    item_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    mode, line = PrefixCache.plan(len(indices), item_bytes, cfg["PREFIX_CACHE_MAX_MB"], cfg["PREFIX_CACHE"],
                                  spill_path.parent)
    if mode == "off":
        return None, mode, line
    what = ("the whole vision output" if k == len(vision_stages(blip)) else
            f"embeddings + vision layers 0-{k - 2}" if k > 1 else "the vision embeddings" if k == 1
            else f"the preprocessed images only ({why_not})")
    return PrefixCache(indices, shape, dtype, mode, spill_path), mode, f"{line}; caches {what} of {len(indices)} images"


def _int_view(dtype):
    import torch

    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]


def vision_batch(core, batch, cache, autocast):
    """Keyword arguments for the vision side of a forward: pixels when there is no cache, else the
    cached prefix, computing (without gradients) the prefix of items seen for the first time."""
    import torch

    if cache is None:
        return {"pixel_values": batch["pixel_values"]}
    index = batch["index"].tolist()
    rows = [r for r in batch["pixel_rows"].tolist() if not cache.has(index[r])]
    if rows:
        where = [batch["pixel_rows"].tolist().index(r) for r in rows]
        with torch.no_grad(), autocast():
            cache.put([index[r] for r in rows], core.vision_prefix(batch["pixel_values"][where]))
    return {"vision_prefix": cache.get(index)}


def optimizer_step(accelerator, wrapped, core, optimizer, scheduler, micro_batches, n_global: int, batches,
                   cache, max_grad_norm) -> tuple[float, int, float | None]:
    """One optimizer step: GRAD_ACCUM micro-batches under accelerator.accumulate(). The loss is scaled
    so the gradient is the mean over the step's n_global captions on all processes (accelerate divides
    by GRAD_ACCUM and DDP averages over processes; the scale undoes both). Returns (sum of the
    per-caption losses, number of captions, gradient norm before clipping)."""
    import torch

    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / n_global
    loss_sum, n, grad_norm = 0.0, 0, None
    for micro_batch in micro_batches:
        with accelerator.accumulate(wrapped):
            if micro_batch:  # empty only in a short last step, and then first: the last one syncs
                batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
                losses = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 **vision_batch(core, batch, cache, accelerator.autocast))
                accelerator.backward(losses.sum() * scale)
                loss_sum, n = loss_sum + losses.detach().double().sum().item(), n + len(micro_batch)
            if accelerator.sync_gradients and max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(
                    [p for p in core.parameters() if p.requires_grad], max_grad_norm))
            optimizer.step()  # accelerate's optimizer skips these until the last micro-batch
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
    return loss_sum, n, grad_norm


# ----------------------------------------------------------------------------- evaluation and logs
def evaluate(core, loader, cache, autocast, device) -> tuple[float, int]:
    """Sum and count of per-caption validation losses over this process's validation items."""
    import torch

    total, count = 0.0, 0
    core.eval()
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with autocast():
                losses = core(batch["input_ids"], batch["attention_mask"], batch["labels"],
                              **vision_batch(core, batch, cache, autocast))
            total, count = total + losses.double().sum().item(), count + len(losses)
    core.train()
    return total, count


def sample_captions(blip, processor, paths, max_tokens: int, autocast, device) -> list[str]:
    """Greedy captions, the way inference will produce them."""
    import torch

    if not paths:
        return []
    pixels = processor(images=[common.open_image(p) for p in paths], return_tensors="pt").pixel_values.to(device)
    was_training = blip.training
    blip.eval()
    with torch.no_grad(), autocast():
        ids = blip.generate(pixel_values=pixels, max_new_tokens=max_tokens, num_beams=1, do_sample=False)
    blip.train(was_training)
    return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]


def plot_losses(history: list[dict], path) -> None:
    """loss_curve.png: logged train loss and per-epoch train/validation loss against epochs."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, never opens a window

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    logs = [m for m in history if m["type"] == "train"]
    epochs = [m for m in history if m["type"] == "epoch"]
    if logs:
        ax.plot([m["epoch_float"] for m in logs], [m["loss"] for m in logs], color="tab:blue", alpha=0.35,
                label=f"train (every {logs[0].get('log_every', '')} steps)")
    ax.plot([m["epoch"] for m in epochs], [m["train_loss"] for m in epochs], "o-", color="tab:blue", label="train")
    val = [m for m in epochs if m.get("val_loss") is not None]
    if val:
        ax.plot([m["epoch"] for m in val], [m["val_loss"] for m in val], "o-", color="tab:orange", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (mean per caption)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    common.atomic_write_bytes(path, buf.getvalue())


def write_metrics(history: list[dict], out_dir: Path) -> None:
    common.atomic_write_bytes(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history).encode())
    plot_losses(history, out_dir / "loss_curve.png")


def peak_rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # Windows
        return None


# ----------------------------------------------------------------------------- checkpoints
def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Whole checkpoints, oldest first (temporary folders start with '.' and are never listed)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(accelerator, ckpt_dir: Path, global_step: int, state: dict, keep: int) -> Path:
    """accelerator.save_state into a temporary folder, then one rename: a checkpoint is whole or
    absent. A failed write removes the temporary folder and leaves older checkpoints as they were."""
    import torch

    final, tmp = ckpt_dir / f"step-{global_step:08d}", ckpt_dir / f".tmp-step-{global_step:08d}"
    error = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # model (trainable part, see the pre-hook), optimizer, scheduler, RNG
        if accelerator.is_main_process:
            common.atomic_write_json(tmp / "trainer_state.json", state)
    except OSError as e:
        error = e
    failed = accelerator.reduce(torch.tensor(float(error is not None), device=accelerator.device), "sum").item()
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(ckpt_dir)
        why = error.strerror or error if error else "another process failed"
        raise UserError(f"could not write checkpoint {final} ({why}); "
                        f"{'the previous checkpoint ' + str(previous[-1]) + ' is intact' if previous else 'no earlier checkpoint'}"
                        f". Free disk space or change OUTPUT_DIR")
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume(resume, ckpt_dir: Path) -> Path | None:
    if resume in (None, "", "None"):
        return None
    if resume == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"RESUME={resume!r} is not a checkpoint folder (no trainer_state.json); "
                        f"use 'auto', None, or a folder under {ckpt_dir}")
    return path


def load_checkpoint(accelerator, wrapped, path: Path, cfg: dict, world: int) -> dict:
    """Restore weights, optimizer, scheduler and RNG states; return the saved trainer state.
    Refuses a checkpoint made with settings that would change what is being trained."""
    from safetensors import safe_open

    saved = json.loads((path / "trainer_state.json").read_text())
    changed = [n for n in _RESUME_MUST_MATCH if saved["config"].get(n) != cfg[n]]
    if saved.get("world_size") != world:
        changed.append(f"number of processes ({saved.get('world_size')} -> {world})")
    if changed:
        raise UserError(f"checkpoint {path} was made with different settings ({', '.join(map(str, changed))}); "
                        "use the same settings, or --RESUME=None to start fresh")
    accelerator.load_state(str(path), strict=False)  # strict=False: the file holds only trainable weights
    with safe_open(path / "model.safetensors", "pt") as f:
        missing = trainable_names(wrapped) - set(f.keys())
    if missing:
        raise UserError(f"checkpoint {path} lacks {len(missing)} trainable weights, e.g. {sorted(missing)[0]}")
    return saved


def trainable_names(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def params_digest(module) -> str:
    """sha256 of the trainable parameters, to check that processes hold the same weights."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- Ctrl-C
class StopRequest:
    """The first Ctrl-C (or SIGTERM) asks the loop to save a checkpoint and stop after the current
    optimizer step; a second Ctrl-C aborts at once."""

    def __init__(self, log):
        self.requested, self.log, self.previous = False, log, {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\nstop requested: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

    def __enter__(self):
        with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _quiet_worker(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = common.configure(globals(), argv, __doc__)
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import broadcast_object_list, gather_object, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler
    from transformers.utils import logging as hf_logging

    started = time.time()
    if cfg["NUM_THREADS"]:
        torch.set_num_threads(cfg["NUM_THREADS"])
    if cfg["FLUSH_DENORMALS"]:
        # Random (and some real) weights make gradients with denormal floats, which x86 CPUs
        # process ~100x slower; flushing them to zero changes nothing a loss curve can show.
        # Set before any parallel work, so the CPU threads started later inherit it.
        torch.set_flush_denormal(True)
    # The launcher's world (accelerate launch / torchrun), known before the Accelerator exists. On a
    # machine without GPUs accelerate needs cpu=True to join the launched processes over gloo.
    on_cpu = not (torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    is_main, rank, world = state.is_main_process, state.process_index, state.num_processes

    def log(msg=""):
        if is_main:
            tqdm.write(str(msg))

    if is_main:
        common.print_config(cfg, "train_blip.py")
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

    # -- settings, and the output folder, checked before minutes of work
    check_config(cfg)
    # 'auto' probes the CPU (bf16 is slower than fp32 on some); all processes take the main one's choice.
    precision = [common.resolve_precision(cfg["PRECISION"], state.device.type)]
    broadcast_object_list(precision)
    precision = precision[0]
    log(f"precision: {precision}" + (" (chosen by PRECISION='auto')" if cfg["PRECISION"] == "auto" else ""))
    out_dir = common.check_writable(cfg["OUTPUT_DIR"], "OUTPUT_DIR")
    ckpt_dir = out_dir / "checkpoints"

    # -- data: captions, then every image decoded once (each process checks its share)
    good, skipped = load_dataset(cfg["DATA_DIR"], rank, world, log)

    # -- model and processor
    set_seed(cfg["SEED"])
    processor = common.load_processor(cfg["MODEL_ID"])
    model = common.load_model(cfg["MODEL_ID"])
    base_ref = str(Path(cfg["MODEL_ID"]).resolve()) if Path(cfg["MODEL_ID"]).is_dir() else cfg["MODEL_ID"]
    text_config = model.config.text_config
    max_tokens = min(cfg["MAX_CAPTION_TOKENS"], text_config.max_position_embeddings)
    if cfg["FREEZE_VISION"]:
        model.vision_model.requires_grad_(False)
    if cfg["USE_LORA"]:
        model = apply_lora(model, cfg, base_ref, log)
        if is_main:
            model.print_trainable_parameters()
    else:
        log(f"full fine-tune: {count_trainable(model):,} trainable parameters")
    if cfg["SDPA"]:
        common.enable_sdpa(model)
    core_cls = _make_caption_model_class()
    blip = model.get_base_model() if cfg["USE_LORA"] else model

    # -- split, tokens, data order
    paths = [p for p, _ in good]
    token_ids = tokenize_captions(processor.tokenizer, [c for _, c in good], max_tokens)
    train_ids, val_ids = split_train_val(len(good), cfg["VAL_FRACTION"], cfg["SEED"])
    dataset = CaptionImages(paths, token_ids, processor.image_processor, cfg["AUGMENT"], cfg["SEED"])
    effective_batch = cfg["BATCH_SIZE"] * cfg["GRAD_ACCUM"] * world
    columns = deal_columns(len(train_ids), effective_batch, world, cfg["SEED"])
    per_rank = cfg["BATCH_SIZE"] * cfg["GRAD_ACCUM"]
    my_train = sorted({train_ids[i] for col in columns[rank * per_rank:(rank + 1) * per_rank] for i in col})
    my_val = val_ids[rank::world]
    steps_per_epoch = max(len(c) for c in columns)
    total_steps = cfg["EPOCHS"] * steps_per_epoch
    if cfg["MAX_STEPS"] is not None:
        total_steps = min(total_steps, cfg["MAX_STEPS"])
    log(f"data: {len(train_ids)} train / {len(val_ids)} validation images; {world} process(es) x batch "
        f"{cfg['BATCH_SIZE']} x {cfg['GRAD_ACCUM']} accumulation = effective batch {effective_batch}; "
        f"{steps_per_epoch} optimizer steps per epoch")

    # -- the frozen-prefix cache: which vision stages, where, or why not
    k, why_not = frozen_prefix_length(blip)
    cache, cache_mode, cache_line = plan_prefix_cache(cfg, blip, k, why_not, precision, my_train + my_val,
                                                      out_dir / f".prefix_cache-rank{rank}.bin")
    log(cache_line)

    # -- accelerate: device, precision, accumulation, processes
    AcceleratorState._reset_state(reset_partial_state=False)  # main() may run twice in one process (tests)
    accelerator = Accelerator(cpu=on_cpu, mixed_precision={"fp32": "no"}.get(precision, precision),
                              gradient_accumulation_steps=cfg["GRAD_ACCUM"], step_scheduler_with_optimizer=False)
    if precision in ("bf16", "fp16") and cfg["USE_LORA"]:
        store_frozen_linears_in(blip, torch.bfloat16 if precision == "bf16" else torch.float16)
    core = core_cls(model, k if cache is not None else 0)
    optimizer = torch.optim.AdamW([p for p in core.parameters() if p.requires_grad], lr=cfg["LR"], weight_decay=cfg["WEIGHT_DECAY"])
    schedule_name = "constant_with_warmup" if cfg["LR_SCHEDULE"] == "constant" and cfg["WARMUP_STEPS"] else cfg["LR_SCHEDULE"]
    try:
        scheduler = get_scheduler(schedule_name, optimizer, num_warmup_steps=cfg["WARMUP_STEPS"],
                                  num_training_steps=max(1, total_steps))
    except ValueError as e:
        raise UserError(f"LR_SCHEDULE={cfg['LR_SCHEDULE']!r}: {e}") from None
    wrapped, optimizer, scheduler = accelerator.prepare(core, optimizer, scheduler)
    n_trainable = count_trainable(core)

    # Checkpoints hold only the trainable parameters (the adapter), not a copy of the frozen model.
    def keep_trainable(models, weights, _dir):
        for m, w in zip(models, weights):
            names = trainable_names(m)
            for key in [key for key in w if key not in names]:
                del w[key]

    accelerator.register_save_state_pre_hook(keep_trainable)

    # -- resume
    history, global_step, start_epoch, start_step = [], 0, 0, 0
    sums = {"epoch_loss": 0.0, "epoch_n": 0, "log_loss": 0.0, "log_n": 0}
    resume_from = find_resume(cfg["RESUME"], ckpt_dir)
    if cfg["RESUME"] in (None, "", "None") and list_checkpoints(ckpt_dir):
        log(f"RESUME=None: starting fresh; removing old checkpoints in {ckpt_dir}")
        if is_main:
            shutil.rmtree(ckpt_dir)
    if resume_from is not None:
        saved = load_checkpoint(accelerator, wrapped, resume_from, cfg, world)
        history, global_step = saved["history"], saved["global_step"]
        start_epoch, start_step, sums = saved["epoch"], saved["next_step"], saved["sums"]
        log(f"resumed from {resume_from}: epoch {start_epoch + 1}, step {global_step}" if start_epoch < cfg["EPOCHS"]
            else f"{resume_from} already finished EPOCHS={cfg['EPOCHS']}; nothing to train (raise EPOCHS to go on)")
    if is_main and history:
        write_metrics(history, out_dir)  # drop lines logged after the checkpoint by the interrupted run

    def trainer_state(epoch, next_step):
        return {"epoch": epoch, "next_step": next_step, "global_step": global_step, "sums": sums,
                "history": history, "config": {n: cfg[n] for n in _RESUME_MUST_MATCH}, "world_size": world}

    def loader(indices_batches, workers):
        # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=indices_batches, num_workers=workers, worker_init_fn=_quiet_worker,
            generator=torch.Generator().manual_seed(cfg["SEED"]),
            collate_fn=functools.partial(collate, pad_token_id=text_config.pad_token_id,
                                         bos_token_id=text_config.bos_token_id))

    # -- the loop
    sample_items = (val_ids or train_ids)[: cfg["NUM_SAMPLE_CAPTIONS"]]
    epoch_rates, epoch_times, stopped, last_ckpt = [], [], False, None
    bar = tqdm(total=total_steps, initial=global_step, disable=not is_main, desc="train", unit="step")
    wrapped.train()
    with StopRequest(log) as stop, contextlib.ExitStack() as cleanup:
        if cache is not None:
            cleanup.callback(cache.close)  # the disk cache file goes, whatever happens
        for epoch in range(start_epoch, cfg["EPOCHS"]):
            if global_step >= total_steps:
                break
            steps = epoch_steps(columns, epoch, cfg["SEED"], rank, cfg["BATCH_SIZE"], cfg["GRAD_ACCUM"])
            dataset.epoch = epoch
            dataset.skip_images = frozenset(cache.filled) if cache is not None else frozenset()
            batches = [[train_ids[i] for i in mb] for _, mbs in steps[start_step:] for mb in mbs if mb]
            needs_images = any(i not in dataset.skip_images for b in batches for i in b)
            it = iter(loader(batches, cfg["NUM_WORKERS"] if needs_images else 0))
            t0, n_seen, next_step = time.time(), 0, start_step
            for n_global, micro_batches in steps[start_step:]:
                loss_sum, n, grad_norm = optimizer_step(accelerator, wrapped, core, optimizer, scheduler,
                                                        micro_batches, n_global, it, cache, cfg["MAX_GRAD_NORM"])
                sums["epoch_loss"], sums["log_loss"] = sums["epoch_loss"] + loss_sum, sums["log_loss"] + loss_sum
                sums["epoch_n"], sums["log_n"], n_seen = sums["epoch_n"] + n, sums["log_n"] + n, n_seen + n
                global_step, next_step = global_step + 1, next_step + 1
                bar.update(1)
                if global_step % cfg["LOG_EVERY"] == 0:
                    loss_sum, loss_n = accelerator.reduce(torch.tensor([sums["log_loss"], sums["log_n"]],
                                                                       dtype=torch.float64), "sum").tolist()
                    rate = n_seen * world / max(time.time() - t0, 1e-9)
                    entry = {"type": "train", "epoch": epoch + 1, "step": global_step,
                             "epoch_float": round(epoch + next_step / steps_per_epoch, 4),
                             "loss": loss_sum / max(loss_n, 1), "lr": scheduler.get_last_lr()[0],
                             "grad_norm": grad_norm,
                             "samples_per_s": round(rate, 3), "log_every": cfg["LOG_EVERY"]}
                    history.append(entry)
                    sums["log_loss"], sums["log_n"] = 0.0, 0
                    log(f"epoch {epoch + 1} step {global_step}: loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                        f"{rate:.2f} samples/s")
                    if is_main:
                        write_metrics(history, out_dir)
                if stop.requested:
                    accelerator.set_trigger()
                if accelerator.check_trigger():
                    stopped = True
                    break
                if cfg["SAVE_EVERY_STEPS"] and global_step % cfg["SAVE_EVERY_STEPS"] == 0 and next_step < len(steps):
                    last_ckpt = save_checkpoint(accelerator, ckpt_dir, global_step, trainer_state(epoch, next_step),
                                                cfg["KEEP_CHECKPOINTS"])
                if global_step >= total_steps:
                    break
            train_time = time.time() - t0
            del it
            if stopped:
                last_ckpt = save_checkpoint(accelerator, ckpt_dir, global_step, trainer_state(epoch, next_step),
                                            cfg["KEEP_CHECKPOINTS"])
                break
            if n_seen:
                epoch_rates.append(n_seen * world / max(train_time, 1e-9))
                epoch_times.append(train_time)

            # -- end of epoch: validation loss, sample captions, metrics, plot, checkpoint
            val_batches = [my_val[i:i + cfg["BATCH_SIZE"]] for i in range(0, len(my_val), cfg["BATCH_SIZE"])]
            dataset.skip_images = frozenset(cache.filled) if cache is not None else frozenset()
            val_sum, val_n = evaluate(core, loader(val_batches, 0), cache, accelerator.autocast, accelerator.device)
            totals = accelerator.reduce(torch.tensor([sums["epoch_loss"], sums["epoch_n"], val_sum, val_n],
                                                     dtype=torch.float64), "sum").tolist()
            entry = {"type": "epoch", "epoch": epoch + 1, "step": global_step,
                     "train_loss": totals[0] / max(totals[1], 1),
                     "val_loss": totals[2] / totals[3] if totals[3] else None,
                     "samples_per_s": round(epoch_rates[-1], 3) if n_seen else None,
                     "train_time_s": round(train_time, 2)}
            if is_main:
                texts = sample_captions(blip, processor, [paths[i] for i in sample_items], max_tokens,
                                        accelerator.autocast, accelerator.device)
                entry["captions"] = [{"file": Path(paths[i]).name, "target": good[i][1], "generated": t}
                                     for i, t in zip(sample_items, texts)]
            history.append(entry)
            sums["epoch_loss"], sums["epoch_n"] = 0.0, 0
            val_text = "-" if entry["val_loss"] is None else f"{entry['val_loss']:.4f}"
            log(f"epoch {epoch + 1}/{cfg['EPOCHS']}: train loss {entry['train_loss']:.4f}  val loss {val_text}  "
                f"{entry['samples_per_s'] or 0:.2f} samples/s  {train_time:.1f} s")
            for c in entry.get("captions", []):
                log(f"  {c['file']}\n    target: {c['target']}\n    model:  {c['generated']}")
            if is_main:
                write_metrics(history, out_dir)
            start_step = 0
            last_epoch = epoch + 1 == cfg["EPOCHS"] or global_step >= total_steps
            if last_epoch or (epoch + 1) % cfg["SAVE_EVERY_EPOCHS"] == 0:
                # A MAX_STEPS stop mid-epoch is saved as mid-epoch, so a later run finishes the epoch.
                position = (epoch + 1, 0) if next_step >= len(steps) else (epoch, next_step)
                last_ckpt = save_checkpoint(accelerator, ckpt_dir, global_step, trainer_state(*position),
                                            cfg["KEEP_CHECKPOINTS"])
    bar.close()

    if stopped:
        resume_args = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
                               if not a.startswith("--RESUME="))
        log(f"stopped at epoch {epoch + 1}, step {global_step}; checkpoint: {last_ckpt}\n"
            f"resume with: python train_blip.py {resume_args}".rstrip() + "   (RESUME='auto' continues from it)")
        raise KeyboardInterrupt

    # -- outputs: adapter (or full model) + processor, config, results; only the main process writes
    epochs_done = [m for m in history if m["type"] == "epoch"]
    digests = gather_object([params_digest(core)])
    steady = epoch_rates[1:] or epoch_rates
    results = {
        "output_dir": str(out_dir), "trainable_params": n_trainable,
        "total_params": sum(p.numel() for p in core.parameters()),
        "epochs": len(epochs_done), "optimizer_steps": global_step,
        "final_train_loss": epochs_done[-1]["train_loss"] if epochs_done else None,
        "final_val_loss": epochs_done[-1]["val_loss"] if epochs_done else None,
        "train_samples_per_s": round(sum(steady) / len(steady), 3) if steady else None,
        "epoch_samples_per_s": [round(r, 3) for r in epoch_rates], "epoch_train_time_s": [round(t, 2) for t in epoch_times],
        "peak_rss_mb": peak_rss_mb(), "precision": precision, "prefix_cache": cache_mode, "prefix_cache_note": cache_line,
        "prefix_stages": k if cache is not None else 0, "world_size": world, "batch_size": cfg["BATCH_SIZE"],
        "grad_accum": cfg["GRAD_ACCUM"], "effective_batch": effective_batch,
        "n_train": len(train_ids), "n_val": len(val_ids), "skipped": [{"file": n, "reason": r} for n, r in skipped],
        "resumed_from": str(resume_from) if resume_from else None, "last_checkpoint": str(last_ckpt) if last_ckpt else None,
        "trainable_digest_per_process": digests, "elapsed_s": round(time.time() - started, 1),
    }
    effective = dict(cfg, PRECISION=precision, MAX_CAPTION_TOKENS=max_tokens, MODEL_ID=base_ref,
                     LORA_TARGET_MODULES=sorted(model.peft_config["default"].target_modules)
                     if cfg["USE_LORA"] and not isinstance(model.peft_config["default"].target_modules, str)
                     else cfg["LORA_TARGET_MODULES"])
    if is_main:
        save_outputs(model, processor, out_dir, cfg["USE_LORA"])
        common.atomic_write_json(out_dir / "training_config.json", effective)
        common.atomic_write_json(out_dir / "train_results.json", results)
        log(f"done: {len(epochs_done)} epochs, {global_step} optimizer steps, final train loss "
            f"{results['final_train_loss']}; {results['train_samples_per_s']} samples/s; outputs in {out_dir}")
    accelerator.wait_for_everyone()
    return results


def save_outputs(model, processor, out_dir: Path, use_lora: bool) -> None:
    """Save in the standard formats (peft adapter or full model, plus the processor), via a temporary
    folder so each file appears whole; stale files of the other kind are removed."""
    tmp = out_dir / ".outputs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        stale = ("model.safetensors", "config.json") if use_lora else ("adapter_model.safetensors", "adapter_config.json")
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    except OSError as e:
        raise UserError(f"could not write the outputs to {out_dir} ({e.strerror or e}); "
                        "free disk space or change OUTPUT_DIR (the checkpoints are intact)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    common.cli(main)()
