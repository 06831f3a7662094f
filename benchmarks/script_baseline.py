"""A fixed, hand-written training script: what a user compares the product against.

    python -m benchmarks.script_baseline DATA [--seed 0] [--image-size 64] [--epochs 15]

Plain PyTorch + a timm model, no project code and no search: resnet10t, AdamW lr 2e-3, weight
decay 0.05, one-cycle, label smoothing 0.1, random horizontal flips, batch 64, trained on every
image of DATA/train (a val folder, if any, is not used), evaluated once on DATA/test. Images are
decoded once (shorter side resized, centre crop). Prints one JSON line: test accuracy, macro-F1,
seconds.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def read_folder(root: Path, size: int, classes: list[str] | None = None):
    classes = classes or sorted(d.name for d in root.iterdir() if d.is_dir())
    images, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in SUFFIXES:
                continue
            im = Image.open(f).convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            images.append(np.asarray(im.resize((size, size), Image.Resampling.BILINEAR)))
            labels.append(k)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels), classes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15)
    args = p.parse_args(argv)
    start = time.time()
    torch.manual_seed(args.seed)
    x_train, y_train, classes = read_folder(args.data / "train", args.image_size)
    x_test, y_test, _ = read_folder(args.data / "test", args.image_size, classes)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    model = timm.create_model("resnet10t", num_classes=len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = args.epochs * (len(x_train) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(len(x_train) // 64):
            idx = order[i * 64:(i + 1) * 64]
            x = x_train[idx].float().div(255)
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = loss_fn(model((x - mean) / std), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model((x_test[i:i + 256].float().div(255) - mean) / std).argmax(1)
                          for i in range(0, len(x_test), 256)])
    acc = (pred == y_test).float().mean().item()
    f1s = []
    for k in range(len(classes)):
        tp = ((pred == k) & (y_test == k)).sum().item()
        denom = (pred == k).sum().item() + (y_test == k).sum().item()
        f1s.append(2 * tp / denom if denom else 0.0)
    print(json.dumps({"test_accuracy": acc, "test_f1": float(np.mean(f1s)),
                      "seconds": round(time.time() - start, 1), "train_images": len(x_train),
                      "test_images": len(x_test)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
