"""train_blip.py with 2 processes on this CPU (gloo), against a 1-process run at the same global batch.

The 2-process run is launched the way users launch it (`torchrun --nproc_per_node 2`), through a
small probe that wraps the unchanged script and records, per rank, without changing what it does:
- which items each epoch's plan gives the rank (`train_blip.epoch_steps`) and which it really
  batches (`families.Blip.collate`), and what its frozen-prefix cache covers (`PrefixCache`);
- every file it creates, renames or saves under OUTPUT_DIR (an audit hook for Python-level file
  operations, plus `torch.save` and safetensors' `save_file`, which write from C++/Rust);
- its stdout and stderr, in separate files.

Why not `accelerate launch --cpu --num_processes 2`: on a machine without MPI, accelerate's
`--cpu` launcher starts one process only. `torchrun` (which `accelerate launch --multi_gpu` also
uses) is the way to get N CPU processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port, make_good_images, one_thread

N_IMAGES, VAL_FRACTION, SEED = 16, 0.25, 7  # 12 train / 4 validation images
COMMON_ARGS = [
    "--EPOCHS=2",
    f"--VAL_FRACTION={VAL_FRACTION}",
    f"--SEED={SEED}",
    "--PRECISION=fp32",
    "--LORA_DROPOUT=0.0",  # dropout draws per-process random masks: 1 x 4 and 2 x 2 would differ
    "--LOG_EVERY=1",
    "--NUM_SAMPLE_CAPTIONS=0",
    "--MAX_CAPTION_TOKENS=16",
    "--NUM_WORKERS=0",
]

PROBE = textwrap.dedent(
    r'''
    """Runs train_blip.main unchanged and records what this rank does (see test_distributed.py)."""
    import json, os, sys
    rank, probe_dir, repo = int(os.environ["RANK"]), os.environ["PROBE_DIR"], os.environ["PROBE_REPO"]
    out_dir = os.path.realpath(os.environ["PROBE_OUTPUT_DIR"])
    # This rank's stdout/stderr go to their own files (file descriptors, so C-level writes too).
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = open(os.path.join(probe_dir, f"rank{rank}.{name}"), "wb")
        os.dup2(f.fileno(), fd)
    events = open(os.path.join(probe_dir, f"rank{rank}.events.jsonl"), "a", buffering=1)

    def record(kind, **kw):
        events.write(json.dumps({"kind": kind, **kw}) + "\n")

    def under_out(path):
        try:
            p = os.path.realpath(os.fsdecode(path))
        except TypeError:
            return None
        return os.path.relpath(p, out_dir) if p == out_dir or p.startswith(out_dir + os.sep) else None

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            writing = any(c in (mode or "") for c in "wax+") if mode else bool((flags or 0) & WRITE_FLAGS)
            rel = under_out(path) if writing else None
            if rel is not None:
                record("write", op="open", path=rel)
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree"):
            rel = under_out(args[1] if event == "os.rename" else args[0])  # a rename writes its target
            if rel is not None:
                record("write", op=event, path=rel)

    sys.addaudithook(audit)
    import safetensors.torch, torch  # patched before transformers/peft/accelerate import their names

    def logged(fn, op):
        def wrapper(obj, f, *a, **kw):
            rel = under_out(f) if isinstance(f, (str, os.PathLike)) else None
            if rel is not None:
                record("write", op=op, path=rel)
            return fn(obj, f, *a, **kw)
        return wrapper

    torch.save = logged(torch.save, "torch.save")
    safetensors.torch.save_file = logged(safetensors.torch.save_file, "safetensors.save_file")

    sys.path.insert(0, repo)
    import common, families, train_blip

    plan, collate, cache_init = train_blip.epoch_steps, families.Blip.collate, train_blip.PrefixCache.__init__

    def epoch_steps(columns, epoch, seed, rank_, *a, **kw):
        steps = plan(columns, epoch, seed, rank_, *a, **kw)
        record("plan", epoch=epoch, positions=[i for _, mbs in steps for mb in mbs for i in mb])
        return steps

    def collate_logged(self, examples):
        record("batch", index=[e["index"] for e in examples])
        return collate(self, examples)

    def cache_logged(self, indices, *a, **kw):
        record("prefix_cache", indices=sorted(set(indices)))
        return cache_init(self, indices, *a, **kw)

    train_blip.epoch_steps = epoch_steps
    families.Blip.collate = collate_logged
    train_blip.PrefixCache.__init__ = cache_logged
    common.cli(train_blip.main)(sys.argv[1:])
    '''
)


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def load_adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dist_data")
    captions = make_good_images(folder, n=N_IMAGES)
    (folder / "captions.json").write_text(json.dumps(captions))
    return folder


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_blip_dir, data_dir):
    """torchrun --nproc_per_node 2 over the probe; BATCH_SIZE 2 per process = global batch 4."""
    work = tmp_path_factory.mktemp("dist_run")
    out, probe_dir = work / "out", work / "probe"
    probe_dir.mkdir()
    (work / "probe.py").write_text(PROBE)
    env = dict(
        os.environ,
        PROBE_DIR=str(probe_dir),
        PROBE_REPO=str(REPO),
        PROBE_OUTPUT_DIR=str(out),
        OMP_NUM_THREADS="1",
        MPLBACKEND="Agg",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(work / "probe.py"),
        f"--MODEL_ID={tiny_blip_dir}",
        f"--DATA_DIR={data_dir}",
        f"--OUTPUT_DIR={out}",
        "--BATCH_SIZE=2",
        *COMMON_ARGS,
    ]
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True, timeout=240)
    ranks = {
        r: {
            "stdout": (probe_dir / f"rank{r}.stdout").read_text(errors="replace"),
            "stderr": (probe_dir / f"rank{r}.stderr").read_text(errors="replace"),
            "events": read_events(probe_dir / f"rank{r}.events.jsonl"),
        }
        for r in (0, 1)
    }
    return {"out": out, "ranks": ranks, "seconds": time.time() - start, "launcher": proc}


def finished(run) -> dict:
    """The run's ranks, after checking that torchrun succeeded (checked in each test, not in the
    fixture, so that a failure is that test's failure)."""
    proc, ranks = run["launcher"], run["ranks"]
    assert proc.returncode == 0, (
        f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n"
        f"--- rank 0 ---\n{ranks[0]['stderr'][-3000:]}"
        f"\n--- rank 1 ---\n{ranks[1]['stderr'][-3000:]}"
    )
    return ranks


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_blip_dir, data_dir):
    """The same training in one process with BATCH_SIZE 4: the same global batch."""
    import train_blip

    out = tmp_path_factory.mktemp("single") / "out"
    with one_thread():  # like each torchrun process (OMP_NUM_THREADS=1)
        results = train_blip.main(
            [
                f"--MODEL_ID={tiny_blip_dir}",
                f"--DATA_DIR={data_dir}",
                f"--OUTPUT_DIR={out}",
                "--BATCH_SIZE=4",
                *COMMON_ARGS,
            ]
        )
    return {"out": out, "results": results}


def split(n_good: int):
    import train_blip

    return train_blip.split_train_val(n_good, VAL_FRACTION, SEED)


def test_two_processes_really_ran_together(two_process_run):
    finished(two_process_run)
    results = json.loads((two_process_run["out"] / "train_results.json").read_text())
    assert results["world_size"] == 2, "each rank ran alone: accelerate did not set up gloo (see the report)"
    assert results["effective_batch"] == 4 and results["batch_size"] == 2
    print(f"2-process run took {two_process_run['seconds']:.1f} s")


def test_each_rank_trains_on_its_own_shard_every_epoch(two_process_run):
    train_ids, val_ids = split(N_IMAGES)
    ranks = finished(two_process_run)
    for epoch in (0, 1):
        plans = {}
        for r in (0, 1):
            [plan] = [e for e in ranks[r]["events"] if e["kind"] == "plan" and e["epoch"] == epoch]
            plans[r] = [train_ids[p] for p in plan["positions"]]
            assert len(plans[r]) == len(set(plans[r])) == len(train_ids) // 2, (
                f"rank {r} epoch {epoch}: {plans[r]}"
            )
        assert not set(plans[0]) & set(plans[1]), f"epoch {epoch}: the ranks share items"
        assert set(plans[0]) | set(plans[1]) == set(train_ids), f"epoch {epoch}: some items trained by nobody"
    for r in (0, 1):
        # What the rank really batched for training (validation batches hold only validation items).
        planned = sorted(
            i
            for e in ranks[r]["events"]
            if e["kind"] == "plan"
            for i in (train_ids[p] for p in e["positions"])
        )
        batched = sorted(
            i for e in ranks[r]["events"] if e["kind"] == "batch" for i in e["index"] if i in set(train_ids)
        )
        assert batched == planned, f"rank {r} batched other items than its shard"
        val_batched = {
            i for e in ranks[r]["events"] if e["kind"] == "batch" for i in e["index"] if i in set(val_ids)
        }
        assert val_batched == set(val_ids[r::2]), f"rank {r} validated on {val_batched}"


def test_prefix_cache_is_per_rank_and_covers_only_its_shard(two_process_run):
    train_ids, val_ids = split(N_IMAGES)
    ranks = finished(two_process_run)
    covered = {}
    for r in (0, 1):
        [cache] = [e for e in ranks[r]["events"] if e["kind"] == "prefix_cache"]
        shard = {train_ids[p] for e in ranks[r]["events"] if e["kind"] == "plan" for p in e["positions"]}
        covered[r] = set(cache["indices"])
        assert covered[r] == shard | set(val_ids[r::2]), f"rank {r} caches {sorted(covered[r])}"
    assert not covered[0] & covered[1]


def test_weights_identical_on_both_ranks(two_process_run):
    finished(two_process_run)
    digests = json.loads((two_process_run["out"] / "train_results.json").read_text())[
        "trainable_digest_per_process"
    ]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_only_rank0_prints_and_writes(two_process_run):
    r0, r1 = finished(two_process_run).values()
    assert "done:" in r0["stdout"] and "epoch 2/2" in r0["stdout"]
    assert r1["stdout"].strip() == "", f"rank 1 printed:\n{r1['stdout'][:2000]}"
    for marker in ("%|", "train:", "epoch", "Loading weights", "trainable params"):
        assert marker not in r1["stderr"], f"rank 1 shows progress ({marker!r}):\n{r1['stderr'][:2000]}"

    def writes(r):
        return [(e["op"], e["path"]) for e in two_process_run["ranks"][r]["events"] if e["kind"] == "write"]

    # Rank 1 may write only what is its own by name: its RNG state inside the checkpoint being
    # saved (accelerate's save_state; needed for an exact resume), its prefix-cache spill file if
    # any, and common.check_writable's empty probe (tempfile also tries to open the folder itself).
    # Directories are not content: every rank calls mkdir(exist_ok=True) on folders rank 0 makes.
    own = ("random_states_1.pkl", ".prefix_cache-rank1.bin", ".write_test_")
    foreign = [
        (op, path)
        for op, path in writes(1)
        if op != "os.mkdir" and path != "." and not any(o in Path(path).name for o in own)
    ]
    assert not foreign, f"rank 1 wrote shared files: {foreign}"
    assert any(p.endswith("random_states_1.pkl") for _, p in writes(1))  # the probe does see rank 1's writes

    # Nothing is written twice: no path is written by both ranks.
    def files(r):  # paths whose content the rank wrote (not folders it made or removed)
        return {
            p
            for op, p in writes(r)
            if op in ("open", "torch.save", "safetensors.save_file", "os.rename") and p != "."
        }

    both = files(0) & files(1)
    assert not both, f"written by both ranks: {both}"
    # Rank 0 wrote every final output, and the checkpoints hold one RNG file per rank.
    written0 = {p for _, p in writes(0)}
    out = two_process_run["out"]
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "training_config.json",
        "metrics.jsonl",
        "loss_curve.png",
        "train_results.json",
    ):
        assert (out / name).is_file() and any(Path(p).name == name or name in p for p in written0), name
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts
    for c in ckpts:
        assert sorted(p.name for p in c.glob("random_states_*.pkl")) == [
            "random_states_0.pkl",
            "random_states_1.pkl",
        ]


def test_matches_one_process_at_the_same_global_batch(two_process_run, one_process_run):
    import torch

    finished(two_process_run)
    two, one = load_adapter(two_process_run["out"]), load_adapter(one_process_run["out"])
    assert two.keys() == one.keys() and two
    worst = max((two[k] - one[k]).abs().max().item() for k in two)
    trained = max(one[k].abs().max().item() for k in one if "lora_B" in k)  # B starts at zero
    assert trained > 0, "the adapter did not move: the comparison would be trivial"
    print(f"largest |2-process - 1-process| adapter difference: {worst:.3g}; largest |lora_B|: {trained:.3g}")
    for k in two:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    # The logged losses agree as well (same items per optimizer step, mean over the same captions).
    logs = [
        [m for m in map(json.loads, (run["out"] / "metrics.jsonl").read_text().splitlines())]
        for run in (two_process_run, one_process_run)
    ]
    assert [m["type"] for m in logs[0]] == [m["type"] for m in logs[1]]
    for a, b in zip(*logs):
        for key in ("loss", "train_loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (key, a, b)
