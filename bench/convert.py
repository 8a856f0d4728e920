"""HF / DeepSeek-V3 checkpoint conversion (launch/convert.py): throughput and peak memory against shard and model size.

Writes a synthetic DeepSeek-V3-format checkpoint of a made-up mid-size shape (random BF16 weights in
safetensors shards with an index, written one shard at a time), then times, each in a fresh process:

  1. import  bf16 HF -> ours (fp32 DCP)         4. import  fp8 HF -> ours (dequantized)
  2. export  ours -> bf16 HF                    5. (the fp8 round trip's max relative error, checked)
  3. export  ours -> fp8 HF (128x128 scales)

and prints GB/s (bytes read and written per second) and peak RSS: the process's kernel high-water mark
(ru_maxrss of the child), and the growth during the conversion itself (high-water mark reset at its
start), against the source shard size and the model size. The claim checked: peak growth stays around
one shard, not the model. Reads come from the page cache when the files were just written (warm): the
numbers are the conversion's own cost plus the disk's write speed.

    python bench/convert.py --quick                 # ~0.3 GB model in 40 MB shards (a minute on 2 cores)
    python bench/convert.py                         # ~2.5 GB model in 250 MB shards
    python bench/convert.py --size-gb 8 --shard-mb 1000 --threads 4 --torch-threads 4 --dir /scratch/x
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from train.config import ModelConfig  # noqa: E402
from train.hf_io import hf_layout, write_synthetic_hf  # noqa: E402

MiB = 2**20


def bench_config(size_gb: float, quick: bool) -> ModelConfig:
    """A mid-size DeepSeek-V3 shape (V3's proportions, scaled down) with as many layers as fill ``size_gb`` of BF16."""
    base = dict(vocab_size=32768, dim=1536, inter_dim=4096, moe_inter_dim=512, n_dense_layers=1, n_heads=16,
                q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                n_routed_experts=64, n_shared_experts=1, n_activated_experts=6, n_expert_groups=8, topk_groups=4,
                route_scale=2.5, mtp_depth=1, max_seq_len=4096, original_seq_len=4096)
    if quick:
        base.update(vocab_size=16384, dim=1024, inter_dim=2048, moe_inter_dim=256, n_heads=8, n_routed_experts=32,
                    q_lora_rank=512, kv_lora_rank=256)
    one = ModelConfig(**base, n_layers=2)
    two = ModelConfig(**base, n_layers=3)
    per_layer = model_bytes(two) - model_bytes(one)
    fixed = model_bytes(one) - 2 * per_layer
    n_layers = max(2, round((size_gb * 1e9 - fixed) / per_layer))
    return ModelConfig(**base, n_layers=n_layers)


def model_bytes(cfg: ModelConfig) -> int:
    return sum(2 * math.prod(e.shape) for e in hf_layout(cfg) if not e.copy)


def child(argv: list[str]) -> None:
    """One conversion in this (fresh) process; prints its ConvertStats as JSON."""
    from train.hf_io import export_hf, import_hf

    kind, src, dst, option, torch_threads = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    torch.set_num_threads(torch_threads)
    if kind == "import":
        stats = import_hf(src, dst, threads=int(option))
    else:
        stats = export_hf(src, dst, dtype=option, max_shard_size=int(argv[5]))
    print(json.dumps({"seconds": stats.seconds, "read": stats.bytes_read, "written": stats.bytes_written,
                      "growth": stats.rss_growth, "largest_item": stats.largest_item, "files": stats.files,
                      "shard_bytes": stats.shard_bytes}))


def run_child(*args: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"bench child {args} failed:\n{err}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024  # Linux: KiB
    result["wall"] = time.perf_counter() - start
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (~0.3 GB)")
    parser.add_argument("--size-gb", type=float, default=None, help="model size in BF16 (default 2.5; quick 0.3)")
    parser.add_argument("--shard-mb", type=float, default=None, help="source shard size (default 250; quick 40)")
    parser.add_argument("--threads", type=int, default=1, help="DCP writer threads of the imports")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads of the children")
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()
    size_gb = args.size_gb or (0.3 if args.quick else 2.5)
    shard = int((args.shard_mb or (40 if args.quick else 250)) * MiB)

    work = args.dir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("hf", "ours", "bf16", "fp8", "ours_fp8"):
        shutil.rmtree(work / name, ignore_errors=True)
    cfg = bench_config(size_gb, args.quick)
    t0 = time.perf_counter()
    total, largest_shard, n_shards = write_synthetic_hf(work / "hf", cfg, shard)
    print(f"synthetic checkpoint: {cfg.n_layers} layers (+{cfg.mtp_depth} MTP), dim {cfg.dim}, {cfg.n_routed_experts} "
          f"experts x {cfg.moe_inter_dim}, vocab {cfg.vocab_size}: {total / 1e9:.2f} GB BF16 in {n_shards} shards of "
          f"<= {largest_shard / MiB:.0f} MiB ({time.perf_counter() - t0:.1f} s to write) in {work}")
    print(f"torch threads {args.torch_threads}, import writer threads {args.threads}, cores {os.cpu_count()}, "
          f"torch {torch.__version__}\n")

    rows = []
    rows.append(("import bf16 -> ours", run_child("import", work / "hf", work / "ours", args.threads, args.torch_threads)))
    rows.append(("export ours -> bf16", run_child("export", work / "ours", work / "bf16", "bf16", args.torch_threads, shard)))
    rows.append(("export ours -> fp8", run_child("export", work / "ours", work / "fp8", "fp8", args.torch_threads, shard)))
    rows.append(("import fp8 -> ours", run_child("import", work / "fp8", work / "ours_fp8", args.threads,
                                                 args.torch_threads)))

    header = (f"{'step':<22}{'read GB':>9}{'write GB':>9}{'s':>7}{'read GB/s':>10}{'write GB/s':>11}"
              f"{'peak RSS':>10}{'growth':>9}{'growth/shard':>13}{'growth/model':>13}")
    print(header)
    print("-" * len(header))
    for name, r in rows:
        growth = r["growth"] if r["growth"] is not None else float("nan")
        print(f"{name:<22}{r['read'] / 1e9:>9.2f}{r['written'] / 1e9:>9.2f}{r['seconds']:>7.1f}"
              f"{r['read'] / r['seconds'] / 1e9:>10.2f}{r['written'] / r['seconds'] / 1e9:>11.2f}"
              f"{r['peak_rss'] / MiB:>9.0f}M{growth / MiB:>8.0f}M{growth / largest_shard:>13.2f}{growth / total:>13.3f}")
    print(f"\nshard {largest_shard / MiB:.0f} MiB, model {total / MiB:.0f} MiB BF16 ({2 * total / MiB:.0f} MiB as our fp32); "
          f"largest tensor held by an import: {rows[0][1]['largest_item'] / MiB:.1f} MiB (fp32); peak RSS = whole child "
          "process (python + torch included); growth = during the conversion")

    # the fp8 round trip stays within the block quantization error: spot-check one expert weight
    from train.hf_io import DcpCheckpoint

    a, b = DcpCheckpoint(work / "ours"), DcpCheckpoint(work / "ours_fp8")
    key = f"layers.{cfg.n_layers - 1}.ffn.experts.w1"
    w, back = a.read(key, 0), b.read(key, 0)
    rel = ((back - w).abs() / w.abs().clamp(min=1e-3)).max().item()
    print(f"fp8 round trip of {key}[0]: max relative error {rel:.4f} (e4m3 half-spacing 2^-4 = 0.0625 for normal "
          "values)")
    if not args.keep and args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
