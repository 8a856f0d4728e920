"""Hugging Face / DeepSeek-V3 checkpoints <-> ours (train/hf_io.py; the name table is train/hf.py).

    python launch/convert.py import HF_DIR OUT_CKPT_DIR [--drop-mtp] [--threads N]
    python launch/convert.py export OUR_CKPT_DIR HF_OUT_DIR [--dtype bf16|fp32|fp8] [--max-shard-size 5GB]
    python launch/convert.py verify DIR            # sha256 of every file against DIR/manifest.json

``import-hf`` and ``export-hf`` are the same commands under the names of design.md's contract.

``import`` reads config.json and the safetensors shards (FP8 weights with their 128x128 weight_scale_inv are
dequantized to fp32; the MTP layers stored as layer num_hidden_layers + k become our mtp.k) and writes a DCP
checkpoint marked ``"weights_only": true`` at step 0: start a run from it with ``train.hf_io.load_weights``
(docs/hf.md says what the trainer does with it). ``export`` writes what ``DeepseekV3ForCausalLM.from_pretrained``
loads. Both stream (about one shard in memory), show a progress bar on a terminal and write manifest.json.
Bad input prints one line ``error: ...`` and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from train.errors import UserError  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/convert.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    progress = argparse.ArgumentParser(add_help=False)
    progress.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                          help="progress bar on stderr (default: when stderr is a terminal)")
    progress.add_argument("--force", action="store_true", help="replace an existing output directory")
    progress.add_argument("--torch-threads", type=int, default=1,
                          help="torch intra-op threads (default 1: the work is per-tensor casts and copies, where "
                               "OpenMP threads mostly wait for each other; use --threads for parallel shards)")

    imp = sub.add_parser("import", aliases=["import-hf"], parents=[progress],
                         help="DeepSeek-V3 / HF safetensors directory -> our checkpoint")
    imp.add_argument("hf_dir", type=Path)
    imp.add_argument("out", type=Path)
    imp.add_argument("--drop-mtp", action="store_true",
                     help="import without the MTP layers (mtp_depth=0), e.g. a transformers save_pretrained output")
    imp.add_argument("--threads", type=int, default=1, help="DCP writer threads, one source shard each (default 1)")

    exp = sub.add_parser("export", aliases=["export-hf"], parents=[progress],
                         help="our checkpoint -> DeepSeek-V3 / HF safetensors directory")
    exp.add_argument("ckpt", type=Path)
    exp.add_argument("out", type=Path)
    exp.add_argument("--dtype", choices=["bf16", "fp32", "fp8"], default="bf16",
                     help="bf16 (default), fp32, or fp8: DeepSeek's float8_e4m3fn weights with 128x128 weight_scale_inv")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MiB (default 5GB)")

    ver = sub.add_parser("verify", help="check DIR's files against its manifest.json")
    ver.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    args.command = args.command.removesuffix("-hf")  # an alias names the same command
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from train import hf_io

        if getattr(args, "torch_threads", None) is not None:
            if args.torch_threads < 1:
                raise hf_io.ConvertError(f"--torch-threads {args.torch_threads}: must be >= 1")
            import torch

            torch.set_num_threads(args.torch_threads)
        show = getattr(args, "progress", None)
        show = sys.stderr.isatty() if show is None else show
        if args.command == "import":
            if args.threads < 1:
                raise hf_io.ConvertError(f"--threads {args.threads}: must be >= 1")
            stats = hf_io.import_hf(args.hf_dir, args.out, drop_mtp=args.drop_mtp, threads=args.threads,
                                    progress=show, force=args.force)
            print(stats.summary(f"imported {args.hf_dir} -> {args.out}"))
            cfg = hf_io.DcpCheckpoint(args.out).cfg
            print(f"model config of {args.out} (a run from it needs exactly this, see docs/hf.md): "
                  f"{' '.join(hf_io.model_overrides(cfg))}")
        elif args.command == "export":
            stats = hf_io.export_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                    progress=show, force=args.force)
            source = hf_io.DcpCheckpoint(args.ckpt).path  # a run directory: its newest checkpoint
            print(stats.summary(f"exported {source} -> {args.out} ({args.dtype})"))
        else:
            print(f"{args.dir}: {hf_io.verify_manifest(args.dir)} files match {args.dir}/manifest.json")
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
