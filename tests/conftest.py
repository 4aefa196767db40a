"""Fixtures shared by the test files.

- `shared_dir`, `coco_mirror`, `blip_processor_dir`: the read-only stand-ins in ../shared
  (skipped with a reason when ../shared is absent).
- `serve`: a real HTTP server on 127.0.0.1 (random free port) over a folder, with HTTP Range
  support, a request log and an optional fault hook.
- `make_coco_mirror` / `synthetic_mirror`: a tiny COCO-format mirror built from nothing, so
  the download tests also run where ../shared is absent.
- `build_tiny_blip` / `tiny_blip_dir`: a small random BLIP saved with the real processor.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import socket
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BLIP_SHARED_DIR", REPO.parent / "shared"))
sys.path.insert(0, str(REPO))  # the scripts are plain files at the top level, not a package

os.environ.setdefault("MPLBACKEND", "Agg")  # headless: never try to open a window in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network here: fail fast instead of retrying
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- ../shared
def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (../shared is absent here)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED, "the shared folder")


@pytest.fixture(scope="session")
def coco_mirror() -> Path:
    return _need(SHARED / "coco_mirror", "the COCO mirror")


@pytest.fixture(scope="session")
def blip_processor_dir() -> Path:
    return _need(SHARED / "blip_processor", "the BLIP processor files")


# ----------------------------------------------------------------------------- HTTP server
class MirrorHandler(SimpleHTTPRequestHandler):
    """Serves a folder like the COCO server: GET/HEAD with single `bytes=N-` or `N-M` ranges.

    `fault(handler) -> bool` runs first; if it returns True it has answered the request itself.
    """

    fault = None
    log: list = None

    def log_message(self, *args):  # keep pytest output clean
        pass

    def send_head(self):
        self.log.append((self.command, self.path, self.headers.get("Range")))
        if self.fault is not None and self.fault(self):
            return None
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().send_head()
        size = path.stat().st_size
        start_s, _, end_s = rng.removeprefix("bytes=").partition("-")
        start, end = int(start_s or 0), int(end_s) if end_s else size - 1
        if start >= size:
            self.send_error(416)
            return None
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(body)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the default 5 drops bursts from parallel downloaders


class Server:
    def __init__(self, directory: Path, fault=None):
        handler = type(
            "Handler", (MirrorHandler,), {"fault": staticmethod(fault) if fault else None, "log": []}
        )
        self.log = handler.log
        self.httpd = _HTTPServer(("127.0.0.1", 0), partial(handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def gets(self, prefix: str = "") -> list[str]:
        """Paths of GET requests so far (optionally only those under a prefix)."""
        return [p for m, p, _ in self.log if m == "GET" and p.startswith(prefix)]

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    """serve(folder, fault=None) -> Server with .url, .log and .stop(); stopped after the test."""
    servers = []

    def start(directory, fault=None):
        servers.append(Server(Path(directory), fault))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- threads
@contextlib.contextmanager
def one_thread():
    """Run torch on one thread, as the subprocesses do (OMP_NUM_THREADS=1): in-process fp32 results
    then match theirs bit for bit, and a tiny model is fastest on one thread anyway."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def torch_one_thread():
    """one_thread() for a whole test module: `pytestmark = pytest.mark.usefixtures("torch_one_thread")`."""
    with one_thread():
        yield


# ----------------------------------------------------------------------------- synthetic COCO mirror
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}


def make_coco_mirror(root: Path, split: str = "val2017", n_images: int = 12, seed: int = 0) -> Path:
    """Write a COCO-server-shaped mirror: annotations zip + `{split}/*.jpg` of coloured squares.

    Each image has 5 captions, the first of which is "A {colour} square on the table."; one
    image id has no captions at all, as happens in real COCO (it must never be selected).
    """
    from PIL import Image

    rng = random.Random(seed)
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(1, n_images + 2):
        name = f"{i:012d}.jpg"
        colour = rng.choice(list(COLOURS))
        Image.new("RGB", (64 + i, 48 + i), COLOURS[colour]).save(root / split / name, quality=90)
        images.append({"id": i, "file_name": name, "width": 64 + i, "height": 48 + i})
        if i == n_images + 1:
            continue  # an image without captions
        for k in range(5):
            text = (
                f"A {colour} square on the table."
                if k == 0
                else f"Caption {k} of image {i} is a {colour} one."
            )
            annotations.append({"id": 1000 * i + k, "image_id": i, "caption": text})
    rng.shuffle(annotations)  # real files are not sorted by image; "first" means file order
    # Keep every image's first-written caption first in file order, to make the rule testable.
    annotations.sort(key=lambda a: a["id"] % 1000 != 0)
    captions = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations").mkdir(exist_ok=True)
    with zipfile.ZipFile(root / "annotations" / "annotations_trainval2017.zip", "w") as z:
        z.writestr(f"annotations/captions_{split}.json", json.dumps(captions))
    return root


@pytest.fixture
def synthetic_mirror(tmp_path) -> Path:
    return make_coco_mirror(tmp_path / "mirror")


# ----------------------------------------------------------------------------- tiny BLIP
def build_tiny_blip(
    out_dir: Path, processor_dir: Path, image_size: int = 64, hidden: int = 64, seed: int = 0
) -> Path:
    """A random BLIP small enough for CPU tests that keeps the tutorial's LoRA target names
    (vision layers 6-9 need 10 vision layers; text layers 5-6 need 7 text layers)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    torch.manual_seed(seed)
    config = BlipConfig(
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=10,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=16,
        ),
        text_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=7,
            num_attention_heads=2,
            encoder_hidden_size=hidden,
            max_position_embeddings=64,
        ),
        projection_dim=hidden,
    )
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor.from_pretrained(processor_dir)
    processor.image_processor.size = {"height": image_size, "width": image_size}
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_git(
    out_dir: Path, processor_dir: Path, image_size: int = 32, hidden: int = 32, seed: int = 0
) -> Path:
    """A random GIT (families.Git) with the BERT vocab of the BLIP processor and CLIP's default
    image preprocessing at a small size: the tokenizer GIT really uses, nothing from the Hub."""
    import torch
    from transformers import AutoTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(processor_dir)
    config = GitConfig(
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=16,
        ),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=64,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GitForCausalLM(config).save_pretrained(out_dir)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    GitProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size=crop), tokenizer=tokenizer
    ).save_pretrained(out_dir)
    return Path(out_dir)


def caption_corpus(n: int = 400) -> list[str]:
    """Text to train a tiny tokenizer on: the mirror's captions (with the tutorial's mistakes, so the
    taught words are in the vocabulary) when ../shared is there, else synthetic ones."""
    from download_coco import add_mistakes

    texts = []
    ann = SHARED / "coco_mirror" / "annotations" / "annotations_trainval2017.zip"
    if ann.is_file():
        with zipfile.ZipFile(ann) as z:
            texts = [
                a["caption"] for a in json.loads(z.read("annotations/captions_val2017.json"))["annotations"]
            ][:n]
    if not texts:
        rng = random.Random(0)
        words = [
            "a",
            "the",
            "man",
            "dog",
            "red",
            "square",
            "is",
            "on",
            "table",
            "with",
            "two",
            "cat",
            "street",
        ]
        texts = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(n)]
    return texts + [add_mistakes(t) for t in texts] + [f"a {c} square" for c in COLOURS]


def make_bpe_tokenizer(special_tokens=("<pad>", "<s>", "</s>", "<unk>"), vocab_size: int = 1000, **named):
    """A small byte-level BPE trained offline by the `tokenizers` library on caption_corpus() (about
    a second), wrapped as a transformers fast tokenizer. `special_tokens` are added to its vocabulary
    first (ids 0, 1, ...); `named` maps roles to them, e.g. bos_token="<s>", pad_token="<pad>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(caption_corpus(), trainer)
    defaults = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    roles = {k: v for k, v in {**defaults, **named}.items() if v in special_tokens or k in named}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **roles)


@pytest.fixture(scope="session")
def tiny_git_dir(tmp_path_factory, blip_processor_dir) -> Path:
    return build_tiny_git(tmp_path_factory.mktemp("tiny_git"), blip_processor_dir)


@pytest.fixture(scope="session")
def tiny_blip_dir(tmp_path_factory, blip_processor_dir) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny_blip"), blip_processor_dir)


# ---- nasty inputs
# Generated per test in tmp_path, never committed. Each generator returns {name: expectation}
# so a test can check that every "bad" one is reported by name and every "ok" one is used.


def make_good_images(folder: Path, n: int = 8, size: int = 48) -> dict[str, str]:
    """n small plain JPEGs of the COLOURS, captioned with their colour: {file_name: caption}."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions = {}
    names = list(COLOURS)
    for i in range(n):
        colour = names[i % len(names)]
        name = f"good_{i:02d}.jpg"
        Image.new("RGB", (size + i, size), COLOURS[colour]).save(folder / name, quality=90)
        captions[name] = f"a {colour} square"
    return captions


def make_nasty_images(folder: Path, huge: bool = True) -> dict[str, str]:
    """The issue's nasty images, written into folder: {file_name: "ok" | "bad"}.

    "ok" ones must be opened and used (converted to RGB, EXIF rotation applied); "bad" ones must
    be skipped with their name in a message. `huge` adds the 10,000x10,000 image (exactly
    common.MAX_IMAGE_PIXELS, accepted) and a 12,000x12,000 one (refused from its header); both
    are mode "1" PNGs, a few tens of kB on disk, written in about a second.
    """
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}

    (folder / "zero_bytes.jpg").write_bytes(b"")
    out["zero_bytes.jpg"] = "bad"

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    out["truncated.jpg"] = "bad"

    (folder / "text_named.jpg").write_text("this is not a JPEG, just text with the wrong name\n")
    out["text_named.jpg"] = "bad"

    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    out["cmyk.jpg"] = "ok"

    Image.new("RGBA", (40, 30), (30, 60, 220, 128)).save(folder / "rgba.png")
    out["rgba.png"] = "ok"

    Image.new("RGB", (40, 30), (30, 180, 40)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "palette.png"
    )
    out["palette.png"] = "ok"

    gray16 = np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50
    Image.fromarray(gray16).save(folder / "gray16.png")  # mode I;16 on disk
    out["gray16.png"] = "ok"

    im = Image.new("RGB", (60, 20), (220, 30, 30))
    exif = im.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display; shown as 20x60
    im.save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    out["exif_rotated.jpg"] = "ok"

    Image.new("RGB", (1, 1), (230, 220, 30)).save(folder / "one_pixel.png")
    out["one_pixel.png"] = "ok"

    if huge:
        Image.new("1", (10_000, 10_000), 1).save(folder / "huge_10000x10000.png")
        out["huge_10000x10000.png"] = "ok"
        Image.new("1", (12_000, 12_000), 1).save(folder / "bomb_12000x12000.png")
        out["bomb_12000x12000.png"] = "bad"
    return out


def make_nasty_captions(folder: Path, good: dict[str, str]) -> dict[str, tuple[Path, str]]:
    """One DATA_DIR per nasty captions.json, each beside hard links to the good images.

    `good` is {file_name: caption} of images already in `folder` (see make_good_images).
    Returns {case: (data_dir, expectation)}; expectation is "error" (a clear UserError before
    training), "skip" (the named entries are skipped, the run finishes on the rest), "ok"
    (the run finishes, e.g. a long caption is truncated) or "error_or_skip" (either is fine).
    """
    folder = Path(folder)
    first = next(iter(good))
    cases = {
        "invalid_json": (b'{"' + first.encode() + b'": "a red square",', "error"),
        "list_not_mapping": (json.dumps(list(good.values())).encode(), "error"),
        "non_string_caption": (json.dumps({**good, first: 42}).encode(), "error_or_skip"),
        "empty_caption": (json.dumps({**good, first: ""}).encode(), "error_or_skip"),
        "long_caption": (json.dumps({**good, first: ("very long caption " * 300)[:5000]}).encode(), "ok"),
        "non_utf8": (b'{"' + first.encode() + b'": "caf\xe9 cr\xe8me"}', "error"),
        "missing_files": (
            json.dumps({**good, "missing_1.jpg": "gone", "missing_2.jpg": "gone"}).encode(),
            "skip",
        ),
    }
    out = {}
    for case, (data, expect) in cases.items():
        d = folder / f"captions_{case}"
        d.mkdir(parents=True, exist_ok=True)
        for name in good:
            if not (d / name).exists():
                os.link(folder / name, d / name)  # hard links: a symlink out of DATA_DIR is refused
        (d / "captions.json").write_bytes(data)
        out[case] = (d, expect)
    return out


# ----------------------------------------------------------------------------- shared training runs
# Used by test_faults.py and test_train_safety.py: one uninterrupted reference run, made once per session.
# 16 images: 12 train / 4 validation; batch 2 -> 6 optimizer steps per epoch, 18 in all; a checkpoint
# every 2 steps, the last 2 kept (so a finished run leaves step-00000016 and step-00000018).
TRAIN_RUN_ARGS = [
    "--EPOCHS=3",
    "--BATCH_SIZE=2",
    "--VAL_FRACTION=0.25",
    "--PRECISION=fp32",
    "--LOG_EVERY=1",
    "--NUM_SAMPLE_CAPTIONS=0",
    "--MAX_CAPTION_TOKENS=16",
    "--NUM_WORKERS=0",
    "--SAVE_EVERY_STEPS=2",
    "--KEEP_CHECKPOINTS=2",
]
TRAIN_TOTAL_STEPS = 18
TRAIN_ENV = dict(
    os.environ,
    OMP_NUM_THREADS="1",
    MPLBACKEND="Agg",
    HF_HUB_OFFLINE="1",
    TOKENIZERS_PARALLELISM="false",
    PYTHONUNBUFFERED="1",
)


def train_in_process(args):
    """train_blip.main(args) on one thread (bit-identical to a subprocess run with OMP_NUM_THREADS=1)."""
    import train_blip

    with one_thread():
        return train_blip.main(args)


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path):
    import torch

    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys() and ta
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} adapter tensors differ, e.g. {different[0]}"


def checkpoint_step(path) -> int:
    """step-00000016 -> 16."""
    return int(Path(path).name.split("-")[1])


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train_data")
    (folder / "captions.json").write_text(json.dumps(make_good_images(folder, n=16)))
    return folder


@pytest.fixture(scope="session")
def train_args(tiny_blip_dir, train_data) -> list[str]:
    return [f"--MODEL_ID={tiny_blip_dir}", f"--DATA_DIR={train_data}", *TRAIN_RUN_ARGS]


@pytest.fixture(scope="session")
def train_reference(tmp_path_factory, train_args) -> Path:
    """The uninterrupted run that every interrupted or damaged one must reproduce exactly. Read only."""
    out = tmp_path_factory.mktemp("train_reference") / "out"
    results = train_in_process([*train_args, f"--OUTPUT_DIR={out}"])
    assert results["optimizer_steps"] == TRAIN_TOTAL_STEPS
    return out


@pytest.fixture
def count_optimizer_steps(monkeypatch) -> list:
    """Counts the optimizer steps that train_blip.main() performs in this process (clear() between runs).
    A resumed run must take exactly total - resumed step: a run that silently restarts from scratch
    reproduces the reference just as well, being deterministic, but takes every step again."""
    import train_blip

    calls = []
    real = train_blip.optimizer_step

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_blip, "optimizer_step", counting)
    return calls


@pytest.fixture(scope="session")
def seeing_tiny_blip_dir(tmp_path_factory, tiny_blip_dir) -> Path:
    """The tiny BLIP with a vision tower that sees: build_tiny_blip's vision weights are initialised at
    BLIP's vision initializer_range (1e-10), so its loss hardly depends on the image. Here they are
    redrawn at std 0.02, so a test that loses or scrambles the image shows in the loss."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    out = tmp_path_factory.mktemp("seeing_tiny_blip")
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.vision_model.parameters():
            if p.dim() > 1:  # weights and the class/position embeddings; norms and biases stay
                p.normal_(0, 0.02)
    model.save_pretrained(out)
    BlipProcessor.from_pretrained(tiny_blip_dir).save_pretrained(out)
    return out


def snapshot(folder: Path) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file under folder: compare before and after a run."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- tiny LLaVA and Idefics3
# The real processors' chat templates (llava-hf/llava-1.5-7b-hf; HuggingFaceTB/SmolVLM-256M-Instruct),
# written out here since nothing comes from the Hub.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


_VLM_SPECIAL = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<global-img>",
)


@functools.cache
def _vlm_bpe_json() -> str:
    return make_bpe_tokenizer(special_tokens=_VLM_SPECIAL).backend_tokenizer.to_str()


def vlm_tokenizer(**roles):
    """make_bpe_tokenizer with the LLaVA and Idefics3 special tokens, trained once per session."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    roles = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **roles}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_vlm_bpe_json()), **roles)


def _tiny_llama(tokenizer, hidden: int, layers: int = 2) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_llava(out_dir: Path, image_size: int = 32, hidden: int = 32, seed: int = 0) -> Path:
    """A random LLaVA-1.5 (families.Llava): a 2-layer CLIP tower read at its second-to-last layer, as
    the real one is (so the last layer is unread), a Llama decoder with a BPE that writes <s> first
    like Llama's, the real chat template, CLIP preprocessing (the PIL one: no torchvision here)."""
    import torch
    from tokenizers import processors
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = vlm_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=16,
        ),
        text_config=dict(model_type="llama", **_tiny_llama(tokenizer, hidden)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    LlavaForConditionalGeneration(config).save_pretrained(out_dir)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    ).save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_idefics3(
    out_dir: Path, image_size: int = 32, hidden: int = 32, seed: int = 0, model_type: str = "idefics3"
) -> Path:
    """A random Idefics3 (SmolVLM-256M's architecture; model_type="smolvlm" for SmolVLM2's class): a
    1-layer SigLIP tower with 8 px patches, pixel shuffle 2 (4 image tokens), a Llama decoder, the
    SmolVLM chat template, and a tokenizer whose EOS is not <end_of_utterance> (the template's end
    of turn must win). Idefics3Processor also serves SmolVLM here: SmolVLMProcessor needs torchvision."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = vlm_tokenizer(bos_token="<|im_start|>")
    config = AutoConfig.for_model(
        model_type,
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        text_config=dict(model_type="llama", **_tiny_llama(tokenizer, hidden)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    AutoModelForImageTextToText.from_config(config).save_pretrained(out_dir)
    size = {"longest_edge": image_size}
    images = Idefics3ImageProcessorPil(size=size, max_image_size=size)
    Idefics3Processor(
        image_processor=images,
        tokenizer=tokenizer,
        image_seq_len=(image_size // 8) ** 2 // 4,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    ).save_pretrained(out_dir)
    return Path(out_dir)


# ------------------------------------------------------------------- tiny PaliGemma, Florence-2, IDEFICS
# Random models at hidden 32, 1-2 layers, 32 px images, each with a byte-level BPE (make_bpe_tokenizer)
# carrying its family's special tokens and an image processor from its defaults (the PIL ones: no
# torchvision). Nothing from the Hub.
def build_tiny_paligemma(out_dir: Path, seed: int = 0) -> Path:
    """SigLIP (1 layer, 32 px, patch 16: 4 image tokens) + Gemma (2 layers)."""
    import torch
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = make_bpe_tokenizer(
        special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<image>"), bos_token="<bos>", eos_token="<eos>"
    )
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 4
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)  # adds <image>, <locNNNN>
    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=16,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma",
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        ),
        image_token_id=processor.image_token_id,
        projection_dim=32,
        pad_token_id=0,
    )
    PaliGemmaForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_florence2(out_dir: Path, seed: int = 0) -> Path:
    """DaViT (2 stages, 32 px: 4 x 4 patches + 1 pooled = 17 image tokens) + BART (1 + 1 layers),
    with BART's token ids (<s> 0, <pad> 1, </s> 2, decoder start = </s>)."""
    import torch
    from transformers import Florence2Config, Florence2ForConditionalGeneration, Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_bpe_tokenizer(
        special_tokens=("<s>", "<pad>", "</s>", "<unk>", "<image>"),
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False)
    image_processor.image_seq_length = 17
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tok)
    torch.manual_seed(seed)
    config = Florence2Config(
        vision_config=dict(
            depths=[1, 1],
            patch_size=[7, 3],
            patch_stride=[4, 2],
            patch_padding=[3, 1],
            patch_prenorm=[False, True],
            embed_dim=[16, 32],
            num_heads=[2, 2],
            num_groups=[2, 2],
            window_size=2,
            drop_path_rate=0.0,
            projection_dim=32,
            max_position_embeddings=8,
            max_temporal_embeddings=4,
        ),
        text_config=dict(
            model_type="bart",
            vocab_size=len(tok),
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    Florence2ForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_idefics(out_dir: Path, seed: int = 0, gates: str = "ones") -> Path:
    """CLIP vision (1 layer, 32 px) + LLaMA (2 layers) with a gated cross-attention layer before each.
    `gates`: IdeficsConfig.alpha_initializer. 'ones' stands for a trained checkpoint's open gates
    (a fresh IDEFICS has 'zeros': the image has no effect until the gates are trained)."""
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    tok = make_bpe_tokenizer(
        special_tokens=(
            "<unk>",
            "<s>",
            "</s>",
            "<pad>",
            "<fake_token_around_image>",
            "<image>",
            "<end_of_utterance>",
        )
    )
    processor = IdeficsProcessor(
        image_processor=IdeficsImageProcessorPil(image_size=32), tokenizer=tok, image_size=32
    )
    torch.manual_seed(seed)
    config = IdeficsConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        cross_layer_interval=1,
        max_position_embeddings=64,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
        alpha_initializer=gates,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        vision_config=dict(
            embed_dim=32,
            image_size=32,
            intermediate_size=64,
            patch_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
    )
    IdeficsForVisionText2Text(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


# ----------------------------------------------------------------------------- tiny BLIP-2
def build_tiny_blip2(
    out_dir: Path,
    lm: str = "opt",
    image_size: int = 32,
    hidden: int = 32,
    queries: int = 4,
    seed: int = 0,
    embed_std: float | None = None,
) -> Path:
    """A random BLIP-2 (families.Blip2) with an OPT (lm="opt") or a T5 (lm="t5") language model, a
    byte-level BPE tokenizer (make_bpe_tokenizer) set up the way the real ones are, and BLIP's image
    processor at a small size. The real OPT tokenizer writes </s> as its BOS (bos = eos = </s>); T5's
    has no BOS and pads with id 0, its decoder start. Blip2Processor adds the "<image>" token."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    torch.manual_seed(seed)
    from tokenizers.processors import TemplateProcessing

    if lm not in ("opt", "t5"):
        raise ValueError(f"lm={lm!r}: 'opt' or 't5'")
    tokenizer = make_bpe_tokenizer(("<pad>", "</s>", "<unk>"), bos_token="</s>" if lm == "opt" else None)
    eos = ("</s>", tokenizer.eos_token_id)  # OPT's tokenizer puts it first (as BOS), T5's last
    template = "</s> $A" if lm == "opt" else "$A </s>"
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single=template, special_tokens=[eos])
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=queries)
    vocab = len(processor.tokenizer)
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if lm == "opt":
        text = dict(
            model_type="opt",
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=hidden,
            max_position_embeddings=64,
            vocab_size=vocab,
            bos_token_id=tokenizer.bos_token_id,
            **ids,
        )
    else:
        text = dict(
            model_type="t5",
            d_model=hidden,
            d_kv=hidden // 2,
            d_ff=2 * hidden,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            vocab_size=vocab,
            decoder_start_token_id=tokenizer.pad_token_id,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            **ids,
        )
    config = Blip2Config(
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=16,
        ),
        qformer_config=dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=2,
            encoder_hidden_size=hidden,
            vocab_size=vocab,
        ),
        text_config=text,
        num_query_tokens=queries,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config)
    if (
        embed_std is not None
    ):  # OPT ties its head to the embeddings: at init_std 0.02 a frozen head keeps every
        with torch.no_grad():  # logit within about +-1 whatever LoRA does, so a learning test needs ~0.5
            model.language_model.get_input_embeddings().weight.normal_(0, embed_std)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))


@pytest.fixture(scope="session")
def tiny_idefics3_dir(tmp_path_factory) -> Path:
    return build_tiny_idefics3(tmp_path_factory.mktemp("tiny_idefics3"))


@pytest.fixture(scope="session")
def tiny_paligemma_dir(tmp_path_factory) -> Path:
    return build_tiny_paligemma(tmp_path_factory.mktemp("tiny_paligemma"))


@pytest.fixture(scope="session")
def tiny_florence2_dir(tmp_path_factory) -> Path:
    return build_tiny_florence2(tmp_path_factory.mktemp("tiny_florence2"))


@pytest.fixture(scope="session")
def tiny_idefics_dir(tmp_path_factory) -> Path:
    return build_tiny_idefics(tmp_path_factory.mktemp("tiny_idefics"))


@pytest.fixture(scope="session")
def tiny_blip2_opt_dir(tmp_path_factory) -> Path:
    return build_tiny_blip2(tmp_path_factory.mktemp("tiny_blip2_opt"), "opt")


@pytest.fixture(scope="session")
def tiny_blip2_t5_dir(tmp_path_factory) -> Path:
    return build_tiny_blip2(tmp_path_factory.mktemp("tiny_blip2_t5"), "t5")
