"""L-LPIPS: LPIPS computed on latents, so the consistency losses never decode to pixels (LogCD, Method 3).

    d(x, y) = sum_l mean_hw  w_l . ( n(f_l(x)) - n(f_l(y)) )^2        n(f) = f / ||f||_channels,  w_l >= 0

f_l are the taps relu1_2 .. relu5_3 of a VGG16-style trunk (widths 64, 128, 256, 512, 512) whose first conv takes
the latent channels (4 for SDXL's VAE, 16 for FLUX's, 1 for the embedded digits teacher) and whose first three
max-pools are removed (latents are already 8x smaller than pixels; the fourth pool stays); w_l are 1x1 linear
heads. Trunk and heads are trained from scratch on 2AFC judgments, as LPIPS was (Zhang et al. 2018):

    python llpips.py --bapps DIR --teacher sdxl --out llpips_sdxl.safetensors   # or --teacher flux, a folder, a hub id
    python bench.py --model sdxl --what llpips         # its cost against VAE decode + pixel LPIPS (bench.py)
    python bench.py --model sdxl --what llpips-train   # a training step, an encode, the paper's budget computed

Only the teacher's VAE is loaded; every patch is encoded once (cached on disk, float16); the run ends with its 2AFC
score on each BAPPS val subset beside the original pixel LPIPS-VGG's (lpips package) on the same triplets.

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


# BAPPS 2AFC triplets per subset, as the dataset's README rounds them (github.com/richzhang/PerceptualSimilarity):
# what bench.py's computed budget counts. Train has 2 judgments per triplet, val 5.
BAPPS_TRIPLETS = {"train": {"traditional": 56_600, "cnn": 38_100, "mix": 56_600},
                  "val": {"traditional": 4_700, "cnn": 4_700, "superres": 10_900, "deblur": 9_400, "color": 4_700,
                          "frameinterp": 1_900}}
ENCODE_BATCH = 64  # patches per VAE call when encoding BAPPS


def read_bapps(root, split):
    """{subset: (ref, p0, p1, judge) file lists} of root/2afc/<split>/<subset>/{ref,p0,p1,judge}; clear errors."""
    base = os.path.join(root, "2afc", split)
    if not os.path.isdir(base):
        raise ValueError(f"{base} is missing: expected the BAPPS layout "
                         "2afc/{train,val}/<subset>/{ref,p0,p1,judge}")
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


def read_images(paths):
    """Patches as LPIPS reads them: RGB, (N, 3, H, W) in [-1, 1], at their stored size (BAPPS's: 64 px)."""
    import numpy as np
    from PIL import Image
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)) for p in paths])
    return x.permute(0, 3, 1, 2) / 127.5 - 1


def read_judges(paths):
    """The judges' share preferring p1, one number per triplet (BAPPS's judge/*.npy)."""
    import numpy as np
    return torch.tensor([float(np.load(p).reshape(-1)[0]) for p in paths])


def load_subset(files, encode, upsample, batch=ENCODE_BATCH, desc=None):
    """Latents of the ref / p0 / p1 patches (upsampled by `upsample`, then encoded, `batch` patches at a time) in
    float16, and the judgments. A chunk at a time because BAPPS train as 256 px pixels would be 350 GB; float16
    because its latents are kept in RAM for training (they are cast to fp32 a batch at a time)."""
    from tqdm import tqdm
    ref, p0, p1, judge = files
    out = {}
    with tqdm(total=3 * len(ref), unit="patch", desc=desc, disable=desc is None) as bar:
        for k, paths in (("ref", ref), ("p0", p0), ("p1", p1)):
            for i in range(0, len(paths), batch):
                x = read_images(paths[i:i + batch])
                if upsample != 1:
                    x = F.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)
                z = encode(x).to("cpu", torch.float16)
                if i == 0:
                    out[k] = z.new_empty((len(paths), *z.shape[1:]))
                out[k][i:i + len(z)] = z
                bar.update(len(z))
    out["judge"] = read_judges(judge)
    return out


def agreement(d0, d1, judge):
    """2AFC score of d0 = d(ref, p0), d1 = d(ref, p1): the share of the judges a distance agrees with (LPIPS's)."""
    # mean of (d0 < d1) (1 - judge) + (d1 < d0) judge + (d0 == d1) / 2,   judge = share preferring p1
    return ((d0 < d1) * (1 - judge) + (d1 < d0) * judge + (d0 == d1) * 0.5).float().mean().item()


def two_afc(net, data, batch=256, device="cpu"):
    """2AFC score of a distance on latents over (ref, p0, p1, judge) tensors, cast to fp32 a batch at a time."""
    d0, d1 = [], []
    with torch.no_grad():
        for i in range(0, len(data["judge"]), batch):
            ref, p0, p1 = (data[k][i:i + batch].to(device, torch.float32) for k in ("ref", "p0", "p1"))
            d0.append(net(ref, p0).flatten().cpu())
            d1.append(net(ref, p1).flatten().cpu())
    return agreement(torch.cat(d0), torch.cat(d1), data["judge"])


def pixel_two_afc(files, net, batch=50, device="cpu"):
    """2AFC score of a pixel distance (the lpips package's LPIPS-VGG) on the same triplets, read from their PNGs."""
    ref, p0, p1, judge = files
    d0, d1 = [], []
    with torch.no_grad():
        for i in range(0, len(ref), batch):
            r, a, b = (read_images(paths[i:i + batch]).to(device) for paths in (ref, p0, p1))
            d0.append(net(r, a).flatten().cpu())
            d1.append(net(r, b).flatten().cpu())
    return agreement(torch.cat(d0), torch.cat(d1), read_judges(judge))


def pixel_lpips(device):
    """The original LPIPS-VGG (lpips.LPIPS(net="vgg"): ImageNet VGG16 and its trained linear heads) to compare
    with, or None and one line saying why: the package needs torchvision and downloads VGG16's weights."""
    try:
        import lpips
        return lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    except Exception as e:  # ImportError without torchvision, URLError / OSError offline, ...
        said = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        print(f"LPIPS-VGG (pixels) not compared: {type(e).__name__}: {said}")
        return None


def report(net, val, files, pixel, device):
    """The table a training run ends with: each val subset's triplets, L-LPIPS's 2AFC and, when the lpips package
    loaded, pixel LPIPS-VGG's on the same triplets. Returns {subset: (triplets, L-LPIPS 2AFC, LPIPS-VGG 2AFC)}."""
    rows = {}
    for subset, data in val.items():
        theirs = pixel_two_afc(files[subset], pixel, device=device) if pixel is not None else None
        rows[subset] = (len(data["judge"]), two_afc(net, data, device=device), theirs)
    print("BAPPS val, 2AFC (agreement with the judges):")
    print("| subset | triplets | L-LPIPS 2AFC | LPIPS-VGG 2AFC |")
    print("|---|---|---|---|")
    for subset, (n, ours, theirs) in rows.items():
        print(f"| {subset} | {n} | {ours:.4f} | {'-' if theirs is None else f'{theirs:.4f}'} |")
    return rows


def encoder(name, device, variant=None, revision=None):
    """(identity, images -> latents) of the teacher whose latents L-LPIPS compares. SDXL / FLUX / a pipeline folder
    or hub id: its VAE alone (teachers.load_vae), not the pipeline. The embedded layout ("digits"): the teacher itself
    (its "VAE" is the identity: cheap)."""
    from teachers import load_teacher, load_vae, locate, vae_encode
    if locate(name, revision)[0] == "digits":
        if variant or revision:
            raise ValueError("--variant / --revision choose the files of a diffusers VAE; the embedded teacher has "
                             "none")
        teacher = load_teacher(name, device)
        return teacher.id, lambda x: teacher.encode_images(x.to(device))
    vae = load_vae(name, device, variant, revision)
    return name, lambda x: vae_encode(vae, x.to(device))


def train_step(net, ranker, opt, ref, p0, p1, judge):
    """One 2AFC training step, LPIPS's: both distances, the ranking net, BCE against the judges, Adam, w_l >= 0."""
    d0, d1 = net(ref, p0), net(ref, p1)
    # BCE between the ranking net's P(judge prefers p1 | d0, d1) and the judges' share
    loss = F.binary_cross_entropy_with_logits(ranker(d0, d1), judge)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    net.clamp_heads()
    return loss


def gather(paths, n):
    """The cached subsets in `paths` as one set of n triplets, filled in place: the train latents exist once in RAM
    (float16: SDXL 3.7 GB, FLUX 14.9 GB for BAPPS train), never twice as a concatenation would hold them."""
    out, at = None, 0
    for path in paths:
        part = lora.load(path)[0]
        if out is None:
            out = {k: v.new_empty((n, *v.shape[1:])) for k, v in part.items()}
        for k, v in part.items():
            out[k][at:at + len(v)] = v
        at += len(part["judge"])
        del part
    return out


def main(argv=None):
    import argparse
    import hashlib

    from tqdm import tqdm
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bapps", help="BAPPS root: 2afc/{train,val}/<subset>/{ref,p0,p1,judge}")
    p.add_argument("--teacher", default="sdxl", help="whose VAE encodes the patches: sdxl, flux, a diffusers pipeline "
                   "folder or hub id (only its vae/ is loaded), or digits / an embedded-layout folder")
    p.add_argument("--variant", default=None, help="the VAE's weight files variant, as from_pretrained's (e.g. fp16)")
    p.add_argument("--revision", default=None, help="the hub revision (branch, tag or commit) of the VAE")
    p.add_argument("--upsample", type=float, default=4, help="patch upsampling before encoding (64 px x 4 -> "
                   "256 px -> 32 x 32 SDXL latents)")
    p.add_argument("--width", type=float, default=1.0, help="trunk width multiplier (1 = VGG16's)")
    p.add_argument("--epochs", type=int, default=5, help="epochs at the full learning rate (5, then --decay-epochs 5: "
                   "the paper's 10 epochs, LPIPS's schedule)")
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
    from runs import load_optimizer, optimizer_tensors, state_path, writable_folder
    from teachers import CACHE, default_device
    device = args.device or default_device()
    # every bad input stops here, before a patch is encoded
    writable_folder(args.out)
    try:
        splits = {s: read_bapps(args.bapps, s) for s in ("train", "val")}
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    try:
        resumed = lora.load(state_path(args.out)) if args.resume else None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: cannot resume: {e}")
    try:
        teacher, encode = encoder(args.teacher, device, args.variant, args.revision)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")

    # encode every patch once, cached on disk: keyed by the VAE (teacher, a local folder's vae/ files, variant,
    # revision), the upsampling and every patch file's path, size and mtime: edited data or another VAE is encoded anew
    cached = {}
    folder = os.path.join(os.path.abspath(teacher), "vae") if os.path.isdir(teacher) else ""
    weights = [(f, os.stat(os.path.join(folder, f)).st_size, os.stat(os.path.join(folder, f)).st_mtime_ns)
               for f in sorted(os.listdir(folder))] if os.path.isdir(folder) else []  # a local VAE, as it is now
    for split, subsets in splits.items():
        for subset, files in subsets.items():
            stamp = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for fs in files for f in fs]
            vae = (teacher, folder, weights, args.variant, args.revision, args.upsample)
            key = hashlib.sha1(repr((*vae, stamp)).encode()).hexdigest()[:16]
            path = os.path.join(CACHE, "bapps", f"{key}.safetensors")
            if not os.path.exists(path):
                lora.save(path, load_subset(files, encode, args.upsample, desc=f"encode {split}/{subset}"),
                          {"teacher": teacher, "variant": args.variant, "revision": args.revision,
                           "upsample": args.upsample, "subset": f"{split}/{subset}"})
            cached[split, subset] = path
    del encode  # the VAE is done: its memory goes back before training
    train = gather([p for (s, _), p in cached.items() if s == "train"],
                   sum(len(files[0]) for files in splits["train"].values()))
    val = {sub: lora.load(p)[0] for (s, sub), p in cached.items() if s == "val"}
    channels = train["ref"].shape[1]

    torch.manual_seed(args.seed)
    net, ranker = LLPIPS(channels, args.width).to(device), RankNet().to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(ranker.parameters()), lr=args.lr, betas=(0.5, 0.999))
    epochs, epoch = args.epochs + args.decay_epochs, 0
    if resumed:
        state, meta = resumed
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
            # the cache stays float16 in RAM; a batch is cast to fp32 on its way to the device
            ref, p0, p1, judge = (train[k][idx].to(device, torch.float32) for k in ("ref", "p0", "p1", "judge"))
            loss = train_step(net, ranker, opt, ref, p0, p1, judge)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        net.eval()
        scores = {f"2afc_{sub}": two_afc(net, d, device=device) for sub, d in val.items()}
        print(f"epoch {epoch + 1}: val 2AFC " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in scores.items()))
        lora.save(state_path(args.out), {**{f"net.{k}": v for k, v in net.state_dict().items()},
                                         **{f"rank.{k}": v for k, v in ranker.state_dict().items()},
                                         **optimizer_tensors(opt)}, {"epoch": epoch + 1})
        save(args.out, net, {"teacher": teacher, "variant": args.variant or "", "revision": args.revision or "",
                             "upsample": args.upsample, "epoch": epoch + 1,
                             **{k: f"{v:.4f}" for k, v in scores.items()}})
    print(f"wrote {args.out}")
    # what it reached, beside the original pixel LPIPS-VGG on the same val triplets
    net.eval()
    return report(net, val, splits["val"], pixel_lpips(device), device)


if __name__ == "__main__":
    main()
