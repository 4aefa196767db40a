"""Helpers shared by download_coco.py, train_blip.py and inference.py.

Only what at least two scripts need lives here (nanochat's common.py is the model):
the `--NAME=value` configurator, one-line user errors, atomic writes, image opening and
precision choice. What depends on the model family lives in families.py. Nothing runs at import.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


# ----------------------------------------------------------------------------- errors
class UserError(Exception):
    """A problem the user can fix. Scripts print it as one line, never a traceback."""


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a script's main(argv=None): a UserError becomes `error: <msg>` and exit code 2,
    Ctrl-C becomes exit code 130. Tests call main() and catch UserError/SystemExit directly."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def quiet_known_warnings() -> None:
    """Hide one upstream warning that every run printed and no user can act on: peft 0.21's
    PeftModel.__init__ reads transformers 5's deprecated `is_gradient_checkpointing`. Narrow on
    purpose (this message, from that module); every other warning still shows."""
    import warnings

    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )


# ----------------------------------------------------------------------------- configurator
def _parse_value(text: str) -> Any:
    """`--X=3` -> 3, `--X=[1,2]` -> [1, 2], `--X=None` -> None, `--X=hello` -> 'hello'."""
    try:
        return ast.literal_eval(text)
    # Everything literal_eval raises: e.g. '-' * 5000 + '1' is a RecursionError, '{[]: 1}' a TypeError.
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _coerce(name: str, default: Any, value: Any, none_ok: bool = False) -> Any:
    """Check an override against the type of its default (nanoGPT's rule, plus int -> float).

    None is accepted only where the default is None or the script lists the name in _NONE_OK."""
    if value is None:
        if default is None or none_ok:
            return None
        kind = type(default).__name__
        raise UserError(f"--{name}=None: {name} cannot be None; expected {kind} like the default {default!r}")
    if default is None:
        return value
    if isinstance(default, float) and isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--{name}={value!r}: expected a finite number like the default {default!r}")
    if isinstance(default, bool) or isinstance(value, bool):
        if isinstance(default, bool) and isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        if abs(value) < 2**1023:  # float() of a larger int overflows
            return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, str) and "," in value:
        return type(default)(v.strip() for v in value.split(","))
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif isinstance(value, type(default)):
        return value
    elif isinstance(default, str) and isinstance(value, (int, float)):
        return str(value)  # e.g. --RESUME=3 where a path-like string is expected
    if isinstance(default, (list, tuple)) and isinstance(value, str):
        return type(default)([value])
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."  # one short line
    raise UserError(f"--{name}={shown}: expected {type(default).__name__} like the default {default!r}")


def defaults_of(module_globals: dict) -> dict:
    """The script's UPPER_CASE constants, in the order they are written."""
    return {
        k: v
        for k, v in module_globals.items()
        if k.isupper() and not k.startswith("_") and not callable(v) and not isinstance(v, type(sys))
    }


def configure(module_globals: dict, argv: list[str] | None, doc: str | None = None) -> dict:
    """Apply `--NAME=value` overrides to a copy of the script's constants and return it.

    An unknown NAME is an error that lists the valid ones; `-h/--help` prints the docstring
    and the constants. The module's globals are never modified, so tests can call main() twice.
    `--NAME=None` is accepted where the default is None, or where the script documents None for
    a constant with another default by listing its name in a module-level `_NONE_OK` tuple.
    """
    cfg = dict(defaults_of(module_globals))
    none_ok = set(module_globals.get("_NONE_OK", ()))
    argv = sys.argv[1:] if argv is None else list(argv)
    for arg in argv:
        if arg in ("-h", "--help"):
            print((doc or "").strip() + "\n\nconstants (override with --NAME=value):")
            for k, v in cfg.items():
                print(f"  {k} = {v!r}")
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"unexpected argument {arg!r}: use --NAME=value, e.g. --EPOCHS=3")
        name, text = arg[2:].split("=", 1)
        if name not in cfg:
            raise UserError(f"unknown setting --{name}; valid names: {', '.join(cfg)}")
        cfg[name] = _coerce(name, cfg[name], _parse_value(text), name in none_ok)
    return cfg


def print_config(cfg: dict, title: str) -> None:
    """Echo the effective config, so every log starts with what was actually run."""
    width = max(map(len, cfg))
    print(f"== {title} ==")
    for k, v in cfg.items():
        print(f"  {k:<{width}} = {v!r}")


# ----------------------------------------------------------------------------- files
def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc), else by a set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it (briefly set, then restored)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """An existing file keeps its permissions; a new one gets what open() would give (0o666 & ~umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: whole or absent.

    mkstemp creates the file 0600; it gets normal permissions (see _mode_for) before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def check_writable(folder: str | os.PathLike, constant: str) -> Path:
    """Fail early, before minutes of work, if outputs cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror}); change {constant}") from None
    return folder


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Put a finished folder in place of `final`: written beside, then renamed, so a crash never
    leaves a half-written folder under the final name. An older `final` steps aside first and is
    put back if the rename fails, then removed."""
    import shutil

    final = Path(final)
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old.", suffix=".tmp"))
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- images
# Images larger than this many pixels are refused instead of decoded (about 0.3 GB as RGB);
# Pillow's own DecompressionBombError fires at twice its MAX_IMAGE_PIXELS.
MAX_IMAGE_PIXELS = 100_000_000
# Larger images are reduced to this side right after decoding (JPEGs already while decoding),
# which saves seconds and gigabytes on huge photos; every model here works at <= 384 px.
MAX_DECODE_SIDE = 2048


def open_image(path: str | os.PathLike):
    """Open an image the way a phone shows it: EXIF rotation applied, converted to 8-bit RGB.

    Handles grayscale, CMYK, palette, RGBA (composited on white) and 16-bit images.
    Raises UserError with the file name for anything that is not a readable image.
    """
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise UserError(f"{path}: {im.width}x{im.height} pixels is too large to caption")
            if max(im.size) > MAX_DECODE_SIDE:
                im.draft("RGB", (MAX_DECODE_SIDE, MAX_DECODE_SIDE))  # JPEG: decode at 1/2, 1/4, 1/8 scale
            im = ImageOps.exif_transpose(im)
            im.load()
            if max(im.size) > MAX_DECODE_SIDE:  # the model sees 384 px; do not carry 10k x 10k around
                im.thumbnail((MAX_DECODE_SIDE, MAX_DECODE_SIDE), reducing_gap=2.0)
            return to_rgb(im)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"{path}: image too large ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({e})") from None


def to_rgb(im):
    """Convert any PIL mode to RGB. 16-bit ('I;16', 'I') images are scaled down, not clipped."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype("uint8"), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


# ----------------------------------------------------------------------------- devices and precision
def cpu_supports_bf16() -> bool:
    """Whether the CPU has bf16 instructions at all (avx512_bf16 or AMX); without them it is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


@functools.cache
def cpu_bf16_is_faster(min_speedup: float = 1.3) -> bool:
    """Having the instructions is not enough: on some CPUs (avx512_bf16 without AMX) oneDNN's bf16
    matmul runs at half the fp32 speed. Time a BLIP-sized matmul both ways (~50 ms) and decide."""
    import time

    import torch

    if not cpu_supports_bf16():
        return False
    a, b = torch.randn(512, 768), torch.randn(768, 3072)

    def best_time(x, y):
        x @ y  # warm-up: oneDNN picks and compiles its kernel
        times = []
        for _ in range(5):
            t = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t)
        return min(times)

    return best_time(a, b) / best_time(a.bfloat16(), b.bfloat16()) >= min_speedup


def memory_growth(fn, device: str = "cpu"):
    """Run fn() and return (its result, the most memory it added, in bytes, the memory free after).

    On a CPU: the process's resident memory, sampled every 10 ms on a thread while fn runs, over
    what it held before; free is what the OS says is available. On CUDA: torch's peak allocation on
    that device over what was allocated before, and the device's free memory."""
    import threading

    import psutil
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        return result, torch.cuda.max_memory_allocated(device) - before, torch.cuda.mem_get_info(device)[0]
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def watch():
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = fn()
    finally:
        done.set()
        watcher.join()
    grown = max(peak[0], process.memory_info().rss) - before
    return result, grown, psutil.virtual_memory().available


def torch_dtype(precision: str):
    """'fp32' | 'bf16' | 'fp16' -> the torch dtype."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def to_device(batch: dict, device) -> dict:
    """A batch dict with its tensors moved to `device` (other values as they are)."""
    import torch

    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def resolve_precision(precision: str, device_type: str) -> str:
    """'auto' -> bf16 where the hardware runs it natively and fast (CUDA with bf16, else fp16;
    a CPU whose bf16 matmul beats fp32), else fp32."""
    import torch

    valid = ("auto", "fp32", "bf16", "fp16")
    if precision not in valid:
        raise UserError(f"PRECISION={precision!r}; valid values: {', '.join(valid)}")
    if precision != "auto":
        if precision == "fp16" and device_type == "cpu":
            raise UserError("PRECISION='fp16' needs a CUDA GPU; use 'bf16' or 'fp32' on CPU")
        return precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device_type == "cpu" and cpu_bf16_is_faster() else "fp32"
