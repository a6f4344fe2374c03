"""LogCD stage 1: local consistency distillation.

Paper: "LogCD: Local-to-global Consistency Distillation for Few-step Image Generation" (CVPR 2026), Method 1.
This file holds the method's common ground, which stage 2 and the sampler import too: time and milestones, the
one solver step Psi, classifier-free guidance; then stage 1 itself: the image-free trajectory buffer, the
local consistency loss, and its training loop (main, when run as a script). The teachers, prompts and
checkpoints are in teachers.py, the run's plumbing (arguments, resume, torchrun) in runs.py.

Time: t in [0, T], T = 1000, for every teacher; t = 0 is the clean latent (alpha = 1, sigma = 0).
  DDPM teachers (SDXL, the digits toy): t = k is the training index k - 1 (so t = T is index 999, "trailing").
  Flow teachers (FLUX): sigma = shift(t / T), alpha = 1 - sigma.
"""
import argparse
import json
import math
import os
import time

import torch

import lora
from runs import (COMPILE_HELP, GradientSync, MetricsLog, Parser, check_fresh_out, check_inputs, compile_blocks,
                  count, explain_interrupt, explain_out_of_memory, fill_presets, init_distributed, load_optimizer,
                  mean_over_ranks, new_run_id, number, optimizer_tensors, pair_bytes_local, positive, prompts_meta,
                  rank_difference, rank_zero_first, read_state, resumed_late, run_prompts, state_path, take_run_batch,
                  take_run_values, weight)
from teachers import (ADAPTERS, ADAPTERS_HELP, DTYPE_HELP, DTYPES, HERE, T, add_student, cond_index, cond_cat,
                      denoiser_size, download, load_teacher, locate, open_prompt_stream, precision, precision_said,
                      prompts_seen, read_checkpoint, read_prompts, save_checkpoint)


# ---- time: milestones and step grids ------------------------------------------------------------------------------

def milestones(M):
    """t^s = s T / M, s = 0..M."""
    return torch.arange(M + 1, dtype=torch.float64) * T / M


def segment(t, M):
    """s such that t lies in (t^s, t^{s+1}]; t = 0 belongs to segment 0."""
    return (torch.ceil(torch.as_tensor(t, dtype=torch.float64) * M / T).long() - 1).clamp(0, M - 1)


def student_times(k, M):
    """k sampling steps on the milestone grid, from T down to 0: milestone indices round(M (k - i) / k), i = 0..k.
    M = 8: k = 4 -> 1000 750 500 250 0; k = 3 -> 1000 625 375 0; k = 2 -> 1000 500 0. Any k in 1..M. An LCM-style
    student (M = 1) is consistent to t = 0 from every t: its k steps are spread evenly, any k."""
    if M == 1:
        return [T * (k - i) / k for i in range(k + 1)]
    if not 1 <= k <= M:
        raise ValueError(f"a student trained with M = {M} milestones samples in 1..{M} steps, not {k}")
    return [float(milestones(M)[round(M * (k - i) / k)]) for i in range(k + 1)]


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


def student_sample(teacher, cond, z_T, k, M):
    """z_0 from z_T by the student's k-step sampler: Psi between the milestones student_times(k, M), one student
    call per step (stage 2's image-free inputs, the validation grids; sample.py runs the same with the LoRA merged)."""
    with lora.adapter(teacher.denoiser, "student"):
        return solve(lambda z, t: teacher.x0(z, t, cond), z_T, student_times(k, M), teacher.alpha_sigma)


# ---- classifier-free guidance -----------------------------------------------------------------------------------

def cfg(teacher, z, t, cond, w):
    """The teacher's x0_hat with classifier-free guidance, in the paper's (Ho-Salimans) form; w = 1 is the plain
    conditional model (diffusers' guidance_scale uses the same convention). x0_hat is affine in the model's output,
    so the guidance is exact on x0_hat for epsilon, v and flow teachers alike. FLUX.1-dev is guidance-distilled: w
    enters its guidance embedding, one pass, no null prompt (teacher.guidance_embedded)."""
    if teacher.guidance_embedded:
        return teacher.x0(z, t, cond, guidance=w)
    # one batched pass for both halves: the prompt and the null prompt
    x0_c, x0_null = teacher.x0(torch.cat([z, z]), torch.cat([t, t]), cond_cat(cond, teacher.null(len(z)))).chunk(2)
    # eps_w = eps(null) + w (eps(c) - eps(null))
    return x0_null + w * (x0_c - x0_null)


def cfg_passes(teacher):
    """Model forwards per sample of one guided x0_hat (cfg): 2, or 1 for a guidance-distilled teacher."""
    return 1 if teacher.guidance_embedded else 2


# ==== Stage 1: local consistency distillation ======================================================================

def local_loss(teacher, d, z_m, t_m, z_n, t_n, t_s, cond):
    """The stage-1 loss on a batch of pairs, with the student adapter active. Returns (loss, target, student
    forwards). Pairs whose t_n is the milestone itself need no student forward for their target."""
    # g_theta(z_{t_m}, t_m, t^s) = Psi(z_{t_m}, x0_theta(z_{t_m}, t_m), t_m, t^s)
    g_m = Psi(z_m, teacher.x0(z_m, t_m, cond), t_m, t_s, teacher.alpha_sigma)
    with torch.no_grad():
        # sg[g_theta(z_{t_n}, t_n, t^s)]; at t_n = t^s it is z_{t^s} itself (the boundary condition)
        g_n, inner = z_n.clone(), (t_n > t_s).nonzero().flatten()
        if len(inner):
            zi, ti, si = z_n[inner], t_n[inner], t_s[inner]
            g_n[inner] = Psi(zi, teacher.x0(zi, ti, cond_index(cond, inner)), ti, si, teacher.alpha_sigma).to(g_n.dtype)
    # L = d(g_theta(z_{t_m}, t_m, t^s), sg[g_theta(z_{t_n}, t_n, t^s)])
    return d(g_m, g_n).mean(), g_n, len(z_m) + len(inner)


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
            # z_{t_n} = Psi(z_{t_m}, x0_hat_w(z_{t_m}), t_m, t_n): one teacher solver step with CFG
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
        self.conds = cond if self.conds is None else cond_cat(self.conds, cond)
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
        return p["z_m"], p["t_m"], p["z_n"], p["t_n"], p["t_s"], cond_index(self.conds, p["traj"] - self.first)

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


DISTANCE_HELP = ("d: the consistency distance. llpips: L-LPIPS, the paper's recipe in both stages, Table 3's last row "
                 "(--llpips FILE alone means it); mse: the paper's MSE row of Table 3. SDXL / FLUX.1-dev have no "
                 "default: give one of the two (train an L-LPIPS with llpips.py). The embedded teacher: mse in "
                 "stage 1, measured (its L-LPIPS was unstable there at the preset lr), llpips with "
                 "toy/llpips.safetensors in stage 2. --d is the same flag, but not under torchrun, which takes --d "
                 "for its own --duplicate-* flags")
LLPIPS_HELP = ("the L-LPIPS of this teacher's VAE (llpips.py writes one); given alone, it makes d = llpips (embedded "
               "teacher: toy/llpips.safetensors)")


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


@torch.no_grad()
def validation_latents(teacher, cond, z_T, steps, M, autocast):
    """The validation grid's rows before decoding: z_0 of the student's k-step sampler from z_T, for each k in steps,
    the student's adapter active under the run's autocast as in training."""
    rows = []
    for k in steps:
        with autocast():
            rows.append(student_sample(teacher, cond, z_T, k, M))
    return rows


def validation(teacher, prompts, steps, M, autocast, metrics, name):
    """validate(step): the student's images of `prompts` from fixed noise (VAL_SEED) at each of `steps` sampling
    steps -- a row per step count, a column per prompt -- into <out>.val/step_<step>.png, its seconds counted in the
    metrics log (runs.MetricsLog). It draws no number from the run's generators: a run trains the same with or
    without it."""
    cond = teacher.encode(prompts)
    z_T = teacher.noise(len(prompts), torch.Generator().manual_seed(VAL_SEED))

    @torch.no_grad()
    def validate(step):
        t0 = time.perf_counter()
        rows = [teacher.decode(z_0).float().cpu() for z_0 in validation_latents(teacher, cond, z_T, steps, M, autocast)]
        title = f"{name} at step {step}; columns: {' | '.join(prompts)}"[:200]
        metrics.write_grid(step, torch.cat(rows), [f"{k} steps" for k in steps], title, time.perf_counter() - t0)
    return validate


# ---- the training script ------------------------------------------------------------------------------------------

RUN_VALUES = dict(teacher=str, variant=str, revision=str, resolution=int, M=int, skip=float, w=float, d=str, llpips=str,
                  lr=float, rank=int, seed=int)  # what --resume keeps of a run


TOY_LLPIPS = os.path.join(HERE, "toy", "llpips.safetensors")  # L-LPIPS trained on the embedded teacher's latents

# The paper's recipe per teacher family, both stages (flags left out take these values); the embedded teacher's is
# ours, sized to finish in minutes on a CPU. SDXL / FLUX: --llpips has no default (train one with llpips.py).
PRESETS = {
    "digits": {
        "local": dict(iters=400, batch=64, lr=1e-3, trajectories=16, buffer=4096, reuse=4, save_every=100,
                      val_every=50, d="mse", llpips=TOY_LLPIPS),
        "global": dict(iters=120, batch=32, lr=3e-5, lr_aux=1e-3, fake_rank=16, fake_updates=2, save_every=40,
                       val_every=20, d="llpips", llpips=TOY_LLPIPS)},
    "sdxl": {
        "local": dict(iters=12000, batch=4, lr=1e-4, w=7.0, trajectories=4, buffer=512, reuse=4, save_every=500,
                      val_every=500),
        "global": dict(iters=3000, batch=4, lr=1e-5, lr_aux=1e-5, fake_updates=2, save_every=250, val_every=250)},
    "flux": {
        "local": dict(iters=6000, batch=2, lr=1e-4, w=3.5, trajectories=2, buffer=256, reuse=4, save_every=500,
                      val_every=500),
        "global": dict(iters=6000, batch=2, lr=1e-5, lr_aux=1e-5, fake_updates=2, save_every=250, val_every=500)},
}


def parse_args(argv=None):
    p = Parser(description=__doc__ + STAGE1, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--teacher", default="digits", help="digits (embedded, default), sdxl, flux, a teacher folder or hub id")
    a("--variant", default=None, help="which weight files of a hub teacher, as diffusers' from_pretrained (e.g. fp16)")
    a("--revision", default=None, help="a hub teacher's branch, tag or commit, as diffusers' from_pretrained")
    a("--prompts", default=None, help="text file, one prompt per line (SDXL / FLUX); the embedded teacher uses 0..9")
    a("--M", type=count, default=8, help="M: number of segments; milestones t^s = s T / M")
    a("--skip", type=positive, default=20, help="skip: t_n = max(t_m - skip, t^s), in teacher timesteps")
    a("--w", type=weight, default=None, help="w: CFG scale of the teacher target, eps(null) + w (eps(c) - eps(null)) "
      "(SDXL: 7, the paper's; FLUX.1-dev: 3.5 in its guidance embedding, one pass, its own default -- a departure: "
      "the paper gives w = 7, a CFG scale; embedded teacher: 1.5, measured)")
    a("--distance", "--d", dest="d", choices=["mse", "llpips"], default=None, help=DISTANCE_HELP)
    a("--llpips", type=os.path.abspath, default=None, help=LLPIPS_HELP)
    a("--rank", type=count, default=64, help="LoRA rank r (alpha = r)")
    a("--lr", type=positive, default=None, help="AdamW learning rate (paper: 1e-4; embedded preset: 1e-3)")
    a("--batch", type=count, default=None, help="training pairs per iteration, rank and micro-batch")
    a("--grad-accum", type=count, default=1, help="micro-batches per iteration: each rank runs N micro-batches of "
      "--batch pairs and takes one AdamW step on their mean, what one batch N times as large trains (to float "
      "rounding) in the memory of one micro-batch: the recipe's batch on fewer GPUs (batch x ranks x N). With "
      "--adapters base the micro-batches' gradients add up in bf16")
    a("--iters", type=count, default=None, help="iterations (paper: 12K SDXL, 6K FLUX)")
    a("--trajectories", type=count, default=None, help="teacher trajectories per buffer refill (per rank)")
    a("--buffer", type=count, default=None, help="capacity of the pair pool")
    a("--reuse", type=positive, default=None, help="draws per training pair on average before it is replaced")
    a("--out", default="local.safetensors", help="the student LoRA; resume state goes to *.state.safetensors")
    a("--save-every", type=count, default=None)
    a("--resume", action="store_true", help="continue the run saved at --out (LoRA, optimizer, step, RNG, buffer)")
    a("--overwrite", action="store_true", help="replace an existing --out (a fresh run refuses to, by default)")
    a("--grad-checkpointing", action="store_true", help="trade compute for memory (SDXL / FLUX at batch > 1)")
    a("--dtype", choices=list(DTYPES), default=None, help=DTYPE_HELP)
    a("--adapters", choices=ADAPTERS, default="autocast", help=ADAPTERS_HELP)
    a("--compile", action="store_true", help=COMPILE_HELP)
    a("--resolution", type=count, default=1024, help="SDXL / FLUX image size")
    a("--encode-batch", type=count, default=32, help="prompts per text-encoder call")
    a("--encode-chunk", type=count, default=256, help="prompts encoded together and kept on the host (per rank)")
    a("--seed", type=int, default=0)
    a("--log-every", type=count, default=10, help="iterations per line of the metrics log, <out>.log.jsonl")
    a("--val-every", type=lambda x: number(x, int, 0), default=None, help="iterations between validation grids, "
      "<out>.val/step_<N>.png (the student at 2, 4 and M steps from fixed noise; also at the start and the end; "
      "0: none)")
    a("--val-prompts", nargs="+", default=None, help="the validation grid's prompts: a text file or the prompts "
      "(default: the embedded teacher's digits, else the first 4 of --prompts)")
    a("--device", default=None)
    return p.parse_args(argv)


STAGE1 = """
Stage 1 (this script): local consistency. [0, T] is cut into M segments at milestones t^s = s T / M; inside each
segment the student learns to map any z_t to the segment's lower end t^s, as the teacher's ODE would:

  g_theta(z_t, t, t^s) = Psi(z_t, x0_theta(z_t, t), t, t^s)
  L = d( g_theta(z_{t_m}, t_m, t^s),  sg[ g_theta(z_{t_n}, t_n, t^s) ] ),  t_n = max(t_m - skip, t^s)

z_{t_n} is one teacher solver step with CFG from z_{t_m}; z_{t_m} comes from teacher trajectories started at pure
noise (image-free), reused across many training pairs. Stop-gradient target, no EMA; only the LoRA trains.

  python local_cd.py                                    # the embedded teacher, minutes on a CPU
  torchrun --nproc_per_node 4 local_cd.py --teacher sdxl --prompts prompts.txt --llpips llpips_sdxl.safetensors
  python sample.py --ckpt local.safetensors --steps 4
"""


def main(argv=None):
    import torch.distributed as dist
    from tqdm import tqdm
    args = parse_args(argv)

    rank, world, device, ddp = init_distributed(args.device)  # torchrun: one process per GPU (or CPU rank)
    cuda = str(device).startswith("cuda")
    master = rank == 0  # only rank 0 logs and saves
    log = print if master else (lambda *a, **k: None)
    # precision: the frozen base in `dtype` (bf16 on CUDA), LoRA and AdamW fp32; the student's forward under
    # autocast() or from bf16 copies (--adapters), d in fp32; the teacher's trajectories (no adapter) plainly in `dtype`
    dtype, autocast, adapter_dtype = precision(device, args.dtype, args.adapters)

    check_fresh_out(args)
    run = lora.metadata(args.out) if args.resume else {}
    if args.resume:  # the run's own teacher, M, skip, w, ...: flags left out are taken from it, flags given must agree
        take_run_values(args, run, RUN_VALUES)
        take_run_batch(args, run, world)
    try:  # every input checked before any model loads: the teacher's configs are read, not its weights
        prompts = run_prompts(args, run)
        family = locate(args.teacher, args.revision)[0]
        fill_presets(args, PRESETS[family]["local"], args.teacher)  # and d: L-LPIPS, MSE, or a refusal
        n_lora, latent = denoiser_size(args.teacher, args.rank, args.resolution, args.revision)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    check_inputs(args, prompts, family, latent, pair_bytes_local(n_lora, latent, args.buffer), n_lora)
    d = distance(args.d, args.llpips, device)  # L-LPIPS: read whole now, a broken file said before the teacher loads
    try:
        with rank_zero_first(ddp):  # a hub teacher: rank 0 downloads it, the other ranks wait, then all load it
            download(args.teacher, args.variant, args.revision)
        teacher = load_teacher(args.teacher, device, args.resolution, dtype, variant=args.variant,
                               revision=args.revision)
        prompts = prompts or read_prompts(None, teacher)
        teacher.check_prompts(prompts)
        shown = val_prompts(args.val_prompts, teacher, prompts)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    args.w = teacher.default_w if args.w is None else args.w

    torch.manual_seed(args.seed)  # the same LoRA init on every rank
    params = add_student(teacher, args.rank)
    if args.grad_checkpointing:
        lora.gradient_checkpointing(teacher.denoiser)
    if args.compile:  # after the adapters are in (and checkpointing is set): they are compiled with their blocks
        compile_blocks(teacher.denoiser)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=cuda or None)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank draws its own trajectories and pairs
    stream = open_prompt_stream(teacher, prompts, args, rank, world)  # prompts encoded a chunk at a time, when drawn
    buffer = TrajectoryBuffer(teacher, stream, args.M, args.skip, args.w, args.trajectories, args.buffer,
                              args.reuse, gen)
    hparams = {"M": args.M, "skip": args.skip, "w": args.w, "d": args.d,
               "llpips": args.llpips if args.d == "llpips" else "", "lr": args.lr,
               "batch": args.batch * world * args.grad_accum, "seed": args.seed, "run": new_run_id(),
               **prompts_meta(prompts)}
    step = n_student = 0  # n_student: student forward passes, counted per sample
    if args.resume:
        try:
            tensors, meta = read_checkpoint(args.out, ("local",), teacher.id)
            state, smeta, student, prefix = read_state(args.out, meta, teacher.lora_prefix)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: cannot resume: {e}")
        lora.load_state_dict(teacher.denoiser, "student", student or tensors, prefix)
        load_optimizer(opt, state)
        step, hparams["run"] = int(smeta["step"]), meta.get("run", hparams["run"])
        if master:  # ranks > 0 start fresh buffers; a single-process resume continues exactly
            gen.set_state(state["rng"])
            try:
                buffer.load(state, json.loads(smeta["buffer"]))
            except ValueError as e:
                raise SystemExit(f"error: cannot resume {args.out}: {e}")
            n_student = int(smeta["student_forwards"])
        else:  # ... and continue their prompt order where rank 0's stands (ranks draw at about the same pace)
            stream.drawn = int(json.loads(smeta["buffer"]).get("prompts_drawn", 0))
        log(f"resumed {args.out} at step {step}" + resumed_late(step, meta))
    if ddp:  # identical LoRA on every rank
        for p in params:
            dist.broadcast(p.data, 0)
    work = lora.Working(teacher.denoiser, "student", adapter_dtype)  # what the forwards use: params, or bf16 copies
    sync = GradientSync(work.params, world)
    metrics = MetricsLog(args.out, step, master)  # <out>.log.jsonl, continued on --resume
    validate = None
    if master and args.val_every:  # rank 0 draws the grids; the others go on to the next all-reduce and wait there
        validate = validation(teacher, shown, sorted({k for k in (2, 4, args.M) if k <= args.M}), args.M, autocast,
                              metrics, os.path.basename(args.out))
        if step == 0:
            validate(0)  # where the student starts: the teacher itself in 2, 4 and M steps

    def forwards():  # the run's training budget: model calls x samples (a CFG step counts 2), all ranks (as rank 0's)
        return (buffer.teacher_forwards + n_student) * world

    def save():
        stream.prune()  # every rank: its cached prompt chunks that a resume from here no longer needs
        if not master:
            return
        tensors, counters = buffer.state()
        meta = {**hparams, "step": step, "forwards": forwards()}
        lora.save(state_path(args.out), {**optimizer_tensors(opt), **tensors, "rng": gen.get_state(),
                                         **lora.state_dict(teacher.denoiser, "student", "student")},
                  {"step": step, "run": hparams["run"], "buffer": json.dumps(counters), "student_forwards": n_student})
        save_checkpoint(args.out, teacher, "local", meta)

    log(f"stage 1 on {teacher.id}: M={args.M} skip={args.skip:g} w={args.w:g} d={args.d} rank={args.rank} "
        f"lr={args.lr:g} batch={args.batch}x{world}x{args.grad_accum} iters={args.iters} "
        f"({sum(p.numel() for p in params) / 1e6:.2f}M "
        f"LoRA parameters; {precision_said(dtype, adapter_dtype)})")
    planned = buffer.planned_refills(args.iters - step, args.batch * args.grad_accum) * args.trajectories
    log(f"prompts: {len(prompts)}; each rank draws about {planned} more ({args.trajectories} per pool refill), "
        f"{min(planned, stream.share)} distinct (its share: {stream.share}), {planned * world} in all; more per run: "
        "a lower --reuse, at more teacher forwards per pair")
    bar = tqdm(total=args.iters, initial=step, disable=not master, desc="local CD")
    while step < args.iters:
        pairs = buffer.sample(args.batch * args.grad_accum)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for i, micro in enumerate(torch.arange(len(pairs[0]), device=device).split(args.batch)):  # --grad-accum
            z_m, t_m, z_n, t_n, t_s = (x[micro] for x in pairs[:5])
            with lora.adapter(teacher.denoiser, "student"), autocast():
                l_micro, _, n = local_loss(teacher, d, z_m, t_m, z_n, t_n, t_s, cond_index(pairs[5], micro))
            n_student += n
            # the micro-batches' gradients add up to the whole batch's; under torchrun they are averaged over the
            # ranks while the last backward runs
            with sync.backward(last=i == args.grad_accum - 1):
                (l_micro / args.grad_accum).backward()
            loss = loss + l_micro.detach() / args.grad_accum
        if ddp:  # the loss too, for the log
            loss = mean_over_ranks(loss, world)
        if not torch.isfinite(loss):
            bar.close()
            raise SystemExit(f"error: loss is {loss.item()} at step {step}; stopped. {args.out} keeps the last good "
                             "checkpoint (try a lower --lr)")
        work.step(opt)  # AdamW (on the fp32 masters of bf16 copies, with --adapters base)
        step += 1
        bar.update(1)
        metrics.add({"loss": loss})
        if step % args.log_every == 0 or step == args.iters:
            served = max(buffer.served, 1)
            line = metrics.write(step, lr=opt.param_groups[0]["lr"],
                                 fwd_per_pair_teacher=buffer.teacher_forwards / served,
                                 fwd_per_pair_student=n_student / served, forwards=forwards())
            if master:
                bar.set_postfix(loss=f"{line['loss']:.4g}", teacher_fwd_per_pair=f"{line['fwd_per_pair_teacher']:.2f}",
                                student_fwd_per_pair=f"{line['fwd_per_pair_student']:.2f}")
        if validate and (step % args.val_every == 0 or step == args.iters):
            validate(step)
        if step % args.save_every == 0 or step == args.iters:
            save()
    bar.close()
    if lora.metadata(args.out).get("step") != str(step):  # resumed from a state newer than its checkpoint, at the end
        save()
    served = max(buffer.served, 1)
    log(f"model forwards per training pair: teacher {buffer.teacher_forwards / served:.2f} + student "
        f"{n_student / served:.2f} = {(buffer.teacher_forwards + n_student) / served:.2f} (this run's pairs; the "
        f"naive way, re-running the teacher from T for every pair: {buffer.naive_forwards / served:.1f} + student)")
    log(prompts_seen(stream, world))
    log(metrics.close())
    log(f"wrote {args.out}; sample it with: python sample.py --ckpt {args.out} --steps 4")
    if ddp:  # a cheap guard: every rank must hold rank 0's LoRA
        log(f"LoRA identical on all {world} ranks: max difference {rank_difference(params):.3g}")
        dist.destroy_process_group()


if __name__ == "__main__":
    with explain_out_of_memory(), explain_interrupt("local_cd.py", lambda: parse_args().out):
        main()
