"""LogCD stage 1: local consistency distillation.

Paper: "LogCD: Local-to-global Consistency Distillation for Few-step Image Generation" (CVPR 2026), Method 1.
This file holds the method's common ground, which stage 2 and the sampler import too: time and milestones, the
one solver step Psi, classifier-free guidance, the distance d; then stage 1 itself: the image-free trajectory
buffer, the local consistency loss, and its training loop (main). What surrounds the loop (arguments, resume,
torchrun, logs) is runs.py's; the teachers, prompts and checkpoints are teachers.py's.

Time: t in [0, T], T = 1000, for every teacher; t = 0 is the clean latent (alpha = 1, sigma = 0).
  DDPM teachers (SDXL, the digits toy): t = k is the training index k - 1 (so t = T is index 999, "trailing").
  Flow teachers (FLUX): sigma = shift(t / T), alpha = 1 - sigma.
"""
import argparse
import json
import math
import os

import torch

import lora
import runs
import teachers
from teachers import T

# ---- the paper's values, per teacher family (every flag left out takes its family's; --help shows them) -----------

TOY_LLPIPS = os.path.join(teachers.HERE, "toy", "llpips.safetensors")  # L-LPIPS trained on the embedded teacher

PAPER = dict(M=8, skip=20, rank=64, lr=1e-4, d=None, llpips=None)  # Method 1 and its experiments
PRESETS = {
    # the embedded teacher: ours, sized to finish in minutes on a CPU; w and d measured (its L-LPIPS was unstable in
    # stage 1 at this lr)
    "digits": {**PAPER, "w": 1.5, "lr": 1e-3, "batch": 64, "iters": 400, "trajectories": 16, "buffer": 4096,
               "reuse": 4, "save_every": 100, "val_every": 50, "d": "mse", "llpips": TOY_LLPIPS},
    "sdxl": {**PAPER, "w": 7.0, "batch": 4, "iters": 12000, "trajectories": 4, "buffer": 512, "reuse": 4,
             "save_every": 500, "val_every": 500},
    # FLUX.1-dev is guidance-distilled: w = 3.5 enters its guidance embedding (a departure: the paper gives w = 7)
    "flux": {**PAPER, "w": 3.5, "batch": 2, "iters": 6000, "trajectories": 2, "buffer": 256, "reuse": 4,
             "save_every": 500, "val_every": 500},
}
# SDXL / FLUX have no d: the paper's is an L-LPIPS of the teacher's VAE (llpips.py trains one), or --distance mse


# ---- time: milestones and step grids ------------------------------------------------------------------------------

def milestones(M):
    """t^s = s T / M, s = 0..M."""
    return torch.arange(M + 1, dtype=torch.float64) * T / M


def segment(t, M):
    """s such that t lies in (t^s, t^{s+1}]; t = 0 belongs to segment 0. A t within 1e-4 of a segment's width of a
    milestone is that milestone: t M / T in floating point lands a hair above s + 1 for some milestones (M = 15: t^7
    = 466.66..., 7.0000000000000009 segments), which would put t^{s+1} into the segment above it."""
    return (torch.ceil(torch.as_tensor(t, dtype=torch.float64) * M / T - 1e-4).long() - 1).clamp(0, M - 1)


def student_times(k, M):
    """k sampling steps on the milestone grid, from T down to 0: milestone indices round(M (k - i) / k), i = 0..k.
    M = 8: k = 4 -> 1000 750 500 250 0; k = 3 -> 1000 625 375 0; k = 2 -> 1000 500 0. Any k in 1..M. An LCM-style
    student (M = 1) is consistent to t = 0 from every t: its k steps are spread evenly, any k."""
    if M == 1:
        return [T * (k - i) / k for i in range(k + 1)]
    if not 1 <= k <= M:
        raise ValueError(f"a student trained with M = {M} milestones samples in 1..{M} steps, not {k}")
    return [float(milestones(M)[round(M * (k - i) / k)]) for i in range(k + 1)]


def pipeline_args(k, M, flow, resolution):
    """The keyword arguments that put a stock diffusers pipeline on the student's k-step grid (student_times), so that
    pipe.load_lora_weights(checkpoint); pipe(prompt, **pipeline_args(k, M, flow, resolution)) draws what sample.py
    draws from the same noise (flow: a FLUX teacher). The pipelines append the final t = 0 themselves.
    SDXL (any UNet teacher): StableDiffusionXLPipeline with SDXL's own EulerDiscreteScheduler ("leading" spacing, the
      one under which it scales the initial noise exactly), whose Euler step on eps in sigma_t / alpha_t is the DDIM
      step Psi. `timesteps` are the grid's training indices t - 1: M = 8, 3 steps -> 999 624 374, where the
      scheduler's own spacings give 667 334 1 ("leading") or 999 666 332 ("trailing"). guidance_scale = 1: no CFG
      pass; the student learned the guided teacher.
    FLUX: FluxPipeline with its FlowMatchEulerDiscreteScheduler. `sigmas` are t / T before the time shift, which the
      pipeline applies for its resolution as the teacher did in training: 3 steps -> 1 0.625 0.375, shifted at
      1024 px to 1 0.840 0.655, where the default spacing gives 1 0.863 0.612. The guidance embedding stays at the
      pipeline's default, 3.5, the value the student ran at in training.
    Exact where the milestones are whole timesteps (M divides 1000); elsewhere the SDXL scheduler interpolates sigma
    where the teacher interpolates log alpha-bar, a small difference."""
    ts = student_times(k, M)[:-1]
    if flow:
        return {"sigmas": [t / T for t in ts], "num_inference_steps": k, "height": resolution, "width": resolution}
    return {"timesteps": [t - 1 for t in ts], "guidance_scale": 1.0, "height": resolution, "width": resolution}


def pipeline_grid(M, teacher):
    """What a checkpoint records of its grid for the stock pipelines (none for the embedded teacher, which has no
    pipeline): pipeline_args of every k = 1..M (1..4 for an LCM-style M = 1), as JSON under "pipeline_args"."""
    if teacher.embedded:
        return {}
    flow, steps = teacher.prediction == "flow", range(1, M + 1) if M > 1 else range(1, 5)
    return {"pipeline_args": json.dumps({k: pipeline_args(k, M, flow, teacher.resolution) for k in steps})}


def teacher_times(n):
    """n evenly spaced DDIM / Euler steps, trailing: the first step starts at t = T (pure noise)."""
    return torch.linspace(T, 0, n + 1, dtype=torch.float64).tolist()


# ---- the one solver --------------------------------------------------------------------------------------------

def Psi(z_t, x0_hat, t, s, alpha_sigma):
    """Moves z_t to time s along the straight line the prediction x0_hat defines. DDIM step for DDPM teachers,
    exactly the Euler step for rectified flows. Psi(z, x0, t, t) = z (at t = 0 too, where eps_hat is undefined).
    t, s: tensors (B,); alpha_sigma: t -> (alpha_t, sigma_t) shaped (B, 1, 1, 1)."""
    a_t, s_t = alpha_sigma(t)
    a_s, s_s = alpha_sigma(s)
    # eps_hat = (z_t - alpha_t x0_hat) / sigma_t
    eps_hat = (z_t - a_t * x0_hat) / s_t.clamp_min(1e-12)
    # Psi = alpha_s x0_hat + sigma_s eps_hat
    z_s = a_s * x0_hat + s_s * eps_hat
    same = (torch.as_tensor(t) == torch.as_tensor(s)).view(-1, *[1] * (z_t.dim() - 1)).to(z_t.device)
    return torch.where(same, z_t, z_s)


def solve(x0_fn, z, ts, alpha_sigma, noises=None):
    """Runs z from ts[0] down to ts[-1]. Each step: x0_hat = x0_fn(z, t), then z = Psi(z, x0_hat, t, s).
    With noises (one N(0, I) tensor like z per step), the LCM-style multistep sampler instead re-noises x0_hat to s:
    z = alpha_s x0_hat + sigma_s noises[i]. Returns the final z (at ts[-1] = 0: the clean latent).
    Each time is a number (the whole batch) or a tensor (B,) (one time per sample, as stage 2's teacher solver uses)."""
    B = z.shape[0]
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        t_, s_ = (torch.as_tensor(u, dtype=torch.float32, device=z.device).expand(B) for u in (t, s))
        x0_hat = x0_fn(z, t_)
        if noises is None:
            z = Psi(z, x0_hat, t_, s_, alpha_sigma)
        else:
            a_s, s_s = alpha_sigma(s_)
            z = a_s * x0_hat + s_s * noises[i]
    return z


def student_sample(teacher, cond, z_T, k, M, adapter="student"):
    """z_0 from z_T by the student's k-step sampler: Psi between the milestones student_times(k, M), one student
    call per step (stage 2's image-free inputs, the validation grids; sample.py runs the same with the LoRA merged).
    adapter: the student's, or a copy of it an option holds."""
    with lora.adapter(teacher.denoiser, adapter):
        return solve(lambda z, t: teacher.x0(z, t, cond), z_T, student_times(k, M), teacher.alpha_sigma)


# ---- classifier-free guidance -----------------------------------------------------------------------------------

def cfg(teacher, z, t, cond, w):
    """The teacher's x0_hat with classifier-free guidance, in the paper's (Ho-Salimans) form; w = 1 is the plain
    conditional model (diffusers' guidance_scale uses the same convention). x0_hat is affine in the model's output,
    so the guidance is exact on x0_hat for epsilon, v and flow teachers alike. FLUX.1-dev is guidance-distilled: w
    enters its guidance embedding, one pass, no null prompt (teacher.guidance_embedded). w: a number, or a function
    of t giving each sample's w, shaped (B, 1, 1, 1) (stage 2's --guidance-interval, an option)."""
    w = w(t) if callable(w) else w
    if teacher.guidance_embedded:
        return teacher.x0(z, t, cond, guidance=w)
    # one batched pass for both halves: the prompt and the null prompt
    x0_c, x0_null = teacher.x0(torch.cat([z, z]), torch.cat([t, t]),
                               teachers.cond_cat(cond, teacher.null(len(z)))).chunk(2)
    # eps_w = eps(null) + w (eps(c) - eps(null))
    return x0_null + w * (x0_c - x0_null)


def cfg_passes(teacher):
    """Model forwards per sample of one guided x0_hat (cfg): 2, or 1 for a guidance-distilled teacher."""
    return 1 if teacher.guidance_embedded else 2


# ==== Stage 1: local consistency distillation ======================================================================

def local_loss(teacher, d, z_m, t_m, z_n, t_n, t_s, cond):
    """The stage-1 loss on a batch of pairs, with the student adapter active. Returns (loss, target). Pairs whose t_n
    is the milestone itself need no student forward for their target."""
    # g_theta(z_{t_m}, t_m, t^s) = Psi(z_{t_m}, x0_theta(z_{t_m}, t_m), t_m, t^s)
    g_m = Psi(z_m, teacher.x0(z_m, t_m, cond), t_m, t_s, teacher.alpha_sigma)
    with torch.no_grad():
        # sg[g_theta(z_{t_n}, t_n, t^s)]; at t_n = t^s it is z_{t^s} itself (the boundary condition)
        g_n, inner = z_n.clone(), (t_n > t_s).nonzero().flatten()
        if len(inner):
            zi, ti, si = z_n[inner], t_n[inner], t_s[inner]
            x0_i = teacher.x0(zi, ti, teachers.cond_index(cond, inner))
            g_n[inner] = Psi(zi, x0_i, ti, si, teacher.alpha_sigma).to(g_n.dtype)
    # L = d(g_theta(z_{t_m}, t_m, t^s), sg[g_theta(z_{t_n}, t_n, t^s)])
    return d(g_m, g_n).mean(), g_n


def local_losses(teacher, d, pairs, micro, autocast):
    """The loss of each micro-batch of `micro` pairs (--grad-accum), one after the other (the trainer runs each one's
    backward before the next is made). pairs: (z_m, t_m, z_n, t_n, t_s, cond), as TrajectoryBuffer.sample gives."""
    for i in torch.arange(len(pairs[0]), device=pairs[0].device).split(micro):
        z_m, t_m, z_n, t_n, t_s = (x[i] for x in pairs[:5])
        with lora.adapter(teacher.denoiser, "student"), autocast():
            loss = local_loss(teacher, d, z_m, t_m, z_n, t_n, t_s, teachers.cond_index(pairs[5], i))[0]
        yield loss  # outside autocast and the adapter: the trainer runs its backward before the next is made


def trajectory_times(M, skip, offset=0):
    """The teacher's solver grid for the image-free training data, T down to 0, and which steps are training pairs.
    In each segment (t^s, t^{s+1}]: t^{s+1}, then t_m = t^{s+1} - offset, t_m - skip, ... and finally t^s. Every
    step after the segment's first goes from t_m to t_n = max(t_m - skip, t^s): one training pair per teacher step.
    (The first, t^{s+1} -> t^{s+1} - offset, only moves the grid: offset in [0, skip) lets t_m reach every t.)"""
    ts, is_pair, grid = [float(T)], [], milestones(M).tolist()
    for s in reversed(range(M)):
        lo, hi = grid[s], grid[s + 1]
        t = hi - offset
        if offset:
            ts.append(t)
            is_pair.append(False)
        while t > lo:
            t = max(t - skip, lo)
            ts.append(t)
            is_pair.append(True)
    return ts, is_pair


class TrajectoryBuffer:
    """Image-free stage-1 data: teacher trajectories from pure noise (CFG, the solver Psi on trajectory_times),
    cut into (z_{t_m}, z_{t_n}) pairs and kept in a pool that every batch samples from. The naive way re-runs the
    teacher from T to t_m for each pair; here one teacher step makes one pair, and each pair is drawn `reuse`
    times on average before new trajectories replace the oldest (FIFO). Each refill draws its `trajectories`
    prompts from a PromptStream; the pool keeps the conditioning of the trajectories it holds pairs of, no more."""

    def __init__(self, teacher, prompts, M, skip, w, trajectories, capacity, reuse, generator):
        self.teacher, self.prompts, self.M, self.skip, self.w = teacher, prompts, M, skip, w
        self.trajectories, self.capacity, self.reuse, self.gen = trajectories, capacity, reuse, generator
        self.pool = self.conds = None  # the pairs; the conditioning of trajectories first, first + 1, ...
        self.first = self.made_trajectories = 0
        self.made = self.served = 0  # pairs made / pairs served
        self.teacher_forwards = 0  # model forward passes, counted per sample (a CFG step = 2)
        self.naive_forwards = 0  # what re-running the teacher from T to t_n for each served pair would have cost
        self.cfg_passes = cfg_passes(teacher)

    @torch.no_grad()
    def refill(self):
        n, dev = self.trajectories, self.teacher.device
        cond, idx = self.prompts.take(n)
        traj = torch.arange(self.made_trajectories, self.made_trajectories + n, device=dev)
        offset = int(torch.randint(0, math.ceil(min(self.skip, T / self.M)), (1,), generator=self.gen))
        ts, is_pair = trajectory_times(self.M, self.skip, offset)
        z = self.teacher.noise(n, self.gen)
        rows = {k: [] for k in ("z_m", "z_n", "t_m", "t_n", "t_s", "prompt", "traj", "depth")}
        for depth, (t, s, keep) in enumerate(zip(ts[:-1], ts[1:], is_pair)):
            t_, s_ = torch.full((n,), t, device=dev), torch.full((n,), s, device=dev)
            # z_{t_n} = Psi(z_{t_m}, x0_hat_w(z_{t_m}), t_m, t_n): one teacher solver step with CFG (no adapter)
            with lora.adapter(self.teacher.denoiser, None):
                z_next = Psi(z, cfg(self.teacher, z, t_, cond, self.w), t_, s_, self.teacher.alpha_sigma)
            self.teacher_forwards += n * self.cfg_passes
            if keep:
                t_s = float(milestones(self.M)[segment(t, self.M)])
                for k, v in (("z_m", z), ("z_n", z_next), ("t_m", t_), ("t_n", s_), ("t_s", torch.full_like(t_, t_s)),
                             ("prompt", idx.to(dev)), ("traj", traj), ("depth", torch.full((n,), depth + 1, device=dev))):
                    rows[k].append(v.float() if v.is_floating_point() else v)
            z = z_next
        new = {k: torch.cat(v) for k, v in rows.items()}
        self.pool = new if self.pool is None else {k: torch.cat([self.pool[k], new[k]])[-self.capacity:]
                                                   for k in new}
        self.conds = cond if self.conds is None else teachers.cond_cat(self.conds, cond)
        self.made_trajectories += n
        drop = int(self.pool["traj"].min()) - self.first  # trajectories none of whose pairs is left in the pool
        self.conds, self.first = {k: v[drop:] for k, v in self.conds.items()}, self.first + drop
        self.made += len(new["t_m"])

    def sample(self, B):
        """B pairs: (z_m, t_m, z_n, t_n, t_s, cond)."""
        while self.pool is None or len(self.pool["t_m"]) < min(B, self.capacity) or self.served >= self.reuse * self.made:
            self.refill()
        i = torch.randint(0, len(self.pool["t_m"]), (B,), generator=self.gen).to(self.teacher.device)
        p = {k: v[i] for k, v in self.pool.items()}
        self.served += B
        self.naive_forwards += int(p["depth"].sum()) * self.cfg_passes
        return p["z_m"], p["t_m"], p["z_n"], p["t_n"], p["t_s"], teachers.cond_index(self.conds, p["traj"] - self.first)

    def planned_refills(self, iters, batch):
        """About how many refills `iters` iterations of `batch` pairs take: each makes `trajectories` times the
        pairs of one trajectory (trajectory_times) and serves `reuse` times as many."""
        pairs = self.trajectories * sum(trajectory_times(self.M, self.skip, 1)[1])  # a shifted grid, the usual one
        return math.ceil(iters * batch / (self.reuse * pairs))

    def state(self):
        tensors = {}
        if self.pool is not None:
            tensors = {**{f"buffer.{k}": v.cpu() for k, v in self.pool.items()},
                       **{f"buffer_cond.{k}": v.cpu() for k, v in self.conds.items()}}
        counters = ("made", "served", "teacher_forwards", "naive_forwards", "first", "made_trajectories")
        return tensors, {**{k: getattr(self, k) for k in counters}, "prompts_drawn": self.prompts.drawn}

    def load(self, tensors, counters):
        if "buffer.t_m" in tensors and "buffer.traj" not in tensors:
            raise ValueError("its trajectory pool was saved by an older version (before prompt streams); start a new run")
        dev = self.teacher.device
        self.pool = {k[len("buffer."):]: v.to(dev) for k, v in tensors.items() if k.startswith("buffer.")} or None
        self.conds = {k[len("buffer_cond."):]: v.to(dev) for k, v in tensors.items() if k.startswith("buffer_cond.")}
        counters = dict(counters)
        self.prompts.drawn = int(counters.pop("prompts_drawn", 0))
        for k, v in counters.items():
            setattr(self, k, int(v))


# ---- the distance d: MSE, or L-LPIPS (the paper's) ---------------------------------------------------------------

DISTANCE_HELP = ("d: the consistency distance: llpips, the paper's recipe in both stages (Table 3's last row; --llpips "
                 "FILE alone means it), or mse, Table 3's MSE row. SDXL / FLUX.1-dev: give one (llpips.py trains an "
                 "L-LPIPS). --d is the same flag, but not under torchrun, which takes --d for its own flags")
LLPIPS_HELP = "the L-LPIPS of this teacher's VAE (llpips.py writes one); given alone, it makes d = llpips"


def distance(name, llpips_path=None, device="cpu"):
    """d(x, y) of the consistency loss, per sample: mse, or L-LPIPS (a perceptual distance on latents, llpips.py;
    its file was checked before any model loaded: runs.check_inputs)."""
    if name == "mse":
        return lambda x, y: (x.float() - y.float()).pow(2).flatten(1).mean(1)
    import llpips
    try:
        net = llpips.load(llpips_path, device)
    except (ValueError, RuntimeError) as e:  # a truncated file, or weights of another shape than its metadata says
        raise SystemExit(f"error: --llpips {llpips_path}: {str(e).strip().splitlines()[0][:200]}") from None

    def d(x, y):
        # in fp32, outside autocast: the loss compares nearly equal latents, whose L-LPIPS under bf16 autocast is
        # rounding noise (toy L-LPIPS, latents 0.01 apart: 75% mean relative error)
        with torch.autocast(x.device.type, enabled=False):
            return net(x.float(), y.float())
    return d


# ---- the training script ------------------------------------------------------------------------------------------

RUN_VALUES = dict(teacher=str, variant=str, revision=str, resolution=int, M=int, skip=float, w=float, d=str, llpips=str,
                  lr=float, rank=int, seed=int)  # what --resume keeps of a run

STAGE1 = """
Stage 1 (this script): local consistency. [0, T] is cut into M segments at milestones t^s = s T / M; inside each
segment the student learns to map any z_t to the segment's lower end t^s, as the teacher's ODE would:

  g_theta(z_t, t, t^s) = Psi(z_t, x0_theta(z_t, t), t, t^s)
  L = d( g_theta(z_{t_m}, t_m, t^s),  sg[ g_theta(z_{t_n}, t_n, t^s) ] ),  t_n = max(t_m - skip, t^s)

z_{t_n} is one teacher solver step with CFG from z_{t_m}; z_{t_m} comes from teacher trajectories started at pure
noise (image-free), reused across many training pairs. Stop-gradient target, no EMA; only the LoRA trains. Each
flag's value per teacher family is in its help.

  python local_cd.py                                    # the embedded teacher, minutes on a CPU
  torchrun --nproc_per_node 4 local_cd.py --teacher sdxl --prompts prompts.txt --llpips llpips_sdxl.safetensors
  python sample.py --ckpt local.safetensors --steps 4
"""


def parse_args(argv=None):
    p = runs.Parser(description=__doc__ + STAGE1, formatter_class=argparse.RawDescriptionHelpFormatter,
                    presets=PRESETS)
    a = p.add_argument
    a("--teacher", default="digits", help="digits (embedded, default), sdxl, flux, a teacher folder or hub id")
    a("--variant", default=None, help="which weight files of a hub teacher, as diffusers' from_pretrained (e.g. fp16)")
    a("--revision", default=None, help="a hub teacher's branch, tag or commit, as diffusers' from_pretrained")
    a("--prompts", default=None, help="text file, one prompt per line (SDXL / FLUX); the embedded teacher uses 0..9")
    a("--M", type=runs.count, help="M: number of segments; milestones t^s = s T / M")
    a("--skip", type=runs.positive, help="skip: t_n = max(t_m - skip, t^s), in teacher timesteps")
    a("--w", type=runs.weight, help="w: CFG scale of the teacher target, eps(null) + w (eps(c) - eps(null)); "
      "FLUX.1-dev: its guidance embedding, one pass")
    a("--distance", "--d", dest="d", choices=["mse", "llpips"], help=DISTANCE_HELP)
    a("--llpips", type=os.path.abspath, help=LLPIPS_HELP)
    a("--rank", type=runs.count, help="LoRA rank r (alpha = r)")
    a("--lr", type=runs.positive, help="AdamW learning rate")
    a("--batch", type=runs.count, help="training pairs per iteration, rank and micro-batch")
    a("--grad-accum", type=runs.count, default=1, help="micro-batches per iteration: each rank runs N micro-batches "
      "of --batch pairs and takes one AdamW step on their mean, what one batch N times as large trains (to float "
      "rounding) in the memory of one micro-batch: the recipe's batch on fewer GPUs (batch x ranks x N). With "
      "--adapters base the micro-batches' gradients add up in bf16")
    a("--iters", type=runs.count, help="iterations")
    a("--trajectories", type=runs.count, help="teacher trajectories per buffer refill (per rank)")
    a("--buffer", type=runs.count, help="capacity of the pair pool")
    a("--reuse", type=runs.positive, help="draws per training pair on average before it is replaced")
    a("--out", default="local.safetensors", help="the student LoRA; resume state goes to *.state.safetensors")
    a("--save-every", type=runs.count, help="iterations between saves of the checkpoint pair")
    a("--keep-every", type=runs.whole, default=0, help="also keep the student every N iterations: a copy of "
      "the checkpoint named by its step beside --out (local.step_000100.safetensors; a save of the pair at "
      "that step too), never overwritten by later saves, a LoRA's size on disk each; python eval.py --history "
      "scores them (default 0: keep none)")
    a("--resume", action="store_true", help="continue the run saved at --out (LoRA, optimizer, step, RNG, buffer)")
    a("--overwrite", action="store_true", help="replace an existing --out (a fresh run refuses to, by default)")
    a("--grad-checkpointing", action="store_true", help="trade compute for memory (SDXL / FLUX at batch > 1)")
    a("--dtype", choices=list(teachers.DTYPES), default=None, help=teachers.DTYPE_HELP)
    a("--adapters", choices=teachers.ADAPTERS, default="autocast", help=teachers.ADAPTERS_HELP)
    a("--compile", action="store_true", help=runs.COMPILE_HELP)
    a("--resolution", type=runs.count, default=1024, help="SDXL / FLUX image size")
    a("--encode-batch", type=runs.count, default=32, help="prompts per text-encoder call")
    a("--encode-chunk", type=runs.count, default=256, help="prompts encoded together and kept on the host (per rank)")
    a("--seed", type=int, default=0)
    a("--log-every", type=runs.count, default=10, help="iterations per line of the metrics log, <out>.log.jsonl")
    a("--report-to", choices=["jsonl", "tensorboard"], default="jsonl", help=runs.REPORT_HELP)
    a("--val-every", type=lambda x: runs.number(x, int, 0), help="iterations between validation grids, "
      "<out>.val/step_<N>.png (the student at 2, 4 and M steps from fixed noise; also at the start and the end; "
      "0: none)")
    a("--val-prompts", nargs="+", default=None, help="the validation grid's prompts: a text file or the prompts "
      "(default: the embedded teacher's digits, else the first 4 of --prompts)")
    a("--device", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run = runs.Trainer(args, "local", RUN_VALUES)  # torchrun, precision; --resume takes the run's own values
    run.check(args.teacher, args.revision, PRESETS,  # every input checked, and the presets filled in, before loading
              pair_bytes=lambda n_lora, latent: runs.pair_bytes_local(n_lora, latent, args.buffer))
    d = distance(args.d, args.llpips, run.device)  # L-LPIPS read whole now: a broken file is said before the teacher
    hub = {"variant": args.variant, "revision": args.revision}
    teacher = run.load(args.teacher, hub, lambda: teachers.load_teacher(args.teacher, run.device, args.resolution,
                                                                        run.dtype, **hub))
    torch.manual_seed(args.seed)  # the same LoRA init on every rank
    teachers.add_student(teacher, args.rank)
    stream = teachers.open_prompt_stream(teacher, run.prompts, args, run.rank, run.world)  # encoded when drawn
    run.train(teacher, {"student": (args.lr, (0.9, 0.999), None)}, stream)
    gen = torch.Generator().manual_seed(args.seed * 1000 + run.rank)  # each rank draws its own trajectories and pairs
    buffer = TrajectoryBuffer(teacher, stream, args.M, args.skip, args.w, args.trajectories, args.buffer,
                              args.reuse, gen)
    hparams = {"M": args.M, "skip": args.skip, "w": args.w, "d": args.d, "llpips": args.llpips or "", "lr": args.lr,
               "batch": args.batch * run.world * args.grad_accum, "iters": args.iters,
               "trajectories": args.trajectories, "buffer": args.buffer, "reuse": args.reuse, "seed": args.seed,
               "run": run.id, **runs.prompts_meta(run.prompts)}
    if args.resume:
        state, smeta = run.resume()
        counters = json.loads(smeta["buffer"])
        if run.master:  # ranks > 0 start fresh pools; a single-process resume continues exactly
            gen.set_state(state["rng"])
            try:
                buffer.load(state, counters)
            except ValueError as e:
                raise SystemExit(f"error: cannot resume {args.out}: {e}")
        else:  # ... and continue their prompt order where rank 0's stands (ranks draw at about the same pace)
            stream.drawn = int(counters.get("prompts_drawn", 0))
    run.log(f"stage 1 on {teacher.id}: {runs.said_all(hparams)}; rank {args.rank}, per rank {args.batch} x "
            f"{args.grad_accum} micro-batches; {teachers.precision_said(run.dtype, run.adapter_dtype)}")
    planned = buffer.planned_refills(args.iters - run.step, args.batch * args.grad_accum) * args.trajectories
    run.log(f"prompts: {len(run.prompts)}; each rank draws about {planned} more ({args.trajectories} per pool "
            f"refill), {min(planned, stream.share)} distinct (its share: {stream.share}), {planned * run.world} in "
            "all; more per run: a lower --reuse, at more teacher forwards per pair")

    def save():
        tensors, counters = buffer.state()
        run.save({**hparams, **pipeline_grid(args.M, teacher)},  # the checkpoint: also its grid for the pipelines
                 {**tensors, "rng": gen.get_state()}, {"buffer": json.dumps(counters)})
    run.start(sorted({k for k in (2, 4, args.M) if k <= args.M}),
              lambda cond, z_T, k: student_sample(teacher, cond, z_T, k, args.M), save)

    while run.step < args.iters:
        pairs = buffer.sample(args.batch * args.grad_accum)  # (z_m, t_m, z_n, t_n, t_s, cond): teacher steps, reused
        loss = run.update("student", local_losses(teacher, d, pairs, args.batch, run.autocast))
        run.next({"loss": loss}, save)
    run.end(save)
    served, teacher_fwd = max(buffer.served, 1), buffer.teacher_forwards
    student_fwd = run.forwards / run.world - teacher_fwd  # rank 0's forwards of the run, less its teacher's
    run.log(f"model forwards per training pair: teacher {teacher_fwd / served:.2f} + student {student_fwd / served:.2f}"
            f" = {(teacher_fwd + student_fwd) / served:.2f} (this run's pairs; the naive way, re-running the teacher "
            f"from T for every pair: {buffer.naive_forwards / served:.1f} + student)")
    run.log(f"wrote {args.out}; sample it with: python sample.py --ckpt {args.out} --steps 4")


if __name__ == "__main__":
    with runs.explain_out_of_memory(), runs.explain_interrupt("local_cd.py", lambda: parse_args().out):
        main()
