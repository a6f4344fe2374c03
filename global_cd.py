"""LogCD stage 2, global consistency distillation: the stage-1 student becomes ONE LoRA that samples in 2, 3 or 4 steps.

Paper: "LogCD: Local-to-global Consistency Distillation for Few-step Image Generation" (CVPR 2026), Method 2 and 4.
The method's common ground (time, milestones, Psi, solve, CFG, the distance d) is in
local_cd.py, the teachers and checkpoints in teachers.py, the run's plumbing (arguments, resume, torchrun) in runs.py.
This file: the image-free inputs and the milestone consistency loss, the GAN (the frozen teacher as backbone,
trainable heads), DMD (a fake-score adapter on the same base), one iteration of all of them, and the training loop.
"""
import argparse
import collections
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
from local_cd import (DISTANCE_HELP, LLPIPS_HELP, PRESETS, cfg, distance, milestones, solve, student_sample,
                      student_times, val_prompts, validation)
from runs import (COMPILE_HELP, GradientSync, MetricsLog, Parser, check_fresh_out, check_inputs, compile_blocks,
                  count, explain_interrupt, explain_out_of_memory, fill_presets, init_distributed, load_optimizer,
                  mean_over_ranks, new_run_id, number, optimizer_tensors, pair_bytes_global, positive, prompts_meta,
                  rank_difference, rank_zero_first, read_state, resumed_late, run_prompts, state_path, take_run_batch,
                  take_run_values, weight)
from teachers import (ADAPTERS, ADAPTERS_HELP, DTYPE_HELP, DTYPES, T, FluxTeacher, add_student, checkpoint_meta,
                      cond_cat, cond_index, denoiser_size, download, load_student, load_teacher, locate,
                      open_prompt_stream, precision, precision_said, prompts_seen, read_prompts, save_checkpoint)

DMD_T = (0.02 * T, 0.98 * T)  # noise levels of the DMD score terms and the fake-score loss (DMD2's range)
GAN_T = (0.0, 0.5 * T)  # noise levels the discriminator sees its inputs at (low: it should judge detail)


def uniform(n, lo, hi, gen, device):
    return (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)).float().to(device)


def randn_like(x, gen):
    return torch.randn(x.shape, generator=gen).to(x.device)  # CPU draws: the same numbers on any device


def renoise(teacher, x0, t, eps):
    """The forward process: z_t = alpha_t x0 + sigma_t eps."""
    alpha, sigma = teacher.alpha_sigma(t)
    return alpha * x0 + sigma * eps


# ---- image-free inputs and the milestone consistency loss --------------------------------------------------------

@torch.no_grad()
def student_samples(teacher, cond, q, M, gen):
    """hat z_0: the current student's own q-step samples from pure noise (Psi sampler on the milestone grid)."""
    return student_sample(teacher, cond, teacher.noise(len(next(iter(cond.values()))), gen), q, M)


@torch.no_grad()
def sampler_steps(teacher, cond, q, M, gen):
    """(z_{t_m}, t_m, t_n) for --inputs sampler (DMD2's backward simulation): the steps the student's own
    k-step sampler takes, k uniform in 1..q (one k per iteration), one of its k steps per sample, uniform: the state
    z_{t_m} it calls the student at and the time t_n it jumps to. A sampler's later states carry its own earlier
    predictions (Psi re-uses their eps_hat), which fresh noise does not."""
    B = len(next(iter(cond.values())))
    k = int(torch.randint(1, q + 1, (1,), generator=gen))
    ts = student_times(k, M)  # the milestones the k-step sampler visits, T first, 0 last
    i = torch.randint(0, k, (B,), generator=gen)  # which of its steps each sample takes
    z, states = teacher.noise(B, gen), []
    with lora.adapter(teacher.denoiser, "student"):
        for j in range(int(i.max()) + 1):  # the sampler's steps, up to the latest state any sample needs
            states.append(z)
            z = solve(lambda z_, t_: teacher.x0(z_, t_, cond), z, ts[j:j + 2], teacher.alpha_sigma)
    ts = torch.tensor(ts, dtype=torch.float32)
    return torch.stack(states)[i, torch.arange(B)], ts[i], ts[i + 1]


def global_loss(teacher, d, z_m, t_m, t_n, cond, w, p):
    """d(x0_theta(z_{t_m}, t_m), sg[x0_theta(hat z_{t_n}, t_n)]) between milestones t_m > t_n (adjacent, t_n = t_m -
    T/M, unless --jump any or --inputs sampler), where hat z_{t_n} comes from z_{t_m} by p teacher solver steps with
    CFG. Returns (loss per sample, x0_m with grad, x0_n = the target). At t_n = 0 the target is hat z_0 itself (the
    boundary condition; no student forward)."""
    with torch.no_grad(), lora.adapter(teacher.denoiser, None):
        # hat z_{t_n} = Psi o ... o Psi (z_{t_m}): p steps of the teacher with CFG, t_m -> t_n in equal parts
        ts = [t_m + (t_n - t_m) * i / p for i in range(p + 1)]
        z_n = solve(lambda z, t: cfg(teacher, z, t, cond, w), z_m, ts, teacher.alpha_sigma)
    with lora.adapter(teacher.denoiser, "student"):
        with torch.no_grad():
            x0_n, inner = z_n.clone(), (t_n > 0).nonzero().flatten()
            if len(inner):
                x0_n[inner] = teacher.x0(z_n[inner], t_n[inner], cond_index(cond, inner)).to(x0_n.dtype)
        x0_m = teacher.x0(z_m, t_m, cond)
    return d(x0_m, x0_n), x0_m, x0_n


# ---- GAN: the frozen teacher's encoder as the discriminator's backbone, trainable heads ---------------------------

class _Enough(Exception):
    """Raised by the last hooked block: the discriminator needs no more of the network."""


def feature_blocks(teacher):
    """Where the discriminator reads the teacher: a UNet's down blocks and mid block (its encoder); for a FLUX
    transformer, 4 evenly spaced double-stream blocks (its first third)."""
    net = teacher.denoiser
    if isinstance(teacher, FluxTeacher):
        n = len(net.transformer_blocks)
        return [net.transformer_blocks[i] for i in sorted({max(round(n * (j + 1) / 4) - 1, 0) for j in range(4)})]
    return [*net.down_blocks, net.mid_block]


def teacher_features(teacher, z, t, cond):
    """Feature maps (B, C, h, w) of the frozen teacher (no adapter active) at feature_blocks, for z at time t. The
    network stops after the last of them. Gradients flow to z (the generator step needs them)."""
    blocks, feats, collecting = feature_blocks(teacher), [], [True]
    H, W = z.shape[-2:]

    def hook(module, inputs, output):
        if not collecting[0]:
            return  # a gradient-checkpointed block recomputing itself during backward
        if isinstance(teacher, FluxTeacher):  # image tokens (B, HW/4, D) -> a (B, D, H/2, W/2) map
            h = output[1]  # FluxTransformerBlock returns (encoder_hidden_states, hidden_states)
            h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], H // 2, W // 2)
        else:
            h = output[0] if isinstance(output, tuple) else output
        feats.append(h)
        if module is blocks[-1]:
            raise _Enough

    handles = [b.register_forward_hook(hook) for b in blocks]
    try:
        with lora.adapter(teacher.denoiser, None):
            teacher.forward(z, t, cond)
    except _Enough:
        pass
    finally:
        collecting[0] = False
        for h in handles:
            h.remove()
    return feats


class Head(nn.Module):
    """A small residual conv head on one feature map: 1x1 conv in, [GroupNorm, SiLU, 3x3 conv] x 2 as a residual,
    1x1 conv to a map of patch logits, averaged to one logit per sample."""

    def __init__(self, channels):
        super().__init__()
        width = min(channels, 256)
        groups = math.gcd(32, width)
        self.inp = nn.Conv2d(channels, width, 1)
        self.res = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                 nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, h):
        h = self.inp(h.float())
        h = h + self.res(h)
        return self.out(h).flatten(1).mean(1)


class Discriminator(nn.Module):
    """D(x0, t, eps, c): x0 re-noised to t with eps, the frozen teacher's features, one head per feature map, the
    heads' logits averaged. Only the heads are parameters: the backbone is the teacher's (shared) base weights."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher  # a plain attribute: the base weights are not this module's parameters
        with torch.no_grad():
            z, t = teacher.noise(1), torch.full((1,), T / 2, device=teacher.device)
            feats = teacher_features(teacher, z, t, teacher.null(1))
        self.heads = nn.ModuleList(Head(f.shape[1]) for f in feats).to(teacher.device)

    def forward(self, x0, t, eps, cond):
        feats = teacher_features(self.teacher, renoise(self.teacher, x0, t, eps), t, cond)
        return sum(head(f) for head, f in zip(self.heads, feats)) / len(self.heads)


def discriminator_loss(disc, real, fake, t, eps, cond):
    """The heads' hinge loss, max(0, 1 - D(real)) + max(0, 1 + D(fake)): both sides re-noised to the same t with the
    same eps, in one pass."""
    logits = disc(torch.cat([real, fake]), torch.cat([t, t]), torch.cat([eps, eps]), cond_cat(cond, cond))
    d_real, d_fake = logits.chunk(2)
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def generator_loss(disc, x0, t, eps, cond):
    """The generator's hinge term, -D(x0): its gradient reaches x0 (the student), not the heads."""
    disc.requires_grad_(False)
    try:
        return -disc(x0, t, eps, cond).mean()
    finally:
        disc.requires_grad_(True)


# ---- DMD: real score = the teacher with CFG, fake score = adapter `fake` on the same base ---------------------------

def dmd_loss(teacher, x0, cond, w, gen):
    """Distribution matching (DMD2): noise the generated x0 to a random t; the gradient on x0 is (fake - real) x0
    predictions, normalised per sample by mean |x0 - real|. Written as a loss whose gradient in x0 is exactly that."""
    t = uniform(len(x0), *DMD_T, gen, x0.device)
    with torch.no_grad():
        z_t = renoise(teacher, x0, t, randn_like(x0, gen))
        with lora.adapter(teacher.denoiser, None):
            real = cfg(teacher, z_t, t, cond, w)
        with lora.adapter(teacher.denoiser, "fake"):
            fake = teacher.x0(z_t, t, cond)
        # grad = (x0_fake - x0_real) / mean |x0 - x0_real|
        grad = (fake - real) / (x0 - real).abs().mean(dim=tuple(range(1, x0.dim())), keepdim=True).clamp_min(1e-6)
    # L = 1/2 || x0 - sg[x0 - grad] ||^2, so dL/dx0 = grad (up to the mean's 1/numel)
    return 0.5 * F.mse_loss(x0.float(), (x0 - grad).float().detach())


def fake_score_loss(teacher, x0, cond, gen):
    """The fake score tracks the student's distribution: the denoising loss ||eps_hat - eps||^2 on the student's
    samples (detached), adapter `fake` active, at a random noise level."""
    x0 = x0.detach()
    t = uniform(len(x0), *DMD_T, gen, x0.device)
    eps = randn_like(x0, gen)
    z_t = renoise(teacher, x0, t, eps)
    with lora.adapter(teacher.denoiser, "fake"):
        x0_hat = teacher.x0(z_t, t, cond)
    alpha, sigma = teacher.alpha_sigma(t)
    # eps_hat = (z_t - alpha_t x0_hat) / sigma_t
    eps_hat = (z_t - alpha * x0_hat) / sigma
    return F.mse_loss(eps_hat.float(), eps)


def milestone_pairs(s, M, jump, gen):
    """(t_m, t_n, k) of an iteration: t_m = s T/M for milestone indices s (B of them, in 1..M), and t_n = max(t_m -
    k T/M, 0), k segments below. jump "adjacent" (the paper's): k = 1, adjacent milestones. jump "any" (an option): k
    uniform in 1..M, drawn once per iteration (one solver length for the batch), so the jumps a 1-step (k = M, t_m =
    T) or 2-step sampler makes are trained directly too."""
    k = 1 if jump == "adjacent" else int(torch.randint(1, M + 1, (1,), generator=gen))
    return milestones(M)[s].float(), milestones(M)[(s - k).clamp(min=0)].float(), k


def one_step(teacher, cond, gen):
    """x0_theta(z_T, T) from fresh noise, with gradient: the student's 1-step sample (--dmd-input one_step)."""
    z_T = teacher.noise(len(next(iter(cond.values()))), gen)
    with lora.adapter(teacher.denoiser, "student"):
        return teacher.x0(z_T, torch.full((len(z_T),), float(T), device=z_T.device), cond)


def image_free_inputs(teacher, cond, a, M, gen, autocast):
    """(z_{t_m}, t_m, t_n, k) of a batch: the states the student trains at, the milestones t_m it is at and t_n it
    jumps to, and the segments k of the longest jump. No gradients."""
    B, device = len(next(iter(cond.values()))), teacher.device
    if a.inputs == "renoise":  # image-free inputs: the student's q-step samples, re-noised to a random milestone t_m
        with autocast():
            x0_q = student_samples(teacher, cond, a.q, M, gen)
        t_m, t_n, k = milestone_pairs(torch.randint(1, M + 1, (B,), generator=gen), M, a.jump, gen)
        t_m, t_n = t_m.to(device), t_n.to(device)
        eps = randn_like(x0_q, gen)
        # z_{t_m} = alpha_{t_m} hat z_0 + sigma_{t_m} eps; at t_m = T the sampler's own input, pure noise (a DDPM's
        # alpha_T > 0 would leave a trace of hat z_0 that no sampler input has)
        z_m = torch.where((t_m == T).view(-1, 1, 1, 1), eps, renoise(teacher, x0_q, t_m, eps))
        return z_m, t_m, t_n, k
    with autocast():  # --inputs sampler: the steps the student's own samplers take, from the states they are in
        z_m, t_m, t_n = sampler_steps(teacher, cond, a.q, M, gen)
    k = round(float((t_m - t_n).max()) * M / T)  # segments in the longest jump: p steps per segment
    return z_m, t_m.to(device), t_n.to(device), k


def iteration(teacher, cond, d, disc, fake, update, a, M, gen, autocast):
    """One stage-2 iteration on the prompts `cond`: the student step, then one discriminator step (if disc) and
    a.fake_updates fake-score steps (if fake). Each step runs over a.grad_accum micro-batches of `cond`:
    update(name, losses) takes one optimizer step of `name` on the mean of `losses`, a generator that makes each
    micro-batch's loss after the last one's backward. a holds p, q, w, w_target, lambda0, lambda1, lambda2,
    fake_updates, jump, inputs, dmd_input, grad_accum; every forward runs inside autocast() (teachers.precision), every
    backward outside it. Returns the losses to log (tensors: no GPU sync here)."""
    B, device, logs = len(next(iter(cond.values()))), teacher.device, collections.defaultdict(float)
    z_m, t_m, t_n, k = image_free_inputs(teacher, cond, a, M, gen, autocast)  # the whole batch's: no gradients
    micro = torch.arange(B, device=device).split(B // a.grad_accum)
    kept = []  # per micro-batch: its rows, and x0_m, x0_n, x0_dmd without gradients, for the other two steps

    def student():  # L = lambda0 L_GoCD + lambda1 L_GAN + lambda2 L_DMD (the paper's lambda0 = 1)
        for i in micro:
            c, n = cond_index(cond, i), len(i)
            with autocast():
                l_cons, x0_m, x0_n = global_loss(teacher, d, z_m[i], t_m[i], t_n[i], c, a.w_target, a.p * k)
                loss = a.lambda0 * l_cons.mean()  # p teacher steps a segment
                logs["cons"] += l_cons.mean().detach() / len(micro)
                if disc:
                    l_gan = generator_loss(disc, x0_m, uniform(n, *GAN_T, gen, device), randn_like(x0_m, gen), c)
                    logs["gan"] += l_gan.detach() / len(micro)
                    loss = loss + a.lambda1 * l_gan
                x0_dmd = x0_m
                if fake:
                    x0_dmd = x0_m if a.dmd_input == "x0_m" else one_step(teacher, c, gen)
                    l_dmd = dmd_loss(teacher, x0_dmd, c, a.w, gen)
                    logs["dmd"] += l_dmd.detach() / len(micro)
                    loss = loss + a.lambda2 * l_dmd
            kept.append((c, x0_m.detach(), x0_n, x0_dmd.detach()))
            yield loss

    def discriminator():  # real = sg[x0 at t_n], fake = sg[x0 at t_m], re-noised alike
        for c, x0_m, x0_n, _ in kept:
            with autocast():
                t_g, eps = uniform(len(x0_m), *GAN_T, gen, device), randn_like(x0_m, gen)
                l_d = discriminator_loss(disc, x0_n, x0_m, t_g, eps, c)
            yield l_d

    def fake_score():  # the fake score follows the distribution DMD moves
        for c, _, _, x0_dmd in kept:
            with autocast():
                l_f = fake_score_loss(teacher, x0_dmd, c, gen)
            yield l_f

    logs["loss"] = update("student", student())
    if disc:
        logs["disc"] = update("disc", discriminator())
    for _ in range(a.fake_updates if fake else 0):
        logs["fake"] = update("fake", fake_score())
    return {name: v.detach() if torch.is_tensor(v) else v for name, v in logs.items()}


# ---- the training script ------------------------------------------------------------------------------------------

RUN_VALUES = dict(w=float, w_target=float, p=int, q=int, d=str, llpips=str, lambda0=float, lambda1=float, lambda2=float,
                  fake_updates=int, jump=str, inputs=str, dmd_input=str, fake_rank=int, lr=float, lr_aux=float,
                  seed=int)  # what --resume keeps

STAGE2 = """
Stage 2 (this script): global consistency, only between milestones t^s = s T / M, the times a 2-, 3- or 4-step
sampler visits. Starting from a stage-1 student (--init), each iteration:

  image-free inputs:  hat z_0 = the current student's q-step samples (no grad), re-noised with fresh noise
                      z_{t_m} = alpha_{t_m} hat z_0 + sigma_{t_m} eps at a random milestone t_m (pure noise at
                      t_m = T, as the sampler starts), t_n = t_m - T/M (--jump any: k T/M below, k in 1..M);
                      --inputs sampler: z_{t_m} = a state a k-step student sampler calls it at (k in 1..q),
                      t_n = the milestone that sampler jumps to
  teacher target:     hat z_{t_n} = p teacher solver steps with CFG from z_{t_m} (Psi, DDIM / Euler; CFG at
                      --w-target if given)
  consistency:        L_GoCD  = d( x0_theta(z_{t_m}, t_m), sg[x0_theta(hat z_{t_n}, t_n)] )   (hat z_0 at t_n = 0)
  GAN (lambda1):      hinge; D = frozen teacher encoder + trainable heads; real = sg[x0 at t_n], fake = x0 at t_m
  DMD (lambda2):      real score = teacher with CFG, fake score = LoRA adapter `fake` on the same base, trained
                      online (--fake-updates denoising steps per student step); DMD2's normalised gradient
                      on x0 at t_m (or on the 1-step sample x0(z_T, T): --dmd-input one_step)
  total:              L = lambda0 L_GoCD + lambda1 L_GAN + lambda2 L_DMD   (the paper: lambda0 = 1)

One copy of the base weights serves the teacher (no adapter), the student (adapter `student`), the fake score
(adapter `fake`) and the discriminator's backbone. Paper: p = 3, q = 4, lambda1 = 0.1, lambda2 = 1, lr 1e-5;
3K iterations for SDXL, 6K for FLUX.1-dev. Ablations (the paper's Table 3): --d mse, --lambda1 0, --lambda2 0.
The DMD2-style baseline (distribution matching + GAN, no consistency term, no stage 1): --init teacher --lambda0 0
--inputs sampler (the student starts as the teacher itself: a fresh LoRA on the milestone grid of --M).

  python global_cd.py                                   # after python local_cd.py: the embedded teacher, minutes
  torchrun --nproc_per_node 4 global_cd.py --init local.safetensors --prompts prompts.txt --llpips sdxl_llpips.safetensors
  python sample.py --steps 2                            # samples global.safetensors
"""


def parse_args(argv=None):
    p = Parser(description=__doc__ + STAGE2, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--init", default="local.safetensors", help="the stage-1 checkpoint to continue (its teacher, M and w are "
      "used), or teacher: a fresh LoRA on --teacher, the student starting as the teacher (the DMD2-style baseline)")
    a("--teacher", default=None, help="optional check: the teacher --init must have been distilled from (with --init "
      "teacher: the teacher, default digits)")
    a("--M", type=count, default=None, help="with --init teacher: the milestone grid's segments (default 8; a stage-1 "
      "checkpoint brings its own)")
    a("--rank", type=count, default=None, help="with --init teacher: the student's LoRA rank (default 64, stage 1's)")
    a("--prompts", default=None, help="text file, one prompt per line (SDXL / FLUX); the embedded teacher uses 0..9")
    a("--p", type=count, default=3, help="p: teacher solver steps from t_m to t_n")
    a("--q", type=count, default=4, help="q: student steps that make the image-free inputs")
    a("--w", type=weight, default=None, help="w: CFG scale of the teacher target and the DMD real score "
      "(default: the stage-1 checkpoint's)")
    a("--w-target", type=weight, default=None, help="the teacher target's CFG scale alone, the DMD real score keeping "
      "--w (default: --w, the paper's one w; more guidance in the target buys alignment at FD's cost)")
    a("--distance", "--d", dest="d", choices=["mse", "llpips"], default=None, help=DISTANCE_HELP)
    a("--llpips", type=os.path.abspath, default=None, help=LLPIPS_HELP)
    a("--lambda0", type=weight, default=1.0, help="lambda0: weight of the consistency term L_GoCD (the paper: 1; 0: "
      "off, the DMD2-style baseline)")
    a("--lambda1", type=weight, default=0.1, help="lambda1: weight of the GAN term (0: off, no discriminator)")
    a("--lambda2", type=weight, default=1.0, help="lambda2: weight of the DMD term (0: off, no fake score). 1 for "
      "every teacher; for FLUX.1-dev a departure: the paper set 0 there, DMD being out of its memory, and here the "
      "fake score is an adapter on the one base copy (34 GiB at batch 1)")
    a("--fake-rank", type=count, default=None, help="LoRA rank of the fake score (default: the "
      "student's; embedded preset: 16)")
    a("--jump", choices=["adjacent", "any"], default="adjacent", help="t_n: adjacent, the milestone below t_m (the "
      "paper's), or any, k segments below (k uniform in 1..M per iteration, t_n >= 0) with p teacher steps per "
      "segment: the 1-step sampler's T -> 0 jump trained directly (about (M + 1) / 2 times the teacher's "
      "solver steps)")
    a("--inputs", choices=["renoise", "sampler"], default="renoise", help="the image-free inputs z_{t_m}: renoise, "
      "the student's q-step samples re-noised with fresh noise to a random milestone (the paper's), or sampler, a "
      "state the student's own k-step sampler calls it at, t_n the milestone it jumps to (k uniform in 1..q; --jump "
      "does not apply; trains the very steps sampling takes, DMD2's backward simulation)")
    a("--dmd-input", choices=["x0_m", "one_step"], default="x0_m", help="what DMD moves: x0_m, the student's x0 at "
      "the iteration's milestone t_m (the paper's), or one_step, its 1-step sample x0_theta(z_T, T) from fresh noise "
      "(one more student forward and backward; toward a 1-step student); the fake score learns the same samples")
    a("--fake-updates", type=lambda x: number(x, int, 0), default=None,
      help="fake-score updates per student update (DMD2's two time-scales)")
    a("--lr", type=positive, default=None, help="AdamW learning rate of the student (paper: 1e-5)")
    a("--lr-aux", type=positive, default=None, help="learning rate of the discriminator heads and the fake score")
    a("--batch", type=count, default=None, help="samples per iteration, rank and micro-batch")
    a("--grad-accum", type=count, default=1, help="micro-batches per iteration: each rank draws N x --batch prompts "
      "and their image-free inputs (the q-step rollout, no gradients, at that size), then the student's, the "
      "discriminator's and the fake score's steps each run over the N micro-batches and step once on their mean: the "
      "recipe's batch on fewer GPUs (batch x ranks x N), every gradient of one micro-batch's size. With --adapters "
      "base the micro-batches' gradients add up in bf16")
    a("--iters", type=count, default=None, help="iterations (paper: 3K SDXL, 6K FLUX)")
    a("--out", default="global.safetensors", help="the student LoRA; resume state goes to *.state.safetensors")
    a("--save-every", type=count, default=None)
    a("--resume", action="store_true", help="continue the run saved at --out (LoRAs, heads, optimizers, step, RNG)")
    a("--overwrite", action="store_true", help="replace an existing --out (a fresh run refuses to, by default)")
    a("--grad-checkpointing", action="store_true", help="trade compute for memory (SDXL / FLUX)")
    a("--dtype", choices=list(DTYPES), default=None, help=DTYPE_HELP)
    a("--adapters", choices=ADAPTERS, default="autocast", help=ADAPTERS_HELP)
    a("--compile", action="store_true", help=COMPILE_HELP)
    a("--encode-batch", type=count, default=32, help="prompts per text-encoder call")
    a("--encode-chunk", type=count, default=256, help="prompts encoded together and kept on the host (per rank)")
    a("--seed", type=int, default=0)
    a("--log-every", type=count, default=10, help="iterations per line of the metrics log, <out>.log.jsonl")
    a("--val-every", type=lambda x: number(x, int, 0), default=None, help="iterations between validation grids, "
      "<out>.val/step_<N>.png (the student at 2 and 4 steps from fixed noise; also at the start and the end; 0: none)")
    a("--val-prompts", nargs="+", default=None, help="the validation grid's prompts: a text file or the prompts "
      "(default: the embedded teacher's digits, else the first 4 of --prompts)")
    a("--device", default=None)
    return p.parse_args(argv)


def main(argv=None):
    import torch.distributed as dist
    from tqdm import tqdm
    args = parse_args(argv)
    rank, world, device, ddp = init_distributed(args.device)  # torchrun: one process per GPU (or CPU rank)
    cuda = str(device).startswith("cuda")
    master = rank == 0  # only rank 0 logs and saves
    log = print if master else (lambda *a, **k: None)
    # precision: the frozen base in `dtype` (bf16 on CUDA); student, fake score and heads fp32 with their AdamW; every
    # forward of an iteration (rollout, teacher solver, student, GAN, DMD) under autocast(), the backwards outside it
    # (or the adapters from bf16 copies, --adapters base); the distance d in fp32 (local_cd.distance)
    dtype, autocast, adapter_dtype = precision(device, args.dtype, args.adapters)

    check_fresh_out(args)
    run = lora.metadata(args.out) if args.resume else {}
    if args.resume:  # the run's own p, q, w, lambdas, ...: flags left out are taken from it, flags given must agree
        take_run_values(args, run, RUN_VALUES)
        take_run_batch(args, run, world)
    from_teacher = args.init == "teacher" and not args.resume
    if (args.M or args.rank) and not (from_teacher or args.resume):
        raise SystemExit("error: --M and --rank go with --init teacher; a stage-1 checkpoint brings its own")
    if args.lambda0 == args.lambda1 == args.lambda2 == 0:
        raise SystemExit("error: --lambda0, --lambda1 and --lambda2 are all 0: nothing to train")
    if args.inputs == "sampler" and args.jump != "adjacent":
        raise SystemExit("error: --jump any: with --inputs sampler, t_n is the milestone the sampler jumps to; leave "
                         "--jump out")
    # the student: a stage-1 checkpoint (or, resuming, this stage's own); teacher, M and w come from its metadata.
    # --init teacher: a fresh LoRA (B = 0), so the student starts as the teacher, on the grid of --M milestones
    source, stages = (args.out, ("global",)) if args.resume else (args.init, ("local",))
    try:  # every input checked before any model loads: the checkpoint's metadata and the teacher's configs are read
        meta = ({"teacher": args.teacher or "digits", "M": args.M or 8, "rank": args.rank or 64, "step": 0, "skip": ""}
                if from_teacher else checkpoint_meta(source, stages))
        if args.teacher is not None and args.teacher != meta["teacher"]:
            raise ValueError(f"{source} was distilled from teacher {meta['teacher']!r}, not {args.teacher!r}")
        for key in ("M", "rank") if args.resume else ():  # given again on --resume: they must be the run's
            if getattr(args, key) not in (None, int(meta[key])):
                raise ValueError(f"--{key} {getattr(args, key)} differs from the run's {key} = {meta[key]}")
        if not 1 <= args.q <= int(meta["M"]):
            raise ValueError(f"--q: the student samples in 1..{meta['M']} steps, not {args.q}")
        hub = {"variant": meta.get("variant") or None, "revision": meta.get("revision") or None}
        family = locate(meta["teacher"], hub["revision"])[0]
        prompts = run_prompts(args, run)
        fill_presets(args, PRESETS[family]["global"], meta["teacher"])  # and d: L-LPIPS, MSE, or a refusal
        lora_rank = int(meta["rank"])
        n_lora, latent = denoiser_size(meta["teacher"], lora_rank, int(meta.get("resolution", 1024)), hub["revision"])
    except (ValueError, FileNotFoundError) as e:
        if args.resume:
            raise SystemExit(f"error: cannot resume: {e}")
        hint = " (run stage 1 first: python local_cd.py)" if isinstance(e, FileNotFoundError) else ""
        raise SystemExit(f"error: {e}{hint}")
    args.fake_rank = args.fake_rank or int(meta.get("fake_rank", 0) if args.resume else 0) or lora_rank
    fake_lora = n_lora * args.fake_rank // lora_rank if args.lambda2 > 0 else 0
    check_inputs(args, prompts, family, latent, pair_bytes_global(n_lora, fake_lora), n_lora)
    d = distance(args.d, args.llpips, device)  # L-LPIPS: read whole now, a broken file said before the teacher loads
    try:
        with rank_zero_first(ddp):  # a hub teacher: rank 0 downloads it, the other ranks wait, then all load it
            download(meta["teacher"], **hub)
        if from_teacher:
            teacher = load_teacher(meta["teacher"], device, dtype=dtype)
            torch.manual_seed(args.seed)  # the LoRA's A: the same init for the same --seed (B = 0)
            add_student(teacher, lora_rank)
            meta["w"] = teacher.default_w
        else:
            teacher, tensors, meta = load_student(source, device, stages, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {'cannot resume: ' if args.resume else ''}{e}")
    M = int(meta["M"])
    args.w = float(meta["w"]) if args.w is None else args.w
    args.w_target = args.w if args.w_target is None else args.w_target
    try:
        prompts = prompts or read_prompts(None, teacher)
        teacher.check_prompts(prompts)
        shown = val_prompts(args.val_prompts, teacher, prompts)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")

    torch.manual_seed(args.seed)  # the same initial heads and fake adapter on every rank
    params = lora.parameters(teacher.denoiser, "student")
    disc = Discriminator(teacher) if args.lambda1 > 0 else None
    shape = teacher.student_lora
    fake = lora.inject(teacher.denoiser, shape["lora_targets"], "fake", args.fake_rank) if args.lambda2 > 0 else None
    # what trains, each with its own AdamW: name -> (parameters, lr, betas); names key the optimizers in the state file
    trainable = {"student": (params, args.lr, (0.9, 0.999))}
    if disc:
        trainable["disc"] = (list(disc.parameters()), args.lr_aux, (0.0, 0.99))
    if fake:
        trainable["fake"] = (fake, args.lr_aux, (0.9, 0.999))
    opts = {k: torch.optim.AdamW(ps, lr=lr, betas=b, weight_decay=0.0, fused=cuda or None)
            for k, (ps, lr, b) in trainable.items()}
    if args.grad_checkpointing:
        lora.gradient_checkpointing(teacher.denoiser)
    if args.compile:  # after the adapters are in (and checkpointing is set): they are compiled with their blocks
        compile_blocks(teacher.denoiser)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank draws its own samples and noise
    stream = open_prompt_stream(teacher, prompts, args, rank, world)  # prompts encoded a chunk at a time, when drawn
    hparams = {"M": M, "w": args.w, "w_target": args.w_target, "p": args.p, "q": args.q, "d": args.d,
               "llpips": args.llpips if args.d == "llpips" else "",
               "lambda0": args.lambda0, "lambda1": args.lambda1, "lambda2": args.lambda2, "fake_updates": args.fake_updates,
               "jump": args.jump, "inputs": args.inputs, "dmd_input": args.dmd_input,
               "fake_rank": args.fake_rank if fake else 0, "lr": args.lr,
               "lr_aux": args.lr_aux, "batch": args.batch * world * args.grad_accum, "seed": args.seed,
               **prompts_meta(prompts),
               "run": meta.get("run", new_run_id()) if args.resume else new_run_id(),
               "init": meta.get("init", args.init) if args.resume else args.init,
               "init_step": meta.get("init_step", meta.get("step")) if args.resume else meta.get("step"),
               "skip": meta.get("skip")}
    step = forwards = 0  # forwards: model calls x samples (a CFG step counts 2) of this run, all ranks
    if args.resume:
        try:
            state, smeta, student, prefix = read_state(args.out, meta, teacher.lora_prefix)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: cannot resume: {e}")
        if student is not None:  # the state's own copy: newer than the checkpoint if a save was interrupted
            lora.load_state_dict(teacher.denoiser, "student", student, prefix)
        if float(smeta.get("lambda1", 0)) != args.lambda1 or float(smeta.get("lambda2", 0)) != args.lambda2:
            raise SystemExit(f"error: {args.out} was trained with lambda1 = {smeta.get('lambda1')}, lambda2 = "
                             f"{smeta.get('lambda2')}; resume with the same values")
        for k, o in opts.items():
            load_optimizer(o, state, f"{k}_optim")
        if disc:
            disc.load_state_dict({k[len("disc."):]: v for k, v in state.items() if k.startswith("disc.")})
        if fake:
            lora.load_state_dict(teacher.denoiser, "fake", state, "fake")
        step, forwards = int(smeta["step"]), int(smeta.get("forwards", 0))
        if master:  # ranks > 0 continue with fresh random streams; a single-process resume continues exactly
            gen.set_state(state["rng"])
        stream.drawn = step * args.batch * args.grad_accum  # every rank draws a batch of prompts per iteration
        log(f"resumed {args.out} at step {step}" + resumed_late(step, meta))
    if ddp:  # identical student, heads and fake score on every rank
        for ps, _, _ in trainable.values():
            for p in ps:
                dist.broadcast(p.data, 0)
    # what the forwards use: the adapters' parameters, or bf16 copies of them (--adapters base); the heads as they are
    work = {k: lora.Plain(ps) if k == "disc" else lora.Working(teacher.denoiser, k, adapter_dtype)
            for k, (ps, _, _) in trainable.items()}
    syncs = {k: GradientSync(w.params, world) for k, w in work.items()}
    metrics = MetricsLog(args.out, step, master)  # <out>.log.jsonl, continued on --resume
    validate = None
    if master and args.val_every:  # rank 0 draws the grids; the others go on to the next all-reduce and wait there
        validate = validation(teacher, shown, sorted({k for k in (2, 4) if k <= M} or {M}), M, autocast, metrics,
                              os.path.basename(args.out))
        if step == 0:
            validate(0)  # where the student starts: the stage-1 student

    def save():
        stream.prune()  # every rank: its cached prompt chunks that a resume from here no longer needs
        if not master:
            return
        tensors = {"rng": gen.get_state(), **lora.state_dict(teacher.denoiser, "student", "student")}
        for k, o in opts.items():
            tensors.update(optimizer_tensors(o, f"{k}_optim"))
        if disc:
            tensors.update({f"disc.{k}": v for k, v in disc.state_dict().items()})
        if fake:
            tensors.update(lora.state_dict(teacher.denoiser, "fake", "fake"))
        lora.save(state_path(args.out), tensors, {"step": step, "run": hparams["run"], "lambda1": args.lambda1,
                                                  "lambda2": args.lambda2, "forwards": forwards})
        save_checkpoint(args.out, teacher, "global", {**hparams, "step": step, "forwards": forwards})

    def update(name, losses):
        """One AdamW step of `name` (student / disc / fake) on the mean of `losses`, one per micro-batch (--grad-accum),
        each made after the last one's backward: the gradients add up over the micro-batches and are averaged over
        ranks during the last backward. A non-finite loss stops the run before the step: the last checkpoint on disk
        stays the last good one."""
        opts[name].zero_grad(set_to_none=True)
        loss = 0.0
        for i, micro_loss in enumerate(losses):
            with syncs[name].backward(last=i == args.grad_accum - 1):  # under torchrun: the all-reduce, at the last
                (micro_loss / args.grad_accum).backward()
            loss = loss + micro_loss.detach() / args.grad_accum
        if ddp:
            loss = mean_over_ranks(loss, world)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: the {name} loss is {loss.item()} at step {step}; stopped. {args.out} keeps the "
                             "last good checkpoint (try a lower --lr / --lr-aux)")
        work[name].step(opts[name])  # AdamW (on the fp32 masters of bf16 copies, with --adapters base)
        return loss.item()

    log(f"stage 2 on {teacher.id} from {source}: M={M} p={args.p} q={args.q} w={args.w:g} "
        f"w_target={args.w_target:g} inputs={args.inputs} jump={args.jump} dmd_input={args.dmd_input} d={args.d} "
        f"lambda1={args.lambda1:g} lambda2={args.lambda2:g} lr={args.lr:g} lr_aux={args.lr_aux:g} "
        f"batch={args.batch}x{world}x{args.grad_accum} iters={args.iters}; {precision_said(dtype, adapter_dtype)}")
    planned = (args.iters - step) * args.batch * args.grad_accum
    log(f"prompts: {len(prompts)}; each rank draws {planned} more ({args.batch * args.grad_accum} per iteration), "
        f"{min(planned, stream.share)} distinct (its share: {stream.share}), {planned * world} in all")
    bar = tqdm(total=args.iters, initial=step, disable=not master, desc="global CD")
    interval = collections.Counter()  # model forwards per adapter (teacher: none) since the last log line, this rank
    with lora.count_forwards(teacher.denoiser) as calls:  # (adapter, batch) of every model call, for the log
        while step < args.iters:
            cond, _ = stream.take(args.batch * args.grad_accum)
            try:
                logs = iteration(teacher, cond, d, disc, fake is not None, update, args, M, gen, autocast)
            except SystemExit:
                bar.close()
                raise
            for adapter, n in calls:
                interval[adapter or "teacher"] += n
            forwards += sum(n for _, n in calls) * world  # the run's training budget, all ranks (as rank 0's)
            calls.clear()
            step += 1
            bar.update(1)
            metrics.add(logs)
            if step % args.log_every == 0 or step == args.iters:
                samples = (step - metrics.step) * args.batch * args.grad_accum  # this interval's, on this rank
                line = metrics.write(step, **{f"lr_{k}": o.param_groups[0]["lr"] for k, o in opts.items()},
                                     **{f"fwd_per_sample_{k}": n / samples for k, n in interval.items()},
                                     forwards=forwards)
                interval.clear()
                if master:
                    bar.set_postfix({k: f"{line[k]:.4g}" for k in logs})
            if validate and (step % args.val_every == 0 or step == args.iters):
                validate(step)
                calls.clear()  # validation's forwards are not training's
            if step % args.save_every == 0 or step == args.iters:
                save()
    bar.close()
    if lora.metadata(args.out).get("step") != str(step):  # resumed from a state newer than its checkpoint, at the end
        save()
    log(prompts_seen(stream, world))
    log(metrics.close())
    log(f"wrote {args.out}; sample it with: python sample.py --ckpt {args.out} --steps 2  (or 3, 4)")
    if ddp:  # a cheap guard: every rank must hold rank 0's weights
        diff = max(rank_difference(ps) for ps, _, _ in trainable.values())
        log(f"student, heads and fake score identical on all {world} ranks: max difference {diff:.3g}")
        dist.destroy_process_group()


if __name__ == "__main__":
    with explain_out_of_memory(), explain_interrupt("global_cd.py", lambda: parse_args().out):
        main()
