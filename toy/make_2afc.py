"""2AFC triplets from the digits, in the BAPPS layout, to train the embedded teacher's L-LPIPS.

    python -m toy.make_2afc --out runs/digits_2afc
    python llpips.py --bapps runs/digits_2afc --teacher digits --upsample 1 --width 0.25 --out toy/llpips.safetensors

ref is a real digit; p0 and p1 are two distortions of it of the kinds a few-step sampler produces (noise, blur,
a 1-pixel shift, thicker or thinner strokes, a low-frequency intensity wobble), each at a random strength.

The judge is NOT human: it is SSIM (structural similarity; Wang et al. 2004), a classical model of perceived
image similarity, computed on the 16x16 images. judge = sigmoid((SSIM(ref, p1) - SSIM(ref, p0)) / 0.02), the share of
"raters" preferring p1. Why SSIM: it is a perceptual model independent of the evaluator's digit classifier, so a
loss trained to agree with it cannot game the alignment / FD the project reports.
"""
import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from toy.digits import load_digits, split


def ssim(x, y, C1=0.01 ** 2, C2=0.03 ** 2):
    """Mean SSIM of images in [0, 1] (B, 1, H, W), 5x5 Gaussian window (sigma 1)."""
    g = torch.exp(-torch.arange(-2, 3.0) ** 2 / 2)
    w = (g[:, None] * g[None, :] / g.sum() ** 2).view(1, 1, 5, 5)
    blur = lambda a: F.conv2d(F.pad(a, (2, 2, 2, 2), mode="replicate"), w)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))
    return s.flatten(1).mean(1)


def distort(x, g):
    """One random distortion per image (x in [0, 1], (B, 1, H, W)) at a random strength."""
    B = len(x)
    kind, s = torch.randint(0, 5, (B,), generator=g), torch.rand(B, generator=g).view(-1, 1, 1, 1)
    noise = x + 0.4 * s * torch.randn(x.shape, generator=g)
    blur = x + s * (F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1) - x)
    shift = torch.roll(x, shifts=(1, 0), dims=(3, 2)) * s + x * (1 - s)
    stroke = torch.where(torch.rand(B, 1, 1, 1, generator=g) < 0.5, F.max_pool2d(x, 3, 1, 1), -F.max_pool2d(-x, 3, 1, 1))
    stroke = x + s * (stroke - x)
    wobble = x + 0.5 * s * F.interpolate(torch.randn(B, 1, 3, 3, generator=g), size=x.shape[2:], mode="bilinear",
                                         align_corners=False)
    out = torch.stack([noise, blur, shift, stroke, wobble])[kind, torch.arange(B)]
    return out.clamp(0, 1)


def write(root, split_name, x, g, tau=0.02):
    d = os.path.join(root, "2afc", split_name, "digits")
    for k in ("ref", "p0", "p1", "judge"):
        os.makedirs(os.path.join(d, k), exist_ok=True)
    p0, p1 = distort(x, g), distort(x, g)
    judge = torch.sigmoid((ssim(x, p1) - ssim(x, p0)) / tau)
    for i in range(len(x)):
        for k, im in (("ref", x), ("p0", p0), ("p1", p1)):
            a = (im[i, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(np.stack([a] * 3, -1)).save(os.path.join(d, k, f"{i:05d}.png"))
        np.save(os.path.join(d, "judge", f"{i:05d}.npy"), np.array([judge[i].item()], dtype=np.float32))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/digits_2afc")
    p.add_argument("--per-digit", type=int, default=3, help="triplets per training digit (val: 1 per held-out digit)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    x, _ = load_digits()
    x = (x + 1) / 2
    tr, te = split(len(x))  # the evaluator's split: val triplets come from digits the judge's classifier held out
    write(args.out, "train", x[tr].repeat(args.per_digit, 1, 1, 1), g)
    write(args.out, "val", x[te], g)
    print(f"wrote {args.per_digit * len(tr)} train and {len(te)} val triplets to {args.out}")
