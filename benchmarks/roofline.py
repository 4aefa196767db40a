"""Roofline figures for the benchmarks: counted model FLOPs, the machine's matmul ceiling, and the
share of that ceiling a measured rate reaches.

- FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records every matmul,
  convolution and attention kernel that one real step runs. It counts a matmul of (M x K) by (K x N)
  as 2*M*N*K (one multiply and one add per term); elementwise work (softmax, layer norm, GELU,
  AdamW) is not counted. torch's table has no entry for the CPU's fused attention kernel, so
  attention_mapping() adds it with torch's own SDPA formulas.
- The ceiling is measured, not taken from a datasheet: the best of several timed F.linear calls on
  the model's own shapes, in the precision the run uses, with all of torch's threads.
- share() turns (FLOPs per item, items/s, ceiling) into achieved GFLOP/s and a percentage.

The training count (train_step_flops) builds train_blip.py's own objects and runs one optimizer
step through train_blip.optimizer_step with the prefix cache already filled: the work of a steady
-state step, which is what train_blip.py's samples/s (epochs after the first) measures.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

FLOP_NOTE = "FLOPs counted by torch FlopCounterMode: a matmul is 2*M*N*K; elementwise ops not counted"


# ----------------------------------------------------------------------------- counting
def attention_mapping() -> dict:
    """FlopCounterMode entries for the CPU's fused SDPA kernels (absent from torch's table, so a
    model on SDPA would otherwise count zero for attention). Same formulas as torch's flash entries."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is not None:

        def sdpa_cpu(query, key, value, *args, out_val=None, **kwargs) -> int:
            return fc.sdpa_flop_count(query, key, value)

        mapping[forward] = sdpa_cpu
    if backward is not None:

        def sdpa_cpu_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[backward] = sdpa_cpu_backward
    return mapping


class FlopCount:
    """`with FlopCount() as fc: work()`, then fc.total (FLOPs) and fc.by_op ({op name: FLOPs})."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.mode = FlopCounterMode(display=False, custom_mapping=attention_mapping())

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return int(self.mode.get_total_flops())

    @property
    def by_op(self) -> dict[str, int]:
        counts = self.mode.get_flop_counts().get("Global", {})
        return {
            str(op).removeprefix("aten.").removesuffix(".default"): int(n)
            for op, n in sorted(counts.items(), key=lambda kv: -kv[1])
        }


# ----------------------------------------------------------------------------- the ceiling
def blip_shapes(rows: int = 4 * 577, hidden: int = 768, mlp: int = 3072) -> list[tuple[int, int, int]]:
    """(M, K, N) of the BLIP-base ViT's linears for `rows` tokens (default: a batch of 4 images of
    577 tokens): qkv/projection-sized 768x768, fc1 768x3072, fc2 3072x768."""
    return [(rows, hidden, hidden), (rows, hidden, mlp), (rows, mlp, hidden)]


def matmul_ceiling(precision: str = "fp32", shapes=None, repeats: int = 8) -> dict:
    """The best F.linear throughput over the model's shapes, in GFLOP/s, in `precision` on CPU.

    Each shape: one warm-up (oneDNN/MKL pick their kernels), then the best of `repeats` timed
    calls. The ceiling is the best shape's figure; every shape's is kept."""
    import torch
    import torch.nn.functional as F

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    shapes = shapes or blip_shapes()
    per_shape = {}
    load_before = os.getloadavg()[0]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for m, k, n in shapes:
            x = torch.randn(m, k, generator=gen).to(dtype)
            w = torch.randn(n, k, generator=gen).to(dtype)
            F.linear(x, w)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                F.linear(x, w)
                best = min(best, time.perf_counter() - start)
            per_shape[f"{m}x{k}x{n}"] = round(2 * m * k * n / best / 1e9, 1)
    return {
        "precision": precision,
        "gflops": max(per_shape.values()),
        "per_shape_gflops": per_shape,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def share(flops_per_item: float, items_per_s: float, ceiling: dict) -> dict:
    """Achieved GFLOP/s (counted FLOPs x measured rate) and its percentage of the ceiling
    (a matmul_ceiling() result, whose precision should be the one the rate was measured in)."""
    achieved = flops_per_item * items_per_s / 1e9
    return {
        "gflop_per_item": round(flops_per_item / 1e9, 2),
        "achieved_gflops": round(achieved, 1),
        "precision": ceiling["precision"],
        "ceiling_gflops": ceiling["gflops"],
        "percent_of_ceiling": round(100 * achieved / ceiling["gflops"], 1),
    }


def describe(name: str, fig: dict, unit: str) -> str:
    return (
        f"{name:>16}: {fig['gflop_per_item']:.1f} GFLOP/{unit} x rate = {fig['achieved_gflops']:.1f} "
        f"GFLOP/s = {fig['percent_of_ceiling']:.0f}% of the {fig['precision']} ceiling "
        f"{fig['ceiling_gflops']:.0f} GFLOP/s"
    )


# ----------------------------------------------------------------------------- train_blip.py's step
@contextlib.contextmanager
def steady_step(model_id: str, data_dir: str, train_args=(), out_dir: str | None = None):
    """train_blip.py's objects (its defaults plus `train_args`: its model with LoRA and SDPA, its
    precision, its prefix cache filled beforehand) and `step()`, which runs its next optimizer step
    through train_blip.optimizer_step: the work of a steady-state step, which is what train_blip.py's
    samples/s (epochs after the first) measures. Yields (step, info); steps cycle over the epochs."""
    import tempfile

    import torch

    import common
    import train_blip

    argv = [f"--MODEL_ID={model_id}", f"--DATA_DIR={data_dir}", *train_args]
    cfg = common.configure(vars(train_blip), argv)
    precision = common.resolve_precision(cfg["PRECISION"], "cpu")
    if cfg["FLUSH_DENORMALS"]:  # as train_blip.setup_run (and left on): same counts, a faster step
        torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory(prefix="roofline_", dir=out_dir) as tmp:
        run = SimpleNamespace(
            is_main=True,
            rank=0,
            world=1,
            on_cpu=True,
            precision=precision,
            out_dir=Path(tmp),
            log=lambda *a, **k: None,
        )
        items, skipped = train_blip.load_dataset(cfg["DATA_DIR"], 0, 1, run.log)
        family, model = train_blip.build_model(cfg, run)
        data = train_blip.plan_data(cfg, run, family, model, items, skipped)
        training = train_blip.prepare_training(cfg, run, family, model, data)
        steps = [
            step
            for epoch in range(4)
            for step in train_blip.epoch_steps(
                data.columns, epoch, cfg["SEED"], 0, cfg["BATCH_SIZE"], cfg["GRAD_ACCUM"]
            )
        ]
        batches = [
            [data.train_ids[i] for i in mb] for _, micro_batches in steps for mb in micro_batches if mb
        ]
        training.prepared_model.train()
        if data.cache is not None:  # steady state: the frozen prefix of these images is cached
            for batch in train_blip.make_loader(data, family, batches, 0, cfg["SEED"]):
                train_blip.vision_inputs(
                    training.caption_model, batch, data.cache, training.accelerator.autocast
                )
            data.dataset.skip_images = frozenset(data.cache.filled)
        loader = iter(train_blip.make_loader(data, family, batches, 0, cfg["SEED"]))
        done = []

        def step() -> int:
            """The next optimizer step; returns its number of samples."""
            n_global, micro_batches = steps[len(done)]
            train_blip.optimizer_step(
                training, micro_batches, n_global, loader, data.cache, cfg["MAX_GRAD_NORM"]
            )
            done.append(sum(map(len, micro_batches)))
            return done[-1]

        info = {
            "precision": precision,
            "prefix_stages_cached": data.prefix_stages,
            "full_batch": cfg["BATCH_SIZE"] * cfg["GRAD_ACCUM"],
            "steps_available": len(steps),
            "caption_tokens": [int(data.dataset.token_ids[i].size) for b in batches[:1] for i in b],
        }
        try:
            yield step, info
        finally:
            if data.cache is not None:
                data.cache.close()


def train_step_flops(
    model_id: str, data_dir: str, train_args=(), out_dir: str | None = None, profile_steps: int = 2
) -> dict:
    """Count one steady-state optimizer step of train_blip.py (steady_step) under FlopCounterMode,
    then run `profile_steps` more under torch.profiler. Returns FLOPs per sample, the breakdown by
    op, and where the profiled steps' time went (time_breakdown)."""
    import torch

    with steady_step(model_id, data_dir, train_args, out_dir) as (step, info):
        with FlopCount() as count:
            samples = step()
        result = {
            "flops_per_sample": count.total / samples,
            "flops_step": count.total,
            "samples": samples,
            **info,
            "by_op_gflop": {k: round(v / 1e9, 2) for k, v in count.by_op.items()},
            "note": FLOP_NOTE,
        }
        if profile_steps:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                profiled = sum(step() for _ in range(profile_steps))
            result["time_breakdown"] = time_breakdown(profile, count.total / samples * profiled)
    return result


# ----------------------------------------------------------------------------- where the time goes
# torch.profiler's CPU ops, grouped: what runs at the matmul ceiling and what cannot.
_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int8pack_mm"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data", "aten::_log_softmax",
                "aten::_log_softmax_backward_data"),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::fill_",
                         "aten::zero_"),
    "norms and activations": ("aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::gelu",
                              "aten::gelu_backward", "aten::tanh", "aten::tanh_backward"),
    "dropout": ("aten::bernoulli_", "aten::native_dropout", "aten::native_dropout_backward"),
}  # fmt: skip


def time_breakdown(profile, flops: float | None = None) -> dict:
    """Self CPU milliseconds of a torch.profiler run by kind of op (fused attention kernels are their
    own kind; every other aten op is "other elementwise"), with each kind's share; given the counted
    FLOPs of the same work, also the rate the matmul and attention kernels themselves reached."""
    kinds: dict[str, float] = {}
    for event in profile.key_averages():
        name = event.key
        if not name.startswith("aten::"):
            continue
        kind = next((k for k, names in _KINDS.items() if name in names), None)
        if kind is None:
            kind = "fused attention" if "scaled_dot_product" in name else "other elementwise"
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e3
    total = sum(kinds.values())
    out = {
        "total_ms": round(total, 1),
        "by_kind": {
            k: {"ms": round(v, 1), "share": round(v / total, 3)}
            for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
        },
    }
    compute_ms = kinds.get("matmul", 0.0) + kinds.get("fused attention", 0.0)
    if flops and compute_ms:
        out["matmul_and_attention_kernels_gflops"] = round(flops / compute_ms / 1e6, 1)
    return out


def describe_breakdown(fig: dict) -> str:
    kinds = ", ".join(f"{k} {v['share']:.0%}" for k, v in fig["by_kind"].items() if v["share"] >= 0.01)
    rate = fig.get("matmul_and_attention_kernels_gflops")
    return f"{fig['total_ms']:.0f} ms of CPU ops: {kinds}" + (
        f"; the matmul and attention kernels alone ran at {rate:.0f} GFLOP/s" if rate else ""
    )
