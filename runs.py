"""What every training run does around its loop (local_cd.py, global_cd.py; llpips.py's trainer too).

  - the command line: argparse that says a mistake in one line, argument types that check ranges, the presets;
  - fresh runs and resumed ones: --overwrite, --resume taking the run's own values, state files beside the
    checkpoint (optimizers, RNG, the student LoRA), so a save interrupted anywhere resumes;
  - torchrun: process setup, the gradient all-reduce, a cheap check that all ranks agree;
  - watching a run: the metrics log (<out>.log.jsonl), validation grids (<out>.val/), the loss curves;
  - how a run ends when it must: Ctrl-C / SIGTERM and out-of-memory errors as one line that says what to do.
Nothing here is LogCD's method.
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time

import torch

import lora
from teachers import PromptFile, default_device, prompt_file, read_checkpoint


# ---- the command line -----------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse that says a mistake in one line (the usage is in --help) and exits with code 2, before any work;
    parse_args also records which flags the command line gave (args.given), so --resume can tell them apart."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        defaults = [(a, a.default) for a in self._actions]
        for a, _ in defaults:
            a.default = argparse.SUPPRESS
        try:
            parsed.given = set(vars(super().parse_args(args)))
        finally:
            for a, d in defaults:
                a.default = d
        return parsed


def count(text):
    """An argparse type: a whole number, at least 1 (iterations, batch sizes, steps, ranks, ...)."""
    return number(text, int, 1)


def positive(text):
    """An argparse type: a finite number above 0 (learning rates, skip, reuse)."""
    return number(text, float, 0, strict=True)


def weight(text):
    """An argparse type: a finite number, 0 or more (CFG scales, loss weights)."""
    return number(text, float, 0)


def number(text, kind, low, strict=False):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{' whole' if kind is int else ''} number") from None
    if not math.isfinite(v) or v < low or (strict and v == low):
        what = "a whole number" if kind is int else "a finite number"
        raise argparse.ArgumentTypeError(f"must be {what} {'above' if strict else 'at least'} {low}, not {text}")
    return v


def fill_presets(args, preset, teacher):
    """Every flag left at None takes the teacher family's preset value; the distance d as choose_distance says."""
    choose_distance(args, preset, teacher)
    for k, v in preset.items():
        if k not in ("d", "llpips") and getattr(args, k, None) is None:
            setattr(args, k, v)


def choose_distance(args, preset, teacher):
    """d of the run (args.d) and its L-LPIPS (args.llpips): --distance if given; else L-LPIPS when --llpips FILE is
    given; else the preset's (the embedded teacher's, measured). SDXL and FLUX.1-dev have none: the paper's recipe is
    L-LPIPS in both stages, and an L-LPIPS belongs to the teacher's VAE, so the run is refused in one line that names
    both ways out, before any model loads."""
    if args.d == "mse" and args.llpips:
        raise SystemExit("error: --llpips is the L-LPIPS of d = llpips, and --distance mse asks for d = MSE: give one")
    if args.d is None:
        args.d = "llpips" if args.llpips else preset.get("d")
    if args.d is None:
        raise SystemExit(f"error: the paper's recipe measures d with an L-LPIPS trained for the teacher's VAE: give "
                         f"--llpips FILE (python llpips.py --bapps DIR --teacher {teacher} --out FILE trains it), or "
                         "--distance mse for the paper's MSE row (Table 3)")
    if args.d == "llpips" and not args.llpips:
        args.llpips = preset.get("llpips")
        if not args.llpips:
            raise SystemExit("error: --distance llpips needs the L-LPIPS of this teacher's VAE: --llpips FILE "
                             "(train it with llpips.py), or --distance mse")


# ---- before any model loads: every input checked, on every rank -------------------------------------------------

def check_inputs(args, prompts, family, latent, pair_bytes, n_lora):
    """What a run would otherwise find late (after the teacher has loaded, or at its first save), said in one line
    before any model loads: no prompts for a teacher with a text encoder (family); an L-LPIPS that is missing, not
    one, or for other latents (latent: the teacher's (C, H, W)); a --val-prompts file that cannot be read; an --out
    that cannot be written; a disk without room for a checkpoint pair of this run (pair_bytes; n_lora: the student's
    LoRA parameters, for the message). Every rank checks."""
    if prompts is None and family != "digits":
        raise SystemExit("error: --prompts is required for this teacher (a text file, one prompt per line)")
    if args.d == "llpips":
        try:
            meta = lora.header(args.llpips)[1]
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: --llpips: {e}".replace("no such checkpoint", "no such file")) from None
        if meta.get("format") != "llpips":
            raise SystemExit(f"error: --llpips: {args.llpips} is not an L-LPIPS weights file (llpips.py writes them)")
        if int(meta["channels"]) != latent[0]:
            raise SystemExit(f"error: --llpips: {args.llpips} compares {meta['channels']}-channel latents; this "
                             f"teacher's have {latent[0]} (train one for its VAE: llpips.py --teacher)")
    if args.val_prompts and len(args.val_prompts) == 1 and (os.path.exists(args.val_prompts[0])
                                                             or args.val_prompts[0].endswith(".txt")):
        try:
            prompt_file(args.val_prompts[0])
        except ValueError as e:
            raise SystemExit(f"error: --val-prompts: {e}") from None
    folder = writable_folder(args.out)
    need, free = pair_bytes * 1.1 + 2 ** 26, shutil.disk_usage(folder).free
    if free < need:
        raise SystemExit(f"error: --out {args.out}: its disk has {free / 2 ** 30:.2f} GiB free, and a checkpoint pair "
                         f"of this run takes about {need / 2 ** 30:.2f} GiB ({n_lora / 1e6:.1f}M LoRA parameters: the "
                         "LoRA, and for --resume its copy and AdamW state); free some space or choose another --out")


def writable_folder(out):
    """The folder --out will be written into (its nearest existing one: atomic writes create the rest), or one line
    and exit if nothing can be written there."""
    folder = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot write into {folder} ({e.strerror})") from None
    return folder


def pair_bytes_local(n_lora, latent, buffer):
    """About the bytes of a stage-1 checkpoint pair: the LoRA (fp32) in the checkpoint and again in the state with
    its two AdamW moments (16 bytes a parameter), and the trajectory pool (two fp32 latents and 36 bytes of times and
    indices a pair)."""
    return 16 * n_lora + buffer * (8 * math.prod(latent) + 36)


def pair_bytes_global(n_lora, fake_lora):
    """About the bytes of a stage-2 checkpoint pair: the student (16 bytes a parameter, as stage 1) and the fake score
    with its AdamW moments (12 bytes a parameter; the heads are small)."""
    return 16 * n_lora + 12 * fake_lora


@contextlib.contextmanager
def rank_zero_first(ddp, hours=12):
    """Rank 0 runs the block first (a download: one, not one per rank, into a hub cache the ranks share); the other
    ranks run it once rank 0 has. They wait at a barrier of a gloo group of its own, whose timeout outlasts a download
    of tens of GB (NCCL's default, 10 minutes, would not) and which no GPU watchdog counts."""
    import datetime
    import torch.distributed as dist
    if not ddp:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=hours))
    ok = torch.ones(1)
    if dist.get_rank() > 0:
        dist.broadcast(ok, 0, group=group)  # waits for rank 0's block to end, and hears how
        if not ok.item():
            raise SystemExit(1)  # rank 0 says why
        yield
        return
    try:
        yield
    except BaseException:
        ok.zero_()
        raise
    finally:
        dist.broadcast(ok, 0, group=group)


# ---- fresh runs and resumed ones -------------------------------------------------------------------------------

def check_fresh_out(args):
    """A run without --resume does not replace an existing --out (or its state file) unless --overwrite says so."""
    for path in (args.out, state_path(args.out)):
        if not args.resume and not args.overwrite and os.path.exists(path):
            raise SystemExit(f"error: {path} exists; continue its run with --resume, or replace it with --overwrite")


def new_run_id():
    """A fresh run's identity: its checkpoint and state file carry it, and --resume requires them to agree."""
    import uuid
    return uuid.uuid4().hex[:12]


def take_run_values(args, meta, kinds):
    """--resume continues the run as it was: each hyper-parameter in `kinds` (name -> type) that the command line left
    out takes the checkpoint's value; one it gave must equal that value, or the resume stops with one line."""
    for key, kind in kinds.items():
        if key not in meta:
            continue
        theirs = kind(float(meta[key])) if kind in (int, float) else (meta[key] or None)
        mine = getattr(args, key)
        if key in args.given and mine != theirs:
            flag = "--" + key.replace("_", "-")
            raise SystemExit(f"error: cannot resume: {flag} {mine} differs from the run's {key} = {theirs}; leave "
                             f"{flag} out to continue the run, or start another (--overwrite, or another --out)")
        setattr(args, key, theirs)


def take_run_batch(args, meta, world):
    """--resume keeps the run's batch (samples per iteration, over all ranks and micro-batches) also on another number
    of ranks or micro-batches: --batch, which is per rank and micro-batch, becomes the run's batch / (world x
    --grad-accum). A --batch given must give the run's batch; a world x --grad-accum that does not divide it is refused
    in one line."""
    if "batch" not in meta:
        return
    total, per = int(meta["batch"]), world * args.grad_accum
    if "batch" in args.given and args.batch * per != total:
        raise SystemExit(f"error: cannot resume: --batch {args.batch} x --grad-accum {args.grad_accum} on {world} "
                         f"rank(s) is {args.batch * per} samples per iteration, the run's batch is {total}; leave "
                         "--batch out")
    if total % per:
        divisors = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0)
        raise SystemExit(f"error: cannot resume: the run's batch of {total} does not split over {world} rank(s) x "
                         f"--grad-accum {args.grad_accum}; ranks x micro-batches must be one of {divisors}")
    args.batch = total // per


def run_prompts(args, meta):
    """A training run's prompts file (a PromptFile, or None for the embedded teacher's own), checked whole before any
    model loads. With --resume (meta: the run's checkpoint metadata) --prompts left out is the run's own file, and a
    --prompts given must hold the run's captions, byte for byte (the file may have moved)."""
    if args.resume and args.prompts is None:
        args.prompts = meta.get("prompts") or None
    prompts = args.prompts and prompt_file(args.prompts)
    if args.resume and meta.get("prompts_sha1", "") != (prompts.sha1 if prompts else ""):
        raise ValueError(f"cannot resume: --prompts {args.prompts} does not hold the run's captions (those of "
                         f"{meta.get('prompts') or 'the embedded teacher'}); give the run's prompts file")
    return prompts


def prompts_meta(prompts):
    """What a checkpoint records of its prompts file: its path and the sha1 of its bytes (run_prompts reads them);
    empty for the embedded teacher's own prompts."""
    if not isinstance(prompts, PromptFile):
        return {"prompts": "", "prompts_sha1": ""}
    return {"prompts": os.path.abspath(prompts.path), "prompts_sha1": prompts.sha1}


def state_path(path):
    """local.safetensors -> local.state.safetensors: optimizer, RNG and data state for --resume."""
    return path[:-len(".safetensors")] + ".state.safetensors" if path.endswith(".safetensors") else path + ".state"


def read_state(path, meta, lora_prefix):
    """(state tensors, state metadata, where the student LoRA to resume is, its key prefix) of the run saved at `path`
    (checkpoint metadata `meta`). The state file holds the student LoRA too (prefix "student"), so a save interrupted
    between its two files (state written, checkpoint not) still resumes, at the state's step. A state without it
    (runs of older versions) must be of the checkpoint's step, and the LoRA comes from the checkpoint."""
    state, smeta = lora.load(state_path(path))
    if smeta.get("run", meta.get("run")) != meta.get("run"):
        raise ValueError(f"{state_path(path)} belongs to another run than {path} (run {smeta.get('run')}, not "
                         f"{meta.get('run')}); restore the pair, or start anew with another --out")
    if any(k.startswith("student.") for k in state):
        return state, smeta, state, "student"
    if smeta.get("step") != meta.get("step"):
        raise ValueError(f"{path} (step {meta.get('step')}) and its state file (step {smeta.get('step')}) disagree; "
                         "a save was interrupted")
    return state, smeta, None, lora_prefix


def resumed_late(step, meta):
    """What a resume log adds when the state file is newer than the checkpoint."""
    if str(step) == meta.get("step"):
        return ""
    return f" (the checkpoint holds step {meta.get('step')}: its save was interrupted; the next save rewrites it)"


def optimizer_tensors(opt, prefix="optim"):
    return {f"{prefix}.{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def load_optimizer(opt, tensors, prefix="optim"):
    sd = opt.state_dict()
    sd["state"] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, i, k = key.split(".")
            sd["state"].setdefault(int(i), {})[k] = v
    opt.load_state_dict(sd)


# ---- torchrun: one process per GPU, no DDP wrapper (the LoRA gradients are averaged by hand, one flat all-reduce) ----

def init_distributed(device=None):
    """A training script's process setup: (rank, world, device, ddp). torchrun sets RANK: gloo on CPU, nccl on GPU,
    one GPU per rank. On CUDA, cuDNN's scaled-dot-product attention is switched off: its backward crashed on FLUX
    (illegal memory access; H200, torch 2.11); flash / memory-efficient attention remain."""
    import torch.distributed as dist
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if not ddp:
        return 0, 1, device or default_device(), False
    dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device, True


class GradientSync:
    """p.grad <- the mean of p.grad over ranks, for the trainable `params`, overlapped with backward (DDP's idea, by
    hand, for adapters on a shared frozen base):

        with sync.backward():
            loss.backward()      # each bucket's all-reduce starts as soon as backward has its last gradient
        opt.step()               # the averaged gradients are in p.grad when the block ends

    The parameters go into buckets of about `bucket_mb` MB, in reverse order (roughly the order backward produces
    their gradients). A hook after each gradient's accumulation counts the bucket down; buckets start strictly in
    order, so every rank issues the same collectives in the same order, whatever order its backward finished them
    in. A bucket whose parameters got no gradient this backward (a term switched off) goes at the end, as zeros.
    The result is one flat all-reduce's after backward, bit for bit (tested). On one process it does nothing."""

    def __init__(self, params, world, bucket_mb=25):
        self.world, self.buckets, self.armed = world, [], False
        if world == 1:
            return
        size = 0
        for p in reversed(list(params)):
            if not self.buckets or size >= bucket_mb * 2 ** 20:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(self.ready)

    def ready(self, p):
        if not self.armed:  # another optimizer's backward reached this parameter (stage 2: the GAN's heads)
            return
        self.left[self.bucket_of[p]] -= 1
        while self.started < len(self.buckets) and self.left[self.started] == 0:
            self.start(self.started)

    def start(self, i):
        import torch.distributed as dist
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.buckets[i]]
        flat = torch.cat(grads) / self.world  # the mean: each rank's share, summed
        self.pending.append((i, flat, dist.all_reduce(flat, async_op=True)))
        self.started = i + 1

    @contextlib.contextmanager
    def backward(self, last=True):
        """last=False: a micro-batch before the last of a step (--grad-accum): its gradients only add up, locally."""
        if self.world == 1 or not last:
            yield
            return
        self.armed, self.started, self.pending = True, 0, []
        self.left = [len(bucket) for bucket in self.buckets]
        try:
            yield
        finally:
            self.armed = False
        while self.started < len(self.buckets):  # the buckets backward left without (some) gradients
            self.start(self.started)
        for i, flat, work in self.pending:
            work.wait()
            for p, g in zip(self.buckets[i], flat.split([p.numel() for p in self.buckets[i]])):
                p.grad = g.view_as(p)


COMPILE_HELP = ("torch.compile the denoiser by region: each repeated block (SDXL's transformer blocks, FLUX.1's double "
                "and single blocks; the embedded teacher: the whole net) compiled with its adapters inside, one graph "
                "shared by the blocks alike; the first iterations wait for the compiler")


def compile_blocks(model, backend="inductor"):
    """Regional torch.compile (diffusers' compile_repeated_blocks): every block of a kind the model lists as
    repeated is compiled with the LoRA layers inside it, where eager PyTorch launches each small op of an adapter and
    a norm on its own. One compiled graph per variant -- which adapter is active (a guard on LoRALayer.active), with
    or without gradients, each block width -- so the recompile limit goes from 8 to 64. A model with no repeated
    blocks (the embedded teacher's) is compiled whole. Eager and compiled agree up to float rounding (tested)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(backend=backend)
    else:
        model.compile(backend=backend)


def mean_over_ranks(x, world):
    import torch.distributed as dist
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world


def rank_difference(params):
    """max |theta - theta of rank 0| over all ranks: 0 when every rank holds the same weights (a cheap guard)."""
    import torch.distributed as dist
    flat = torch.nn.utils.parameters_to_vector(params).detach()
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


# ---- watching a run: the metrics log and validation grids ---------------------------------------------------------

def run_files(out):
    """local.safetensors -> (local.log.jsonl, local.val): a run's metrics log and its folder of validation grids."""
    stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
    return stem + ".log.jsonl", stem + ".val"


class MetricsLog:
    """The run's metrics log, <out>.log.jsonl: one JSON line per logging interval, written by rank 0 and flushed at
    once, so `tail -f` and `python eval.py --curves` read a running job. A line holds the step, the interval's mean of
    every loss term (add), what the script passes to write (learning rates, forwards counters), iterations per second
    (validation excluded), the interval's validation seconds, the CUDA memory peak so far and the elapsed seconds.
    A fresh run starts the log anew; --resume from step N keeps its lines up to N (later ones were written past the
    last save; the resumed run writes them again) and continues it, elapsed time included. The validation grids of
    steps after N go likewise."""

    def __init__(self, out, step, master):
        self.path, self.folder = run_files(out)
        self.master, self.step, self.sums, self.n = master, step, {}, 0
        self.val_s = self.val_total = self.elapsed = 0.0
        self.t0 = self.t_last = time.perf_counter()
        if not master:
            return
        kept = []
        if step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            self.elapsed = json.loads(kept[-1])["elapsed_s"] if kept else 0.0
        with lora.atomic(self.path) as tmp, open(tmp, "w") as f:
            f.writelines(kept)
        if os.path.isdir(self.folder):
            for name in os.listdir(self.folder):
                if re.fullmatch(r"step_\d+\.png", name) and int(name[5:-4]) > step:
                    os.remove(os.path.join(self.folder, name))
        self.file = open(self.path, "a")

    def add(self, terms):
        """One iteration's loss terms (name -> tensor or float): summed on their device, no GPU sync until write."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)
        self.n += 1

    def write(self, step, **values):
        """Appends the interval's line (rank 0) and starts the next interval; returns the line (None on ranks > 0)."""
        now = time.perf_counter()
        line = {"step": step, **{k: float(v) / max(self.n, 1) for k, v in self.sums.items()}, **values,
                "it_per_s": (step - self.step) / max(now - self.t_last - self.val_s, 1e-9), "val_s": self.val_s,
                "elapsed_s": self.elapsed + now - self.t0}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            line["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        self.step, self.sums, self.n, self.t_last, self.val_s = step, {}, 0, now, 0.0
        if not self.master:
            return None
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        return line

    def write_grid(self, step, images, prompts, title, seconds):
        """Writes a validation grid to <out>.val/step_<step>.png (rank 0) and counts its cost in the log."""
        self.val_s += seconds
        self.val_total += seconds
        if not self.master:
            return
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"step_{step:06d}.png")
        with lora.atomic(path) as tmp:
            grid(images, prompts, title).save(tmp, format="PNG")

    def close(self):
        """The run's summary line: validation's share of this session's time; the loss curves as a PNG beside the log
        when matplotlib is installed (plotting is optional; training never needs it) and the log has two points."""
        if not self.master:
            return ""
        self.file.close()
        share = self.val_total / max(time.perf_counter() - self.t0, 1e-9)
        said = (f"metrics: {self.path}; validation grids: {self.folder}/ ({self.val_total:.1f} s, {share:.1%} of the "
                "run)")
        try:
            if len(read_log(self.path)) < 2:  # a run shorter than --log-every: one point is no curve
                said += "; loss curves: none (one logged point)"
            else:
                said += f"; loss curves: {plot_log(self.path)}"
        except ImportError:
            said += f" (pip install matplotlib, then python eval.py --curves {self.path}, draws the loss curves)"
        return said


def read_log(path):
    """The lines of a metrics log, as dicts."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


LOG_BOOKKEEPING = ("step", "it_per_s", "val_s", "elapsed_s", "gpu_mem_peak_gib")
# Beside the loss terms (the interval's mean of each) the training scripts write the learning rates (lr*: the schedule
# the flags set), the forwards per pair or sample (fwd*: ratios the run's last line states) and `forwards`: a counter
# of the run's model forwards so far, no interval mean. The figure draws the loss terms and the counters.
LOG_CUMULATIVE = ("forwards",)


def curves_figure(lines, title):
    """A matplotlib figure of a metrics log's lines: one panel per loss term against the step (log scale where a
    term stays positive and spans more than a decade), one per cumulative counter (linear: it only grows), and one
    of the training speed. Each panel's y label says what its values are."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    skip = LOG_BOOKKEEPING + LOG_CUMULATIVE
    losses = [k for k in lines[0] if k not in skip and not k.startswith(("lr", "fwd"))]
    labels = {**{k: f"{k} (interval mean)" for k in losses},
              **{k: f"{k} (cumulative)" for k in LOG_CUMULATIVE if k in lines[0]},
              "it_per_s": "iterations / s (validation excluded)"}
    cols = min(len(labels), 3)
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    steps = [line["step"] for line in lines]
    for ax, (k, label) in zip(axes.flat, labels.items()):
        ys = [line.get(k, float("nan")) for line in lines]
        ax.plot(steps, ys, lw=1.2)
        seen = [y for y in ys if y == y]
        if k in losses and min(seen) > 0 and max(seen) > 10 * min(seen):
            ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_log(path, png=None):
    """The loss curves of the metrics log at `path` as a PNG (default: beside it, <out>.loss.png). Needs matplotlib."""
    import matplotlib.pyplot as plt
    if png is None:
        png = (path[:-len(".log.jsonl")] if path.endswith(".log.jsonl") else path) + ".loss.png"
    fig = curves_figure(read_log(path), os.path.basename(path))
    with lora.atomic(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return png


def grid(images, row_labels, title, tile=None):
    """PIL image: one row per label, images (N, C, H, W) in [-1, 1] laid out row-major, label to the left, the title
    above. The text is PIL's own font at 13 px: at its default 10 px the spaces (2 px) are no wider than the gaps
    between letters and the words run together. Widths are PIL's measures of the text drawn, whatever its letters."""
    from PIL import Image, ImageDraw, ImageFont
    N, C, H, W = images.shape
    cols = N // len(row_labels)
    tile = tile or (64 if H < 64 else min(H, 256))
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: its one default, a bitmap font whose space is a whole 6-pixel letter
        font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = [l[:40] for l in row_labels]
    lab, top = math.ceil(max(measure.textlength(l, font=font) for l in labels)) + 12, 20
    width = max(lab + cols * (tile + 2), math.ceil(measure.textlength(title, font=font)) + 8)
    out = Image.new("RGB", (width, top + len(row_labels) * (tile + 2)), "white")
    draw = ImageDraw.Draw(out)
    draw.text((4, 2), title, fill="black", font=font)  # within the top band (13 px: ink in rows 5..18)
    for i in range(N):
        r, c = divmod(i, cols)
        im = Image.fromarray(x[i, :, :, 0] if C == 1 else x[i, :, :, :3]).resize((tile, tile), Image.NEAREST)
        out.paste(im.convert("RGB"), (lab + c * (tile + 2), top + r * (tile + 2)))
    for r, l in enumerate(labels):
        draw.text((4, top + r * (tile + 2) + tile // 2 - 9), l, fill="black", font=font)
    return out


# ---- how a run ends when it must ------------------------------------------------------------------------------------

@contextlib.contextmanager
def explain_out_of_memory():
    """A CUDA out-of-memory error becomes one line: the least this run needs (memory_needed), the card's size, and
    the flags that help -- instead of a CUDA trace."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        need = memory_needed(e)
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2 ** 30
        raise SystemExit(f"error: out of GPU memory: this run needs more than {need:.1f} GiB, the GPU has {total:.1f} "
                         "GiB; try --grad-checkpointing, a smaller --batch, or more GPUs with torchrun (--batch is per "
                         "GPU)") from None


def memory_needed(e):
    """The least GiB a run that hit this CUDA out-of-memory error needs: the peak in use plus the failed allocation."""
    m = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB)", str(e))
    asked = float(m.group(1)) / (1024 if m.group(2) == "MiB" else 1) if m else 0.0
    return torch.cuda.max_memory_allocated() / 2 ** 30 + asked


@contextlib.contextmanager
def explain_interrupt(script, out):
    """Ctrl-C, or a SIGTERM (a scheduler's or torchrun's stop), ends a training run with one line: what --out holds
    now, and the command that continues it. out(): the run's --out. Every checkpoint write is atomic, so what is on
    disk is whole."""
    import shlex
    import signal
    import sys

    def terminated(signum, frame):
        raise KeyboardInterrupt  # the same way out as Ctrl-C: unwinds through any save, which leaves no half file
    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write("\n")  # below the progress bar
        path = out()
        try:  # the state's step when it is newer (an interrupted save): --resume continues from there
            step = lora.metadata(state_path(path)).get("step") or read_checkpoint(path)[1]["step"]
        except (ValueError, FileNotFoundError):
            raise SystemExit(f"interrupted before the first checkpoint: nothing was written to {path}") from None
        if int(os.environ.get("RANK", 0)) > 0:
            raise SystemExit(1) from None  # rank 0 says it for all
        again = " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--resume")
        launch = "python"
        if "RANK" in os.environ:  # torchrun, with its rendezvous flags (if any) as before
            nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
            launch = (f"torchrun{f' --nnodes {nodes}' if nodes != '1' else ''} "
                      f"--nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '?')}")
        raise SystemExit(f"interrupted: {path} continues from step {step} with: {launch} {script} {again} --resume"
                         .replace("  ", " ")) from None
    finally:
        signal.signal(signal.SIGTERM, before)
