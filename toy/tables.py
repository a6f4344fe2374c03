"""toy/tables.py: the embedded digits teacher's judge, and the paper's tables at toy scale; what `python eval.py
--table ...`, `--train-classifier` and `--replot` run (eval.py holds the one command line: its --help lists every
command).

A small CNN trained deterministically on the digits is the judge:
  alignment = share of samples the classifier reads as the prompted digit (the CLIP-score analogue);
  FD        = Frechet distance between its penultimate features of the samples and of all 1797 real digits
              (the FID analogue).
Samples come from sample.py (the stable command line every script uses): 1000 per row, 100 per digit, fixed seed.
The paper's tables (--table main | ablation | M | p | q) train what they need with local_cd.py / global_cd.py at the
embedded presets, once per seed (seeds 0, 1, 2), into runs/eval/<recipe>/seed<s>/, and reuse a finished run; each
cell is mean +/- std over the 3 seeds (teacher rows: 3 sampling seeds), every student at 4, 3, 2 and 1 steps. Table
1's baselines get LogCD's training budget in model forwards and a grid of learning rates and iterations, judged on
seed 3 (never reported): the grid and its picks print below the table.
The tables' printer (`table`), mean and std (`mean_std`) and figure of metrics against steps (`plot`, `replot`)
serve eval.py's real-teacher scores (--score, --plot-scores) too.
"""
import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from local_cd import PRESETS
from sample import SOLVERS
from teachers import load_teacher
from toy.digits import load_digits, split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
CLASSIFIER = os.path.join(ROOT, "toy", "classifier.safetensors")


# ---- the judge: a digit classifier, its alignment and FD, samples through sample.py --------------------------------

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

RUNS = os.path.join(ROOT, "runs", "eval")
SEEDS = (0, 1, 2)
TUNE_SEED = 3  # the baselines' grids are trained and judged on this seed, which no table reports
# stage-1 recipes (local_cd.py flags) and stage-2 recipes (global_cd.py flags, on top of a stage-1 recipe)
STAGE1 = {"mse": [], "llpips": ["--d", "llpips"], "M1": ["--M", "1"], "M4": ["--M", "4"], "M16": ["--M", "16"]}
STAGE2 = {"full": [], "cons": ["--lambda1", "0", "--lambda2", "0"], "gan": ["--lambda2", "0"],
          "dmd": ["--lambda1", "0"], "dmd1": ["--dmd-input", "one_step"], "any": ["--jump", "any"],
          "cons_mse": ["--lambda1", "0", "--lambda2", "0", "--d", "mse"], "full_mse": ["--d", "mse"],
          "cons_w3": ["--lambda1", "0", "--lambda2", "0", "--w", "3"], "full_w3": ["--w", "3"],
          "full_wt2": ["--w-target", "2"], "full_wt3": ["--w-target", "3"],
          "sampler": ["--inputs", "sampler"], "sampler_wt2": ["--inputs", "sampler", "--w-target", "2"],
          "sampler_dmd1": ["--inputs", "sampler", "--dmd-input", "one_step"], "lr1e4": ["--lr", "1e-4"],
          "lr1e4_dmd1": ["--lr", "1e-4", "--dmd-input", "one_step"],
          **{f"p{p}": ["--p", str(p)] for p in (1, 2, 4)}, **{f"q{q}": ["--q", str(q)] for q in (1, 2, 3)}}
QUICK = ["--iters", "2", "--save-every", "2", "--val-every", "0"]  # --quick: 2-iteration trainings, no validation grids
QUICK1 = [*QUICK, "--batch", "8", "--trajectories", "2", "--buffer", "64"]
QUICK2 = [*QUICK, "--batch", "4"]
STEPS = (4, 3, 2, 1)  # every student row: its model(s) at 4, 3, 2 and 1 steps
TEACHER_STEPS = (25, 4, 3, 2, 1)
SHARE = 1.0  # the share of the machine a training here has: 1 / --jobs
TEACHER = "digits"  # the tables' teacher (--teacher): the embedded one, or another of its layout
ROWS = None  # --rows: parts of the labels of the rows to make (None: every row)

# ---- Table 1's baselines, and LogCD's stage 2, each tuned on TUNE_SEED ----------
# Each baseline gets LogCD's training budget in model forwards (a CFG step counts 2): about 138K per seed at the
# embedded presets they were tuned at (stage 2 at 120 iterations, now 160; the tables' forwards column has each run's
# count). Stage 1 with M <= 4 spends about 164 forwards an iteration (64 pairs, 2.56 each), the DMD2-style stage 2
# about 1256 (32 samples, 39 each: its GAN's real side is the teacher's p steps per segment over the sampler's jump):
# 850 and 110 iterations. LogCD gets the same search on its stage 2, up to that budget's 120 iterations, after the
# preset's stage 1.
STAGE1_LR, STAGE2_LR = (1e-4, 3e-4, 1e-3), (3e-5, 1e-4, 3e-4)  # around each stage's preset: 1e-3, 3e-5
GRID_PARTS = (4, 2, 1)  # a grid's iterations: the budget / 4, / 2 and all of it (one training, resumed twice)
CHAIN = {}  # a grid recipe -> the shorter one it continues (--resume is exact: the same as training it at once)
DMD2 = ["--init", "teacher", "--lambda0", "0", "--inputs", "sampler"]  # distribution matching + GAN, no stage 1


def grid(name, flags, lrs, iters, sampler, s1=None):
    """A grid of learning rates lrs by lengths iters / GRID_PARTS: one recipe per point, registered as
    name_lr<lr>_it<n> in STAGE1 (a stage-1 grid: s1 = "") or STAGE2 (from stage-1 recipe s1, or None: from the
    teacher itself). Returns its points (s1, s2, sampler)."""
    recipes, points = STAGE1 if s1 == "" else STAGE2, []
    for lr in lrs:
        before = None
        for part in GRID_PARTS:
            key = f"{name}_lr{lr:g}_it{iters // part}"
            recipes[key] = [*flags, "--lr", f"{lr:g}", "--iters", str(iters // part)]
            if before:
                CHAIN[key] = before
            before = key
            points.append((key, None, sampler) if s1 == "" else (s1, key, sampler))
    return points


# baseline -> (its grid points, the step counts the judge reads); picked: the lowest geometric-mean FD over them
BASELINES = {
    "solver": ([(None, None, s) for s in SOLVERS], (4, 3, 2)),  # the teacher's best diffusers solver (1 step: DDIM)
    "lcm": (grid("M1", ["--M", "1"], STAGE1_LR, 850, "lcm", ""), STEPS),
    **{f"pcm{k}": (grid(f"M{k}", ["--M", str(k)], STAGE1_LR, 850, "psi", ""), (k,)) for k in (1, 2, 3, 4)},
    "dmd2": (grid("dmd2", DMD2, STAGE2_LR, 110, "psi"), STEPS),
    "logcd": (grid("logcd", [], (1e-5, 3e-5, 1e-4), 120, "psi", "mse"), STEPS),  # stage 2's lr and length
}

# rows the tables share
TEACHER4 = ("teacher DDIM (CFG: 2 calls per step)", None, None, "psi", (25, 4))
STAGE1_ONLY = ("stage 1 only (local CD, MSE)", "mse", None, "psi", STEPS)
RECIPE = ("LogCD (the paper's recipe, the README's)", "mse", "full", "psi", STEPS)
SAMPLER_DMD1 = ("LogCD, --inputs sampler --dmd-input one_step", "mse", "sampler_dmd1", "psi", STEPS)
# table -> rows: (label, stage-1 recipe (None: the teacher, or stage 2 from it; "tuned": a baseline's pick),
# stage-2 recipe or None (with "tuned": the baseline), sampler (teacher rows: the solver), step counts)
TABLES = {
    "main": [("teacher DDIM (CFG: 2 calls per step)", None, None, "psi", TEACHER_STEPS),
             ("teacher, the best diffusers solver (tuned)", "tuned", "solver", None, STEPS),
             ("LCM-style: M = 1, LCM sampler (tuned)", "tuned", "lcm", None, STEPS),
             ("PCM-style: M = k phases for k steps, a model per k (tuned)", "tuned", "pcm", None, STEPS),
             ("DMD2-style: DMD + GAN from the teacher, no consistency (tuned)", "tuned", "dmd2", None, STEPS),
             ("stage 1 only (local CD, M = 8)", "mse", None, "psi", STEPS),
             ("LogCD (stage 1 + stage 2)", "mse", "full", "psi", STEPS),
             ("LogCD, stage 2's lr and length tuned as the baselines' (tuned)", "tuned", "logcd", None, STEPS)],
    "ablation": [("local CD, MSE", "mse", None, "psi", STEPS),
                 ("local CD, L-LPIPS", "llpips", None, "psi", STEPS),
                 ("+ global CD (consistency only)", "llpips", "cons", "psi", STEPS),
                 ("+ GAN (lambda1 = 0.1)", "llpips", "gan", "psi", STEPS),
                 ("+ DMD (lambda2 = 1): LogCD with L-LPIPS in both stages", "llpips", "full", "psi", STEPS)],
    # what each stage-2 term does to alignment and FD, from the README's stage 1 (MSE), at 1 to 4 steps
    "terms": [TEACHER4, STAGE1_ONLY,
              ("+ global consistency only", "mse", "cons", "psi", STEPS),
              ("+ GAN (lambda1 = 0.1), no DMD", "mse", "gan", "psi", STEPS),
              ("+ DMD (lambda2 = 1), no GAN", "mse", "dmd", "psi", STEPS),
              ("+ GAN + DMD = LogCD (the README's recipe)", "mse", "full", "psi", STEPS),
              ("global consistency only, d = MSE (not L-LPIPS)", "mse", "cons_mse", "psi", STEPS),
              ("LogCD, d = MSE in stage 2", "mse", "full_mse", "psi", STEPS),
              ("global consistency only, w = 3 in stage 2 (stage 1: 1.5)", "mse", "cons_w3", "psi", STEPS),
              ("LogCD, w = 3 in stage 2 (target and DMD real score)", "mse", "full_w3", "psi", STEPS),
              ("LogCD, target at w = 2, DMD real score at 1.5 (--w-target 2)", "mse", "full_wt2", "psi", STEPS),
              ("LogCD, target at w = 3, DMD real score at 1.5 (--w-target 3)", "mse", "full_wt3", "psi", STEPS),
              ("LogCD, sampled with fresh noise at each step (sample.py --sampler lcm)", "mse", "full", "lcm", STEPS),
              ("LogCD, trained on the student samplers' own steps (--inputs sampler)", "mse", "sampler", "psi",
               STEPS)],
    # the options for a 1-step student, beside the paper's recipe
    "onestep": [TEACHER4,
                ("LogCD (the README's recipe: DMD on x0 at t_m)", "mse", "full", "psi", STEPS),
                ("LogCD, DMD on the 1-step sample (--dmd-input one_step)", "mse", "dmd1", "psi", STEPS),
                ("LogCD, t_n any lower milestone (--jump any)", "mse", "any", "psi", STEPS),
                ("LogCD, lr 1e-4 (preset: 3e-5)", "mse", "lr1e4", "psi", STEPS),
                ("LogCD, lr 1e-4, DMD on the 1-step sample", "mse", "lr1e4_dmd1", "psi", STEPS)],
    # the 1-4-step targets, on the embedded teacher; and on a second one (--teacher toy/teacher_w24) the paper's
    # recipe and the option best at 1 and 4 steps on the embedded one
    "targets": [TEACHER4, STAGE1_ONLY, RECIPE,
                ("LogCD, --inputs sampler", "mse", "sampler", "psi", STEPS),
                ("LogCD, --inputs sampler --w-target 2", "mse", "sampler_wt2", "psi", STEPS),
                SAMPLER_DMD1],
    "second": [TEACHER4, STAGE1_ONLY, RECIPE, SAMPLER_DMD1],
    "M": [(f"LogCD, M = {m}", f"M{m}" if m != 8 else "mse", "full", "psi", STEPS) for m in (4, 8, 16)],
    "p": [(f"LogCD, p = {p}", "mse", f"p{p}" if p != 3 else "full", "psi", STEPS) for p in (1, 2, 3, 4)],
    "q": [(f"LogCD, q = {q}", "mse", f"q{q}" if q != 4 else "full", "psi", STEPS) for q in (1, 2, 3, 4)],
}


def train(stage, argv, seed, folder, start=None):
    """Trains one stage (local_cd / global_cd main, the command line a user would type plus --seed and --out) into
    folder/seed<s>/, or reuses the run if it finished before (its .done.json). An interrupted run (a checkpoint and
    its resume state, no .done.json) continues with --resume, which is exact: the result equals an uninterrupted
    run. start: a finished shorter run of the same recipe (a grid's CHAIN) to continue, copied, with --resume.
    Returns (checkpoint, training seconds, model forwards): wall time (a resumed run adds its earlier parts up to
    their last save, a continued one its start's) times the share of the machine the run had (1 / --jobs), so that
    costs compare across --jobs; the forwards as the training script counted them (checkpoint metadata). Two
    processes asking for one run at once (two grid points of one chain, two rows): the second waits for the first
    (a lock file beside the run) and reuses its result."""
    out = os.path.join(folder, f"seed{seed}", f"{stage}.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        return _train(stage, argv, seed, out, start)


def _train(stage, argv, seed, out, start):
    import global_cd
    import local_cd
    import runs
    done, part = out + ".done.json", out + ".part.json"

    def result(seconds):
        return out, seconds, int(float(lora.metadata(out).get("forwards", 0)))
    if os.path.exists(done) and os.path.exists(out):
        with open(done) as f:
            return result(json.load(f)["seconds"])
    if start and not os.path.exists(out):  # continue the shorter run: its checkpoint, state and metrics log
        for src, dst in ((start, out), (runs.state_path(start), runs.state_path(out)),
                         (os.path.splitext(start)[0] + ".log.jsonl", os.path.splitext(out)[0] + ".log.jsonl")):
            if os.path.exists(src):
                shutil.copy2(src, dst)
        with open(start + ".done.json") as f, lora.atomic(part) as tmp, open(tmp, "w") as g:
            json.dump({"start": os.path.getmtime(out), "share": SHARE, "before": json.load(f)["seconds"]}, g)
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
    return result(seconds)


def student(s1, s2, seed, runs, quick):
    """The checkpoint of stage-1 recipe s1 (then stage-2 recipe s2; s1 None: stage 2 from the teacher itself) for
    one seed, its training seconds and model forwards (both stages)."""
    def start(s1, s2):  # a grid recipe continues its shorter run (not in --quick: every quick run is 2 iterations)
        key = s2 or s1
        if quick or key not in CHAIN:
            return None
        return student(*((s1, CHAIN[s2]) if s2 else (CHAIN[s1], None)), seed, runs, quick)[0]
    if s1 is None:
        return train("global", ["--teacher", TEACHER, *STAGE2[s2], *(QUICK2 if quick else [])], seed,
                     os.path.join(runs, f"global-teacher-{s2}"), start(None, s2))
    ckpt, sec, fwd = train("local", ["--teacher", TEACHER, *STAGE1[s1], *(QUICK1 if quick else [])], seed,
                           os.path.join(runs, f"local-{s1}"), start(s1, None))
    if s2 is None:
        return ckpt, sec, fwd
    ckpt2, sec2, fwd2 = train("global", ["--init", ckpt, *STAGE2[s2], *(QUICK2 if quick else [])], seed,
                              os.path.join(runs, f"global-{s1}-{s2}"), start(s1, s2))
    return ckpt2, sec + sec2, fwd + fwd2


def source(s1, s2, sampler, seed, runs, quick):
    """A table row's sample.py flags for one seed (the teacher with its solver, or the student trained for it),
    and its training seconds and forwards (0 for the teacher)."""
    if s1 is None and s2 is None:
        return ["--teacher", TEACHER], ["--solver", sampler] if sampler != "psi" else [], 0.0, 0
    ckpt, sec, fwd = student(s1, s2, seed, runs, quick)
    return ["--ckpt", ckpt], ["--sampler", sampler], sec, fwd


def grid_points(name, quick):
    """A baseline's grid; in --quick, its last point (every quick training is 2 iterations: no chain to test)."""
    points = BASELINES[name][0]
    return points if not quick or name == "solver" else points[-1:]


def judged(name, point, runs, quick, net=None):
    """A grid point's scores on TUNE_SEED at the step counts its baseline `name` is judged at: {k: score}."""
    src, extra, _, _ = source(*point, TUNE_SEED, runs, quick)
    net = net or load_classifier()[0]
    return {k: cached_score(src, k, TUNE_SEED, 4 if quick else 100, extra, None, net, runs)
            for k in BASELINES[name][1]}


def geo_fd(scores):
    return math.exp(sum(math.log(s["FD"]) for s in scores.values()) / len(scores))


def tuned(name, runs, quick):
    """The grid point of baseline `name` the judge picks on TUNE_SEED: the lowest geometric mean of FD over the
    step counts it is judged at (each step count weighs alike, whatever its FD's size)."""
    net = load_classifier()[0]
    return min(grid_points(name, quick), key=lambda point: geo_fd(judged(name, point, runs, quick, net)))


def pick(s1, s2, sampler, k, runs, quick):
    """(s1, s2, sampler) a table row samples at k steps: its own, or (s1 = "tuned") the pick of baseline s2's grid
    (s2 = "pcm": of pcm<k>, a model of k phases for k steps)."""
    if s1 != "tuned":
        return s1, s2, sampler
    return tuned(f"pcm{k}" if s2 == "pcm" else s2, runs, quick)


def table_rows(name):
    """A table's rows: all of TABLES[name], or those --rows names (ROWS: parts of their labels)."""
    return [r for r in TABLES[name] if ROWS is None or any(part in r[0] for part in ROWS)]


def baselines_of(name):
    """The baselines a table's tuned rows use."""
    return [n for _, s1, s2, _, steps in table_rows(name) if s1 == "tuned"
            for n in ([f"pcm{k}" for k in steps] if s2 == "pcm" else [s2])]


def run_table(name, runs, quick, seeds, jobs):
    """--jobs N: does the table's missing work N at a time, in N processes of cores / N threads each, in rounds (a
    round's tasks need only earlier rounds). First the baselines' grids on TUNE_SEED: their trainings (the budget /
    4, then resumed to / 2 and to all of it), then their scores; then the table's stage-1 trainings and teacher rows;
    its stage-2 trainings and stage-1-only rows; its stage-2 rows. A row is scored per (seed, steps): 1000 samples,
    then alignment and FD, remembered in scores.json. paper_table then finds all of it done. On 2 CPU cores, 2 jobs of
    1 thread get 1.35x the work of 1 job of 2 threads done; the results equal a --jobs 1 run up to float rounding
    (the thread count changes the order of sums), not bit for bit."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    per_prompt = 4 if quick else 100
    def depth(key):  # how many shorter runs a grid recipe continues
        return 0 if quick or key not in CHAIN else 1 + depth(CHAIN[key])
    judge = [(n, p) for n in dict.fromkeys(baselines_of(name)) for p in grid_points(n, quick)]
    trained = list(dict.fromkeys(p[:2] for _, p in judge if p[:2] != (None, None)))
    rounds = [[("train", (s1, s2, TUNE_SEED, runs, quick)) for s1, s2 in trained if depth(s2 or s1) == j]
              for j in range(max((depth(s2 or s1) for s1, s2 in trained), default=-1) + 1)]
    # before them, alone: the stage-1 runs a stage-2 grid starts from (two grid points must not train one at once)
    rounds.insert(0, [("train", (s1, None, TUNE_SEED, runs, quick))
                      for s1 in dict.fromkeys(s1 for s1, s2 in trained if s1 and s2)])
    rounds.append([("score", (*p, k, TUNE_SEED, runs, quick, per_prompt)) for n, p in judge
                   for k in BASELINES[n][1]])
    with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), initializer=_worker,
                             initargs=(max(1, torch.get_num_threads() // jobs), 1 / jobs, TEACHER)) as pool:
        def do(tasks):
            for scored in pool.map(_task, list(dict.fromkeys(tasks))):  # a run shared by two rows: trained once
                remember(runs, scored)  # here, in one process: workers finishing together cannot lose an entry
        for tasks in rounds:
            do(tasks)
        # the table's own work, with every tuned row resolved to its picks
        cells = [(*pick(s1, s2, sampler, k, runs, quick), k, seed)
                 for _, s1, s2, sampler, steps in table_rows(name) for seed in seeds for k in steps]
        models = list(dict.fromkeys(c[:2] for c in cells if c[:2] != (None, None)))
        score = [("score", (*c, runs, quick, per_prompt)) for c in cells]
        do([("train", (s1, None, seed, runs, quick)) for s1, s2 in models if s1 for seed in seeds] +
           [t for t in score if t[1][:2] == (None, None)])
        do([("train", (s1, s2, seed, runs, quick)) for s1, s2 in models if s2 for seed in seeds] +
           [t for t in score if t[1][0] is not None and t[1][1] is None])
        do([t for t in score if t[1][1] is not None])


def _worker(threads, share, teacher):
    global SHARE, TEACHER
    TEACHER = teacher
    torch.set_num_threads(threads)
    SHARE = share


def _task(task):
    """One unit of run_table's work in a worker: a training, or one row's (or grid point's) score for one
    (seed, steps)."""
    kind, args = task
    if kind == "train":
        student(*args)
        return {}
    s1, s2, sampler, k, seed, runs, quick, per_prompt = args
    src, extra, _, _ = source(s1, s2, sampler, seed, runs, quick)
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


def teacher_reference(runs, quick, seeds, per_prompt=None):
    """The figures' reference line: the teacher's 25-step DDIM with its CFG, mean and std over the sampling seeds
    (remembered scores: Table 1's teacher row), per_prompt samples per digit (default: the tables')."""
    net, _ = load_classifier()
    scores = []
    for seed in seeds:
        src, extra, _, _ = source(None, None, "psi", seed, runs, quick)
        scores.append(cached_score(src, 25, seed, per_prompt or (4 if quick else 100), extra, None, net, runs))
    (a, a_std), (fd, fd_std) = (mean_std([s[m] for s in scores]) for m in ("alignment", "FD"))
    return {"label": "teacher, 25 DDIM steps with CFG (50 calls)", "_alignment": a, "_alignment_std": a_std,
            "_FD": fd, "_FD_std": fd_std}


def mean_std(values):
    v = torch.tensor(values, dtype=torch.float64)
    return v.mean().item(), (v.std().item() if len(v) > 1 else 0.0)


def paper_table(name, runs=RUNS, quick=False, seeds=SEEDS, grids=None, jobs=1):
    """Rows of one of the paper's tables: per (row, steps), alignment and FD as mean +/- std over the seeds, model
    calls per sample, the training (mean over seeds, both stages): machine minutes and model forwards, and for a
    tuned row its baseline's pick at that step count. Does what is missing (--jobs at a time)."""
    if jobs > 1:
        run_table(name, runs, quick, seeds, jobs)
    net, _ = load_classifier()
    per_prompt = 4 if quick else 100
    rows = []
    for label, s1, s2, sampler, steps in table_rows(name):
        for k in steps:
            r1, r2, solver = pick(s1, s2, sampler, k, runs, quick)
            scores, minutes, forwards = [], [], []
            for seed in seeds:
                src, extra, sec, fwd = source(r1, r2, solver, seed, runs, quick)
                if (r1, r2) != (None, None):
                    minutes.append(sec / 60)
                    forwards.append(fwd / 1000)
                grid = None
                if grids and seed == seeds[0]:
                    os.makedirs(grids, exist_ok=True)
                    grid = os.path.join(grids, f"{name}_{r1 or 'teacher'}_{r2 or solver}_{k}.png")
                scores.append(cached_score(src, k, seed, per_prompt, extra, grid, net, runs))
            a, fd = (mean_std([sc[m] for sc in scores]) for m in ("alignment", "FD"))
            rows.append({"row": label, "steps": k, "calls": 2 * k if (r1, r2) == (None, None) else k,
                         "alignment": f"{a[0]:.3f} ± {a[1]:.3f}", "FD": f"{fd[0]:.2f} ± {fd[1]:.2f}",
                         "training (min)": f"{sum(minutes) / len(minutes):.1f}" if minutes else "-",
                         "forwards (K)": f"{sum(forwards) / len(forwards):.0f}" if forwards else "-",
                         "pick": describe(r1, r2, solver) if s1 == "tuned" else "-",
                         "_alignment": a[0], "_FD": fd[0], "_alignment_std": a[1], "_FD_std": fd[1],
                         "_commits": sorted(trained_at(r1, r2, seeds, runs, quick))})
            print(table([{k_: v for k_, v in rows[-1].items() if not k_.startswith("_")}]).splitlines()[-1],
                  flush=True)
    return rows


def describe(s1, s2, solver):
    """A pick in words: a diffusers solver, or a grid recipe's M, learning rate and iterations."""
    if (s1, s2) == (None, None):
        return SOLVERS[solver][0]
    flags = STAGE2[s2] if s2 else STAGE1[s1]
    value = {f: flags[flags.index(f) + 1] for f in ("--M", "--lr", "--iters") if f in flags}
    return (f"M = {value['--M']}, " if "--M" in value else "") + f"lr {value['--lr']}, {value['--iters']} iterations"


def trained_at(s1, s2, seeds, runs, quick):
    """The commits (checkpoint metadata) the trainings of a row were made at, both stages."""
    if (s1, s2) == (None, None):
        return set()
    found = set()
    for seed in seeds:
        meta = lora.metadata(student(s1, s2, seed, runs, quick)[0])
        found.add(meta.get("git_commit", "unknown"))
        if os.path.isfile(meta.get("init", "")):
            found.add(lora.metadata(meta["init"]).get("git_commit", "unknown"))
    return found


def grid_table(name, runs, quick):
    """The baselines' grids of table `name` as the judge saw them on TUNE_SEED: per point, FD (alignment) at each
    judged step count, the geometric-mean FD that picks, and the grid's training cost (the longest run of each
    chain: the shorter ones are its first parts)."""
    rows, net = [], load_classifier()[0]
    for n in dict.fromkeys(baselines_of(name)):
        best = tuned(n, runs, quick)
        for point in grid_points(n, quick):
            scores = judged(n, point, runs, quick, net)
            cost = "-"
            if point[:2] != (None, None) and (point[0] or point[1]) not in CHAIN.values():
                _, sec, fwd = student(*point[:2], TUNE_SEED, runs, quick)
                cost = f"{sec / 60:.1f} min, {fwd / 1000:.0f}K forwards"
            rows.append({"baseline": n, "point": describe(*point),
                         **{f"{k} step{'s' * (k > 1)}: FD (alignment)":
                            f"{scores[k]['FD']:.1f} ({scores[k]['alignment']:.3f})" if k in scores else "-"
                            for k in STEPS},
                         "geometric-mean FD": f"{geo_fd(scores):.1f}", "picked": "yes" if point == best else "",
                         "training (whole chain)": cost})
    return rows


TOY_METRICS = (("FD", "FD to the real digits (lower is better)"), ("alignment", "alignment (higher is better)"))


def plot(rows, path, reference=None, metrics=TOY_METRICS, title=None, x="steps", xlabel="sampling steps", by=None):
    """Metrics against sampling steps (or another x: the training step of a run's history), one panel per metric: a
    line per table row (mean over seeds, error bars one std, cut to the metric's range; the rows a little apart at
    each x, a log y axis where the bars span more than a decade), the teacher's many-step score as a dashed reference
    line (its std as a band). rows: dicts with row, <x>, _<metric> and _<metric>_std; reference: {"label",
    "_<metric>", "_<metric>_std"} or None. by: a key of the rows (e.g. "k", the step count) that makes a column of
    panels per value (the line per row within it). Needs matplotlib (plotting only). Also writes the figure's numbers
    beside it (*.json): `--replot` draws them again."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = list(dict.fromkeys(r[by] for r in rows)) if by else [None]
    fig, axes = plt.subplots(len(metrics) if by else 1, len(columns) if by else len(metrics), squeeze=False,
                             figsize=(4.2 * len(columns), 3.6 * len(metrics)) if by else (5.2 * len(metrics), 4.2))
    for i, (m, name) in enumerate(metrics):
        for j, column in enumerate(columns):
            ax = axes[i][j] if by else axes[0][i]
            panel(ax, [r for r in rows if not by or r[by] == column], m, name, reference, x, xlabel)
            if by and i == 0:
                ax.set_title(f"{by} = {column}" if by != "k" else f"{column} step{'s' * (column > 1)}")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, (0.06 + 0.035 * math.ceil(len(names) / 2)) / (len(metrics) if by else 1), 1, 1))
    with lora.atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    with lora.atomic(os.path.splitext(path)[0] + ".json") as tmp, open(tmp, "w") as f:
        json.dump({"title": title, "metrics": [list(m) for m in metrics], "reference": reference, "rows": rows,
                   "x": x, "xlabel": xlabel, "by": by}, f, indent=1)


def panel(ax, rows, m, name, reference, x, xlabel):
    """One panel of `plot`: metric m of the rows against x, a line per row label, the reference dashed."""
    import matplotlib.ticker
    labels = list(dict.fromkeys(r["row"] for r in rows))
    steps = sorted({r[x] for r in rows})
    apart = min([b - a for a, b in zip(steps, steps[1:])] or [1])  # the rows' offset at one x: a share of this
    means = [r[f"_{m}"] for r in rows] + ([reference[f"_{m}"]] if reference is not None else [])
    # each bar and band is mean +/- std, cut to what the metric can be: a share (alignment) lies in [0, 1]; a
    # positive metric (FD) on a log axis stops at half its smallest mean, where a std larger than the mean (a
    # failed seed among three) would reach zero or below
    lo = min(means) / 2 if means and min(means) > 0 else -math.inf
    hi = 1.0 if m == "alignment" else math.inf
    ends = []  # of every bar and band, so cut: a log axis where they span more than a decade
    if reference is not None:
        mean, std = reference[f"_{m}"], reference.get(f"_{m}_std") or 0.0
        ax.axhline(mean, color="black", ls="--", lw=1.2, label=reference["label"])
        ax.axhspan(max(mean - std, lo), min(mean + std, hi), color="black", alpha=0.08, lw=0)
        ends += [max(mean - std, lo), min(mean + std, hi)]
    for i, label in enumerate(labels):
        mine = sorted((r for r in rows if r["row"] == label), key=lambda r: r[x])
        dx = 0.04 * apart * (i - (len(labels) - 1) / 2)  # the rows side by side at each x: bars do not overlap
        ys, errs = [r[f"_{m}"] for r in mine], [r.get(f"_{m}_std") or 0.0 for r in mine]
        bottoms, tops = [max(y - e, lo) for y, e in zip(ys, errs)], [min(y + e, hi) for y, e in zip(ys, errs)]
        ax.errorbar([r[x] + dx for r in mine], ys, yerr=[[y - b for y, b in zip(ys, bottoms)],
                                                               [t - y for y, t in zip(ys, tops)]],
                    marker="o", ms=4, capsize=3, lw=1.5, label=label)
        ends += bottoms + tops
    if lo > 0 and max(ends) > 10 * min(ends):  # e.g. Table 1's FD: 14 to 305
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        name += "\n(log scale)"  # a second line: one would not fit beside the panel
    if len(steps) <= 12:
        ax.set_xticks(steps)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)


def replot(numbers, path=None):
    """Draws a figure again from the numbers `plot` wrote beside it (default: the PNG of the same name)."""
    with open(numbers) as f:
        fig = json.load(f)
    path = path or os.path.splitext(numbers)[0] + ".png"
    plot(fig["rows"], path, fig["reference"], [tuple(m) for m in fig["metrics"]], fig["title"], fig.get("x", "steps"),
         fig.get("xlabel", "sampling steps"), fig.get("by"))
    return path


# ---- eval.py --table: the command's two kinds of table -------------------------------------------------------------

def teacher_runs(runs, teacher):
    """Where the tables keep a teacher's trainings and scores: `runs` for the embedded teacher, a folder of its own
    named as the teacher's folder for another of its layout."""
    return runs if teacher == "digits" else os.path.join(runs, os.path.basename(os.path.normpath(teacher)))


def print_paper_table(args):
    """--table main | ablation | terms | ... (TABLES): trains and scores what the table needs (reusing what is done),
    prints it and the baselines' grids, and with --figure draws it; returns its rows. --teacher is the tables'
    TEACHER (set here, in the module that reads it; run_table hands it to its workers); --rows their ROWS."""
    global TEACHER, ROWS
    TEACHER, ROWS = args.teacher, args.rows
    if not table_rows(args.table):
        raise SystemExit(f"error: --rows {' '.join(args.rows)}: no row of --table {args.table} has it in its label; "
                         "its rows: " + "; ".join(r[0] for r in TABLES[args.table]))
    args.runs = teacher_runs(args.runs, args.teacher)  # another teacher: its own trainings, beside the embedded one's
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        runs = stack.enter_context(tempfile.TemporaryDirectory()) if args.quick else args.runs
        seeds = SEEDS[:2] if args.quick else SEEDS
        rows = paper_table(args.table, runs, args.quick, seeds, args.grids, args.jobs)
        grids = grid_table(args.table, runs, args.quick)
        commits = ", ".join(sorted({c for r in rows for c in r["_commits"]})) or "-"
        if args.figure:  # the many-step teacher is the reference line, not a point of the curves
            plot([r for r in rows if r["steps"] != 25], args.figure, teacher_reference(runs, args.quick, seeds),
                 title=f"--table {args.table}: {len(seeds)} seeds, {40 if args.quick else 1000} samples per "
                 f"point; trained at {commits}")
            print(f"wrote {args.figure} and its numbers, {os.path.splitext(args.figure)[0]}.json")
    n = 2 if args.quick else len(SEEDS)
    print(f"\n--table {args.table}: mean ± std over {n} seeds, {40 if args.quick else 1000} samples per row, "
          f"{time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} CPU threads; trained at commit(s) "
          f"{commits}\n")
    print(table([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]))
    if grids:
        print(f"\nthe baselines' grids, judged on seed {TUNE_SEED} (FD and alignment of "
              f"{40 if args.quick else 1000} samples):\n")
        print(table(grids))
    return rows


def print_sampling_table(args):
    """--table teacher | cfg | student: the judge's scores of real digits, then of one model's samples per row (the
    teacher by step count, with and without clipping; the teacher across CFG scales w; a student checkpoint by step
    count); returns the rows."""
    net, meta = load_classifier()
    real, y = load_digits()
    g = torch.Generator().manual_seed(args.seed)
    sub = torch.randperm(len(real), generator=g)[:10 * args.per_prompt]
    rows = [{"row": f"real digits ({len(sub)} of {len(real)})", "steps": "-", "w": "-", "clip": "-",
             **score(real[sub], y[sub], net)}]
    src = ["--teacher", args.teacher]
    if args.table == "teacher":
        w = args.cfg if args.cfg is not None else PRESETS[load_teacher(args.teacher, "cpu").family]["w"]
        for clip in (False, True):
            for n in (25, 8, 4, 3, 2):
                x, lab = sample(src, n, args.seed, args.per_prompt, ["--cfg", str(w)] + (["--clip"] if clip else []))
                rows.append({"row": "teacher DDIM", "steps": n, "w": w, "clip": clip,
                             **score(x, lab, net)})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    elif args.table == "student":
        for k in args.steps or [8, 4, 3, 2]:
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
