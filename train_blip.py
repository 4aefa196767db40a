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

How a step works: the model family (families.py) builds each batch; for BLIP the [DEC] token
goes to position 0 (as generate() does) and pads are masked out of the labels. The loss is each
caption's mean token loss, averaged over the captions of an optimizer step, so BATCH_SIZE=4
computes the same gradient as the tutorial's batch 1 x 4 accumulation steps. Vision layers in
front of the first trainable one are frozen and deterministic, so their output is computed once
per image and reused every epoch (the prefix cache).

The file reads in the order it runs: constants, checks, data, model, one training step, the
loop, checkpoints, outputs, main().
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

import common
import families
from common import UserError

# ---- model and data
MODEL_ID = "Salesforce/blip-image-captioning-base"  # hub id or local folder (model + processor)
DATA_DIR = "coco_sample"  # folder with captions.json ({file_name: caption}) and the images
OUTPUT_DIR = "blip_coco_finetuned"  # adapter, processor, logs, plots and checkpoints go here
VAL_FRACTION = 0.1  # share of images held out for validation (seeded); 0 = none
MAX_CAPTION_TOKENS = 64  # longer captions are cut; the cut caption keeps its end token
PROMPT = "auto"  # auto: the family's own (none for BLIP and GIT) | any text before each caption
AUGMENT = False  # True: a random 80-100% crop of each image every epoch (turns the prefix cache off)

# ---- LoRA
USE_LORA = True  # False: full fine-tune of every parameter (saves a whole model)
LORA_R = 16  # rank of the LoRA update
LORA_ALPHA = 32  # LoRA scaling numerator (scale = alpha / r)
LORA_DROPOUT = 0.05  # dropout on the LoRA branch input
LORA_TARGET_MODULES = "auto"  # auto: the family's default (BLIP: the tutorial's) | names | "all-linear"
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
NUM_SAMPLE_CAPTIONS = 3  # validation images captioned (greedy) after the first and last epoch, and ...
SAMPLE_EVERY_EPOCHS = 5  # ... every N epochs (each time costs seconds on a CPU: ~1.5 s a BLIP-base caption)

# Settings that accept None beyond those whose default is None (see common.configure).
_NONE_OK = ("RESUME", "MAX_GRAD_NORM")
# Settings that must match for a checkpoint to be continued (others, like EPOCHS, may change).
_RESUME_MUST_MATCH = ("MODEL_ID", "DATA_DIR", "USE_LORA", "LORA_R", "LORA_ALPHA", "LORA_DROPOUT",
                      "FREEZE_VISION", "BATCH_SIZE", "GRAD_ACCUM", "SEED", "VAL_FRACTION",
                      "MAX_CAPTION_TOKENS", "AUGMENT", "PROMPT")  # fmt: skip
# The file that marks OUTPUT_DIR as this script's: written first, so a folder without it is not ours.
_MARKER = "training_config.json"
# In OUTPUT_DIR (never DATA_DIR): the images that passed the start-up check, with their size and mtime.
_CHECK_FILE = ".image_check.json"


# ----------------------------------------------------------------------------- checks
def check_config(cfg: dict) -> None:
    """Settings that cannot work fail in one line, before any loading."""
    for name in (
        "EPOCHS",
        "BATCH_SIZE",
        "GRAD_ACCUM",
        "KEEP_CHECKPOINTS",
        "LOG_EVERY",
        "SAVE_EVERY_EPOCHS",
        "SAMPLE_EVERY_EPOCHS",
    ):
        if not isinstance(cfg[name], int) or cfg[name] < 1:
            raise UserError(f"{name}={cfg[name]!r}: must be a positive integer")
    if not 0 <= cfg["VAL_FRACTION"] < 1:
        raise UserError(f"VAL_FRACTION={cfg['VAL_FRACTION']!r}: must be in [0, 1)")
    if not (math.isfinite(cfg["LR"]) and cfg["LR"] > 0):
        raise UserError(f"LR={cfg['LR']!r}: must be a positive, finite number (the tutorial's is 3e-5)")
    if cfg["PREFIX_CACHE"] not in ("auto", "disk", "off"):
        raise UserError(f"PREFIX_CACHE={cfg['PREFIX_CACHE']!r}; valid values: auto, disk, off")


def claim_output_dir(out_dir: Path, model_id: str, data_dir: str) -> None:
    """Write only into a folder that is empty or already ours (it has the marker), never into the
    model's or the data's folder: a run must not clobber anything it did not write."""
    for other, name in ((model_id, "MODEL_ID"), (data_dir, "DATA_DIR")):
        if Path(other).exists() and overlaps(out_dir, Path(other)):
            raise UserError(
                f"OUTPUT_DIR={str(out_dir)!r} overlaps {name}={other!r}; choose another OUTPUT_DIR"
            )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / _MARKER).is_file():
        raise UserError(
            f"OUTPUT_DIR={str(out_dir)!r} holds files that train_blip.py did not write "
            f"(no {_MARKER}); choose an empty or new folder"
        )


def overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


class OutputLock:
    """An exclusive lock on OUTPUT_DIR for the run, so two runs never write the same files."""

    def __init__(self, out_dir: Path):
        self.path, self.fd = out_dir / ".lock", None

    def acquire(self) -> str | None:
        """None when locked, else who holds it."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; nothing to hold
            return None
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 100, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            return holder
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"train_blip.py pid {os.getpid()}".encode(), 0)
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


# ----------------------------------------------------------------------------- data
def load_dataset(data_dir, rank: int, world: int, log=print, check_file: Path | None = None):
    """captions.json plus the images that pass the start-up check; each process checks its share, all
    get the result. Images that passed before with the same size and mtime (check_file, in OUTPUT_DIR)
    are not checked again; the main process writes the new list there."""
    captions = read_captions(data_dir)
    known = read_check_file(check_file, data_dir)
    items, skipped, passed = check_images(
        data_dir, {n: captions[n] for n in sorted(captions)[rank::world]}, progress=rank == 0, known=known
    )
    if world > 1:
        items = sorted(gather_object(items))
        skipped = sorted(gather_object(skipped))
        passed = dict(gather_object(sorted(passed.items())))
    reused = sum(known.get(n) == fp for n, fp in passed.items())
    log(
        f"images: {len(items):,} of {len(captions):,} usable; {len(captions) - reused:,} checked now, "
        f"{reused:,} known from an earlier run's check"
    )
    if rank == 0 and check_file is not None and passed != known:
        with contextlib.suppress(OSError):  # only a speed-up for the next run: never a reason to stop
            common.atomic_write_bytes(
                check_file, json.dumps({"data_dir": str(Path(data_dir).resolve()), "passed": passed}).encode()
            )
    if skipped:
        log(skipped_warning(skipped, len(captions)))
    if not items:
        raise UserError(
            f"no usable images in {data_dir} ({len(captions)} captions, all skipped): "
            "run `python download_coco.py` or fix DATA_DIR"
        )
    return items, skipped


def read_check_file(path: Path | None, data_dir) -> dict[str, list[int]]:
    """{file_name: [size, mtime_ns]} of the images that passed an earlier run's check of this DATA_DIR;
    empty if there is none (or it is unreadable: then everything is checked again)."""
    try:
        saved = json.loads(path.read_bytes())
        if saved["data_dir"] == str(Path(data_dir).resolve()) and isinstance(saved["passed"], dict):
            return saved["passed"]
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        pass
    return {}


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
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a {{file_name: caption}} mapping") from None
    if not isinstance(captions, dict):
        raise UserError(
            f"{path}: expected a mapping {{file_name: caption}}, got a JSON {type(captions).__name__}"
        )
    for name, caption in captions.items():
        if not isinstance(caption, str):
            raise UserError(f"{path}: the caption of {name!r} is a {type(caption).__name__}, not a string")
        if not is_plain_name(name):
            raise UserError(f"{path}: {name!r} is not a plain file name in DATA_DIR (no folders, no '..')")
    return captions


def is_plain_name(name: str) -> bool:
    """A file name with no folder part: what download_coco.py writes (000000xxxxxx.jpg)."""
    return (
        bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
    )


def check_images(data_dir, captions: dict[str, str], threads: int = 4, progress: bool = False, known=None):
    """Check every image up front from its header (image_problem), so bad files are reported together
    before training; decoding is left to the DataLoader. An image listed in `known` with the same
    [size, mtime_ns] passed before and is not read at all.

    Returns (items [(path, caption)], skipped [(file_name, reason)], passed {file_name: [size, mtime_ns]});
    the lists sorted by file name.
    """
    folder = Path(data_dir).resolve()
    known = known or {}

    def check(name):
        if not captions[name].strip():
            return "empty caption", None
        path = os.path.join(data_dir, name)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                st = os.stat(path)
                if Path(path).resolve().parent != folder:  # a symlink that leads out of DATA_DIR
                    return "a link to a file outside DATA_DIR", None
        except OSError:
            return "missing file", None
        if not stat.S_ISREG(st.st_mode):
            return "missing file", None
        fingerprint = [st.st_size, st.st_mtime_ns]
        if known.get(name) == fingerprint:
            return None, fingerprint
        problem = image_problem(path)
        return problem, None if problem else fingerprint

    names = sorted(captions)
    chunks = [names[start : start + 256] for start in range(0, len(names), 256)]  # a task per image: slower
    results = []
    bar = tqdm(total=len(names), desc="check images", unit="img", disable=not progress or len(names) < 1000)
    with ThreadPoolExecutor(max(1, threads)) as pool:  # file reads (and any decoding) release the GIL
        for chunk in pool.map(lambda chunk: [check(name) for name in chunk], chunks):
            results += chunk
            bar.update(len(chunk))
    bar.close()
    prefix = os.path.join(data_dir, "")
    items = [(prefix + n, captions[n]) for n, (p, _) in zip(names, results, strict=True) if p is None]
    skipped = [(n, p) for n, (p, _) in zip(names, results, strict=True) if p is not None]
    passed = {n: fp for n, (_, fp) in zip(names, results, strict=True) if fp is not None}
    return items, skipped, passed


def image_problem(path) -> str | None:
    """The start-up check of one image: None if it looks usable, else why not. No pixels are decoded:
    a JPEG is read from its frame header (its size) and its last two bytes (the end marker, which a cut
    download lacks); other formats are opened by PIL and verify()'d (PNG: every chunk's checksum).
    A JPEG this cannot follow to its end marker is decoded in full, as every image used to be. An
    image that passes and still fails to decode is skipped, by name, when the DataLoader reads it."""
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return pil_header_problem(path)
            size = jpeg_size(f)
            f.seek(-2, os.SEEK_END)
            if size is not None and f.read(2) == b"\xff\xd9":
                return size_problem(*size)
    except OSError as e:
        return f"not a readable image ({e.strerror or e})"
    try:
        common.open_image(path)
    except UserError as e:
        return str(e).split(": ", 1)[-1]
    return None


# JPEG frame headers (SOF0-15) hold the size; C4, C8 and CC in that range are other segments.
_JPEG_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(f) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, hopping from segment to segment after the start
    marker (a few small reads); None where the markers do not lead to a frame header."""
    for _ in range(1000):  # real files have a few dozen segments before it
        segment = f.read(4)
        if len(segment) < 4 or segment[0] != 0xFF:
            return None
        if segment[1] == 0xFF:  # a fill byte before the marker
            f.seek(-3, os.SEEK_CUR)
            continue
        marker, length = segment[1], int.from_bytes(segment[2:], "big")
        if marker in _JPEG_FRAME_MARKERS:
            frame = f.read(5)  # precision, height, width
            if len(frame) < 5:
                return None
            height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:], "big")
            return (width, height) if width and height else None
        if length < 2 or marker in (0xD9, 0xDA):  # the end, or a scan before any frame header
            return None
        f.seek(length - 2, os.SEEK_CUR)
    return None


def size_problem(width: int, height: int) -> str | None:
    if width * height > common.MAX_IMAGE_PIXELS:  # the rule common.open_image applies
        return f"{width}x{height} pixels is too large to caption"
    return None


def pil_header_problem(path) -> str | None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = common.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            return size_problem(im.width, im.height) or im.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"image too large ({e})"
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        return f"not a readable image ({e})"


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


def random_crop(image, rng: random.Random, min_area: float = 0.8):
    """The AUGMENT transform: a crop of 80-100% of the area at a random place (captions stay true)."""
    scale = math.sqrt(rng.uniform(min_area, 1.0))
    w = max(1, round(image.width * scale))
    h = max(1, round(image.height * scale))
    x = rng.randint(0, image.width - w)
    y = rng.randint(0, image.height - h)
    return image.crop((x, y, x + w, y + h))


class CaptionImages:
    """A map-style dataset: item i is {"index", "input_ids", "pixel_values"}.

    Images are read from disk when asked for, so memory does not grow with the dataset. Items in
    `skip_images` (their vision prefix is cached) come without pixels: no decoding at all. An image
    that does not decode (it passed the start-up check from its header) comes marked "bad", with its
    name and why, and blank pixels; collate_good leaves it out of the batch.
    """

    def __init__(self, paths, token_ids, family, augment=False, seed=0):
        self.paths = paths
        self.token_ids = token_ids
        self.family = family
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.skip_images = frozenset()
        self._blank = None

    def __len__(self):
        return len(self.paths)

    def pixels(self, i):
        image = common.open_image(self.paths[i])
        if self.augment:
            image = random_crop(image, random.Random(f"{self.seed}-{self.epoch}-{i}"))
        return self.family.pixel_values([image])[0]

    def blank(self):
        if self._blank is None:
            from PIL import Image

            self._blank = self.family.pixel_values([Image.new("RGB", (32, 32))])[0]
        return self._blank

    def __getitem__(self, i):
        item = {"index": i, "input_ids": self.token_ids[i], "pixel_values": None}
        if i not in self.skip_images:
            try:
                item["pixel_values"] = self.pixels(i)
            except UserError as e:
                why = str(e).split(": ", 1)[-1]
                item.update(pixel_values=self.blank(), bad=(Path(self.paths[i]).name, why))
        return item


class CaptionTokens:
    """Each caption's token ids, made when the DataLoader asks for the item: tokenizing 100k captions
    up front would hold the first step back by seconds, and costs next to nothing per batch."""

    def __init__(self, captions: list[str], family, max_tokens: int):
        self.captions = captions
        self.family = family
        self.max_tokens = max_tokens

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.family.tokenize([self.captions[i]], self.max_tokens)[0]


def collate_good(family, examples: list[dict]) -> dict:
    """The family's batch of the items whose image decoded; the others (marked "bad" by CaptionImages)
    are left out and listed as batch["bad"] [(file_name, reason)]. When no image of the micro-batch
    decoded, the batch is a stand-in (batch["stand_in"]): those items with blank pixels, which
    optimizer_step runs at zero weight, so that every process still takes part in the backward."""
    good = [e for e in examples if "bad" not in e]
    batch = family.collate(good or examples)
    batch["bad"] = [e["bad"] for e in examples if "bad" in e]
    batch["stand_in"] = not good
    return batch


def note_bad_images(batches, dropped: dict):
    """The loader's batches, naming each image that failed to decode once (a warning line from the
    process that read it; each image belongs to one process) and recording it in `dropped`."""
    for batch in batches:
        for name, why in batch.pop("bad"):
            if name not in dropped:
                dropped[name] = why
                tqdm.write(f"warning: skipped {name} ({why}): it failed to decode; training goes on")
        yield batch


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
    mine = cols[rank * per_rank : (rank + 1) * per_rank]
    steps = []
    for k in range(max(len(c) for c in cols)):
        micro = [
            [c[k] for c in mine[j * batch_size : (j + 1) * batch_size] if k < len(c)]
            for j in range(grad_accum)
        ]
        steps.append((sum(k < len(c) for c in cols), sorted(micro, key=len)))
    return steps


# ----------------------------------------------------------------------------- the frozen-prefix cache
class PrefixCache:
    """Output of the frozen vision stages for this process's images, computed once, reused every epoch.

    Lives in RAM when it fits in max_mb, else in a file read back per batch (the OS page cache, not
    this process, holds it). Exact: the same function of the same image gives the same numbers.
    """

    def __init__(self, indices, shape, dtype, mode: str, path: Path | None = None):
        self.slot = {i: s for s, i in enumerate(sorted(set(indices)))}
        self.shape = tuple(shape)
        self.dtype = dtype
        self.mode = mode
        self.path = path
        self.item_bytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        self.filled = set()
        if mode == "ram":
            self.store = torch.empty((len(self.slot), *self.shape), dtype=dtype)
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self.fd, len(self.slot) * self.item_bytes)

    @staticmethod
    def plan(
        n_items: int, item_bytes: int, max_mb: float, requested: str, spill_dir: Path
    ) -> tuple[str, str]:
        """Choose 'ram' | 'disk' | 'off' and say why, in one line."""
        need_mb = n_items * item_bytes / 2**20
        if requested == "disk" or need_mb > max_mb:
            free_mb = shutil.disk_usage(spill_dir).free / 2**20
            if free_mb > 2 * need_mb + 1024:
                why = (
                    "PREFIX_CACHE='disk'" if requested == "disk" else f"above PREFIX_CACHE_MAX_MB={max_mb:g}"
                )
                return "disk", f"prefix cache: {need_mb:.0f} MB on disk in {spill_dir} ({why})"
            return "off", (
                f"prefix cache: off ({need_mb:.0f} MB is above PREFIX_CACHE_MAX_MB={max_mb:g} "
                f"and only {free_mb:.0f} MB of disk is free)"
            )
        return "ram", f"prefix cache: {need_mb:.0f} MB in RAM (bound PREFIX_CACHE_MAX_MB={max_mb:g})"

    def has(self, i: int) -> bool:
        return i in self.filled

    def put(self, indices, values):
        values = values.detach().to("cpu", self.dtype).contiguous()
        for i, v in zip(indices, values):
            if self.mode == "ram":
                self.store[self.slot[i]] = v
            else:  # raw bytes; viewing as int16/int32 lets numpy carry bf16 too
                os.pwrite(
                    self.fd, v.view(_int_view(self.dtype)).numpy().tobytes(), self.slot[i] * self.item_bytes
                )
            self.filled.add(i)

    def get(self, indices):
        if self.mode == "ram":
            return self.store[torch.tensor([self.slot[i] for i in indices])]
        rows = [
            torch.frombuffer(
                bytearray(os.pread(self.fd, self.item_bytes, self.slot[i] * self.item_bytes)),
                dtype=self.dtype,
            ).view(self.shape)
            for i in indices
        ]
        return torch.stack(rows)

    def close(self):
        if self.mode == "disk":
            os.close(self.fd)
            Path(self.path).unlink(missing_ok=True)


def _int_view(dtype):
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]


def plan_prefix_cache(
    cfg, family, base, prefix_stages: int, why_not: str, precision: str, indices, spill_path: Path
):
    """The prefix cache for these dataset indices (this process's train and validation images), or
    None; plus its mode and the one line that says what it holds, where, or why it is off."""
    if cfg["PREFIX_CACHE"] == "off":
        return None, "off", "prefix cache: off (PREFIX_CACHE='off')"
    if cfg["AUGMENT"]:
        return None, "off", "prefix cache: off (AUGMENT=True changes the images every epoch)"
    stages = family.vision_stages(base)
    if stages is None:
        return None, "off", f"prefix cache: off (no vision-stage hook for the {family.name} family)"
    dtype = common.torch_dtype(precision)
    shape = family.prefix_shape(base, prefix_stages)
    item_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    mode, line = PrefixCache.plan(
        len(indices), item_bytes, cfg["PREFIX_CACHE_MAX_MB"], cfg["PREFIX_CACHE"], spill_path.parent
    )
    if mode == "off":
        return None, mode, line
    what = cached_part(prefix_stages, len(stages), why_not)
    return (
        PrefixCache(indices, shape, dtype, mode, spill_path),
        mode,
        f"{line}; caches {what} of {len(indices)} images",
    )


# ----------------------------------------------------------------------------- model
def build_model(cfg, run):
    """The family's model with LoRA (or fully trainable), FREEZE_VISION applied, attention on SDPA."""
    set_seed(cfg["SEED"])  # LoRA's initial weights come from it
    family = families.load(cfg["MODEL_ID"], prompt=cfg["PROMPT"])
    model = family.load_model(cfg["MODEL_ID"])
    n_params = sum(p.numel() for p in model.parameters())
    run.log(
        f"model: {family.name}, {n_params / 1e6:.1f}M parameters, "
        f"{n_params * model.dtype.itemsize / 2**30:.2f} GB of weights as loaded ({str(model.dtype)[6:]})"
    )
    if cfg["FREEZE_VISION"]:
        for name in family.vision_modules:
            try:
                model.get_submodule(name).requires_grad_(False)
            except AttributeError:  # a bare parameter, not a module (BLIP-2's query_tokens)
                model.get_parameter(name).requires_grad_(False)
    if cfg["USE_LORA"]:
        model = apply_lora(model, family, cfg, base_ref(cfg["MODEL_ID"]), run.log)
        if run.is_main:
            model.print_trainable_parameters()
    else:
        run.log(f"full fine-tune: {count_trainable(model):,} trainable parameters")
    if cfg["SDPA"]:
        family.enable_sdpa(model)
    return family, model


def base_ref(model_id: str) -> str:
    """What inference should load as the base: an absolute path for a local folder, else the hub id."""
    return str(Path(model_id).resolve()) if Path(model_id).is_dir() else model_id


def resolve_targets(model, family, targets, freeze_vision: bool):
    """Check every target names a module (else name the nearest real ones) and drop vision targets
    when FREEZE_VISION. Returns (targets for LoraConfig, exclude regex or None, dropped names)."""
    if targets == "auto":
        targets = family.lora_targets
    targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    vision = family.vision_modules
    if targets == ["all-linear"]:
        if freeze_vision and vision:
            # every module inside a vision module, or the module itself (BLIP-2's bare language_projection)
            exclude = "|".join(rf"(.*\.)?{re.escape(name)}(\..*)?" for name in vision)
            return "all-linear", exclude, [f"every {' / '.join(vision)} linear layer"]
        return "all-linear", None, []
    names = [n for n, _ in model.named_modules() if n]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            near = difflib.get_close_matches(t, names, n=3, cutoff=0.3)
            raise UserError(
                f"LORA_TARGET_MODULES: {t!r} matches no module of the model; "
                f"nearest real names: {', '.join(near) or '(none)'}"
            )
    dropped = [t for t in targets if freeze_vision and any(t == v or t.startswith(v + ".") for v in vision)]
    kept = [t for t in targets if t not in dropped]
    if not kept:
        raise UserError(
            "FREEZE_VISION=True dropped every LoRA target: add text targets to LORA_TARGET_MODULES"
        )
    return kept, None, dropped


def apply_lora(model, family, cfg, base_id: str, log=print):
    """LoraConfig -> get_peft_model -> print_trainable_parameters(), the idiom peft users know."""
    from peft import LoraConfig, get_peft_model

    targets, exclude, dropped = resolve_targets(
        model, family, cfg["LORA_TARGET_MODULES"], cfg["FREEZE_VISION"]
    )
    if dropped:
        log(f"FREEZE_VISION=True: vision encoder frozen; dropped vision LoRA targets: {', '.join(dropped)}")
    lora_config = LoraConfig(
        r=cfg["LORA_R"],
        lora_alpha=cfg["LORA_ALPHA"],
        lora_dropout=cfg["LORA_DROPOUT"],
        target_modules=targets,
        exclude_modules=exclude,
        bias="none",
    )
    try:
        model = get_peft_model(model, lora_config)
    except ValueError as e:
        raise UserError(f"LORA_TARGET_MODULES: {e}") from None
    model.peft_config["default"].base_model_name_or_path = base_id  # what inference loads as the base
    return model


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_names(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def cast_frozen_linears(model, dtype) -> int:
    """Keep frozen nn.Linear weights in the autocast dtype. Autocast rounds them to that dtype on every
    use anyway, so results agree (to the order kernels sum in); this saves the per-step cast and half
    their memory.
    A weight the Linear shares with another module (BLIP ties the LM head to the word embeddings) gets
    a frozen copy of its own in that dtype, so the embedding lookup keeps its fp32 table while the
    head skips a 30k x 768 cast on every step; shared weights that train are left alone."""
    users = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            users.setdefault(id(p), []).append(module)
    converted = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.requires_grad:
            continue
        for name in ("weight", "bias"):
            p = getattr(module, name)
            if p is None or p.requires_grad or p.dtype == dtype:
                continue
            if len(users[id(p)]) > 1:  # untie: a frozen copy for this Linear only
                setattr(module, name, torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))
            else:
                p.data = p.data.to(dtype)
            converted += p.numel()
    return converted


def frozen_prefix_length(stages) -> tuple[int, str]:
    """How many leading vision stages are frozen and deterministic (no trainable parameter, no active
    dropout), so their output is a pure function of the image. Returns (that count, why it is 0)."""
    for index, stage in enumerate(stages):
        if any(p.requires_grad for p in stage.parameters()):
            return index, "the vision embeddings are trained" if index == 0 else ""
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in stage.modules()):
            return index, "the vision embeddings have dropout" if index == 0 else ""
    return len(stages), ""


def cached_part(prefix_stages: int, n_stages: int, why_not: str) -> str:
    """What the prefix cache holds, in words, for its log line."""
    if prefix_stages == n_stages:
        return "the whole vision output"
    if prefix_stages > 1:
        return f"embeddings + vision layers 0-{prefix_stages - 2}"
    if prefix_stages == 1:
        return "the vision embeddings"
    return f"the preprocessed images only ({why_not})"


# ----------------------------------------------------------------------------- one training step
def caption_loss(logits, targets, label_smoothing: float = 0.0):
    """Cross-entropy of aligned logits and targets (-100: not learnt), averaged over each caption's
    own tokens: one loss per caption."""
    token_loss = F.cross_entropy(
        logits.float().transpose(1, 2),
        targets,
        ignore_index=-100,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    return token_loss.sum(1) / (targets != -100).sum(1).clamp(min=1)


class CaptionModel(torch.nn.Module):
    """The family's captioning forward, split after `prefix_stages` vision stages so that a cached
    prefix can be fed in. Returns one loss per caption. (Accelerate wraps this module.)"""

    def __init__(self, model, family, prefix_stages: int):
        super().__init__()
        self.model = model
        self.family = family
        self.prefix_stages = prefix_stages

    def stages(self):
        return self.family.vision_stages(families.base_model(self.model))

    def vision_prefix(self, pixel_values):
        return families.run_stages(self.stages()[: self.prefix_stages], pixel_values)

    def forward(self, batch, vision_prefix=None):
        base = families.base_model(self.model)
        stages = self.stages()
        if stages is None:  # a family without the hook: its plain forward
            logits, targets = self.family.caption_logits(base, batch)
        else:
            image_embeds = (
                families.run_stages(stages, batch["pixel_values"])
                if vision_prefix is None
                else families.run_stages(stages[self.prefix_stages :], vision_prefix)
            )
            logits, targets = self.family.caption_logits(base, batch, image_embeds)
        smoothing = getattr(base.config.get_text_config(), "label_smoothing", 0.0)
        return caption_loss(logits, targets, smoothing)


def vision_inputs(caption_model, batch, cache, autocast):
    """Keyword arguments for the vision side of a forward: pixels when there is no cache, else the
    cached prefix, computing (without gradients) the prefix of items seen for the first time."""
    if cache is None:
        return {}
    index = batch["index"].tolist()
    pixel_rows = batch["pixel_rows"].tolist()
    rows = [r for r in pixel_rows if not cache.has(index[r])]
    if rows:
        where = [pixel_rows.index(r) for r in rows]
        with torch.no_grad(), autocast():
            cache.put([index[r] for r in rows], caption_model.vision_prefix(batch["pixel_values"][where]))
    return {"vision_prefix": cache.get(index).to(batch["input_ids"].device)}


def optimizer_step(training, micro_batches, n_global: int, batches, cache, max_grad_norm):
    """One optimizer step: GRAD_ACCUM micro-batches under accelerator.accumulate(). The loss is scaled
    so the gradient is the mean over the step's captions on all processes (accelerate divides by
    GRAD_ACCUM and DDP averages over processes; the scale undoes both). Their number is n_global, less
    any image that failed to decode (collate_good left it out), summed over the processes. Returns
    (sum of the per-caption losses, number of captions, gradient norm before clipping)."""
    accelerator = training.accelerator
    fetched = [next(batches) if micro_batch else None for micro_batch in micro_batches]
    kept = [0 if b is None or b["stand_in"] else len(b["index"]) for b in fetched]
    dropped = sum(map(len, micro_batches)) - sum(kept)
    if accelerator.num_processes > 1:
        dropped = int(accelerator.reduce(torch.tensor(dropped, device=accelerator.device), "sum").item())
    n_step = n_global - dropped
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / max(n_step, 1)
    loss_sum = 0.0
    n = 0
    grad_norm = None
    for batch in fetched:
        with accelerator.accumulate(training.prepared_model):
            if batch is not None:  # None only in a short last step, and then first: the last one syncs
                batch = common.to_device(batch, accelerator.device)
                if batch["stand_in"]:  # no image decoded: zero weight, but DDP still syncs in the backward
                    accelerator.backward(training.prepared_model(batch).sum() * 0.0)
                else:
                    losses = training.prepared_model(
                        batch, **vision_inputs(training.caption_model, batch, cache, accelerator.autocast)
                    )
                    accelerator.backward(losses.sum() * scale)
                    loss_sum += losses.detach().double().sum().item()
                    n += len(losses)
            if accelerator.sync_gradients and max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(training.parameters, max_grad_norm))
            if n_step:  # accelerate's optimizer skips this until the last micro-batch
                training.optimizer.step()
            if accelerator.sync_gradients:
                training.scheduler.step()
            training.optimizer.zero_grad()
    return loss_sum, n, grad_norm


# ----------------------------------------------------------------------------- the loop
@dataclass
class Run:
    """Facts about this process and run, fixed once set up."""

    is_main: bool
    rank: int
    world: int
    on_cpu: bool
    precision: str
    out_dir: Path
    started: float
    last_checkpoint: Path | None = None
    first_step_at: float | None = None  # time.time() at the end of this run's first optimizer step

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def log(self, msg="") -> None:
        if self.is_main:
            tqdm.write(str(msg))


@dataclass
class Data:
    """The planned data: items, split, this process's shard and steps, and the prefix cache."""

    items: list
    skipped: list
    max_tokens: int
    dataset: CaptionImages
    train_ids: list
    val_ids: list
    columns: list
    my_val: list
    steps_per_epoch: int
    total_steps: int
    cache: PrefixCache | None
    cache_mode: str
    cache_line: str
    prefix_stages: int
    dropped: dict = field(default_factory=dict)  # {file_name: why}: images that failed to decode in training


@dataclass
class Training:
    """What one optimizer step needs: the model (plain and as accelerate prepared it), optimizer, schedule."""

    accelerator: Accelerator
    caption_model: CaptionModel
    prepared_model: torch.nn.Module
    optimizer: object
    scheduler: object
    parameters: list


@dataclass
class LoopState:
    """Everything the loop changes as it runs; a checkpoint saves exactly this (plus the tensors)."""

    epoch: int = 0  # the epoch in progress, from 0
    next_step: int = 0  # its next optimizer step
    global_step: int = 0  # optimizer steps done in all
    epoch_loss: float = 0.0  # sum of per-caption losses in this epoch (this process)
    epoch_n: int = 0  # captions in that sum
    log_loss: float = 0.0  # the same since the last log line
    log_n: int = 0
    history: list = field(default_factory=list)  # the rows of metrics.jsonl


def make_loader(data: Data, family, batches, workers: int, seed: int):
    # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
    collate = partial(collate_good, family)  # the family's collate, minus images that failed to decode
    loader = torch.utils.data.DataLoader(
        data.dataset,
        batch_sampler=batches,
        num_workers=workers,
        worker_init_fn=_quiet_worker,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
    )
    return note_bad_images(loader, data.dropped)


def _quiet_worker(_):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business


def train_epoch(cfg, run, family, data, training, state, stop, bar) -> tuple[str, int, float]:
    """This process's optimizer steps of state.epoch, from state.next_step on. Returns how it ended
    ('done' | 'max_steps' | 'stopped'), the captions it trained on and the seconds it took."""
    accelerator = training.accelerator
    steps = epoch_steps(
        data.columns, state.epoch, cfg["SEED"], run.rank, cfg["BATCH_SIZE"], cfg["GRAD_ACCUM"]
    )
    data.dataset.epoch = state.epoch
    data.dataset.skip_images = frozenset(data.cache.filled) if data.cache is not None else frozenset()
    batches = [[data.train_ids[i] for i in mb] for _, mbs in steps[state.next_step :] for mb in mbs if mb]
    needs_images = any(i not in data.dataset.skip_images for b in batches for i in b)
    loader = iter(make_loader(data, family, batches, cfg["NUM_WORKERS"] if needs_images else 0, cfg["SEED"]))
    started = time.time()
    seen = 0
    for n_global, micro_batches in steps[state.next_step :]:
        loss_sum, n, grad_norm = optimizer_step(
            training, micro_batches, n_global, loader, data.cache, cfg["MAX_GRAD_NORM"]
        )
        check_finite(accelerator, loss_sum, state.global_step + 1)
        run.first_step_at = run.first_step_at or time.time()
        state.epoch_loss += loss_sum
        state.epoch_n += n
        state.log_loss += loss_sum
        state.log_n += n
        state.global_step += 1
        state.next_step += 1
        seen += n
        bar.update(1)
        if state.global_step % cfg["LOG_EVERY"] == 0:
            log_step(
                cfg,
                run,
                data,
                training,
                state,
                grad_norm,
                seen * run.world / max(time.time() - started, 1e-9),
            )
        if stop.requested:
            accelerator.set_trigger()
        if accelerator.check_trigger():
            return "stopped", seen, time.time() - started
        if state.global_step >= data.total_steps:
            break
        if (
            cfg["SAVE_EVERY_STEPS"]
            and state.global_step % cfg["SAVE_EVERY_STEPS"] == 0
            and state.next_step < len(steps)
        ):
            save_checkpoint(accelerator, run, state, cfg)
    ended = "done" if state.next_step >= len(steps) else "max_steps"
    return ended, seen, time.time() - started


def check_finite(accelerator, loss_sum: float, step: int) -> None:
    """Stop at the first NaN or inf loss, on every process at once, before it reaches a checkpoint."""
    bad = torch.tensor(float(not math.isfinite(loss_sum)))
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.to(accelerator.device), "sum").cpu()
    if bad.item():
        raise UserError(
            f"the loss became {loss_sum} at optimizer step {step}: training diverged. Lower LR, "
            "or use PRECISION='fp32'; the last checkpoint and any earlier outputs are untouched"
        )


def log_step(cfg, run, data, training, state, grad_norm, rate: float) -> None:
    """Every LOG_EVERY steps: the mean loss since the last line (over all processes) into metrics.jsonl."""
    sums = torch.tensor([state.log_loss, state.log_n], dtype=torch.float64)
    loss_sum, loss_n = training.accelerator.reduce(sums, "sum").tolist()
    entry = {
        "type": "train",
        "epoch": state.epoch + 1,
        "step": state.global_step,
        "epoch_float": round(state.epoch + state.next_step / data.steps_per_epoch, 4),
        "loss": loss_sum / max(loss_n, 1),
        "lr": training.scheduler.get_last_lr()[0],
        "grad_norm": grad_norm,
        "samples_per_s": round(rate, 3),
        "log_every": cfg["LOG_EVERY"],
    }
    state.history.append(entry)
    state.log_loss = 0.0
    state.log_n = 0
    run.log(
        f"epoch {state.epoch + 1} step {state.global_step}: loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
        f"{rate:.2f} samples/s"
    )
    if run.is_main:
        write_metrics(state.history, run.out_dir)


def end_epoch(cfg, run, family, data, training, state, ended: str, seen: int, seconds: float) -> dict:
    """Validation loss, sample captions, the epoch's metrics row and plot, then a checkpoint."""
    accelerator = training.accelerator
    size = cfg["BATCH_SIZE"]
    val_batches = [data.my_val[i : i + size] for i in range(0, len(data.my_val), size)]
    data.dataset.skip_images = frozenset(data.cache.filled) if data.cache is not None else frozenset()
    val_sum, val_n = evaluate(
        training.caption_model,
        make_loader(data, family, val_batches, 0, cfg["SEED"]),
        data.cache,
        accelerator,
    )
    number = state.epoch + 1
    last = number == cfg["EPOCHS"] or state.global_step >= data.total_steps
    sums = torch.tensor([state.epoch_loss, state.epoch_n, val_sum, val_n], dtype=torch.float64)
    totals = accelerator.reduce(sums, "sum").tolist()
    rate = seen * run.world / max(seconds, 1e-9) if seen else None
    entry = {
        "type": "epoch",
        "epoch": number,
        "step": state.global_step,
        "train_loss": totals[0] / max(totals[1], 1),
        "val_loss": totals[2] / totals[3] if totals[3] else None,
        "samples_per_s": round(rate, 3) if rate else None,
        "train_time_s": round(seconds, 2),
    }
    if run.is_main and (number == 1 or last or number % cfg["SAMPLE_EVERY_EPOCHS"] == 0):
        sample = (data.val_ids or data.train_ids)[: cfg["NUM_SAMPLE_CAPTIONS"]]
        paths = [data.dataset.paths[i] for i in sample]
        texts = sample_captions(
            family,
            training.caption_model.model,
            paths,
            data.max_tokens,
            accelerator.autocast,
            accelerator.device,
        )
        entry["captions"] = [
            {"file": Path(p).name, "target": data.items[i][1], "generated": t}
            for i, p, t in zip(sample, paths, texts)
        ]
    state.history.append(entry)
    state.epoch_loss = 0.0
    state.epoch_n = 0
    val_text = "-" if entry["val_loss"] is None else f"{entry['val_loss']:.4f}"
    run.log(
        f"epoch {number}/{cfg['EPOCHS']}: train loss {entry['train_loss']:.4f}  "
        f"val loss {val_text}  "
        f"{entry['samples_per_s'] or 0:.2f} samples/s  {seconds:.1f} s"
    )
    for c in entry.get("captions", []):
        run.log(f"  {c['file']}\n    target: {c['target']}\n    model:  {c['generated']}")
    if run.is_main:
        write_metrics(state.history, run.out_dir)
    if ended == "done":  # a MAX_STEPS stop mid-epoch is saved as mid-epoch, so a later run finishes it
        state.epoch += 1
        state.next_step = 0
    if last or state.epoch % cfg["SAVE_EVERY_EPOCHS"] == 0:
        save_checkpoint(accelerator, run, state, cfg)
    return entry


def evaluate(caption_model, loader, cache, accelerator) -> tuple[float, int]:
    """Sum and count of per-caption validation losses over this process's validation items."""
    total = 0.0
    count = 0
    caption_model.eval()
    with torch.no_grad():
        for batch in loader:
            if batch["stand_in"]:  # no image of it decoded
                continue
            batch = common.to_device(batch, accelerator.device)
            with accelerator.autocast():
                losses = caption_model(
                    batch, **vision_inputs(caption_model, batch, cache, accelerator.autocast)
                )
            total += losses.double().sum().item()
            count += len(losses)
    caption_model.train()
    return total, count


def sample_captions(
    family, model, paths, max_tokens: int, autocast=contextlib.nullcontext, device="cpu"
) -> list[str]:
    """Greedy captions, the way inference will produce them."""
    images = []
    for p in paths:
        try:
            images.append(common.open_image(p))
        except UserError:  # an image that does not decode gets no caption (training names it)
            images.append(None)
    if not any(images):
        return [None] * len(paths)
    pixels = family.pixel_values([im for im in images if im is not None]).to(device)
    base = families.base_model(model)
    was_training = base.training
    base.eval()
    with torch.no_grad(), autocast():
        ids = family.generate(base, pixels, max_new_tokens=max_tokens, num_beams=1, do_sample=False)
    base.train(was_training)
    texts = iter(family.decode(ids))
    return [None if im is None else next(texts) for im in images]


def say_how_to_resume(run, state: LoopState, argv) -> None:
    args = " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--RESUME=")
    )
    run.log(
        f"stopped at epoch {state.epoch + 1}, step {state.global_step}; checkpoint: {run.last_checkpoint}\n"
        f"resume with: python train_blip.py {args}".rstrip()
        + "   (RESUME='auto' continues from it)"
    )


class StopRequest:
    """The first Ctrl-C (or SIGTERM) asks the loop to save a checkpoint and stop after the current
    optimizer step; a second Ctrl-C aborts at once."""

    def __init__(self, log):
        self.requested = False
        self.log = log
        self.previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.log(
            "\nstop requested: saving a checkpoint after this step (Ctrl-C again to abort without saving)"
        )

    def __enter__(self):
        with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- checkpoints
def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Whole checkpoints, oldest first (temporary folders start with '.' and are never listed)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def save_checkpoint(accelerator, run, state: LoopState, cfg: dict) -> Path:
    """accelerator.save_state into a temporary folder, then one rename: a checkpoint is whole or
    absent. A failed write removes the temporary folder and leaves older checkpoints as they were."""
    ckpt_dir = run.ckpt_dir
    final = ckpt_dir / f"step-{state.global_step:08d}"
    tmp = ckpt_dir / f".tmp-step-{state.global_step:08d}"
    trainer_state = {
        **asdict(state),
        "config": {n: cfg[n] for n in _RESUME_MUST_MATCH},
        "world_size": run.world,
    }
    error = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(
            str(tmp)
        )  # model (trainable part, see the pre-hook), optimizer, scheduler, RNG
        if accelerator.is_main_process:
            common.atomic_write_json(tmp / "trainer_state.json", trainer_state)
    except OSError as e:
        error = e
    failed = accelerator.reduce(
        torch.tensor(float(error is not None), device=accelerator.device), "sum"
    ).item()
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(ckpt_dir)
        why = error.strerror or error if error else "another process failed"
        intact = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint"
        raise UserError(
            f"could not write checkpoint {final} ({why}); {intact}. Free disk space or change OUTPUT_DIR"
        )
    if accelerator.is_main_process:
        common.replace_dir(tmp, final)
        for old in list_checkpoints(ckpt_dir)[: -cfg["KEEP_CHECKPOINTS"]]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    run.last_checkpoint = final
    return final


def keep_trainable(models, weights, _dir) -> None:
    """save_state pre-hook: checkpoints hold only the trainable parameters, not the frozen model."""
    for m, w in zip(models, weights):
        names = trainable_names(m)
        for key in [key for key in w if key not in names]:
            del w[key]


def checkpoint_problem(path: Path, cfg: dict, run, trainable: set[str]) -> str | None:
    """None if every piece of the checkpoint is there and readable for this run, else what is wrong.
    A problem with the settings is a UserError: another checkpoint would not fix it."""
    from safetensors import safe_open

    try:
        saved = json.loads((path / "trainer_state.json").read_text())
        LoopState(**{k: saved[k] for k in asdict(LoopState())})
        saved_config = saved["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__}: {e})"
    changed = [n for n in _RESUME_MUST_MATCH if saved_config.get(n) != cfg[n]]
    if saved.get("world_size") != run.world:
        changed.append(f"number of processes ({saved.get('world_size')} -> {run.world})")
    if changed:
        raise UserError(
            f"checkpoint {path} was made with different settings ({', '.join(map(str, changed))}); "
            "use the same settings, or --RESUME=None to start fresh"
        )
    try:
        with safe_open(path / "model.safetensors", "pt") as f:
            keys = set(f.keys())
            missing = trainable - keys
            for key in keys:  # reading each tensor catches a truncated file
                f.get_slice(key)
    except Exception as e:  # safetensors raises its own error type for damaged files
        return f"model.safetensors is unreadable ({type(e).__name__}: {str(e)[:100]})"
    if missing:
        return f"it lacks {len(missing)} trainable weights, e.g. {sorted(missing)[0]}"
    for name in ("optimizer.bin", "scheduler.bin", f"random_states_{run.rank}.pkl"):
        try:  # accelerate would skip a damaged RNG state with an info message: resume would not be exact
            torch.load(path / name, weights_only=False, map_location="cpu")
        except Exception as e:
            return f"{name} is missing or unreadable ({type(e).__name__})"
    return None


def resume_or_start(cfg, run, training) -> tuple[LoopState, Path | None]:
    """The loop state to start from: the newest whole checkpoint (RESUME='auto'), the one named, or a
    fresh state. A damaged checkpoint is named and the previous one is used instead."""
    candidates = find_checkpoints(cfg["RESUME"], run.ckpt_dir)
    if cfg["RESUME"] in (None, "", "None") and list_checkpoints(run.ckpt_dir):
        run.log(f"RESUME=None: starting fresh; removing old checkpoints in {run.ckpt_dir}")
        if run.is_main:
            for old in list_checkpoints(run.ckpt_dir):
                shutil.rmtree(old)
    trainable = trainable_names(training.prepared_model)
    for path in reversed(candidates):
        problems = gather_object([checkpoint_problem(path, cfg, run, trainable)])
        problem = next((p for p in problems if p), None)
        if problem is not None:
            older = [p for p in candidates if p.name < path.name]
            then = f"using the previous one, {older[-1].name}" if older else "no older one"
            run.log(f"warning: checkpoint {path} is damaged ({problem}); {then}")
            continue
        training.accelerator.load_state(str(path), strict=False)  # strict=False: only trainable weights
        saved = json.loads((path / "trainer_state.json").read_text())
        state = LoopState(**{k: saved[k] for k in asdict(LoopState())})
        verb = "resumed from" if state.epoch < cfg["EPOCHS"] else "loaded"
        run.log(
            f"{verb} {path}: epoch {state.epoch + 1}, step {state.global_step}"
            if state.epoch < cfg["EPOCHS"]
            else f"{path} already finished EPOCHS={cfg['EPOCHS']}; nothing to train (raise EPOCHS to go on)"
        )
        if run.is_main:
            write_metrics(
                state.history, run.out_dir
            )  # drop lines logged after the checkpoint by the interrupted run
        return state, path
    if candidates:
        raise UserError(
            f"every checkpoint in {run.ckpt_dir} is damaged (see above); "
            "rerun with --RESUME=None to start fresh"
        )
    return LoopState(), None


def find_checkpoints(resume, ckpt_dir: Path) -> list[Path]:
    """The checkpoints RESUME allows, oldest first: all whole ones ('auto'), the one named, or none."""
    if resume in (None, "", "None"):
        return []
    if resume == "auto":
        return list_checkpoints(ckpt_dir)
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise UserError(
            f"RESUME={resume!r} is not a checkpoint folder (no trainer_state.json); "
            f"use 'auto', None, or a folder under {ckpt_dir}"
        )
    return [path]


# ----------------------------------------------------------------------------- outputs
def write_metrics(history: list[dict], out_dir: Path) -> None:
    common.atomic_write_bytes(
        out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history).encode()
    )
    plot_losses(history, out_dir / "loss_curve.png")


def plot_losses(history: list[dict], path) -> None:
    """loss_curve.png: logged train loss and per-epoch train/validation loss against epochs."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, never opens a window

    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    logs = [m for m in history if m["type"] == "train"]
    epochs = [m for m in history if m["type"] == "epoch"]
    if logs:
        ax.plot(
            [m["epoch_float"] for m in logs],
            [m["loss"] for m in logs],
            color="tab:blue",
            alpha=0.35,
            label=f"train (every {logs[0].get('log_every', '')} steps)",
        )
    ax.plot(
        [m["epoch"] for m in epochs], [m["train_loss"] for m in epochs], "o-", color="tab:blue", label="train"
    )
    val = [m for m in epochs if m.get("val_loss") is not None]
    if val:
        ax.plot(
            [m["epoch"] for m in val],
            [m["val_loss"] for m in val],
            "o-",
            color="tab:orange",
            label="validation",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (mean per caption)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    common.atomic_write_bytes(path, buf.getvalue())


def peak_rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # Windows
        return None


def params_digest(module) -> str:
    """sha256 of the trainable parameters, to check that processes hold the same weights."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def save_outputs(model, family, out_dir: Path, use_lora: bool) -> None:
    """Save in the standard formats (peft adapter or full model, plus the processor), via a temporary
    folder so each file appears whole; our files of the other kind (from an earlier run) are removed."""
    tmp = out_dir / ".outputs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        family.processor.save_pretrained(tmp)
        stale = (
            ("model.safetensors", "config.json")
            if use_lora
            else ("adapter_model.safetensors", "adapter_config.json")
        )
        for name in stale:
            (out_dir / name).unlink(missing_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
    except OSError as e:
        raise UserError(
            f"could not write the outputs to {out_dir} ({e.strerror or e}); "
            "free disk space or change OUTPUT_DIR (the checkpoints are intact)"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def effective_config(cfg, family, model, precision: str, max_tokens: int) -> dict:
    """training_config.json: the settings as run, with 'auto' values resolved (inference reads PROMPT)."""
    targets = cfg["LORA_TARGET_MODULES"]
    if cfg["USE_LORA"]:
        targets = model.peft_config["default"].target_modules
        targets = targets if isinstance(targets, str) else sorted(targets)
    return dict(
        cfg,
        PRECISION=precision,
        MAX_CAPTION_TOKENS=max_tokens,
        MODEL_ID=base_ref(cfg["MODEL_ID"]),
        LORA_TARGET_MODULES=targets,
        PROMPT=family.prompt,
        FAMILY=family.name,
    )


def summarize(cfg, run, family, model, data, training, state, resumed_from, rates, times) -> dict:
    """train_results.json and the final outputs (only the main process writes)."""
    caption_model = training.caption_model
    epochs_done = [m for m in state.history if m["type"] == "epoch"]
    digests = gather_object([params_digest(caption_model)])
    skipped = data.skipped + sorted(gather_object(sorted(data.dropped.items())))  # at the check; in training
    steady = rates[1:] or rates
    results = {
        "output_dir": str(run.out_dir),
        "trainable_params": count_trainable(caption_model),
        "total_params": sum(p.numel() for p in caption_model.parameters()),
        "epochs": len(epochs_done),
        "optimizer_steps": state.global_step,
        "final_train_loss": epochs_done[-1]["train_loss"] if epochs_done else None,
        "final_val_loss": epochs_done[-1]["val_loss"] if epochs_done else None,
        "train_samples_per_s": round(sum(steady) / len(steady), 3) if steady else None,
        "epoch_samples_per_s": [round(r, 3) for r in rates],
        "epoch_train_time_s": [round(t, 2) for t in times],
        "peak_rss_mb": peak_rss_mb(),
        "precision": run.precision,
        "prefix_cache": data.cache_mode,
        "prefix_cache_note": data.cache_line,
        "prefix_stages": data.prefix_stages,
        "world_size": run.world,
        "batch_size": cfg["BATCH_SIZE"],
        "grad_accum": cfg["GRAD_ACCUM"],
        "effective_batch": cfg["BATCH_SIZE"] * cfg["GRAD_ACCUM"] * run.world,
        "n_train": len(data.train_ids),
        "n_val": len(data.val_ids),
        "skipped": [{"file": n, "reason": r} for n, r in skipped],
        "resumed_from": str(resumed_from) if resumed_from else None,
        "last_checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
        "trainable_digest_per_process": digests,
        "elapsed_s": round(time.time() - run.started, 1),
        "first_step_s": round(run.first_step_at - run.started, 2) if run.first_step_at else None,
    }
    # Whole-process overhead: everything but the optimizer steps (loading, the image check, cache
    # filling inside the first epoch excepted, validation, sample captions, checkpoints, plots).
    results["overhead_s"] = round(results["elapsed_s"] - sum(times), 1)
    results["overhead_share"] = round(results["overhead_s"] / max(results["elapsed_s"], 1e-9), 4)
    if run.is_main:
        save_outputs(model, family, run.out_dir, cfg["USE_LORA"])
        common.atomic_write_json(
            run.out_dir / _MARKER, effective_config(cfg, family, model, run.precision, data.max_tokens)
        )
        common.atomic_write_json(run.out_dir / "train_results.json", results)
        run.log(
            f"done: {len(epochs_done)} epochs, {state.global_step} optimizer steps, final train loss "
            f"{results['final_train_loss']}; {results['train_samples_per_s']} samples/s; "
            f"outputs in {run.out_dir}"
        )
    training.accelerator.wait_for_everyone()
    return results


# ----------------------------------------------------------------------------- main
def setup_run(cfg, started: float) -> tuple[Run, OutputLock]:
    """Threads, denormals, processes, precision and the output folder: everything before the data."""
    from transformers.utils import logging as hf_logging

    if cfg["NUM_THREADS"]:
        torch.set_num_threads(cfg["NUM_THREADS"])
    if cfg["FLUSH_DENORMALS"]:
        # Random (and some real) weights make gradients with denormal floats, which x86 CPUs
        # process ~100x slower; flushing them to zero changes nothing a loss curve can show.
        # Set before any parallel work, so the CPU threads started later inherit it.
        torch.set_flush_denormal(True)
    # The launcher's world (accelerate launch / torchrun), known before the Accelerator exists. On a
    # machine without GPUs accelerate needs cpu=True to join the launched processes over gloo.
    on_cpu = not (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    state = PartialState(cpu=on_cpu)
    if state.is_main_process:
        common.print_config(cfg, "train_blip.py")
    else:
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    check_config(cfg)
    # 'auto' probes the CPU (bf16 is slower than fp32 on some); all processes take the main one's choice.
    precision = [common.resolve_precision(cfg["PRECISION"], state.device.type)]
    broadcast_object_list(precision)
    out_dir = Path(cfg["OUTPUT_DIR"])
    lock = OutputLock(out_dir)
    error = [None]
    if state.is_main_process:  # one process decides, the others follow (they would see its files)
        try:
            claim_output_dir(out_dir, cfg["MODEL_ID"], cfg["DATA_DIR"])
            common.check_writable(out_dir, "OUTPUT_DIR")
            holder = lock.acquire()
            if holder:
                raise UserError(
                    f"OUTPUT_DIR={str(out_dir)!r} is in use by another run ({holder}); "
                    "wait for it, or choose another OUTPUT_DIR"
                )
            if not (out_dir / _MARKER).is_file():
                common.atomic_write_json(
                    out_dir / _MARKER, dict(cfg)
                )  # claims the folder; rewritten at the end
        except UserError as e:
            error = [str(e)]
    broadcast_object_list(error)
    if error[0]:
        raise UserError(error[0])
    run = Run(
        state.is_main_process,
        state.process_index,
        state.num_processes,
        on_cpu,
        precision[0],
        out_dir,
        started,
    )
    run.log(
        f"precision: {run.precision}"
        + (" (chosen by PRECISION='auto')" if cfg["PRECISION"] == "auto" else "")
    )
    return run, lock


def plan_data(cfg, run, family, model, items, skipped) -> Data:
    """Tokens, the split, this process's shard and steps, and the prefix cache for its images."""
    max_tokens = min(cfg["MAX_CAPTION_TOKENS"], family.max_caption_tokens())
    token_ids = CaptionTokens([c for _, c in items], family, max_tokens)
    train_ids, val_ids = split_train_val(len(items), cfg["VAL_FRACTION"], cfg["SEED"])
    dataset = CaptionImages([p for p, _ in items], token_ids, family, cfg["AUGMENT"], cfg["SEED"])
    effective_batch = cfg["BATCH_SIZE"] * cfg["GRAD_ACCUM"] * run.world
    columns = deal_columns(len(train_ids), effective_batch, run.world, cfg["SEED"])
    per_rank = cfg["BATCH_SIZE"] * cfg["GRAD_ACCUM"]
    mine = columns[run.rank * per_rank : (run.rank + 1) * per_rank]
    my_train = sorted({train_ids[i] for col in mine for i in col})
    my_val = val_ids[run.rank :: run.world]
    steps_per_epoch = max(len(c) for c in columns)
    total_steps = cfg["EPOCHS"] * steps_per_epoch
    if cfg["MAX_STEPS"] is not None:
        total_steps = min(total_steps, cfg["MAX_STEPS"])
    run.log(
        f"data: {len(train_ids)} train / {len(val_ids)} validation images; {run.world} process(es) x batch "
        f"{cfg['BATCH_SIZE']} x {cfg['GRAD_ACCUM']} accumulation = effective batch {effective_batch}; "
        f"{steps_per_epoch} optimizer steps per epoch"
    )
    base = families.base_model(model)
    stages = family.vision_stages(base)
    prefix_stages, why_not = frozen_prefix_length(stages) if stages is not None else (0, "")
    cache, mode, line = plan_prefix_cache(
        cfg,
        family,
        base,
        prefix_stages,
        why_not,
        run.precision,
        my_train + my_val,
        run.out_dir / f".prefix_cache-rank{run.rank}.bin",
    )
    run.log(line)
    return Data(
        items,
        skipped,
        max_tokens,
        dataset,
        train_ids,
        val_ids,
        columns,
        my_val,
        steps_per_epoch,
        total_steps,
        cache,
        mode,
        line,
        prefix_stages if cache is not None else 0,
    )


def prepare_training(cfg, run, family, model, data) -> Training:
    """Accelerate (device, precision, accumulation, processes), the optimizer and the LR schedule."""
    from transformers import get_scheduler

    AcceleratorState._reset_state(reset_partial_state=False)  # main() may run twice in one process (tests)
    accelerator = Accelerator(
        cpu=run.on_cpu,
        mixed_precision={"fp32": "no"}.get(run.precision, run.precision),
        gradient_accumulation_steps=cfg["GRAD_ACCUM"],
        step_scheduler_with_optimizer=False,
    )
    if run.precision in ("bf16", "fp16") and cfg["USE_LORA"]:
        cast_frozen_linears(families.base_model(model), common.torch_dtype(run.precision))
    caption_model = CaptionModel(model, family, data.prefix_stages)
    parameters = [p for p in caption_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg["LR"], weight_decay=cfg["WEIGHT_DECAY"])
    schedule = cfg["LR_SCHEDULE"]
    if schedule == "constant" and cfg["WARMUP_STEPS"]:
        schedule = "constant_with_warmup"
    try:
        scheduler = get_scheduler(
            schedule,
            optimizer,
            num_warmup_steps=cfg["WARMUP_STEPS"],
            num_training_steps=max(1, data.total_steps),
        )
    except ValueError as e:
        raise UserError(f"LR_SCHEDULE={cfg['LR_SCHEDULE']!r}: {e}") from None
    prepared_model, optimizer, scheduler = accelerator.prepare(caption_model, optimizer, scheduler)
    accelerator.register_save_state_pre_hook(keep_trainable)
    return Training(accelerator, caption_model, prepared_model, optimizer, scheduler, parameters)


def main(argv=None):
    started = time.time()
    cfg = common.configure(globals(), argv, __doc__)
    common.quiet_known_warnings()
    run, lock = setup_run(cfg, started)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lock.release)
        check_file = run.out_dir / _CHECK_FILE
        items, skipped = load_dataset(cfg["DATA_DIR"], run.rank, run.world, run.log, check_file)
        family, model = build_model(cfg, run)
        data = plan_data(cfg, run, family, model, items, skipped)
        if data.cache is not None:
            cleanup.callback(data.cache.close)  # the disk cache file goes, whatever happens
        training = prepare_training(cfg, run, family, model, data)
        state, resumed_from = resume_or_start(cfg, run, training)

        rates, times = [], []  # samples/s and seconds of each epoch this run trained
        ended = "done"
        bar = tqdm(
            total=data.total_steps,
            initial=state.global_step,
            disable=not run.is_main,
            desc="train",
            unit="step",
        )
        training.prepared_model.train()
        with StopRequest(run.log) as stop:
            while state.epoch < cfg["EPOCHS"] and state.global_step < data.total_steps:
                ended, seen, seconds = train_epoch(cfg, run, family, data, training, state, stop, bar)
                if ended == "stopped":
                    save_checkpoint(training.accelerator, run, state, cfg)
                    break
                if seen:
                    rates.append(seen * run.world / max(seconds, 1e-9))
                    times.append(seconds)
                end_epoch(cfg, run, family, data, training, state, ended, seen, seconds)
        bar.close()
        if ended == "stopped":
            say_how_to_resume(run, state, argv)
            raise KeyboardInterrupt
        return summarize(cfg, run, family, model, data, training, state, resumed_from, rates, times)


if __name__ == "__main__":
    common.cli(main)()
