"""The project's own evaluator on the embedded digits teacher (the paper's CLIP score and FID, at toy scale), the
paper's tables at toy scale, and a CLIP score for real teachers.

    python eval.py --table teacher      # teacher DDIM at 25 / 8 / 4 / 3 / 2 steps (the yardstick for every stage)
    python eval.py --table cfg          # the teacher across CFG scales w (how its default w was chosen)
    python eval.py --table student --ckpt local.safetensors --steps 8 4 3 2
    python eval.py --table main --jobs 2   # Table 1 (45 min on 2 cores): teacher, LCM-style, stage 1 only, LogCD
    python eval.py --table ablation     # Table 3: local MSE -> local L-LPIPS -> + global -> + GAN -> + DMD
    python eval.py --table M            # Tables 4-6: M in {4, 8, 16}; --table p: p in 1..4; --table q: q in 1..4
    python eval.py --table main --quick # the same code on tiny trainings and 40 samples per row (CI: the table's shape)
    python eval.py --clip-score openai/clip-vit-large-patch14 --samples s.safetensors   # real teachers (below)
    python eval.py --train-classifier   # retrain the judge (deterministic; its weights are committed)

A small CNN trained deterministically on the digits is the judge:
  alignment = share of samples the classifier reads as the prompted digit (the CLIP-score analogue);
  FD        = Frechet distance between its penultimate features of the samples and of all 1797 real digits
              (the FID analogue).
Samples come from sample.py (the stable command line every script uses): 1000 per row, 100 per digit, fixed seed.
The paper's tables (--table main | ablation | M | p | q) train what they need with local_cd.py / global_cd.py at the
embedded presets, once per seed (seeds 0, 1, 2), into runs/eval/<recipe>/seed<s>/, and reuse a finished run; each
cell is mean +/- std over the 3 seeds (teacher rows: 3 sampling seeds).
For SDXL / FLUX students, `--clip-score MODEL --samples FILE` scores `sample.py --save-tensors FILE` output (e.g.
from MSCOCO / MJHQ prompt files) with transformers' CLIPModel: 100 x cosine(image, prompt), averaged.
"""
import argparse
import contextlib
import json
import math
import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from teachers import load_teacher
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
    """Runs sample.py's main with the command line a user would type (in this process); returns (images, labels)."""
    import sample as sample_py
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "s.safetensors")
        argv = [*source, "--steps", str(steps), "--per-prompt", str(per_prompt), "--seed", str(seed),
                "--save-tensors", out, "--out", grid or os.path.join(tmp, "g.png"), *extra]
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            sample_py.main(argv)
        t, _ = lora.load(out)
    return t["images"], t["labels"]


def table(rows):
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


# ---- the paper's tables at toy scale -------------------------------------------------------------------------------

RUNS = os.path.join(HERE, "runs", "eval")
SEEDS = (0, 1, 2)
# stage-1 recipes (local_cd.py flags) and stage-2 recipes (global_cd.py flags, on top of a stage-1 recipe)
STAGE1 = {"mse": [], "llpips": ["--d", "llpips"], "M1": ["--M", "1"], "M4": ["--M", "4"], "M16": ["--M", "16"]}
STAGE2 = {"full": [], "cons": ["--lambda1", "0", "--lambda2", "0"], "gan": ["--lambda2", "0"],
          **{f"p{p}": ["--p", str(p)] for p in (1, 2, 4)}, **{f"q{q}": ["--q", str(q)] for q in (1, 2, 3)}}
QUICK1 = ["--iters", "2", "--batch", "8", "--trajectories", "2", "--buffer", "64", "--save-every", "2"]
QUICK2 = ["--iters", "2", "--batch", "4", "--save-every", "2"]
STEPS = (4, 3, 2)
SHARE = 1.0  # the share of the machine a training here has: 1 / --jobs

# table -> rows: (label, stage-1 recipe or None for the teacher, stage-2 recipe or None, sampler, step counts)
TABLES = {
    "main": [("teacher DDIM (CFG: 2 calls per step)", None, None, "psi", (25,) + STEPS),
             ("LCM-style: local CD with M = 1, LCM sampler", "M1", None, "lcm", STEPS),
             ("stage 1 only (local CD, M = 8; PCM-style, 8 phases)", "mse", None, "psi", STEPS),
             ("LogCD (stage 1 + stage 2)", "mse", "full", "psi", STEPS)],
    "ablation": [("local CD, MSE", "mse", None, "psi", STEPS),
                 ("local CD, L-LPIPS", "llpips", None, "psi", STEPS),
                 ("+ global CD (consistency only)", "llpips", "cons", "psi", STEPS),
                 ("+ GAN (lambda1 = 0.1)", "llpips", "gan", "psi", STEPS),
                 ("+ DMD (lambda2 = 1): LogCD with L-LPIPS in both stages", "llpips", "full", "psi", STEPS)],
    "M": [(f"LogCD, M = {m}", f"M{m}" if m != 8 else "mse", "full", "psi", STEPS) for m in (4, 8, 16)],
    "p": [(f"LogCD, p = {p}", "mse", f"p{p}" if p != 3 else "full", "psi", STEPS) for p in (1, 2, 3, 4)],
    "q": [(f"LogCD, q = {q}", "mse", f"q{q}" if q != 4 else "full", "psi", STEPS) for q in (1, 2, 3, 4)],
}


def train(stage, argv, seed, folder):
    """Trains one stage (local_cd / global_cd main, the command line a user would type plus --seed and --out) into
    folder/seed<s>/, or reuses the run if it finished before (its .done.json). An interrupted run (a checkpoint and
    its resume state, no .done.json) continues with --resume, which is exact: the result equals an uninterrupted
    run. Returns (checkpoint, training seconds): wall time (a resumed run adds its earlier parts up to their last
    save) times the share of the machine the run had (1 / --jobs), so that costs compare across --jobs."""
    import global_cd
    import local_cd
    import runs
    out = os.path.join(folder, f"seed{seed}", f"{stage}.safetensors")
    done, part = out + ".done.json", out + ".part.json"
    if os.path.exists(done) and os.path.exists(out):
        with open(done) as f:
            return out, json.load(f)["seconds"]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    argv = [*argv, "--seed", str(seed), "--out", out]
    fresh = [*argv, "--overwrite"]  # this folder is eval's own: a part that cannot resume starts over
    # part.json: when this part started, its share of the machine, and the seconds its earlier, interrupted parts
    # took; an interrupted part counts until its last save (the checkpoint's mtime): --resume redoes what came after
    resume = all(os.path.exists(f) for f in (out, runs.state_path(out), part))
    before = 0.0
    if resume:
        with open(part) as f:
            p = json.load(f)
        before = p["before"] + max(os.path.getmtime(out) - p["start"], 0.0) * p["share"]

    def started(before):  # -> the perf_counter this part started at
        with lora.atomic(part) as tmp, open(tmp, "w") as f:
            json.dump({"start": time.time(), "share": SHARE, "before": before}, f)
        return time.perf_counter()
    t0 = started(before)
    with open(out + ".log", "a" if resume else "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        main = (local_cd if stage == "local" else global_cd).main
        try:
            main(argv + ["--resume"] if resume else fresh)
        except SystemExit as e:
            if not (resume and "cannot resume" in str(e)):  # e.g. killed between the state and checkpoint writes
                raise
            print(f"{e}; starting over", flush=True)
            before = 0.0
            t0 = started(before)
            main(fresh)
    seconds = before + (time.perf_counter() - t0) * SHARE
    with lora.atomic(done) as tmp, open(tmp, "w") as f:
        json.dump({"seconds": seconds, "share": SHARE, "argv": argv, "resumed": resume}, f)
    os.remove(part)
    return out, seconds


def student(s1, s2, seed, runs, quick):
    """The checkpoint of stage-1 recipe s1 (then stage-2 recipe s2) for one seed, and its training seconds."""
    ckpt, sec = train("local", STAGE1[s1] + (QUICK1 if quick else []), seed, os.path.join(runs, f"local-{s1}"))
    if s2 is None:
        return ckpt, sec
    ckpt2, sec2 = train("global", ["--init", ckpt, *STAGE2[s2], *(QUICK2 if quick else [])], seed,
                        os.path.join(runs, f"global-{s1}-{s2}"))
    return ckpt2, sec + sec2


def source(s1, s2, sampler, seed, runs, quick):
    """A table row's sample.py flags for one seed (the teacher, or the student trained for it) and its training
    seconds (0 for the teacher)."""
    if s1 is None:
        return ["--teacher", "digits"], [], 0.0
    ckpt, sec = student(s1, s2, seed, runs, quick)
    return ["--ckpt", ckpt], ["--sampler", sampler], sec


def run_table(name, runs, quick, seeds, jobs):
    """--jobs N: does the table's missing work N at a time, in N processes of cores / N threads each, in three rounds
    (a round's tasks need only earlier rounds): the stage-1 trainings and the teacher's rows; the stage-2 trainings
    and the stage-1-only rows; the stage-2 rows. A row is scored per (seed, steps): 1000 samples, then alignment and
    FD, remembered in scores.json. paper_table then finds all of it done. On 2 CPU cores, 2 jobs of 1 thread get
    1.35x the work of 1 job of 2 threads done; the results equal a --jobs 1 run up to float rounding (the thread
    count changes the order of sums), not bit for bit."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    rows, per_prompt = TABLES[name], 4 if quick else 100
    scores = [(s1, s2, sampler, k, seed) for _, s1, s2, sampler, steps in rows for seed in seeds for k in steps]
    s1s = dict.fromkeys(s1 for _, s1, _, _, _ in rows if s1 is not None)
    s2s = dict.fromkeys((s1, s2) for _, s1, s2, _, _ in rows if s2 is not None)
    rounds = [[("train", (s1, None, seed, runs, quick)) for s1 in s1s for seed in seeds] +
              [("score", (*sc, runs, quick, per_prompt)) for sc in scores if sc[0] is None],
              [("train", (s1, s2, seed, runs, quick)) for s1, s2 in s2s for seed in seeds] +
              [("score", (*sc, runs, quick, per_prompt)) for sc in scores if sc[0] is not None and sc[1] is None],
              [("score", (*sc, runs, quick, per_prompt)) for sc in scores if sc[1] is not None]]
    with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), initializer=_worker,
                             initargs=(max(1, torch.get_num_threads() // jobs), 1 / jobs)) as pool:
        for tasks in rounds:
            for scored in pool.map(_task, tasks):
                remember(runs, scored)  # here, in one process: workers finishing together cannot lose an entry


def _worker(threads, share):
    global SHARE
    torch.set_num_threads(threads)
    SHARE = share


def _task(task):
    """One unit of run_table's work in a worker: a training, or one row's score for one (seed, steps)."""
    kind, args = task
    if kind == "train":
        student(*args)
        return {}
    s1, s2, sampler, k, seed, runs, quick, per_prompt = args
    src, extra, _ = source(s1, s2, sampler, seed, runs, quick)
    key = score_key(src, k, seed, per_prompt, extra)
    if key in read_scores(runs):
        return {}
    return {key: score(*sample(src, k, seed, per_prompt, extra), load_classifier()[0])}


def score_key(source, k, seed, per_prompt, extra):
    """scores.json's key: the sample.py command line, plus each checkpoint's size and mtime (a retrained
    checkpoint is scored again)."""
    stamp = [(os.path.getsize(f), os.path.getmtime(f)) for f in source if f.endswith(".safetensors")]
    return json.dumps([source, stamp, k, seed, per_prompt, list(extra)])


def read_scores(runs):
    path = os.path.join(runs, "scores.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def remember(runs, scored):
    """Adds {key: score} to runs/scores.json, merged with what another eval run wrote meanwhile; atomic."""
    if not scored:
        return
    os.makedirs(runs, exist_ok=True)
    path = os.path.join(runs, "scores.json")
    with lora.atomic(path) as tmp, open(tmp, "w") as f:  # a reader never sees half a file
        json.dump({**read_scores(runs), **scored}, f, indent=0)


def cached_score(source, k, seed, per_prompt, extra, grid, net, runs):
    """score(sample(...)), remembered in runs/scores.json: tables share rows (stage 1 only = local MSE, p = 3 =
    q = 4 = M = 8 = LogCD) and the teacher's rows cost minutes. With a grid it samples again to draw it."""
    key = score_key(source, k, seed, per_prompt, extra)
    value = read_scores(runs).get(key)
    if value is None or grid:
        value = score(*sample(source, k, seed, per_prompt, extra, grid), net)
        remember(runs, {key: value})
    return value


def mean_std(values):
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)


def paper_table(name, runs=RUNS, quick=False, seeds=SEEDS, grids=None, jobs=1):
    """Rows of one of the paper's tables: per (row, steps), alignment and FD as mean +/- std over the seeds, model
    calls per sample, training minutes (mean over seeds, both stages). Does what is missing (--jobs at a time)."""
    if jobs > 1:
        run_table(name, runs, quick, seeds, jobs)
    net, _ = load_classifier()
    per_prompt = 4 if quick else 100
    rows = []
    for label, s1, s2, sampler, steps in TABLES[name]:
        scores, minutes = {k: [] for k in steps}, []
        for seed in seeds:
            src, extra, sec = source(s1, s2, sampler, seed, runs, quick)
            if s1 is not None:
                minutes.append(sec / 60)
            for k in steps:
                grid = None
                if grids and seed == seeds[0]:
                    os.makedirs(grids, exist_ok=True)
                    grid = os.path.join(grids, f"{name}_{s1 or 'teacher'}_{s2 or 'none'}_{k}.png")
                scores[k].append(cached_score(src, k, seed, per_prompt, extra, grid, net, runs))
        for k in steps:
            a, fd = (mean_std([sc[m] for sc in scores[k]]) for m in ("alignment", "FD"))
            rows.append({"row": label, "steps": k, "calls": 2 * k if s1 is None else k,
                         "alignment": f"{a[0]:.3f} ± {a[1]:.3f}", "FD": f"{fd[0]:.2f} ± {fd[1]:.2f}",
                         "training (min)": f"{sum(minutes) / len(minutes):.1f}" if minutes else "-",
                         "_alignment": a[0], "_FD": fd[0]})
            print(table([{k_: v for k_, v in rows[-1].items() if not k_.startswith("_")}]).splitlines()[-1],
                  flush=True)
    return rows


def plot(rows, path, width=900, H=270):
    """metrics against steps, one line per table row: FD (left) and alignment (right), plots H pixels high, the
    legend below; a plain PIL drawing."""
    from PIL import Image, ImageDraw
    colors = [(0, 0, 0), (214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    labels = list(dict.fromkeys(r["row"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    img = Image.new("RGB", (width, H + 48 + 12 * len(labels)), "white")
    d = ImageDraw.Draw(img)
    W, pad = width // 2, 50
    for panel, metric in enumerate(("_FD", "_alignment")):
        x0 = panel * W + pad
        vals = [r[metric] for r in rows]
        lo, hi = min(vals), max(vals)
        hi = hi + (hi - lo) * 0.05 + 1e-9
        lo = lo - (hi - lo) * 0.05

        def xy(k, v):  # steps on a log axis
            fx = (math.log(k) - math.log(steps[0])) / max(math.log(steps[-1]) - math.log(steps[0]), 1e-9)
            return x0 + fx * (W - 2 * pad), 20 + (1 - (v - lo) / (hi - lo)) * (H - 20)
        d.rectangle([x0, 20, x0 + W - 2 * pad, H], outline=(160, 160, 160))
        d.text((x0, 4), ("FD (lower is better)" if metric == "_FD" else "alignment (higher is better)"), fill=0)
        for k in steps:
            x, _ = xy(k, lo)
            d.text((x - 4, H + 4), str(k), fill=0)
        for v in (lo, (lo + hi) / 2, hi):
            d.text((x0 - 45, xy(steps[0], v)[1] - 6), f"{v:.3g}", fill=0)
        d.text((x0 + W // 2 - 60, H + 18), "sampling steps", fill=0)
        for i, label in enumerate(labels):
            pts = [xy(r["steps"], r[metric]) for r in rows if r["row"] == label]
            if len(pts) > 1:
                d.line(pts, fill=colors[i % len(colors)], width=2)
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colors[i % len(colors)])
    for i, label in enumerate(labels):
        d.rectangle([pad, H + 38 + 12 * i, pad + 10, H + 46 + 12 * i], fill=colors[i % len(colors)])
        d.text((pad + 16, H + 35 + 12 * i), label, fill=0)
    with lora.atomic(path) as tmp:
        img.save(tmp, format="PNG")


# ---- CLIP score for real teachers -----------------------------------------------------------------------------------

@torch.no_grad()
def clip_score(model, tokenizer, images, prompts, batch=32):
    """CLIP score of images (N, 3, H, W) in [-1, 1] against their prompts: 100 x max(cos(image, text), 0), mean
    over the images (the metric of the paper's Tables 1-2). model: a transformers CLIPModel."""
    c = model.config.vision_config
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIP's preprocessing
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(images), batch):
        x = (images[i:i + batch].float() + 1) / 2
        x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        tok = tokenizer(prompts[i:i + batch], padding=True, truncation=True, return_tensors="pt").to(device)
        f_img = model.get_image_features(pixel_values=((x - mean) / std).to(device))
        f_txt = model.get_text_features(**tok)
        # transformers 5 returns outputs whose pooler_output is the projected embedding; 4.x the tensor itself
        f_img, f_txt = (f if torch.is_tensor(f) else f.pooler_output for f in (f_img, f_txt))
        total += (100 * F.cosine_similarity(f_img, f_txt).clamp_min(0)).sum().item()
    return total / len(images)


def clip_score_file(model_path, samples):
    """`sample.py --save-tensors` output (images, prompts in the metadata, per-prompt samples in order) scored with a
    CLIPModel and its tokenizer from model_path (hub id or folder)."""
    from transformers import AutoTokenizer, CLIPModel
    tensors, meta = lora.load(samples)
    images, prompts = tensors["images"], meta["prompts"].split("|")
    per_prompt = len(images) // len(prompts)
    if images.shape[1] != 3:
        raise SystemExit(f"error: {samples} holds {images.shape[1]}-channel images; CLIP scores RGB images "
                         "(SDXL / FLUX samples; the embedded teacher has its own judge: --table)")
    model = CLIPModel.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return clip_score(model, tokenizer, images, [p for p in prompts for _ in range(per_prompt)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=["teacher", "cfg", "student", *TABLES], help="which table to print")
    p.add_argument("--ckpt", default="local.safetensors", help="the student checkpoint of --table student")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 4, 3, 2], help="step counts of --table student")
    p.add_argument("--teacher", default="digits", help="an embedded-layout teacher (name or folder)")
    p.add_argument("--cfg", type=float, default=None, help="w for --table teacher (default: the teacher's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-prompt", type=int, default=100, help="samples per digit (1000 per row by default)")
    p.add_argument("--runs", default=RUNS, help="where the paper's tables keep their trainings (reused when finished)")
    p.add_argument("--quick", action="store_true", help="the paper's tables on 2-iteration trainings, 2 seeds and 40 "
                   "samples per row, into a temporary folder: checks the table's shape, not its numbers")
    p.add_argument("--jobs", type=int, default=1, help="the paper's tables: trainings and scorings at a time, each on "
                   "cores / jobs threads (2 on 2 cores: 1.35x faster, equal up to float rounding; 1 reproduces the "
                   "README pipeline's checkpoints bit for bit)")
    p.add_argument("--grids", default=None, help="the paper's tables: write each row's seed-0 sample grid into DIR")
    p.add_argument("--figure", default=None, help="the paper's tables: PNG of FD and alignment against steps")
    p.add_argument("--clip-score", default=None, metavar="MODEL", help="CLIPModel hub id or folder: score --samples")
    p.add_argument("--samples", default=None, help="sample.py --save-tensors output (SDXL / FLUX) for --clip-score")
    p.add_argument("--train-classifier", action="store_true")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be 1 or more, got {args.jobs}")
    if args.train_classifier:
        train_classifier()
    if args.clip_score:
        if not args.samples or not os.path.exists(args.samples):
            raise SystemExit("error: --clip-score needs --samples FILE (python sample.py ... --save-tensors FILE)")
        cs = clip_score_file(args.clip_score, args.samples)
        print(f"CLIP score {cs:.2f} ({args.samples}, {args.clip_score})")
        return cs
    if not args.table:
        return
    if args.table in TABLES:
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            runs = stack.enter_context(tempfile.TemporaryDirectory()) if args.quick else args.runs
            rows = paper_table(args.table, runs, args.quick, SEEDS[:2] if args.quick else SEEDS, args.grids,
                               args.jobs)
        if args.figure:
            plot(rows, args.figure)
        n = 2 if args.quick else len(SEEDS)
        print(f"\n--table {args.table}: mean ± std over {n} seeds, {40 if args.quick else 1000} samples per row, "
              f"{time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} CPU threads\n")
        print(table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]))
        return rows
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
    return rows


if __name__ == "__main__":
    main()
