"""Few-step sampling with a LogCD student (and many-step sampling with its teacher, for comparison).

    python sample.py --steps 2                                  # global.safetensors, 2 milestone steps
    python sample.py --ckpt local.safetensors --steps 4
    python sample.py --teacher digits --steps 25 --cfg 2        # the teacher's own DDIM with CFG
    python sample.py --teacher digits --steps 4 --solver dpmpp2m  # ... or a diffusers solver (DPM-Solver++ 2M)
    python sample.py --ckpt global.safetensors --steps 3 --prompts prompts.txt --per-prompt 4 --out grid.png

A student checkpoint samples in any k = 1..M steps: k milestones spread as evenly as the grid t^s = s T / M allows,
from T down to 0 (local_cd.student_times), one model call per step, LoRA merged into the base weights, no CFG pass.
Default update: the deterministic jump Psi to the next milestone; `--sampler lcm` re-noises x0_hat with fresh noise.
The teacher samples with n evenly spaced trailing DDIM (SDXL, the toy) or Euler (FLUX) steps = the same Psi, or
(--solver, a UNet teacher) with one of diffusers' deterministic multistep solvers on the same trailing steps.
The same --seed gives the same images. `--save-tensors` writes `images` (float32, N x C x H x W, decoded, in
[-1, 1]), `latents` (float32, the final z_0 before decoding) and, for the embedded teacher, `labels` (int64, the
prompted digit).

A student in a stock diffusers pipeline (diffusers_args gives the arguments that put it on its training grid):

    pipe = StableDiffusionXLPipeline.from_pretrained(..., dtype=torch.bfloat16)   # or FluxPipeline
    pipe.load_lora_weights("global.safetensors")
    images = pipe(prompts, **diffusers_args("global.safetensors", steps=3)).images
"""
import argparse
import os
import sys
import tempfile

import torch
from tqdm import tqdm

import lora
from local_cd import PRESETS, cfg, pipeline_args, solve, student_times, teacher_times
from runs import Parser, count, grid, weight
from teachers import (DTYPE_HELP, DTYPES, default_device, load_student, load_teacher, precision, read_checkpoint,
                      read_prompts)


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="student checkpoint (local.safetensors / global.safetensors); default: "
                                    "global.safetensors if it exists")
    src.add_argument("--teacher", help="sample the teacher itself: digits (embedded), sdxl, flux, a folder or hub id")
    p.add_argument("--steps", type=count, default=None, help="model calls per image (student: 1..M, default 4; "
                                                           "teacher: default 25)")
    p.add_argument("--cfg", type=weight, default=None, help="teacher only: CFG scale w in eps(null) + w (eps(c) - "
                   "eps(null)) (w = 1: no guidance; FLUX.1-dev: the guidance embedding); default: the teacher's")
    p.add_argument("--prompts", nargs="+", default=None, help="a text file (one prompt per line) or the prompts "
                   "themselves; the embedded teacher's prompts are the digits 0..9 (default: all ten)")
    p.add_argument("--per-prompt", type=count, default=8, help="images per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["psi", "lcm"], default="psi", help="student only: its update between "
                   "milestones: psi = deterministic jump, lcm = re-noise x0_hat with fresh noise")
    p.add_argument("--solver", choices=["psi", *SOLVERS], default="psi", help="teacher only: psi = its DDIM / Euler "
                   "step (this repository's solver); or diffusers' scheduler for a UNet teacher, trailing, one model "
                   "call per step (CFG: 2): " + ", ".join(f"{k} = {v[0]}" for k, v in SOLVERS.items()))
    p.add_argument("--clip", action="store_true", help="clip x0_hat to [-1, 1] at every step (pixel-space toy only)")
    p.add_argument("--batch", type=count, default=None, help="images per model call (default: 1000 on the embedded "
                                                           "teacher, 4 otherwise)")
    p.add_argument("--out", default="samples.png", help="labelled PNG grid (rows: prompts)")
    p.add_argument("--save-tensors", default=None, help="also write the decoded images (and labels) here")
    p.add_argument("--resolution", type=count, default=1024, help="teacher only (SDXL / FLUX): image size in pixels")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help=DTYPE_HELP)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def check_output(path, formats, flag):
    """One line, before any work, if `path` cannot be written: an unknown extension, a missing or read-only folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.splitext(path)[1].lower() not in formats:
        raise SystemExit(f"error: {flag} {path}: the file name must end in {' or '.join(formats)}")
    if not os.path.isdir(folder):
        raise SystemExit(f"error: {flag} {path}: the folder {folder} does not exist")
    try:  # the one sure test of writability: write (os.access says yes to root everywhere)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError:
        raise SystemExit(f"error: {flag} {path}: the folder {folder} is not writable") from None


def diffusers_args(ckpt, steps=4):
    """Keyword arguments for a stock diffusers pipeline call that samples the student `ckpt` (loaded into the pipeline
    with pipe.load_lora_weights(ckpt)) on the grid it was trained on, the grid sample.py uses: the same latents
    (local_cd.pipeline_args). A checkpoint also carries them in its metadata ("pipeline_args", every k = 1..M), for
    code that imports only safetensors and diffusers."""
    _, meta = read_checkpoint(ckpt)
    flow = meta.get("lora_prefix") == "transformer"  # FLUX
    return pipeline_args(steps, int(meta["M"]), flow, int(meta.get("resolution", 1024)))


# diffusers' deterministic multistep solvers (one model call per step), for a UNet teacher: --solver
SOLVERS = {"ddim": ("DDIMScheduler", {}),
           "dpmpp2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
           "unipc": ("UniPCMultistepScheduler", {"solver_order": 2}),
           "deis": ("DEISMultistepScheduler", {"solver_order": 2})}


def scheduler_solve(teacher, name, steps):
    """A solve(x0_fn, z_T, ...) that runs diffusers' scheduler `name` (SOLVERS) in `steps` trailing steps from t = T
    in place of Psi: the teacher's stock few-step samplers, built from its own noise schedule. The scheduler's step
    takes eps_hat = (z_t - alpha_t x0_hat) / sigma_t of the guided x0_hat; its timestep index k is our t = k + 1."""
    import diffusers
    cls, kwargs = SOLVERS[name]
    sched = getattr(diffusers, cls).from_config(teacher.scheduler_config, timestep_spacing="trailing",
                                                prediction_type="epsilon", **kwargs)

    def run(x0_fn, z, ts=None, alpha_sigma=None, noises=None):
        sched.set_timesteps(steps)  # also clears a multistep solver's history
        for k in sched.timesteps:
            t = torch.full((len(z),), float(k) + 1, device=z.device)
            x0_hat = x0_fn(z, t)
            alpha, sigma = teacher.alpha_sigma(t)
            z = sched.step((z - alpha * x0_hat) / sigma, k, z).prev_sample
        return z
    return run


def x0_function(teacher, student, w=None, clip=False):
    """x0_hat(z, t, cond) of the sampler: the student (no CFG pass: it learned the guided teacher) or the teacher
    with CFG at scale w; with clip, x0_hat clipped to [-1, 1] (the pixel-space toy)."""
    def x0_fn(z, t, cond):
        x0 = teacher.x0(z, t, cond) if student else cfg(teacher, z, t, cond, w)
        return x0.clamp(-1, 1) if clip else x0
    return x0_fn


def sampling(teacher, student):
    """The weights to sample with: the student's adapter merged into the base (no per-layer overhead, as a diffusers
    pipeline runs it), or the teacher's own, no adapter active."""
    return lora.merged(teacher.denoiser, "student") if student else lora.adapter(teacher.denoiser, None)


def generate(teacher, x0_fn, ts, prompts, z_T, per=1, batch=4, noises=None, chunk=256, solver=solve):
    """The sampling loop of sample.py and eval.py: image i starts from the noise z_T[i] with the prompt
    prompts[i // per] (len(prompts) * per images) and is solved along the times ts, `batch` images per model call.
    The prompts are encoded a chunk at a time, each once: the text encoders visit the GPU once per chunk. noises:
    the LCM sampler's fresh noise, one (N, ...) tensor per step. Yields (the slice of image indices, their final
    latents z_0, their decoded images) batch by batch; run it under torch.no_grad() and `sampling`. solver: solve
    (Psi, or the LCM sampler with noises), or scheduler_solve's diffusers solver."""
    for j in range(0, len(prompts), chunk):
        embeds = teacher.encode(prompts[j:j + chunk], device="cpu")
        end = min(j + chunk, len(prompts)) * per
        for i in range(j * per, end, batch):
            sl = slice(i, min(i + batch, end))
            cond = {k: v[torch.arange(sl.start, sl.stop) // per - j].to(teacher.device) for k, v in embeds.items()}
            z0 = solver(lambda z, t: x0_fn(z, t, cond), z_T[sl], ts, teacher.alpha_sigma,
                        None if noises is None else noises[:, sl])
            yield sl, z0, teacher.decode(z0)


def main(argv=None):
    args = parse_args(argv)
    # a flag of the other kind of model, in one line before any model loads
    if args.teacher and args.sampler != "psi":  # the LCM sampler re-noises a consistency model's x0_hat: a student's
        raise SystemExit(f"error: --sampler {args.sampler} is for a student; the teacher samples with its own solver "
                         "(--solver)")
    if not args.teacher and args.solver != "psi":
        raise SystemExit("error: --solver is for the teacher; a student samples on its milestones (--sampler)")
    if args.ckpt is None and args.teacher is None:
        if not os.path.exists("global.safetensors"):
            raise SystemExit("error: no --ckpt given and no global.safetensors here. Train a student (python local_cd.py,"
                             " then python global_cd.py), pass --ckpt local.safetensors, or sample the teacher with "
                             "--teacher digits")
        args.ckpt = "global.safetensors"
        print("sampling global.safetensors (pass --ckpt to choose another)")
    check_output(args.out, IMAGE_FORMATS, "--out")  # before any model loads: a bad path loses no sampling
    if args.save_tensors:
        check_output(args.save_tensors, {".safetensors": None}, "--save-tensors")
    # precision: the student's LoRA is merged into the base, so every forward runs plainly in `dtype`, no autocast:
    # exactly how a diffusers pipeline in that dtype runs it
    dtype = precision(args.device or default_device(), args.dtype)[0]
    try:
        if args.ckpt:
            teacher, _, meta = load_student(args.ckpt, args.device, dtype=dtype)
            M, k = int(meta["M"]), args.steps or 4
            if args.cfg is not None:
                raise SystemExit("error: --cfg is for the teacher; the student was distilled with CFG "
                                 f"(w = {meta.get('w')}) and needs no guidance pass")
            ts = student_times(k, M)
            what = f"{os.path.basename(args.ckpt)} ({meta['stage']} CD, M={M}), {k} steps {args.sampler}"
        else:
            teacher = load_teacher(args.teacher, args.device, args.resolution, dtype)
            k, w = args.steps or 25, args.cfg if args.cfg is not None else PRESETS[teacher.family]["w"]
            ts = teacher_times(k)
            method = "Euler" if teacher.prediction == "flow" else "DDIM"
            if args.solver != "psi":
                if not hasattr(teacher, "scheduler_config"):
                    raise SystemExit(f"error: --solver {args.solver} is for a UNet (DDPM) teacher; {teacher.id} is a "
                                     "flow: its Euler step is --solver psi")
                method = SOLVERS[args.solver][0]
            what = f"teacher {teacher.id}, {k} steps {method}, w={w:g}"
        prompts = read_prompts(args.prompts, teacher)
        teacher.check_prompts(prompts)  # before any sampling: the prompts are encoded a batch at a time
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    if args.clip:
        what += ", x0 clipped"

    prompts = list(prompts)
    N, per = len(prompts) * args.per_prompt, args.per_prompt
    gen = torch.Generator().manual_seed(args.seed)
    z_T = teacher.noise(N, gen)
    renoise = torch.randn(k, *z_T.shape, generator=gen).to(z_T.device) if args.sampler == "lcm" else None
    batch = args.batch or (1000 if teacher.embedded else 4)
    x0_fn = x0_function(teacher, bool(args.ckpt), None if args.ckpt else w, args.clip)
    solver = solve if args.solver == "psi" else scheduler_solve(teacher, args.solver, k)
    images, latents = [], []
    with torch.no_grad(), sampling(teacher, bool(args.ckpt)), tqdm(total=N, desc=what, disable=N <= batch) as bar:
        for sl, z0, x in generate(teacher, x0_fn, ts, prompts, z_T, per, batch, renoise, solver=solver):
            latents.append(z0.float().cpu())
            images.append(x.float().cpu())
            bar.update(sl.stop - sl.start)
    images, latents = torch.cat(images), torch.cat(latents)

    with lora.atomic(args.out) as tmp:
        grid(images, prompts, what).save(tmp, format=IMAGE_FORMATS[os.path.splitext(args.out)[1].lower()])
    print(f"wrote {args.out} ({N} images: {what})")
    if args.save_tensors:
        tensors = {"images": images.contiguous(), "latents": latents.contiguous()}
        if teacher.embedded:
            tensors["labels"] = torch.tensor([int(p) if p.isdigit() else -1 for p in prompts
                                              for _ in range(args.per_prompt)], dtype=torch.int64)
        lora.save(args.save_tensors, tensors, {"what": what, "seed": args.seed, "prompts": "|".join(prompts)})
        print(f"wrote {args.save_tensors}")


if __name__ == "__main__":
    main(sys.argv[1:])
