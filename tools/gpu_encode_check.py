"""GPU image-encoding throughput through the real preparation path, for a lent GPU machine (no hub,
no network): a SigLIP so400m/14@384-shaped vision tower with random weights (the throughput of a
frozen encoder does not depend on its weight values) saved to a local folder, WebDataset tar shards
of synthetic JPEGs, then ``tools/encode_images.py`` over them (decode + letterbox on the CPU,
encode on ``cuda:LOCAL_RANK``, parts, merge) and the encoder's forward alone. Writes a dated
markdown report to --out-dir.

    python tools/gpu_encode_check.py --out-dir benchmarks            # on the GPU machine
    python tools/gpu_encode_check.py --tiny --images 16 --out-dir /tmp  # the same path on a CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megavlm.data.indexed import EmbeddingStore  # noqa: E402
from megavlm.helpformat import HelpFormatter  # noqa: E402


def siglip_config(tiny: bool):
    from transformers import SiglipVisionConfig

    if tiny:
        return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=56, patch_size=14)
    # google/siglip-so400m-patch14-384's vision tower: 27 x 27 = 729 patches of width 1152
    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                              num_attention_heads=16, image_size=384, patch_size=14)


def write_shards(folder: Path, images: int, shards: int, side: int) -> list[Path]:
    """Smooth random RGB images (JPEG, side x 3/4 side) with a caption, as img2dataset writes them."""
    rng = np.random.default_rng(0)
    paths = []
    per = -(-images // shards)
    for s in range(shards):
        path = folder / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, min(images, (s + 1) * per)):
                small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((side, side * 3 // 4), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                for name, data in ((f"{i:08d}.jpg", buf.getvalue()), (f"{i:08d}.txt", f"image {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def forward_rate(model, cfg, batch: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    with torch.inference_mode(), torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        for _ in range(2):
            model(pixel_values=x)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            model(pixel_values=x)
        if device == "cuda":
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--side", type=int, default=512, help="stored JPEG width")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="encode_images.py --compute-dtype for the end-to-end row")
    p.add_argument("--tiny", action="store_true", help="a small random SigLIP (CPU check of the path)")
    args = p.parse_args(argv)
    from transformers import SiglipVisionModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = siglip_config(args.tiny)
    rows = []
    with tempfile.TemporaryDirectory(prefix="megavlm-encode-") as tmp:
        tmp = Path(tmp)
        model = SiglipVisionModel(cfg).eval()
        model.save_pretrained(tmp / "siglip")
        shards = write_shards(tmp, args.images, args.shards, args.side)
        cmd = [sys.executable, str(ROOT / "tools" / "encode_images.py"),
               "--input", str(tmp / f"shard-{{0000..{args.shards - 1:04d}}}.tar"),
               "--encoder", f"siglip:{tmp / 'siglip'}", "--output", str(tmp / "out" / "caps"),
               "--no-captions", "--batch-size", str(args.batch_size), "--resize", "letterbox",
               "--decoder", "pil", "--no-progress", "--compute-dtype", args.compute_dtype]
        t = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wall = time.perf_counter() - t
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"encode_images failed (rc {run.returncode})")
        store = EmbeddingStore(str(tmp / "out" / "caps.embeds"))
        first = torch.as_tensor(np.asarray(store.get(0), dtype=np.float32))
        assert len(store) == args.images, (len(store), args.images)
        assert tuple(first.shape) == ((cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size), first.shape
        assert torch.isfinite(first).all()
        rows.append(("tools/encode_images.py over tar shards (decode + letterbox on CPU, "
                     f"{args.compute_dtype} encode, bf16 store, parts + merge)", f"{args.images / wall:,.1f}", f"{wall:.1f} s wall, "
                     "model load and process start included"))
        model = model.to(device)
        for name, dtype in (("fp32", torch.float32), ("bf16 autocast", torch.bfloat16)):
            rate = forward_rate(model, cfg, args.batch_size, dtype, device, 3 if args.tiny else 10)
            rows.append((f"encoder forward alone, {name}, batch {args.batch_size}", f"{rate:,.1f}", ""))
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    text = [f"# Image encoding throughput, {gpu}, {dt.date.today().isoformat()}", "",
            f"Command: `python tools/gpu_encode_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
            f"- torch {torch.__version__}, CUDA {torch.version.cuda}, device {gpu}",
            f"- encoder: SigLIP vision tower, {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
            f"{cfg.image_size} px / patch {cfg.patch_size} = {(cfg.image_size // cfg.patch_size) ** 2} "
            "patches, random weights (throughput only)",
            f"- input: {args.images} synthetic JPEGs ({args.side} x {args.side * 3 // 4}) in {args.shards} "
            "WebDataset tar shards; one worker", "",
            "| path | images/s | note |", "| --- | ---: | --- |"]
    text += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = "cpu" if device == "cpu" else gpu.split()[-1].lower()
    out = args.out_dir / f"{dt.date.today().isoformat()}-{slug}-encode.md"
    out.write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
