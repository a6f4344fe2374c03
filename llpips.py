"""L-LPIPS: LPIPS computed on latents, so the consistency losses never decode to pixels (LogCD, Method 3).

    d(x, y) = sum_l mean_hw  w_l . ( n(f_l(x)) - n(f_l(y)) )^2        n(f) = f / ||f||_channels,  w_l >= 0

f_l are the taps relu1_2 .. relu5_3 of a VGG16-style trunk (widths 64, 128, 256, 512, 512) whose first conv takes
the latent channels (4 for SDXL's VAE, 16 for FLUX's, 1 for the embedded digits teacher) and whose first three
max-pools are removed (latents are already 8x smaller than pixels; the fourth pool stays); w_l are 1x1 linear
heads. Trunk and heads are trained from scratch on 2AFC judgments, as LPIPS was (Zhang et al. 2018):

    python llpips.py --bapps DIR --teacher sdxl --upsample 4 --out llpips_sdxl.safetensors
    python bench.py --model sdxl --what llpips   # its cost against VAE decode + pixel LPIPS (bench.py)

`pixel=True` builds the original pixel-space LPIPS-VGG (3 channels, all pools, LPIPS's input scaling): the tests
check it against the `lpips` package, same weights in, same distances out.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora

VGG16 = [(64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)]  # conv widths of the 5 slices


class LLPIPS(nn.Module):
    def __init__(self, channels=4, width=1.0, pixel=False):
        super().__init__()
        self.channels, self.width, self.pixel = channels, width, pixel
        self.slices, self.heads = nn.ModuleList(), nn.ModuleList()
        c_in = channels
        for k, widths in enumerate(VGG16):
            layers = []
            if k > 0 and (pixel or k == 4):  # latent mode keeps only the pool before slice 5
                layers.append(nn.MaxPool2d(2, 2))
            for c in widths:
                c = max(1, round(c * width))
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
                c_in = c
            self.slices.append(nn.Sequential(*layers))
            self.heads.append(nn.Conv2d(c_in, 1, 1, bias=False))
        for h in self.heads:
            nn.init.uniform_(h.weight, 0, 1.0 / h.in_channels)  # non-negative from the start
        self.dropout = nn.Dropout(0.5)  # on the heads' input, in training only (as LPIPS)
        # LPIPS's input scaling of ImageNet-normalised VGG (pixel mode only)
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1), persistent=False)

    def taps(self, x):
        if self.pixel:
            x = (x - self.shift) / self.scale
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out

    def forward(self, x, y, spatial=False):
        """d(x, y) per sample, shape (B,); spatial=True: the distance map (B, 1, H, W)."""
        if x.shape[1] != self.channels or y.shape != x.shape:
            raise ValueError(f"L-LPIPS takes two (B, {self.channels}, H, W) latents; got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError("NaN or inf in the L-LPIPS input")
        d = 0
        for f, head in zip(self.taps(torch.cat([x, y])), self.heads):
            fx, fy = f.chunk(2)
            # w_l . (n(f_l(x)) - n(f_l(y)))^2
            m = head(self.dropout((unit(fx) - unit(fy)) ** 2))
            # mean over h, w (or the map at input size), summed over the taps
            d = d + (F.interpolate(m, size=x.shape[2:], mode="bilinear", align_corners=False) if spatial
                     else m.mean((2, 3), keepdim=True))
        return d if spatial else d.flatten()

    def clamp_heads(self):
        with torch.no_grad():
            for h in self.heads:
                h.weight.clamp_(min=0)


def unit(f, eps=1e-10):
    """f / ||f|| over the channels, at every position."""
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


def save(path, net, meta=None):
    lora.save(path, net.state_dict(), {"format": "llpips", "channels": net.channels, "width": net.width,
                                       "pixel": net.pixel, **(meta or {})})


def load(path, device=None):
    """A frozen, eval-mode L-LPIPS from a weights file (channels and width come from its metadata)."""
    tensors, meta = lora.load(path)
    if meta.get("format") != "llpips":
        raise ValueError(f"{path} is not an L-LPIPS weights file")
    net = LLPIPS(int(meta["channels"]), float(meta["width"]), meta.get("pixel") == "True")
    net.load_state_dict(tensors)
    net.meta = meta
    return net.to(device or "cpu").eval().requires_grad_(False)


# ---- 2AFC training on BAPPS-format data ------------------------------------------------------------------------

class RankNet(nn.Module):
    """LPIPS's small ranking network: from the two distances to the probability that a judge prefers p1."""

    def __init__(self, hidden=32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(5, hidden, 1), nn.LeakyReLU(0.2), nn.Conv2d(hidden, hidden, 1),
                                 nn.LeakyReLU(0.2), nn.Conv2d(hidden, 1, 1))

    def forward(self, d0, d1, eps=0.1):
        d0, d1 = d0.view(-1, 1, 1, 1), d1.view(-1, 1, 1, 1)
        return self.net(torch.cat([d0, d1, d0 - d1, d0 / (d1 + eps), d1 / (d0 + eps)], 1)).flatten()  # logits


def read_bapps(root, split):
    """{subset: (ref, p0, p1, judge) file lists} of root/2afc/<split>/<subset>/{ref,p0,p1,judge}; clear errors."""
    base = os.path.join(root, "2afc", split)
    if not os.path.isdir(base):
        raise ValueError(f"{base} is missing: expected the BAPPS layout 2afc/{{train,val}}/<subset>/{{ref,p0,p1,judge}}")
    out = {}
    for subset in sorted(os.listdir(base)):
        folders = [os.path.join(base, subset, k) for k in ("ref", "p0", "p1", "judge")]
        missing = [f for f in folders if not os.path.isdir(f)]
        if missing:
            raise ValueError(f"BAPPS subset {split}/{subset} lacks {', '.join(os.path.basename(m) for m in missing)}/")
        files = [sorted(os.listdir(f)) for f in folders]
        stems = [[os.path.splitext(n)[0] for n in fs] for fs in files]
        if any(s != stems[0] for s in stems) or not stems[0]:
            raise ValueError(f"BAPPS subset {split}/{subset}: ref/p0/p1/judge hold {[len(s) for s in stems]} files "
                             "whose names do not match one to one")
        out[subset] = [[os.path.join(f, n) for n in fs] for f, fs in zip(folders, files)]
    if not out:
        raise ValueError(f"{base} holds no subsets")
    return out


def load_subset(files, encode, upsample):
    """Latents of ref / p0 / p1 patches (images upsampled by `upsample`, then encoded) and the judgments."""
    import numpy as np
    from PIL import Image
    ref, p0, p1, judge = files
    out = {}
    for k, paths in (("ref", ref), ("p0", p0), ("p1", p1)):
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)) for p in paths])
        x = x.permute(0, 3, 1, 2) / 127.5 - 1
        if upsample != 1:
            x = F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)
        out[k] = torch.cat([encode(c) for c in x.split(64)])
    out["judge"] = torch.tensor([float(np.load(p).reshape(-1)[0]) for p in judge])  # share preferring p1
    return out


def two_afc(net, data, batch=256):
    """2AFC score: agreement with the judges, sum of (d0 < d1) (1 - judge) + (d1 < d0) judge (+ 1/2 for ties)."""
    with torch.no_grad():
        d0 = torch.cat([net(r, a) for r, a in zip(data["ref"].split(batch), data["p0"].split(batch))])
        d1 = torch.cat([net(r, b) for r, b in zip(data["ref"].split(batch), data["p1"].split(batch))])
    j = data["judge"]
    return ((d0 < d1) * (1 - j) + (d1 < d0) * j + (d0 == d1) * 0.5).float().mean().item()


def main(argv=None):
    import argparse
    import hashlib

    from tqdm import tqdm
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bapps", help="BAPPS root: 2afc/{train,val}/<subset>/{ref,p0,p1,judge}")
    p.add_argument("--teacher", default="sdxl", help="whose VAE encodes the patches (digits, sdxl, flux, folder)")
    p.add_argument("--upsample", type=float, default=4, help="patch upsampling before encoding (64 px x 4 -> "
                   "256 px -> 32 x 32 SDXL latents)")
    p.add_argument("--width", type=float, default=1.0, help="trunk width multiplier (1 = VGG16's)")
    p.add_argument("--epochs", type=int, default=5, help="epochs at the full learning rate")
    p.add_argument("--decay-epochs", type=int, default=5, help="then epochs with linear decay to 0")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="llpips.safetensors")
    p.add_argument("--resume", action="store_true", help="continue from --out and its .state file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if not args.bapps:
        p.error("--bapps DIR is required (to time L-LPIPS against VAE decode + LPIPS: python bench.py --what llpips)")

    # the trainer alone needs a teacher (its VAE) and the shared checkpoint helpers
    from runs import load_optimizer, optimizer_tensors, state_path
    from teachers import CACHE, default_device, load_teacher
    device = args.device or default_device()
    try:
        splits = {s: read_bapps(args.bapps, s) for s in ("train", "val")}
        teacher = load_teacher(args.teacher, device)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    # encode every patch once, cached on disk
    data = {}
    for split, subsets in splits.items():
        for subset, files in subsets.items():
            # keyed by teacher, upsampling and every file's path, size and mtime: edited data is encoded anew
            stamp = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for fs in files for f in fs]
            key = hashlib.sha1(repr((teacher.id, args.upsample, stamp)).encode()).hexdigest()[:16]
            path = os.path.join(CACHE, "bapps", f"{key}.safetensors")
            if not os.path.exists(path):
                with torch.no_grad():
                    lora.save(path, load_subset(files, lambda x: teacher.encode_images(x.to(device)).cpu(),
                                                args.upsample), {})
            data[split, subset] = lora.load(path)[0]
    train = {k: torch.cat([v[k] for (s, _), v in data.items() if s == "train"]) for k in ("ref", "p0", "p1", "judge")}
    channels = train["ref"].shape[1]

    torch.manual_seed(args.seed)
    net, ranker = LLPIPS(channels, args.width).to(device), RankNet().to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(ranker.parameters()), lr=args.lr, betas=(0.5, 0.999))
    epochs, epoch = args.epochs + args.decay_epochs, 0
    if args.resume:
        try:
            state, meta = lora.load(state_path(args.out))
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: cannot resume: {e}")
        net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        ranker.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("rank.")})
        load_optimizer(opt, state)
        epoch = int(meta["epoch"])
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(epoch, epochs):
        net.train()
        lr = args.lr * min(1.0, (epochs - epoch) / (args.decay_epochs + 1)) if epoch >= args.epochs else args.lr
        for g in opt.param_groups:
            g["lr"] = lr
        order = torch.randperm(len(train["judge"]), generator=gen)
        bar = tqdm(order.split(args.batch), desc=f"epoch {epoch + 1}/{epochs}")
        for idx in bar:
            ref, p0, p1, judge = (train[k][idx].to(device) for k in ("ref", "p0", "p1", "judge"))
            d0, d1 = net(ref, p0), net(ref, p1)
            # BCE between the ranking net's P(judge prefers p1 | d0, d1) and the judges' share
            loss = F.binary_cross_entropy_with_logits(ranker(d0, d1), judge)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            net.clamp_heads()  # w_l >= 0
            bar.set_postfix(loss=f"{loss.item():.4f}")
        net.eval()
        scores = {f"2afc_{sub}": two_afc(net, {k: v.to(device) for k, v in d.items()})
                  for (s, sub), d in data.items() if s == "val"}
        print(f"epoch {epoch + 1}: val 2AFC " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in scores.items()))
        lora.save(state_path(args.out), {**{f"net.{k}": v for k, v in net.state_dict().items()},
                                         **{f"rank.{k}": v for k, v in ranker.state_dict().items()},
                                         **optimizer_tensors(opt)}, {"epoch": epoch + 1})
        save(args.out, net, {"teacher": teacher.id, "upsample": args.upsample, "epoch": epoch + 1,
                             **{k: f"{v:.4f}" for k, v in scores.items()}})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
