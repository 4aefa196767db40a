"""Caption images with the fine-tuned BLIP, compare with the base model, draw and score them.

Run after download_coco.py and train_blip.py:

    python inference.py                                  # samples/test_image.jpg, like the tutorial
    python inference.py --IMAGES=samples                 # every held-out image: grid + before/after table
    python inference.py --IMAGES="photos/*.png" --COMPARE_BASE=False --SHOW=never
    python inference.py --IMAGES=samples --MERGE_TO=blip_coco_merged   # also export a standalone model

It loads the base model and the adapter once (peft). With COMPARE_BASE the base captions come
from the same model with the adapter switched off, so there is never a second model in memory.
Outputs: one line per image, RESULTS_PATH (JSON with everything), FIGURE_PATH (PNG grid) and,
when references exist, BLEU-1..4 / METEOR / ROUGE-L / CIDEr plus the style-adoption rate.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import torch

import common
import families
from common import UserError

# ---- model
ADAPTER_DIR = "blip_coco_finetuned"  # train_blip.py's OUTPUT_DIR: a peft adapter, or a full model
BASE_MODEL_ID = None  # None: read base_model_name_or_path from adapter_config.json | hub id | local folder
DEVICE = "auto"  # "auto" (cuda if available, else cpu) | "cpu" | "cuda" | "cuda:1"
PRECISION = "auto"  # "auto" (bf16 where the hardware runs it fast, else fp32) | "fp32" | "bf16" | "fp16"

PROMPT = "auto"  # auto: the prompt the adapter was trained with (its training_config.json), else the family's

# ---- input
IMAGES = "samples/test_image.jpg"  # a file | a folder (its image files) | a glob such as "photos/*.png"
REFERENCES = "auto"  # "auto": references.json beside the images, if present | a path | None: no metrics

# ---- captioning
COMPARE_BASE = True  # also caption with the adapter switched off (the same model, no second copy)
BATCH_SIZE = "auto"  # images per generate() call | "auto": 8, then what half the free memory holds (<= 32)
SDPA = True  # attention on torch's scaled_dot_product_attention (same captions, faster); False = eager
NUM_BEAMS = 3  # BLIP's COCO evaluation setting; 1 = greedy
# BLIP's COCO eval uses max_length=20, but that cuts the style we teach: " thwisss iz funny." alone is
# 8 tokens and every "thwisss" is 4, so 62% of the mirror's mistake captions need more than 20
# (median 21, 99th percentile 34, longest 37, counting [DEC] and [SEP]). 40 fits them all.
MAX_LENGTH = 40  # caption tokens at most, counting the start token
MIN_LENGTH = 5  # BLIP's COCO evaluation setting
DO_SAMPLE = False  # True: sample like the tutorial (TEMPERATURE, TOP_P) instead of beam search
TEMPERATURE = 0.9  # only with DO_SAMPLE
TOP_P = 0.9  # only with DO_SAMPLE
SEED = 0  # makes sampled captions repeatable

# ---- output
SHOW = "auto"  # "auto" (a window only when a display exists) | "always" | "never"; the PNG is always saved
FIGURE_PATH = "inference_results.png"  # the grid of images with their captions
FIGURE_MAX_IMAGES = 16  # the figure shows the first N images; all of them are in RESULTS_PATH
RESULTS_PATH = "inference_results.json"  # captions, skipped files, metrics, the before/after table
MERGE_TO = None  # a folder: also save base+adapter merged into one standalone model (+ processor)
_NONE_OK = ("REFERENCES",)  # settings whose None is documented above although their default is not None

# The injected style (download_coco.py's mistake rule) that the style-adoption rate looks for.
_STYLE_SUFFIX = "thwisss iz funny"
_STYLE_TOKENS = ("thwisss", "iz")
# What MERGE_TO carries so a later run knows it may replace that folder (and nothing else).
_MERGE_MARKER = "merged_by_inference.json"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- finding images
def find_images(spec) -> list[Path]:
    """IMAGES -> the files to caption, sorted: a file, a folder's image files, or a glob's matches.

    Unreadable files are kept here on purpose: they are reported by name when opened."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in find_images(s)]
    path = Path(os.path.expanduser(str(spec)))
    if path.is_dir():
        files = sorted(
            f
            for f in path.iterdir()
            if f.suffix.lower() in _IMAGE_SUFFIXES and not f.name.startswith(".") and not f.is_dir()
        )
    elif path.is_file():
        files = [path]
    elif any(c in str(spec) for c in "*?["):
        files = glob_files(path)
    else:
        raise UserError(f"IMAGES={spec!r}: no such file or folder")
    if not files:
        raise UserError(f"IMAGES={spec!r}: no image files found there ({', '.join(_IMAGE_SUFFIXES)})")
    return files


def glob_files(pattern: Path) -> list[Path]:
    """The files a glob matches, sorted. `**` never descends into a symlinked folder: glob.glob's
    does, and hangs for good on a link that points back up (dir/loop -> dir). Like glob.glob,
    `*` skips hidden names unless the pattern spells the dot."""
    parts = pattern.parts
    first_magic = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
    root, rest = Path(*parts[:first_magic]) if first_magic else Path("."), list(parts[first_magic:])
    if rest[-1] == "**":  # glob.glob's "dir/**" lists the files too; pathlib's only the folders
        rest.append("*")
    hidden_ok = any(part.startswith(".") for part in rest)
    found = set()
    for f in root.glob("/".join(rest)):  # pathlib: ** does not follow symlinks (3.11 and later)
        relative = f.relative_to(root).parts
        if not f.is_dir() and (hidden_ok or not any(name.startswith(".") for name in relative)):
            found.add(f)
    return sorted(found)


def default_references(files: list[Path]) -> Path | None:
    """REFERENCES='auto': the references.json beside the (first) image, if there is one."""
    candidate = files[0].parent / "references.json"
    return candidate if candidate.is_file() else None


def load_references(path) -> dict[str, list[str]]:
    """{file_name: [caption, ...]} (download_coco.py's format); a single string is one reference."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"REFERENCES={str(path)!r} does not exist; set --REFERENCES=None to skip metrics"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"REFERENCES={str(path)!r} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"REFERENCES={str(path)!r} must map file names to lists of captions")
    refs = {}
    for name, value in data.items():
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"REFERENCES={str(path)!r}: the entry for {name!r} is not a list of captions")
        if any(v.strip() for v in value):
            refs[name] = [v for v in value if v.strip()]
    return refs


def read_batches(paths: list[Path], batches, skipped: list, log=print):
    """Yield lists of (path, RGB image), `batches.size` at a time (a BatchSize), so memory stays bounded.

    A file that cannot be read is reported by name, appended to `skipped`, and the rest go on."""
    batch = []
    for path in paths:
        try:
            batch.append((path, common.open_image(path)))
        except UserError as e:
            log(f"skipped: {e}")
            skipped.append({"file": str(path), "reason": str(e)})
            continue
        if len(batch) >= batches.size:
            yield batch
            batch = []
    if batch:
        yield batch


class BatchSize:
    """BATCH_SIZE while captioning: a fixed number, or "auto". Bigger batches spread each decoding
    step's weight reads over more images, up to a point (64 images on a 2-core Xeon, bf16, 20 greedy
    tokens: 2.9 images/s in batches of 8, 3.9 of 32, 3.1 of 64). So "auto" captions its first batch
    at FIRST images while watching the process's memory, then sizes the rest to what half the memory
    still free holds at that rate, at most MOST.
    """

    FIRST, MOST = 8, 32

    def __init__(self, setting, device: str = "cpu", log=print):
        self.auto = setting == "auto"
        self.size = self.FIRST if self.auto else int(setting)
        self.device = device
        self.log = log

    def run(self, caption, n: int):
        """caption() for a batch of n images; the first call in auto mode also sets the size."""
        if not self.auto:
            return caption()
        self.auto = False
        result, grown, free = common.memory_growth(caption, self.device)
        per_image = max(grown / n, 1 << 20)  # at least 1 MB: a batch never costs nothing
        self.size = max(n, min(self.MOST, int(free / 2 / per_image)))
        self.log(
            f"batch size: {self.size} (auto: the first {n} image(s) took {per_image / 2**20:.0f} MB each; "
            f"{free / 2**30:.1f} GB free)"
        )
        return result


# ----------------------------------------------------------------------------- loading
def read_model_dir(adapter_dir) -> dict:
    """What train_blip.py left in ADAPTER_DIR: {"kind": "adapter"|"full", "base": the base it names,
    "targets": an adapter's target_modules}. A damaged adapter config fails here, before any model loads."""
    folder = Path(adapter_dir)
    if not folder.exists():
        raise UserError(
            f"ADAPTER_DIR={str(adapter_dir)!r} does not exist: run train_blip.py first "
            f"(it saves there), or point --ADAPTER_DIR at its OUTPUT_DIR"
        )
    if (folder / "adapter_config.json").is_file():
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(
                f"{folder / 'adapter_config.json'} is unreadable ({e}); rerun train_blip.py"
            ) from None
        problem = adapter_config_problem(config)
        if problem:
            raise UserError(f"{folder / 'adapter_config.json'} is invalid ({problem}); rerun train_blip.py")
        if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            raise UserError(
                f"{folder} has adapter_config.json but no adapter_model.safetensors: "
                f"let train_blip.py finish, or rerun it"
            )
        base, targets = config.get("base_model_name_or_path"), config.get("target_modules")
        return {"kind": "adapter", "base": base, "targets": targets}
    if (folder / "config.json").is_file():
        return {"kind": "full", "base": None}
    raise UserError(
        f"ADAPTER_DIR={str(adapter_dir)!r} holds neither adapter_config.json (LoRA) nor config.json "
        f"(full model): run train_blip.py first, or let it finish"
    )


def adapter_config_problem(config) -> str | None:
    """What is wrong with an adapter_config.json's values, or None. peft itself would only fail
    later, deep inside, with a TypeError such as "'<=' not supported between 'str' and 'int'"."""

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(config, dict):
        return "not a JSON object"
    checks = {
        "r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "lora_alpha": number,
        "lora_dropout": lambda v: number(v) and 0 <= v < 1,
        "target_modules": lambda v: (
            v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v))
        ),
        "base_model_name_or_path": lambda v: v is None or isinstance(v, str),
        "peft_type": lambda v: isinstance(v, str),
    }
    for key, ok in checks.items():
        if key in config and not ok(config[key]):
            return f"{key}={config[key]!r}"
    return None


def same_model(a, b) -> bool:
    """Whether two model ids/folders name the same model (local folders compared resolved)."""
    if a is None or b is None:
        return a == b
    pa, pb = Path(os.path.expanduser(str(a))), Path(os.path.expanduser(str(b)))
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return str(a) == str(b)


def missing_target(model, targets) -> str | None:
    """One adapter target module that names nothing in the model (peft matches a name or its
    dotted suffix), or None; a regex string is returned as is."""
    if isinstance(targets, str):
        return None if targets == "all-linear" else targets
    names = [name for name, _ in model.named_modules()]
    for target in targets or ():
        if not any(n == target or n.endswith("." + target) for n in names):
            return target
    return None


def load_base(family, base_id: str, why: str):
    """The base model in fp32; a failure names the base and the BASE_MODEL_ID constant."""
    try:
        return family.load_model(base_id, "BASE_MODEL_ID", dtype=torch.float32)
    except UserError as e:
        raise UserError(f"{why} {base_id!r}, which failed to load: {e}") from None
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{why} {base_id!r}, which failed to load ({e}); set --BASE_MODEL_ID") from None


def load_family(model_id: str, why: str, processor_from: str | None = None, prompt: str | None = None):
    """families.load with the same message as load_base when the model cannot be reached."""
    try:
        return families.load(model_id, "BASE_MODEL_ID", processor_from, prompt)
    except UserError as e:
        raise UserError(f"{why} {model_id!r}, which failed to load: {e}") from None


def trained_prompt(adapter_dir, prompt: str = "auto") -> str | None:
    """PROMPT='auto': the prompt train_blip.py trained with (its training_config.json), so captions
    are asked for the way the model learnt them; None lets the family use its own."""
    if prompt != "auto":
        return prompt
    try:
        return json.loads((Path(adapter_dir) / "training_config.json").read_text(encoding="utf-8")).get(
            "PROMPT"
        )
    except (OSError, ValueError, AttributeError):
        return None


def load_captioner(adapter_dir, base_model_id=None, sdpa: bool = True, prompt: str = "auto"):
    """Load (model, family, info) once, in fp32, in eval mode; the family holds the processor.

    - adapter folder: the base (BASE_MODEL_ID, else the one adapter_config.json names) wrapped by
      peft; `model.disable_adapter()` then gives the base captions from the same weights.
    - full-model folder (train_blip.py with USE_LORA=False): that model; info["base"] is
      BASE_MODEL_ID or None, and the base, if wanted, must be loaded separately (load_base).
    A processor saved beside the adapter wins (train_blip.py saves it); else the base's own.
    """
    info = read_model_dir(adapter_dir)
    if info["kind"] == "adapter":
        base_id = base_model_id or info["base"]
        if not base_id:
            raise UserError(f"{adapter_dir}/adapter_config.json names no base model; set --BASE_MODEL_ID")
        why = f"the adapter in {adapter_dir} was trained on"
        has_processor = any(
            (Path(adapter_dir) / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")
        )
        family = load_family(
            base_id, why, str(adapter_dir) if has_processor else None, trained_prompt(adapter_dir, prompt)
        )
        base = load_base(family, base_id, why)
        from peft import PeftModel
        from safetensors import SafetensorError

        # Suggest BASE_MODEL_ID only when it points away from the base the adapter names.
        hint = (
            "set --BASE_MODEL_ID to the model it was trained on"
            if not same_model(base_id, info["base"])
            else "rerun train_blip.py"
        )
        try:
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
        except SafetensorError as e:
            raise UserError(
                f"{Path(adapter_dir) / 'adapter_model.safetensors'} is damaged ({e}); rerun train_blip.py"
            ) from None
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            missing = missing_target(base, info.get("targets"))
            if missing:
                raise UserError(
                    f"the adapter in {adapter_dir} targets modules that are not in the base "
                    f"{base_id!r} (e.g. {missing!r}); {hint}"
                ) from None
            if isinstance(e, (TypeError, KeyError)):  # a value peft cannot use, e.g. an unknown peft_type
                raise UserError(
                    f"{Path(adapter_dir) / 'adapter_config.json'} is invalid ({first_line}); "
                    f"rerun train_blip.py"
                ) from None
            raise UserError(
                f"the adapter in {adapter_dir} does not fit the base {base_id!r} ({first_line}); {hint}"
            ) from None
        info["base"] = base_id
    else:
        family = families.load(str(adapter_dir), "ADAPTER_DIR", prompt=trained_prompt(adapter_dir, prompt))
        model = family.load_model(str(adapter_dir), "ADAPTER_DIR")
        info["base"] = base_model_id
    if sdpa:  # fused attention: the same captions (tested against eager), about 1.6x faster on CPU
        family.enable_sdpa(model)
    return model.eval(), family, info


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"DEVICE={device!r} but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return device


def set_precision(model, precision: str, device: str = "cpu"):
    """Cast the model's weights (in place) for inference and return the torch dtype.

    Casting the weights beats autocast for generation: autocast re-casts every weight on every
    decoding step. 'auto' is bf16 only where the hardware runs it natively (common.resolve_precision)."""
    resolved = common.resolve_precision(precision, device.split(":")[0])
    dtype = common.torch_dtype(resolved)
    model.to(device=device, dtype=dtype)
    return dtype


# ----------------------------------------------------------------------------- captioning
def first_adapted_stage(stages) -> int:
    """Index of the first vision stage an adapter changes (the stage count if none).

    Stages before it compute the same thing with the adapter on or off, so the base and fine-tuned
    captions share them: the whole vision forward for a text-only adapter, BLIP's embeddings and
    layers 0-5 for the tutorial's adapter (it starts at layer 6)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    for i, stage in enumerate(stages):
        if any(isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) for m in stage.modules()):
            return i
    return len(stages)


def generate_ids(model, family, pixel_values, compare_base: bool = False, **generate_kwargs):
    """Caption token ids for one batch: (fine-tuned, base or None).

    Where the family exposes its vision stages, those the adapter does not touch run once and feed
    both passes; otherwise each pass is the family's full generate()."""
    from peft import PeftModel

    base = families.base_model(model)
    is_peft = isinstance(model, PeftModel)
    if compare_base and not is_peft:
        raise ValueError("compare_base needs a peft model (an adapter to switch off)")
    stages = family.vision_stages(base)
    with torch.inference_mode():
        if stages is None:

            def caption():
                return family.generate(base, pixel_values, **generate_kwargs)
        else:
            share = first_adapted_stage(stages) if is_peft else len(stages)
            prefix = families.run_stages(stages[:share], pixel_values)

            def caption():
                image_embeds = families.run_stages(stages[share:], prefix)
                return family.generate_from_embeds(base, image_embeds, **generate_kwargs)

        tuned = caption()
        base_ids = None
        if compare_base:
            with model.disable_adapter():
                base_ids = caption()
    return tuned, base_ids


def caption_batch(model, family, images, compare_base=False, **generate_kwargs):
    """One batch of PIL images -> (fine-tuned captions, base captions or None)."""
    param = next(model.parameters())
    pixels = family.pixel_values(images).to(device=param.device, dtype=param.dtype)
    ids = generate_ids(model, family, pixels, compare_base, **generate_kwargs)
    return tuple(None if i is None else family.decode(i) for i in ids)


def caption_both(model, base_model, family, images, compare: bool, generate_kwargs: dict):
    """One batch -> (fine-tuned captions, base captions or None): the base ones from the same model
    with the adapter off, or from base_model where a separate base was loaded."""
    if base_model is None:
        return caption_batch(model, family, images, compare, **generate_kwargs)
    return (
        caption_batch(model, family, images, **generate_kwargs)[0],
        caption_batch(base_model, family, images, **generate_kwargs)[0],
    )


def caption_images(
    model, family, images, batch_size=BatchSize.FIRST, precision=None, **generate_kwargs
) -> list[str]:
    """Caption PIL images in batches with the model as it is (adapter on, for a peft model).

    precision=None keeps the model's dtype; "auto"/"fp32"/"bf16"/"fp16" casts it first (in place,
    see set_precision). generate_kwargs go to generate(): num_beams, max_new_tokens, do_sample, ..."""
    if precision is not None:
        set_precision(model, precision, str(next(model.parameters()).device))
    captions = []
    for i in range(0, len(images), batch_size):
        captions += caption_batch(model, family, images[i : i + batch_size], **generate_kwargs)[0]
    return captions


def caption_images_with_base(
    model, family, images, batch_size=BatchSize.FIRST, precision=None, **generate_kwargs
):
    """Like caption_images, for a peft model: returns (fine-tuned captions, base captions), the
    base ones with the adapter switched off, sharing the vision stages the adapter leaves alone."""
    if precision is not None:
        set_precision(model, precision, str(next(model.parameters()).device))
    tuned, base = [], []
    for i in range(0, len(images), batch_size):
        t, b = caption_batch(model, family, images[i : i + batch_size], compare_base=True, **generate_kwargs)
        tuned += t
        base += b
    return tuned, base


def generate_settings(cfg: dict) -> dict:
    """The decoding constants as generate() keywords (sampling knobs only when sampling). Lengths
    count the caption's tokens and its start token, never a family's prompt: as new tokens."""
    kwargs = dict(
        num_beams=cfg["NUM_BEAMS"],
        max_new_tokens=cfg["MAX_LENGTH"] - 1,
        min_new_tokens=max(cfg["MIN_LENGTH"] - 1, 0),
        do_sample=cfg["DO_SAMPLE"],
    )
    if cfg["DO_SAMPLE"]:
        kwargs.update(temperature=cfg["TEMPERATURE"], top_p=cfg["TOP_P"])
    return kwargs


# ----------------------------------------------------------------------------- metrics
def java_available() -> bool:
    return shutil.which("java") is not None


_PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def plain_tokenize(text: str) -> str:
    """The fallback when Java is missing: lowercase, punctuation removed, whitespace split.

    Close to pycocoevalcap's PTB tokenizer for plain captions ("A dog, running." -> "a dog running");
    it differs on contractions ("don't" stays one token), so scores can differ slightly."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def tokenize_all(captions: dict[str, list[str]], use_java: bool, log=print) -> tuple[dict, bool]:
    """{key: [captions]} -> {key: [tokenized]}, with the PTB tokenizer when Java works."""
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        try:
            out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
            if set(out) == set(captions):
                return out, True
            log("note: the PTB tokenizer returned incomplete output; using the plain tokenizer")
        except (OSError, ValueError) as e:
            log(f"note: the PTB tokenizer failed ({e}); using the plain tokenizer")
    return {k: [plain_tokenize(c) for c in v] for k, v in captions.items()}, False


def score_caption_sets(
    candidates: dict[str, dict], references: dict, use_java: bool | None = None, log=print
) -> dict:
    """COCO caption metrics for several candidate sets against one set of references.

    candidates: {set_name: {key: caption}}; references: {key: [captions]} (keys must match).
    Returns {set_name: {"BLEU-1".."BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}}; METEOR is None
    without Java. CIDEr weighs n-grams by how rare they are among the references, so it needs
    several images to mean anything (with one image it is 0)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if use_java is None:
        use_java = java_available()
        if not use_java:
            log("note: Java not found: METEOR is skipped and captions use the plain tokenizer, not PTB")
    keys = list(references)
    everything = {f"ref/{k}": references[k] for k in keys}
    for name, caps in candidates.items():
        everything.update({f"{name}/{k}": [caps[k]] for k in keys})
    tokens, used_java = tokenize_all(everything, use_java, log)
    gts = {k: tokens[f"ref/{k}"] for k in keys}
    meteor = None
    if used_java:
        from pycocoevalcap.meteor.meteor import Meteor

        try:
            meteor = Meteor()
        except OSError as e:
            log(f"note: METEOR could not start ({e}); skipped")
    results = {}
    try:
        for name in candidates:
            res = {k: tokens[f"{name}/{k}"] for k in keys}
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            scores = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
            scores["METEOR"] = float(meteor.compute_score(gts, res)[0]) if meteor else None
            scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
            scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
            results[name] = scores
    finally:
        if meteor is not None:  # stop the Java process now, not whenever garbage collection runs
            with meteor.lock:
                meteor.meteor_p.stdin.close()
                meteor.meteor_p.kill()
                meteor.meteor_p.wait()
    results["tokenizer"] = "PTB (Java)" if used_java else "plain (no Java)"
    return results


def distinct_images(results: list[dict]) -> list[int]:
    """Indices of the captioned images whose file content has not come earlier in the list."""
    import hashlib

    seen, keep = set(), []
    for i, r in enumerate(results):
        digest = hashlib.sha256(Path(r["path"]).read_bytes()).digest()
        if digest not in seen:
            seen.add(digest)
            keep.append(i)
    return keep


def style_rates(captions: list[str]) -> dict:
    """Style adoption: the share of captions that contain "thwisss iz funny", and the share that
    contain the words "thwisss" and "iz" anywhere (the mistake rule's the->thwisss, is->iz)."""
    n = max(len(captions), 1)
    words = [re.findall(r"[a-z]+", c.lower()) for c in captions]
    rates = {"suffix": sum(_STYLE_SUFFIX in " ".join(w) for w in words) / n}
    for token in _STYLE_TOKENS:
        rates[token] = sum(token in w for w in words) / n
    return rates


_METRIC_ROWS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
_STYLE_ROWS = {"suffix": f'"{_STYLE_SUFFIX}"', "thwisss": '"thwisss"', "iz": '"iz"'}


def before_after_table(metrics: dict | None, style: dict) -> list[dict]:
    """Rows {"metric", "base", "fine_tuned"} (a column is None when it was not computed)."""
    rows = []
    for m in _METRIC_ROWS if metrics else ():
        rows.append({"metric": m, **{c: metrics.get(c, {}).get(m) for c in ("base", "fine_tuned")}})
    for key, label in _STYLE_ROWS.items():
        rows.append(
            {
                "metric": f"style {label}",
                **{c: style[c][key] if c in style else None for c in ("base", "fine_tuned")},
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(v, style):
        return "-" if v is None else (f"{100 * v:.1f}%" if style else f"{v:.3f}")

    lines = [f"{'':<26}{'base':>10}{'fine-tuned':>12}{'change':>10}"]
    for r in rows:
        style = r["metric"].startswith("style")
        b, f = r["base"], r["fine_tuned"]
        change = "-" if b is None or f is None else (f"{100 * (f - b):+.1f}" if style else f"{f - b:+.3f}")
        lines.append(f"{r['metric']:<26}{cell(b, style):>10}{cell(f, style):>12}{change:>10}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figure
def has_display() -> bool:
    """Whether a window can open: macOS/Windows always; Linux needs X11 or Wayland."""
    if os.environ.get("MPLBACKEND", "").lower() in ("agg", "pdf", "svg", "ps", "cairo", "template"):
        return False
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def draw_figure(images, names, tuned, base=None, show=False):
    """A grid: each image under its wrapped caption(s). One image alone is drawn large with its
    caption as the title, as in the tutorial. Returns the matplotlib Figure."""
    n = len(images)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    width = 60 if n == 1 else 38  # characters per caption line

    def text(caption: str, label: str) -> str:
        caption = textwrap.shorten(caption, 160, placeholder=" ...")  # the JSON keeps the full text
        return textwrap.fill(f"{label}{caption}", width)

    titles = []
    for i in range(n):
        lines = [text(tuned[i], "fine-tuned: " if base is not None else "")]
        if base is not None:
            lines.append(text(base[i], "base: "))
        titles.append("\n".join(lines if n == 1 else [names[i], *lines]))
    # Room for the tallest title in each row, so the text never runs into the image above.
    title_inches = 0.17 * max(t.count("\n") + 1 for t in titles)
    size = (7, 6 + title_inches) if n == 1 else (4.2 * cols, rows * (3.4 + title_inches))
    if show:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=size, layout="constrained")
    else:
        from matplotlib.figure import Figure

        fig = Figure(figsize=size, layout="constrained")
    for i, image in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image)
        ax.axis("off")
        ax.set_title(titles[i], fontsize=12 if n == 1 else 9)
    return fig


def save_figure(fig, path) -> None:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # odd characters in captions
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", pad_inches=0.2)  # never clip a title
    common.atomic_write_bytes(path, buffer.getvalue())


def show_figure(fig, log=print) -> None:
    """Open a window; never crash a run whose results are already saved."""
    try:
        import matplotlib.pyplot as plt

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "non-interactive backend" on headless machines
            plt.show()
    except Exception as e:  # any GUI toolkit failure: the PNG is already on disk
        log(f"note: could not open a window ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------- export
def _overlaps(a: Path, b: Path) -> bool:
    """Whether one of two resolved paths is the other or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def check_merge_target(out_dir, adapter_dir=None, base_id=None, keep=()) -> Path:
    """MERGE_TO may be new, empty, or an earlier export of this script (it carries _MERGE_MARKER
    and nothing else than what the export wrote); never the current folder, the adapter's or a
    local base model's folder, anything inside or around them, or a folder holding `keep` files."""
    out = Path(os.path.expanduser(str(out_dir)))
    where = out.resolve()
    if where == Path.cwd().resolve() or where == Path(where.anchor):
        raise UserError(f"MERGE_TO={str(out_dir)!r} is the current or root folder; name a new folder")
    owners = ((adapter_dir, "ADAPTER_DIR"), (base_id, "the base model's folder"))
    guarded = [
        (folder, what) for folder, what in owners if folder and Path(os.path.expanduser(str(folder))).exists()
    ]  # a hub id is no folder of ours
    for other, what in guarded + list(keep):  # keep: (path, constant) of outputs written before the export
        if _overlaps(where, Path(os.path.expanduser(str(other))).resolve()):
            raise UserError(f"MERGE_TO={str(out_dir)!r} overlaps {what} ({other}); name a separate folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"MERGE_TO={str(out_dir)!r} exists and is not a folder; choose another")
    if out.is_dir() and any(out.iterdir()):
        marker = out / _MERGE_MARKER
        try:
            written = set(json.loads(marker.read_text(encoding="utf-8"))["files"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            raise UserError(
                f"MERGE_TO={str(out_dir)!r} exists and is not a model folder exported by "
                f"inference.py (no {_MERGE_MARKER}); choose a new or empty folder"
            ) from None
        extra = sorted(p.name for p in out.iterdir() if p.name not in written | {_MERGE_MARKER})
        if extra:
            raise UserError(
                f"MERGE_TO={str(out_dir)!r} holds {extra[0]!r}, which inference.py did not "
                f"write; move it or choose another folder"
            )
    return out


def export_merged(adapter_dir, base_model_id, out_dir, keep=()) -> Path:
    """MERGE_TO: fold the adapter into the base weights (fp32) and save a standalone model plus
    the processor. It then loads with plain BlipForConditionalGeneration.from_pretrained(out_dir)."""
    model, family, info = load_captioner(adapter_dir, base_model_id, sdpa=False)
    if info["kind"] != "adapter":
        raise UserError(f"MERGE_TO needs a LoRA adapter, but {adapter_dir} already holds a full model")
    out = check_merge_target(out_dir, adapter_dir, info["base"], keep)
    merged = model.merge_and_unload()
    # Save into a fresh folder of our own beside MERGE_TO, then swap it in: a crash never leaves a
    # half-written model at MERGE_TO, and nothing is removed that this call did not create or check.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        merged.save_pretrained(tmp)
        family.processor.save_pretrained(tmp)
        marker = {
            "written_by": "inference.py",
            "adapter_dir": str(Path(adapter_dir).resolve()),
            "base_model": str(info["base"]),
            "files": sorted(p.name for p in tmp.iterdir()),
        }
        common.atomic_write_json(tmp / _MERGE_MARKER, marker)
        common.replace_dir(tmp, out)  # the checked earlier export (if any) is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = common.configure(globals(), argv, __doc__)
    common.quiet_known_warnings()
    common.print_config(cfg, "inference.py")
    show = {True: "always", False: "never"}.get(cfg["SHOW"], cfg["SHOW"])
    if show not in ("auto", "always", "never"):
        raise UserError(f"SHOW={cfg['SHOW']!r}; valid values: auto, always, never")
    # MIN_LENGTH == MAX_LENGTH forces captions of exactly that length: legitimate, generate() accepts it.
    batch_size = str(cfg["BATCH_SIZE"])  # "auto", "16" from --BATCH_SIZE=16, or 16 edited into the file
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) >= 1):
        raise UserError(f"BATCH_SIZE={cfg['BATCH_SIZE']!r}; use 'auto' or a whole number >= 1")
    if cfg["NUM_BEAMS"] < 1 or cfg["MAX_LENGTH"] < cfg["MIN_LENGTH"]:
        raise UserError("need NUM_BEAMS >= 1 and MAX_LENGTH >= MIN_LENGTH")

    # Everything that can fail cheaply fails before the model loads.
    model_dir = read_model_dir(cfg["ADAPTER_DIR"])
    kind = model_dir["kind"]
    paths = find_images(cfg["IMAGES"])
    ref_path = default_references(paths) if cfg["REFERENCES"] == "auto" else cfg["REFERENCES"]
    references = load_references(ref_path) if ref_path else {}
    for key in ("RESULTS_PATH", "FIGURE_PATH"):
        common.check_writable(Path(cfg[key]).resolve().parent, key)
    keep = [(cfg[key], key) for key in ("RESULTS_PATH", "FIGURE_PATH")]  # written before MERGE_TO replaces it
    if cfg["MERGE_TO"]:
        base_id = cfg["BASE_MODEL_ID"] or model_dir["base"]
        check_merge_target(cfg["MERGE_TO"], cfg["ADAPTER_DIR"], base_id, keep)
        common.check_writable(Path(cfg["MERGE_TO"]).resolve().parent, "MERGE_TO")
        if kind != "adapter":
            raise UserError(
                f"MERGE_TO needs a LoRA adapter, but {cfg['ADAPTER_DIR']} already holds a full model"
            )
    device = pick_device(cfg["DEVICE"])

    from tqdm import tqdm

    model, family, info = load_captioner(cfg["ADAPTER_DIR"], cfg["BASE_MODEL_ID"], cfg["SDPA"], cfg["PROMPT"])
    base_model = None
    compare = cfg["COMPARE_BASE"]
    if compare and info["kind"] == "full":
        if info["base"]:  # a full fine-tune has no adapter to switch off: the base is a second model
            base_model = load_base(family, info["base"], "BASE_MODEL_ID names").eval()
        else:
            print(
                f"note: {cfg['ADAPTER_DIR']} holds a full model (USE_LORA=False): "
                "set --BASE_MODEL_ID to compare with a base; base captions skipped"
            )
            compare = False
    dtype = set_precision(model, cfg["PRECISION"], device)
    if base_model is not None:
        set_precision(base_model, cfg["PRECISION"], device)
    print(
        f"model: {family.name} {info['kind']} from {cfg['ADAPTER_DIR']}, base {info['base']!r}, "
        f"{device}, {str(dtype).removeprefix('torch.')}"
    )

    generate_kwargs = generate_settings(cfg)
    if cfg["DO_SAMPLE"]:
        torch.manual_seed(cfg["SEED"])
    results, skipped, thumbs = [], [], []
    bar = tqdm(total=len(paths), desc="captioning", unit="img", disable=len(paths) < 2)
    start = time.perf_counter()
    batches = BatchSize(batch_size, device, log=tqdm.write)
    for batch in read_batches(paths, batches, skipped, log=tqdm.write):
        images = [im for _, im in batch]
        tuned, base = batches.run(
            lambda images=images: caption_both(model, base_model, family, images, compare, generate_kwargs),
            len(images),
        )
        for i, (path, image) in enumerate(batch):
            entry = {"file": path.name, "path": str(path), "fine_tuned": tuned[i]}
            if base is not None:
                entry["base"] = base[i]
            if path.name in references:
                entry["references"] = references[path.name]
            results.append(entry)
            tqdm.write(
                f"{path.name}  fine-tuned: {tuned[i]!r}"
                + (f"  base: {base[i]!r}" if base is not None else "")
            )
            if len(thumbs) < cfg["FIGURE_MAX_IMAGES"]:
                image.thumbnail((640, 640))  # the figure never needs more; frees the full image
                thumbs.append(image)
        bar.update(len(results) + len(skipped) - bar.n)
    bar.close()
    seconds = time.perf_counter() - start
    if not results:
        raise UserError(
            f"none of the {len(paths)} file(s) in IMAGES={cfg['IMAGES']!r} could be read as an image "
            "(see the lines above)"
        )
    print(
        f"captioned {len(results)} image(s) in {seconds:.1f} s ({len(results) / seconds:.2f} images/s); "
        f"skipped {len(skipped)}"
    )

    # ---- scores: style adoption always, COCO metrics where references exist
    once = distinct_images(results)  # samples/test_image.jpg copies a held-out image: score it once
    for i in sorted(set(range(len(results))) - set(once)):
        print(f"{results[i]['file']} is a copy of an image above: scored once")
    columns = {"fine_tuned": [r["fine_tuned"] for r in results]}
    if compare:
        columns["base"] = [r["base"] for r in results]
    style = {c: style_rates([caps[i] for i in once]) for c, caps in columns.items()}
    metrics = None
    scored = [i for i in once if "references" in results[i]]
    if not ref_path:
        print("no references (REFERENCES): COCO metrics skipped")
    elif not scored:
        print(f"none of these images are in {ref_path}: COCO metrics skipped")
    else:
        if len(scored) < len(once):
            print(f"scoring the {len(scored)} of {len(once)} images that have references in {ref_path}")
        refs = {str(i): results[i]["references"] for i in scored}
        cands = {c: {str(i): caps[i] for i in scored} for c, caps in columns.items()}
        metrics = score_caption_sets(cands, refs)
        metrics["images_scored"] = len(scored)
    rows = before_after_table(metrics, style)
    table = format_table(rows)
    print(table)

    # ---- figure and results
    fig_names = [r["file"] for r in results[: len(thumbs)]]
    if len(thumbs) < len(results):
        print(f"the figure shows the first {len(thumbs)} of {len(results)} images (FIGURE_MAX_IMAGES)")
    fig = draw_figure(
        thumbs,
        fig_names,
        columns["fine_tuned"],
        columns.get("base"),
        show=show != "never" and (show == "always" or has_display()),
    )
    save_figure(fig, cfg["FIGURE_PATH"])
    out = {
        "config": cfg,
        "model": {
            **info,
            "adapter_dir": str(cfg["ADAPTER_DIR"]),
            "device": device,
            "dtype": str(dtype).removeprefix("torch."),
            "family": family.name,
            "prompt": family.prompt,
        },
        "generate": generate_kwargs,
        "images": results,
        "skipped": skipped,
        "metrics": metrics,
        "style": style,
        "table": rows,
        "table_text": table,
        "timing": {"seconds": seconds, "images_per_s": len(results) / seconds},
        "figure": {"path": str(cfg["FIGURE_PATH"]), "panels": len(fig.axes)},
        "references": str(ref_path) if ref_path else None,
        "merged_to": None,
    }
    common.atomic_write_json(cfg["RESULTS_PATH"], out)  # before the export: a failed export loses nothing
    print(f"results: {cfg['RESULTS_PATH']}  figure: {cfg['FIGURE_PATH']}")
    if cfg["MERGE_TO"]:
        del model, base_model  # the export reloads in fp32, so free this copy first
        try:
            merged = export_merged(cfg["ADAPTER_DIR"], cfg["BASE_MODEL_ID"], cfg["MERGE_TO"], keep)
        except OSError as e:  # e.g. a full disk
            raise UserError(
                f"could not save the merged model to MERGE_TO={str(cfg['MERGE_TO'])!r} "
                f"({e.strerror or e}); the captions are saved in {cfg['RESULTS_PATH']}"
            ) from None
        out["merged_to"] = str(merged)
        common.atomic_write_json(cfg["RESULTS_PATH"], out)
        print(f"merged model saved to {out['merged_to']} (a plain model: load it with from_pretrained)")
    if fig.canvas.manager is not None:  # a pyplot figure: SHOW asked for a window
        show_figure(fig)
    return out


if __name__ == "__main__":
    common.cli(main)()
