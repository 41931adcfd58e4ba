"""Encrypted against plaintext logits for every image of a folder (and N images of another).

    .venv/bin/python benchmarks/check_encrypted_inference.py --model runs/real_cnn128/model.pt \\
        --data ../shared/data/chest_xray/val --extra ../shared/data/chest_xray/train --extra-count 50

Runs the encrypted engine (model owner, data owner, dealer: separate processes) in
batches and writes benchmarks/results/encrypted_inference_check.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from medmpc.imaging.dataset import load_folder
from medmpc.protocols.inference import run_inference
from medmpc.training.checkpoint import Checkpoint


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--extra", type=Path)
    p.add_argument("--extra-count", type=int, default=50)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encrypted_inference_check.json")
    a = p.parse_args()
    ckpt = Checkpoint.load(a.model)
    size, k = ckpt.preprocessing.image_size, len(ckpt.classes)
    images = load_folder(a.data, image_size=size, num_classes=k).images
    if a.extra is not None:
        extra = load_folder(a.extra, image_size=size, num_classes=k).images
        pick = torch.randperm(len(extra), generator=torch.Generator().manual_seed(0))[: a.extra_count]
        images = torch.cat([images, extra[pick]])
    x = ckpt.preprocessing(images)
    plain = ckpt.build()(x).detach()
    encrypted, online = [], []
    for i in tqdm(range(0, len(x), a.batch), desc="encrypted batches"):
        r = run_inference(str(a.model), x[i : i + a.batch])
        encrypted.append(r["logits"])
        online.append(r["online_s"])
    enc = torch.cat(encrypted)
    err = (enc - plain).abs().max(dim=1).values
    result = {
        "model": str(a.model),
        "n_images": len(x),
        "max_abs_err": float(err.max()),
        "images_over_0.05": int((err > 0.05).sum()),
        "argmax_agree": int((enc.argmax(1) == plain.argmax(1)).sum()),
        "online_s_per_batch": online,
        "batch": a.batch,
    }
    a.out.parent.mkdir(exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
