#!/usr/bin/env python3
"""How much of easy-VQA's shape and colour a frozen vision tower gives away: a linear probe.

For N training and M test images of easy-VQA (PyPI `easy-vqa`), the features MemVP reads
(`memvp encode-image`: the penultimate block, CLS dropped, post-layernorm) are fitted by a
multinomial logistic regression to each image's shape (circle / rectangle / triangle) and colour
(8 classes), on three inputs: the mean of the patch features, all patch features, and the raw
pixels (the same 64x64 input, a baseline that needs no tower). Test accuracy says what a linear
read-out of the frozen features can know: if the shape is not linearly there, no projector on
top of this tower can put it into the LM's memory.

    python3 scripts/probe_vision.py --vision random:small --train 2000 --test 500

Writes results/vision_probe.json. Needs numpy and a built target/release/memvp.
"""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ["circle", "rectangle", "triangle"]


def labels(split_dir):
    """image id -> (shape, colour), from the answers of the open questions."""
    qs = json.load(open(split_dir / "questions.json"))
    shape, colour = {}, {}
    for q, a, img in qs:
        if a in SHAPES:
            shape[img] = a
            m = re.match(r"what is the (\w+) shape\?", q)
            if m:
                colour[img] = m.group(1)
        elif a not in ("yes", "no"):
            colour[img] = a
    return {i: (shape[i], colour[i]) for i in shape if i in colour}


def features(memvp, vision, paths, tmp):
    out = []
    for k, p in enumerate(paths):
        f = Path(tmp) / f"f{k}.safetensors"
        subprocess.run([memvp, "encode-image", "--vision", vision, "--image", str(p), "--out", str(f)],
                       check=True, capture_output=True)
        out.append(load_file(str(f))["features"])
        f.unlink()
    return np.stack(out)  # [N, n, c]


def probe(xtr, ytr, xte, yte, classes, steps=300, lr=0.5, l2=1e-3):
    """Multinomial logistic regression by full-batch gradient descent on standardised inputs."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = np.zeros((xtr.shape[1], classes))
    b = np.zeros(classes)
    onehot = np.eye(classes)[ytr]
    for _ in range(steps):
        z = xtr @ w + b
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / len(xtr)
        w -= lr * (xtr.T @ g + l2 * w)
        b -= lr * g.sum(0)
    acc = lambda x, y: float(((x @ w + b).argmax(1) == y).mean())
    return acc(xtr, ytr), acc(xte, yte)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vision", default="random:small")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    args = ap.parse_args()
    data = Path(os.path.dirname(importlib.util.find_spec("easy_vqa").origin)) / "data"
    memvp = str(ROOT / "target/release/memvp")
    sets = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, n in [("train", args.train), ("test", args.test)]:
            lab = labels(data / split)
            ids = sorted(lab)[:n]
            paths = [data / split / "images" / f"{i}.png" for i in ids]
            feats = features(memvp, args.vision, paths, tmp)
            pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).ravel() / 255 for p in paths])
            colours = sorted({c for _, c in lab.values()})
            sets[split] = {
                "mean patch features": feats.mean(1),
                "all patch features": feats.reshape(len(ids), -1),
                "pixels": pixels,
                "shape": np.array([SHAPES.index(lab[i][0]) for i in ids]),
                "colour": np.array([colours.index(lab[i][1]) for i in ids]),
                "colours": colours,
            }
    res = {"vision": args.vision, "train_images": args.train, "test_images": args.test, "probes": {}}
    for inp in ["mean patch features", "all patch features", "pixels"]:
        for target, k in [("shape", 3), ("colour", len(sets["train"]["colours"]))]:
            tr, te = probe(sets["train"][inp], sets["train"][target], sets["test"][inp], sets["test"][target], k)
            res["probes"][f"{target} from {inp}"] = {"train_accuracy": round(100 * tr, 2), "test_accuracy": round(100 * te, 2)}
            print(f"{target:6} from {inp:20}: train {100 * tr:5.1f}%  test {100 * te:5.1f}%")
    counts = np.bincount(sets["test"]["shape"], minlength=3)
    res["shape_majority_test_accuracy"] = round(100 * counts.max() / counts.sum(), 2)
    (ROOT / "results").mkdir(exist_ok=True)
    (ROOT / "results" / "vision_probe.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
