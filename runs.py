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
import errno
import json
import math
import os
import re
import shutil
import tempfile
import time

import torch

import lora
from teachers import (PromptFile, default_device, denoiser_size, download, locate, precision, prompt_file, prompts_seen,
                      read_checkpoint, read_prompts, save_checkpoint)


# ---- the command line -----------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse that says a mistake in one line (the usage is in --help) and exits with code 2, before any work;
    parse_args also records which flags the command line gave (args.given), so --resume can tell them apart.
    presets (family -> {flag's dest: value}): a flag the presets hold defaults to None, which fill_presets replaces by
    its family's value, and its help says each family's value -- the one place a reader and --help find them."""

    def __init__(self, *a, presets=None, **k):
        self.presets = presets or {}
        super().__init__(*a, **k)

    def add_argument(self, *a, **k):
        dest = k.get("dest") or a[0].lstrip("-").replace("-", "_")
        values = {family: said(preset[dest]) for family, preset in self.presets.items() if dest in preset}
        if values:
            k["default"] = None
            if len(values) == len(self.presets) and len(set(values.values())) == 1:
                k["help"] = f"{k.get('help', '')} (every teacher: {next(iter(values.values()))})"
            else:
                k["help"] = f"{k.get('help', '')} ({', '.join(f'{f}: {v}' for f, v in values.items())})"
        return super().add_argument(*a, **k)

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


def said(value):
    """A preset's value as --help and the first log line print it: 1e-05, 0.1, 12000, a file by its name."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return format(value, "g")
    return os.path.basename(value) if isinstance(value, str) and os.sep in value else str(value)


def said_all(values):
    """A run's values in one line, name=value each (the first log line: a log is a full record of its run)."""
    return " ".join(f"{k}={said(v)}" for k, v in values.items() if v != "")


def count(text):
    """An argparse type: a whole number, at least 1 (iterations, batch sizes, steps, ranks, ...)."""
    return number(text, int, 1)


def whole(text):
    """An argparse type: a whole number, 0 or more (0: off)."""
    return number(text, int, 0)


def positive(text):
    """An argparse type: a finite number above 0 (learning rates, skip, reuse)."""
    return number(text, float, 0, strict=True)


def weight(text):
    """An argparse type: a finite number, 0 or more (CFG scales, loss weights)."""
    return number(text, float, 0)


def fraction(text):
    """An argparse type: a number in [0, 1) (an EMA's decay)."""
    v = number(text, float, 0)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1, not {text}")
    return v


def numbers(text):
    """Numbers as a checkpoint's metadata holds a list of them ("[200.0, 800.0]"): a resume reads them back."""
    return [float(x) for x in text.strip("[]").replace(",", " ").split()]


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
    """Every flag left at None takes the teacher family's preset value (the stage's PRESETS); the distance d as
    choose_distance says."""
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

PAIR_BYTES = [0]  # a checkpoint pair's bytes, as check_inputs estimated them


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
    PAIR_BYTES[0] = pair_bytes  # what a full disk's message says if no pair is on disk yet
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


def pair_bytes_global(n_lora, fake_lora, held=0):
    """About the bytes of a stage-2 checkpoint pair: the student (16 bytes a parameter, as stage 1), the fake score
    with its AdamW moments (12 bytes a parameter; the heads are small) and the copies of the student an option holds
    (held of them, 4 bytes a parameter)."""
    return 16 * n_lora + 12 * fake_lora + 4 * held * n_lora


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
    """A run without --resume does not replace an existing --out (or its state file) unless --overwrite says so; a
    run with --resume needs the checkpoint."""
    for path in (args.out, state_path(args.out)):
        if not args.resume and not args.overwrite and os.path.exists(path):
            raise SystemExit(f"error: {path} exists; continue its run with --resume, or replace it with --overwrite")
    if args.resume and not os.path.exists(args.out):
        if os.path.exists(state_path(args.out)):
            raise SystemExit(f"error: cannot resume: {args.out} does not exist, only its state file: the run stopped "
                             "before its first checkpoint was written; start it again with --overwrite")
        raise SystemExit(f"error: cannot resume: {args.out} does not exist; start the run without --resume")


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
        theirs = kind(float(meta[key])) if kind in (int, float) else (kind(meta[key]) if meta[key] else None)
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
                         f"{meta.get('run')}): a run started with --overwrite stopped before its first checkpoint, or "
                         "the files were mixed; start it again with --overwrite (or restore the pair)")
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


# ---- the trainer both stages share: everything around the method's loop -------------------------------------------

class Trainer:
    """What a stage does around its method, so that its file holds the method and a loop a reader follows:

      run = Trainer(args, "local", RUN_VALUES)        # torchrun, precision; --resume takes the run's own values
      run.check(...)                           # every input, before any model loads
      teacher = run.load(...)                  # rank 0 downloads first; the prompts checked against the teacher
      run.train(teacher, {"student": (lr, betas, None), "disc": (lr, betas, module)}, stream)  # each: its AdamW
      while run.step < args.iters:
          logs = {"loss": run.update("student", losses)}       # one optimizer step, over --grad-accum micro-batches
          run.next(logs)                                       # the log line, validation, the checkpoint pair

    Its parts: a LoRA adapter on the teacher's denoiser (module None), or a module of their own (the GAN's heads). It
    counts the model forwards (a hook on the denoiser) and saves and resumes the parts, their optimizers, the step, the
    forwards and the RNG; the stage adds what is its own (save's and resume's extra). Nothing here is LogCD's method."""

    def __init__(self, args, stage, run_values):
        import torch.distributed as dist
        self.args, self.stage, self.dist = args, stage, dist
        self.rank, self.world, self.device, self.ddp = init_distributed(args.device)
        self.master = self.rank == 0  # only rank 0 logs and saves
        # the frozen base in `dtype` (bf16 on CUDA); the trained parts fp32 with their AdamW; their forwards under
        # autocast() (or from bf16 copies: --adapters base), the backwards outside it
        self.dtype, self.autocast, self.adapter_dtype = precision(self.device, args.dtype, args.adapters)
        check_fresh_out(args)
        if args.report_to == "tensorboard":
            summary_writer()  # the package is there, before any work
        self.resumed = lora.metadata(args.out) if args.resume else {}  # the run's checkpoint metadata
        if args.resume:  # its own values: flags left out are taken from it, flags given must agree
            take_run_values(args, self.resumed, run_values)
            take_run_batch(args, self.resumed, self.world)
        self.id = self.resumed.get("run") or new_run_id()  # the checkpoint and its state file carry it
        self.step = self.forwards = 0  # forwards: model calls x samples (a CFG call counts 2), all ranks
        self.validate = self.prompts = None
        self.late = False

    def log(self, *a):
        if self.master:
            print(*a)

    def check(self, teacher, revision, presets, pair_bytes, rank=None, resolution=None):
        """Every input checked before any model loads (the teacher's configs are read, not its weights): the prompts,
        the presets of the teacher's family filled in (and d chosen), the L-LPIPS, --out and its disk (pair_bytes(
        LoRA parameters, latent shape): the bytes of a checkpoint pair; the LoRA's rank and the image size default
        to --rank and --resolution). Each mistake is one line."""
        args = self.args
        try:
            self.prompts = run_prompts(args, self.resumed)
            family = locate(teacher, revision)[0]
            fill_presets(args, presets[family], teacher)  # and d: L-LPIPS, MSE, or a refusal
            n_lora, latent = denoiser_size(teacher, rank or args.rank, resolution or args.resolution, revision)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        check_inputs(args, self.prompts, family, latent, pair_bytes(n_lora, latent), n_lora)

    def load(self, name, hub, load):
        """The teacher: a hub one downloaded by rank 0 while the other ranks wait, then load() on every rank; then the
        prompts and the validation prompts checked against it. Returns what load() returns."""
        try:
            with rank_zero_first(self.ddp):
                download(name, **hub)
            loaded = load()
            teacher = loaded[0] if isinstance(loaded, tuple) else loaded
            self.prompts = self.prompts or read_prompts(None, teacher)
            teacher.check_prompts(self.prompts)
            self.shown = val_prompts(self.args.val_prompts, teacher, self.prompts)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {'cannot resume: ' if self.args.resume else ''}{e}")
        return loaded

    def train(self, teacher, parts, stream, held=()):
        """The parts that train (name -> (lr, betas, module; None for the adapter `name`)), each with its AdamW
        (weight decay 0); gradient checkpointing and torch.compile once they are all in; the prompt stream. held: the
        names of adapters that do not train but are saved and resumed with the run (an option's copies of the
        student)."""
        args, cuda = self.args, str(self.device).startswith("cuda")
        self.teacher, self.stream, self.modules = teacher, stream, {k: m for k, (_, _, m) in parts.items()}
        self.held = tuple(held)
        self.params = {k: list(m.parameters()) if m is not None else lora.parameters(teacher.denoiser, k)
                       for k, (_, _, m) in parts.items()}
        self.opts = {k: torch.optim.AdamW(self.params[k], lr=lr, betas=betas, weight_decay=0.0, fused=cuda or None)
                     for k, (lr, betas, _) in parts.items()}
        if args.grad_checkpointing:
            lora.gradient_checkpointing(teacher.denoiser)
        if args.compile:  # after the adapters are in (and checkpointing is set): they are compiled with their blocks
            compile_blocks(teacher.denoiser)

    def resume(self):
        """--resume: every part and its optimizer, the step, the forwards, rank 0's RNG state (returned: the stage's
        generator takes it) from the state file; the student from it too (an interrupted save leaves the state newer
        than the checkpoint), else from the checkpoint. Returns (state tensors, state metadata)."""
        args, teacher = self.args, self.teacher
        try:
            meta = read_checkpoint(args.out, (self.stage,), teacher.id)[1]
            state, smeta, student, prefix = read_state(args.out, meta, teacher.lora_prefix)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: cannot resume: {e}")
        lora.load_state_dict(teacher.denoiser, "student", student or lora.load(args.out)[0], prefix)
        for k, module in self.modules.items():
            old = "optim" if k == "student" and "optim.0.step" in state else None  # stage-1 states of older versions
            load_optimizer(self.opts[k], state, old or f"{k}_optim")
            if module is not None:
                module.load_state_dict({n[len(k) + 1:]: v for n, v in state.items() if n.startswith(k + ".")})
            elif k != "student":
                lora.load_state_dict(teacher.denoiser, k, state, k)
        for k in self.held:
            lora.load_state_dict(teacher.denoiser, k, state, k)
        self.step, self.forwards = int(smeta["step"]), int(smeta.get("forwards", 0))
        self.late = meta["step"] != str(self.step)  # start() saves the pair of this step again
        if self.master and self.keeps(self.step) and meta["step"] == str(self.step) and \
                lora.metadata(kept_path(args.out, self.step)).get("run") != self.id:
            keep(args.out, self.step)  # the run stopped between its checkpoint and the copy (or an older run's)
        self.log(f"resumed {args.out} at step {self.step}" + resumed_late(self.step, meta))
        return state, smeta

    def start(self, val_steps, sample, save):
        """After a resume: every rank holds rank 0's parts; the working copies the forwards use (lora.Working: the
        adapters' parameters, or bf16 copies with --adapters base) and the gradient all-reduce of each part; the
        metrics log; validation grids at val_steps (sample(cond, z_T, k) -> z_0), drawn at once on a fresh run. A
        resume from a state newer than its checkpoint (a stop between the two files) saves the pair at once (save():
        the stage's), so that the checkpoint, and the student --keep-every keeps of this step, are not lost."""
        args, teacher = self.args, self.teacher
        if self.late:
            save()
        if self.ddp:
            for ps in self.params.values():
                for p in ps:
                    self.dist.broadcast(p.data, 0)
        self.work = {k: lora.Plain(ps) if self.modules[k] is not None else
                     lora.Working(teacher.denoiser, k, self.adapter_dtype) for k, ps in self.params.items()}
        for k in self.held:  # their forwards compute as the student's do (lora.blend keeps any copies in step)
            lora.Working(teacher.denoiser, k, self.adapter_dtype)
        self.syncs = {k: GradientSync(w.params, self.world) for k, w in self.work.items()}
        if self.master:  # what a killed run's writes left: their temporary files (the files themselves are whole)
            stem = os.path.basename(args.out).removesuffix(".safetensors")
            lora.remove_stale(os.path.dirname(os.path.abspath(args.out)), stem + ".")
            lora.remove_stale(run_files(args.out)[1], "step_")
        self.metrics = MetricsLog(args.out, self.step, self.master,  # <out>.log.jsonl, continued on --resume
                                  args.report_to == "tensorboard")
        if self.master and args.val_every:  # rank 0 draws the grids; the others wait at the next all-reduce
            self.validate = validation(teacher, self.shown, val_steps, sample, self.autocast, self.metrics,
                                       os.path.basename(args.out))
            if self.step == 0:
                self.validate(0)  # where the student starts
        self.interval = {}  # model forwards per adapter since the last log line, this rank
        self.counting = lora.count_forwards(teacher.denoiser)
        self.calls = self.counting.__enter__()
        from tqdm import tqdm
        self.bar = tqdm(total=args.iters, initial=self.step, disable=not self.master, desc=f"{self.stage} CD")

    def update(self, name, losses):
        """One AdamW step of part `name` on the mean of `losses`, one per micro-batch (--grad-accum), each made after
        the last one's backward: the gradients add up over the micro-batches and are averaged over the ranks during
        the last backward. A non-finite loss stops the run before the step: the last checkpoint stays the last good
        one. Returns the mean loss, a tensor (the log sums them on the device)."""
        n, opt = self.args.grad_accum, self.opts[name]
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for i, micro_loss in enumerate(losses):
            with self.syncs[name].backward(last=i == n - 1):  # under torchrun: the all-reduce, at the last
                (micro_loss / n).backward()
            loss = loss + micro_loss.detach() / n
        if self.ddp:
            loss = mean_over_ranks(loss, self.world)
        if not torch.isfinite(loss):
            self.bar.close()
            lr = "--lr" if name == "student" else "--lr-aux"
            raise SystemExit(f"error: the {name} loss is {loss.item()} at step {self.step}; stopped. {self.args.out} "
                             f"keeps the last good checkpoint (try a lower {lr})")
        self.work[name].step(opt)  # AdamW (on the fp32 masters of bf16 copies, with --adapters base)
        return loss

    def next(self, logs, save):
        """The iteration's end: its model forwards counted, the step, every --log-every a metrics line (the interval's
        mean losses, the learning rates, the forwards per sample of each adapter), every --val-every a
        validation grid, every --save-every the checkpoint pair (save(): the stage's own)."""
        args = self.args
        for adapter, n in self.calls:
            self.interval[adapter or "teacher"] = self.interval.get(adapter or "teacher", 0) + n
        self.forwards += sum(n for _, n in self.calls) * self.world  # the run's training budget, all ranks
        self.calls.clear()
        self.step += 1
        self.bar.update(1)
        self.metrics.add(logs)
        if self.step % args.log_every == 0 or self.step == args.iters:
            samples = (self.step - self.metrics.step) * args.batch * args.grad_accum  # this interval's, this rank
            written = self.metrics.write(self.step, **{f"lr_{k}": o.param_groups[0]["lr"] for k, o in self.opts.items()},
                                         **{f"fwd_per_sample_{k}": n / samples for k, n in self.interval.items()},
                                         forwards=self.forwards)
            self.interval.clear()
            if self.master:
                self.bar.set_postfix({k: f"{written[k]:.4g}" for k in logs})
        if self.validate and (self.step % args.val_every == 0 or self.step == args.iters):
            self.validate(self.step)
            self.calls.clear()  # validation's forwards are not training's
        if self.step % args.save_every == 0 or self.step == args.iters or self.keeps(self.step):
            save()

    def save(self, hparams, tensors=None, meta=None):
        """The checkpoint pair: first the state (every part, its optimizer, the RNG, the stage's `tensors` and
        `meta`), then the checkpoint (the student LoRA and `hparams`); each written atomically. Every rank prunes its
        prompt cache; rank 0 writes."""
        self.stream.prune()  # every rank: its cached prompt chunks that a resume from here no longer needs
        if not self.master:
            return
        state = dict(tensors or {})
        for k, module in self.modules.items():
            state.update(optimizer_tensors(self.opts[k], f"{k}_optim"))
            state.update({f"{k}.{n}": v for n, v in module.state_dict().items()} if module is not None else
                         lora.state_dict(self.teacher.denoiser, k, k))
        for k in self.held:
            state.update(lora.state_dict(self.teacher.denoiser, k, k))
        lora.save(state_path(self.args.out), state, {"step": self.step, "run": self.id,
                                                     "forwards": self.forwards, **(meta or {})})
        save_checkpoint(self.args.out, self.teacher, self.stage, {**hparams, "step": self.step, "forwards": self.forwards})
        if self.keeps(self.step):
            keep(self.args.out, self.step)

    def keeps(self, step):
        """Whether the student of `step` is kept (--keep-every)."""
        return self.args.keep_every > 0 and step % self.args.keep_every == 0

    def end(self, save):
        """After the last iteration: a final save if the last one was not of this step (a resume from a state newer
        than its checkpoint, at the end); the metrics summary; under torchrun a check that every rank holds rank 0's
        parts."""
        self.counting.__exit__(None, None, None)
        self.bar.close()
        if lora.metadata(self.args.out).get("step") != str(self.step):
            save()
        self.log(prompts_seen(self.stream, self.world))
        self.log(self.metrics.close())
        if self.ddp:
            diff = max(rank_difference(ps) for ps in self.params.values())
            self.log(f"{', '.join(self.params)} identical on all {self.world} ranks: max difference {diff:.3g}")
            self.dist.destroy_process_group()


# ---- watching the student learn: validation grids -----------------------------------------------------------------

VAL_SEED = 0  # the validation noise, the same in every run: two runs' grids compare image by image


def val_prompts(spec, teacher, prompts):
    """The validation prompts: --val-prompts (a file or the prompts; at most 16), else the embedded teacher's digits,
    else the first 4 training prompts. Checked before any training."""
    try:
        chosen = read_prompts(spec, teacher) if spec or teacher.embedded else prompts
        chosen = [chosen[i] for i in range(min(len(chosen), 16 if spec or teacher.embedded else 4))]
        teacher.check_prompts(chosen)
    except ValueError as e:
        raise ValueError(f"--val-prompts: {e}" if spec else str(e)) from None
    return chosen


def validation(teacher, prompts, steps, sample, autocast, metrics, name):
    """validate(step): the student's images of `prompts` from fixed noise (VAL_SEED) at each of `steps` sampling
    steps (sample(cond, z_T, k) -> z_0, run under the training's autocast) -- a row per step count, a column per
    prompt -- into <out>.val/step_<step>.png, its seconds counted in the metrics log. It draws no number from the
    run's generators: a run trains the same with or without it."""
    cond = teacher.encode(prompts)
    z_T = teacher.noise(len(prompts), torch.Generator().manual_seed(VAL_SEED))

    @torch.no_grad()
    def validate(step):
        t0 = time.perf_counter()
        rows = []
        for k in steps:
            with autocast():  # the student as in training; the VAE as the teacher, in its own dtype
                z_0 = sample(cond, z_T, k)
            rows.append(teacher.decode(z_0).float().cpu())
        title = f"{name} at step {step}; columns: {' | '.join(prompts)}"[:200]
        metrics.write_grid(step, torch.cat(rows), [f"{k} steps" for k in steps], title, time.perf_counter() - t0)
    return validate


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

def kept_path(out, step):
    """global.safetensors, step 500 -> global.step_000500.safetensors: the student kept at that step (--keep-every)."""
    stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
    return f"{stem}.step_{step:06d}.safetensors"


def kept_paths(out):
    """{step: path} of the students kept beside `out` (--keep-every), in step order."""
    stem = os.path.basename(out[:-len(".safetensors")] if out.endswith(".safetensors") else out)
    folder = os.path.dirname(os.path.abspath(out))
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(re.escape(stem) + r"\.step_(\d+)\.safetensors", name)
        if m:
            found[int(m.group(1))] = os.path.join(folder, name)
    return dict(sorted(found.items()))


def keep(out, step):
    """The checkpoint at `out` (of `step`), copied byte for byte to kept_path(out, step), atomically."""
    with lora.atomic(kept_path(out, step)) as tmp:
        shutil.copyfile(out, tmp)


def run_files(out):
    """local.safetensors -> (local.log.jsonl, local.val): a run's metrics log and its folder of validation grids."""
    stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
    return stem + ".log.jsonl", stem + ".val"


REPORT_HELP = ("where the metrics go besides <out>.log.jsonl (always written): tensorboard also writes its scalars "
               "and the validation grids to <out>.tb/ (pip install tensorboard; tensorboard --logdir <out>.tb)")


def summary_writer():
    """torch's TensorBoard SummaryWriter class, or one line and exit if the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("error: --report-to tensorboard needs the tensorboard package: pip install tensorboard") \
            from None
    return SummaryWriter


def tensorboard_writer(out, step):
    """A TensorBoard writer into <out>.tb/ that drops what an earlier session logged after `step` (the steps a resume
    from `step` logs again; all of it for a fresh run)."""
    stem = out[:-len(".safetensors")] if out.endswith(".safetensors") else out
    if not step:  # a fresh run starts anew, as its metrics log does
        shutil.rmtree(stem + ".tb", ignore_errors=True)
    return summary_writer()(stem + ".tb", purge_step=step + 1 if step else None)


class MetricsLog:
    """The run's metrics log, <out>.log.jsonl: one JSON line per logging interval, written by rank 0 and flushed at
    once, so `tail -f` and `python eval.py --curves` read a running job. A line holds the step, the interval's mean of
    every loss term (add), what the script passes to write (learning rates, forwards counters), iterations per second
    (validation excluded), the interval's validation seconds, the CUDA memory peak so far and the elapsed seconds.
    A fresh run starts the log anew; --resume from step N keeps its lines up to N (later ones were written past the
    last save; the resumed run writes them again) and continues it, elapsed time included. The validation grids of
    steps after N go likewise."""

    def __init__(self, out, step, master, tensorboard=False):
        self.path, self.folder = run_files(out)
        self.tb = tensorboard_writer(out, step) if tensorboard and master else None  # --report-to tensorboard
        self.master, self.step, self.sums, self.n = master, step, {}, 0
        self.val_s = self.val_total = self.elapsed = 0.0
        self.t0 = self.t_last = time.perf_counter()
        if not master:
            return
        kept = []
        if step > 0 and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if (read_line(line) or {}).get("step", step + 1) <= step]
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
        if self.tb:
            for k, v in line.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()
        return line

    def write_grid(self, step, images, prompts, title, seconds):
        """Writes a validation grid to <out>.val/step_<step>.png (rank 0) and counts its cost in the log."""
        self.val_s += seconds
        self.val_total += seconds
        if not self.master:
            return
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"step_{step:06d}.png")
        image = grid(images, prompts, title)
        with lora.atomic(path) as tmp:
            image.save(tmp, format="PNG")
        if self.tb:
            import numpy as np
            self.tb.add_image("validation", np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.tb.flush()

    def close(self):
        """The run's summary line: validation's share of this session's time; the loss curves as a PNG beside the log
        when matplotlib is installed (plotting is optional; training never needs it) and the log has two points."""
        if not self.master:
            return ""
        self.file.close()
        if self.tb:
            self.tb.close()
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


def read_line(line):
    """A metrics line as a dict, or None for what is not one: a line cut short by a stop in its write (a kill, a full
    disk), or an empty one."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_log(path):
    """The lines of a metrics log, as dicts (a line a stop cut short left out)."""
    with open(path) as f:
        return [line for line in map(read_line, f) if line is not None]


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

    def continued(path):
        """(the step --resume continues from, the command that does it); (None, the command that starts the run
        again) when there is no checkpoint to resume (with --overwrite where its state file was written)."""
        again = " ".join(shlex.quote(a) for a in sys.argv[1:] if a not in ("--resume", "--overwrite"))
        launch = "python"
        if "RANK" in os.environ:  # torchrun, with its rendezvous flags (if any) as before
            nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
            launch = (f"torchrun{f' --nnodes {nodes}' if nodes != '1' else ''} "
                      f"--nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '?')}")
        try:  # the state's step when it is newer (an interrupted save): --resume continues from there
            step = read_checkpoint(path)[1]["step"]
            step = lora.metadata(state_path(path)).get("step") or step
        except (ValueError, FileNotFoundError):
            fresh = " --overwrite" * os.path.exists(state_path(path))
            return None, f"{launch} {script} {again}{fresh}".replace("  ", " ")
        return step, f"{launch} {script} {again} --resume".replace("  ", " ")
    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write("\n")  # below the progress bar
        path = out()
        step, command = continued(path)
        if step is None:
            raise SystemExit(f"interrupted before the first checkpoint: no {path} was written; start again with: "
                             f"{command}") from None
        if int(os.environ.get("RANK", 0)) > 0:
            raise SystemExit(1) from None  # rank 0 says it for all
        raise SystemExit(f"interrupted: {path} continues from step {step} with: {command}") from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sys.stderr.write("\n")
        path = out()
        folder = os.path.dirname(os.path.abspath(path))
        pair = sum(os.path.getsize(p) for p in (path, state_path(path)) if os.path.exists(p)) or PAIR_BYTES[0]
        step, command = continued(path)
        kept = f"{path} keeps step {step}, whole; free it and continue with: {command}" if step else \
            f"no checkpoint was written yet; free it and start again with: {command}"
        raise SystemExit(f"error: the disk of {folder} is full (writing {e.filename or 'a file'}): each save writes "
                         f"a checkpoint pair of {pair / 2 ** 20:.0f} MiB beside the last one before replacing it, so "
                         f"about {pair / 2 ** 20 + 64:.0f} MiB must be free there; {kept}") from None
    finally:
        signal.signal(signal.SIGTERM, before)
