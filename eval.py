"""The project's own evaluator on the embedded digits teacher (the paper's CLIP score and FID, at toy scale).

    python eval.py --table teacher      # teacher DDIM at 25 / 8 / 4 / 3 / 2 steps (the yardstick for every stage)
    python eval.py --table cfg          # the teacher across CFG scales w (how its default w was chosen)
    python eval.py --table student --ckpt local.safetensors --steps 8 4 3 2
    python eval.py --train-classifier   # retrain the judge (deterministic; its weights are committed)

A small CNN trained deterministically on the digits is the judge:
  alignment = share of samples the classifier reads as the prompted digit (the CLIP-score analogue);
  FD        = Frechet distance between its penultimate features of the samples and of all 1797 real digits
              (the FID analogue).
Samples come from `sample.py --save-tensors` (the stable command line every script uses): 1000 per row, 100 per
digit, fixed seed.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from local_cd import load_teacher
from toy.digits import load_digits, split

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSIFIER = os.path.join(HERE, "toy", "classifier.safetensors")


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.trunk(x))


def train_classifier(path=CLASSIFIER, epochs=30, seed=0):
    """Deterministic: fixed seed, fixed split, +-1 pixel random shifts so it judges shapes, not exact positions."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    x, y = load_digits()
    tr, te = split(len(x))
    net = Classifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        for idx in torch.randperm(len(tr)).split(64):
            xb = F.pad(x[tr[idx]], (1, 1, 1, 1), value=-1)
            i, j = torch.randint(0, 3, (2,))
            xb = xb[:, :, i:i + 16, j:j + 16]
            loss = F.cross_entropy(net(xb), y[tr[idx]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[te]).argmax(1) == y[te]).float().mean().item()
    lora.save(path, net.state_dict(), {"held_out_accuracy": f"{acc:.4f}", "held_out": len(te), "train": len(tr),
                                       "trained_by": "python eval.py --train-classifier"})
    print(f"classifier: held-out accuracy {acc:.4f} on {len(te)} digits (trained on {len(tr)}); wrote {path}")
    return net


def load_classifier():
    if not os.path.exists(CLASSIFIER):
        raise SystemExit(f"error: {CLASSIFIER} is missing: run `python eval.py --train-classifier`")
    sd, meta = lora.load(CLASSIFIER)
    net = Classifier()
    net.load_state_dict(sd)
    return net.eval(), meta


def frechet(f1, f2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64 with symmetric eigendecompositions."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    S1, S2 = torch.cov(f1.T), torch.cov(f2.T)
    e, V = torch.linalg.eigh(S1)
    r1 = V @ torch.diag(e.clamp_min(0).sqrt()) @ V.T
    cross = torch.linalg.eigvalsh(r1 @ S2 @ r1).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).pow(2).sum() + S1.trace() + S2.trace() - 2 * cross).item()


@torch.no_grad()
def score(images, labels, net=None):
    """{'alignment', 'FD'} of decoded digit images (N, 1, 16, 16) in [-1, 1] prompted with `labels`."""
    net = net or load_classifier()[0]
    real, _ = load_digits()
    f_real, f = net.trunk(real), net.trunk(images.float())
    return {"alignment": (net.head(f).argmax(1) == labels).float().mean().item(), "FD": frechet(f, f_real)}


def sample(source, steps, seed=0, per_prompt=100, extra=(), grid=None):
    """Runs sample.py exactly as a user would; returns (images, labels)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "s.safetensors")
        cmd = [sys.executable, os.path.join(HERE, "sample.py"), *source, "--steps", str(steps), "--per-prompt",
               str(per_prompt), "--seed", str(seed), "--save-tensors", out, "--out", grid or os.path.join(tmp, "g.png"),
               *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        t, _ = lora.load(out)
    return t["images"], t["labels"]


def table(rows):
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=["teacher", "cfg", "student"], help="which table to print")
    p.add_argument("--ckpt", default="local.safetensors", help="the student checkpoint of --table student")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 4, 3, 2], help="step counts of --table student")
    p.add_argument("--teacher", default="digits", help="an embedded-layout teacher (name or folder)")
    p.add_argument("--cfg", type=float, default=None, help="w for --table teacher (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-prompt", type=int, default=100, help="samples per digit (1000 per row by default)")
    p.add_argument("--train-classifier", action="store_true")
    args = p.parse_args()
    if args.train_classifier:
        train_classifier()
    if not args.table:
        return
    net, meta = load_classifier()
    real, y = load_digits()
    g = torch.Generator().manual_seed(args.seed)
    sub = torch.randperm(len(real), generator=g)[:10 * args.per_prompt]
    rows = [{"row": f"real digits ({len(sub)} of {len(real)})", "steps": "-", "w": "-", "clip": "-",
             **score(real[sub], y[sub], net)}]
    src = ["--teacher", args.teacher]
    if args.table == "teacher":
        w = args.cfg if args.cfg is not None else load_teacher(args.teacher, "cpu").default_w
        for clip in (False, True):
            for n in (25, 8, 4, 3, 2):
                x, lab = sample(src, n, args.seed, args.per_prompt, ["--cfg", str(w)] + (["--clip"] if clip else []))
                rows.append({"row": "teacher DDIM", "steps": n, "w": w, "clip": clip,
                             **score(x, lab, net)})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    elif args.table == "student":
        for k in args.steps:
            x, lab = sample(["--ckpt", args.ckpt], k, args.seed, args.per_prompt)
            rows.append({"row": os.path.basename(args.ckpt), "steps": k, "w": "-", "clip": False, **score(x, lab, net)})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    else:
        for w in (1.0, 1.5, 2.0, 3.0, 5.0, 7.0):
            x, lab = sample(src, 25, args.seed, args.per_prompt, ["--cfg", str(w)])
            rows.append({"row": "teacher DDIM", "steps": 25, "w": w, "clip": False, **score(x, lab, net)})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nclassifier held-out accuracy {meta.get('held_out_accuracy')}; seed {args.seed}; "
          f"{10 * args.per_prompt} samples per row\n")
    print(table(rows))


if __name__ == "__main__":
    main()
