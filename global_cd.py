"""LogCD stage 2, global consistency distillation: the stage-1 student becomes ONE LoRA that samples in 2, 3 or 4 steps.

Paper: "LogCD: Local-to-global Consistency Distillation for Few-step Image Generation" (CVPR 2026), Method 2 and 4.
This file, top to bottom: the paper's values; the image-free inputs and the milestone consistency loss; the GAN (the
frozen teacher as backbone, trainable heads); DMD (a fake-score adapter on the same base); one iteration of all of
them; the training loop (main). The method's common ground (time, milestones, Psi, solve, CFG, the distance d) is in
local_cd.py; what surrounds the loop (arguments, resume, torchrun, logs) is runs.py's; the teachers, prompts and
checkpoints are teachers.py's. Options the paper does not have come last, after main, joined to its path in main.
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora
import runs
import teachers
from local_cd import (DISTANCE_HELP, LLPIPS_HELP, TOY_LLPIPS, cfg, distance, milestones, pipeline_grid, solve,
                      student_sample, student_times)
from teachers import T

# ---- the paper's values, per teacher family (every flag left out takes its family's; --help shows them) -----------

PAPER = dict(p=3, q=4, lambda1=0.1, lambda2=1.0, lr=1e-5, lr_aux=1e-5, fake_updates=2, fake_rank=None, d=None,
             llpips=None)  # Method 2 and 4; w and M are the stage-1 checkpoint's; fake_rank None: the student's
PRESETS = {
    # the embedded teacher: ours, sized to finish in minutes on a CPU
    "digits": {**PAPER, "lr": 3e-5, "lr_aux": 1e-3, "fake_rank": 16, "batch": 32, "iters": 160, "save_every": 40,
               "val_every": 20, "d": "llpips", "llpips": TOY_LLPIPS},
    "sdxl": {**PAPER, "batch": 4, "iters": 3000, "save_every": 250, "val_every": 250},
    # FLUX.1-dev with DMD (lambda2 = 1) is a departure: the paper set 0 there, DMD being out of its memory; here the
    # fake score is an adapter on the one base copy
    "flux": {**PAPER, "batch": 2, "iters": 6000, "save_every": 250, "val_every": 500},
}
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
def image_free_inputs(teacher, cond, q, M, gen, autocast, pair=None):
    """(z_{t_m}, t_m, t_n) of a batch, no gradients: the current student's q-step samples hat z_0 from pure noise,
    re-noised with fresh noise to a random milestone t_m; t_n = t_m - T/M, the milestone below it (pair: --jump
    any's choice of t_n, an option)."""
    B = len(next(iter(cond.values())))
    with autocast():
        x0_q = student_sample(teacher, cond, teacher.noise(B, gen), q, M)
    s = torch.randint(1, M + 1, (B,), generator=gen)  # t_m = t^s, s uniform in 1..M
    t_m, t_n = (pair or milestone_pair)(s, M, gen)
    t_m, t_n = t_m.to(teacher.device), t_n.to(teacher.device)
    eps = randn_like(x0_q, gen)
    # z_{t_m} = alpha_{t_m} hat z_0 + sigma_{t_m} eps; at t_m = T the sampler's own input, pure noise (a DDPM's
    # alpha_T > 0 would leave a trace of hat z_0 that no sampler input has)
    z_m = torch.where((t_m == T).view(-1, 1, 1, 1), eps, renoise(teacher, x0_q, t_m, eps))
    return z_m, t_m, t_n


def milestone_pair(s, M, gen):
    """(t_m, t_n) = (t^s, t^{s-1}): adjacent milestones, the paper's. (The option --jump any replaces this.)"""
    return milestones(M)[s].float(), milestones(M)[s - 1].float()


@torch.no_grad()
def teacher_target(teacher, z_m, t_m, t_n, cond, w, p):
    """hat z_{t_n} = Psi o ... o Psi (z_{t_m}): p steps of the teacher with CFG w, t_m -> t_n in equal parts."""
    ts = [t_m + (t_n - t_m) * i / p for i in range(p + 1)]
    with lora.adapter(teacher.denoiser, None):
        return solve(lambda z, t: cfg(teacher, z, t, cond, w), z_m, ts, teacher.alpha_sigma)


def global_loss(teacher, d, z_m, t_m, z_n, t_n, cond, target="student"):
    """L_GoCD = d(x0_theta(z_{t_m}, t_m), sg[x0_theta(hat z_{t_n}, t_n)]) per sample, hat z_{t_n} the teacher's
    target. Returns (loss per sample, x0_m with grad, x0_n = the target). At t_n = 0 the target is hat z_0 itself
    (the boundary condition; no student forward). target: the adapter whose x0 at t_n is the target, the student
    itself (the paper's) or an option's EMA of it (theta^-)."""
    with lora.adapter(teacher.denoiser, target):
        with torch.no_grad():
            x0_n, inner = z_n.clone(), (t_n > 0).nonzero().flatten()
            if len(inner):
                x0_n[inner] = teacher.x0(z_n[inner], t_n[inner], teachers.cond_index(cond, inner)).to(x0_n.dtype)
    with lora.adapter(teacher.denoiser, "student"):
        x0_m = teacher.x0(z_m, t_m, cond)
    return d(x0_m, x0_n), x0_m, x0_n


# ---- GAN: the frozen teacher's encoder as the discriminator's backbone, trainable heads ---------------------------

class _Enough(Exception):
    """Raised by the last hooked block: the discriminator needs no more of the network."""


def feature_blocks(teacher):
    """Where the discriminator reads the teacher: a UNet's down blocks and mid block (its encoder); for a FLUX
    transformer, 4 evenly spaced double-stream blocks (its first third)."""
    net = teacher.denoiser
    if isinstance(teacher, teachers.FluxTeacher):
        n = len(net.transformer_blocks)
        return [net.transformer_blocks[i] for i in sorted({max(round(n * (j + 1) / 4) - 1, 0) for j in range(4)})]
    return [*net.down_blocks, net.mid_block]


def teacher_features(teacher, z, t, cond):
    """Feature maps (B, C, h, w) of the frozen teacher (no adapter active) at feature_blocks, for z at time t. The
    network stops after the last of them. Gradients flow to z (the generator step needs them)."""
    blocks, feats = feature_blocks(teacher), []
    H, W = z.shape[-2:]

    def hook(module, inputs, output):
        if isinstance(teacher, teachers.FluxTeacher):  # image tokens (B, HW/4, D) -> a (B, D, H/2, W/2) map
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
    finally:  # gone before any backward: a gradient-checkpointed block recomputing itself there is not read again
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
    logits = disc(torch.cat([real, fake]), torch.cat([t, t]), torch.cat([eps, eps]), teachers.cond_cat(cond, cond))
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


# ---- one iteration: the student's step, the discriminator's, the fake score's ------------------------------------

class GlobalCD:
    """Stage 2's iteration with the paper's hyperparameters, by name: M segments (the stage-1 student's milestones),
    p teacher solver steps from t_m to t_n, q student steps for the image-free inputs, w the CFG scale of the teacher
    target and of DMD's real score, lambda1 and lambda2 the GAN's and DMD's weights, fake_updates fake-score steps per
    student step. d: the distance; disc: the Discriminator (None when lambda1 = 0); the fake score is the adapter
    `fake` on the teacher's denoiser (there when lambda2 > 0)."""
    lambda0 = 1.0  # the consistency term's weight: 1 in the paper

    def __init__(self, teacher, d, disc, *, M, p, q, w, lambda1, lambda2, fake_updates):
        self.teacher, self.d, self.disc = teacher, d, disc
        self.M, self.p, self.q, self.w = M, p, q, w
        self.lambda1, self.lambda2, self.fake_updates = lambda1, lambda2, fake_updates

    def inputs(self, cond, gen, autocast):
        """(z_{t_m}, t_m, t_n): the image-free inputs."""
        return image_free_inputs(self.teacher, cond, self.q, self.M, gen, autocast)

    def target(self, z_m, t_m, t_n, cond):
        """hat z_{t_n}: p teacher steps with CFG w from z_{t_m}."""
        return teacher_target(self.teacher, z_m, t_m, t_n, cond, self.w, self.p)

    def consistency(self, z_m, t_m, z_n, t_n, cond):
        """L_GoCD per sample, x0_m, x0_n (global_loss)."""
        return global_loss(self.teacher, self.d, z_m, t_m, z_n, t_n, cond)

    def dmd_x0(self, x0_m, cond, gen):
        """What DMD moves: the student's x0 at t_m."""
        return x0_m

    def iteration(self, cond, update, grad_accum, gen, autocast):
        """One stage-2 iteration on the prompts `cond`: the student's step, then one discriminator step (lambda1 > 0)
        and fake_updates fake-score steps (lambda2 > 0). Each step runs over grad_accum micro-batches: update(name,
        losses) takes one optimizer step of part `name` on the mean of `losses`, a generator that makes each
        micro-batch's loss after the last one's backward (runs.Trainer.update). Every forward runs inside
        autocast(), every backward outside it. Returns the losses to log, as tensors."""
        teacher, B = self.teacher, len(next(iter(cond.values())))
        z_m, t_m, t_n = self.inputs(cond, gen, autocast)  # the whole batch's, no gradients
        micro = torch.arange(B, device=teacher.device).split(B // grad_accum)
        logs, kept = {"cons": 0.0}, []  # kept, per micro-batch: its prompts, x0_m, x0_n and DMD's x0, detached

        def student():  # L = lambda0 L_GoCD + lambda1 L_GAN + lambda2 L_DMD
            for i in micro:
                c, n = teachers.cond_index(cond, i), len(i)
                with autocast():
                    z_n = self.target(z_m[i], t_m[i], t_n[i], c)
                    l_cons, x0_m, x0_n = self.consistency(z_m[i], t_m[i], z_n, t_n[i], c)
                    loss = self.lambda0 * l_cons.mean()
                    logs["cons"] += l_cons.mean().detach() / len(micro)
                    if self.disc:
                        l_gan = generator_loss(self.disc, x0_m, uniform(n, *GAN_T, gen, teacher.device),
                                               randn_like(x0_m, gen), c)
                        logs["gan"] = logs.get("gan", 0.0) + l_gan.detach() / len(micro)
                        loss = loss + self.lambda1 * l_gan
                    x0_dmd = x0_m
                    if self.lambda2 > 0:
                        x0_dmd = self.dmd_x0(x0_m, c, gen)
                        l_dmd = dmd_loss(teacher, x0_dmd, c, self.w, gen)
                        logs["dmd"] = logs.get("dmd", 0.0) + l_dmd.detach() / len(micro)
                        loss = loss + self.lambda2 * l_dmd
                kept.append((c, x0_m.detach(), x0_n, x0_dmd.detach()))
                yield loss

        def discriminator():  # real = sg[x0 at t_n], fake = sg[x0 at t_m], re-noised alike
            for c, x0_m, x0_n, _ in kept:
                with autocast():
                    t_g, eps = uniform(len(x0_m), *GAN_T, gen, teacher.device), randn_like(x0_m, gen)
                    l_d = discriminator_loss(self.disc, x0_n, x0_m, t_g, eps, c)
                yield l_d  # outside autocast: the trainer runs its backward before the next is made

        def fake_score():  # the fake score follows the distribution DMD moves
            for c, _, _, x0_dmd in kept:
                with autocast():
                    l_f = fake_score_loss(teacher, x0_dmd, c, gen)
                yield l_f

        logs["loss"] = update("student", student())
        if self.disc:
            logs["disc"] = update("disc", discriminator())
        for _ in range(self.fake_updates if self.lambda2 > 0 else 0):
            logs["fake"] = update("fake", fake_score())
        return logs


# ---- the training script ------------------------------------------------------------------------------------------

RUN_VALUES = dict(w=float, p=int, q=int, d=str, llpips=str, lambda1=float, lambda2=float, fake_updates=int,
                  fake_rank=int, lr=float, lr_aux=float, seed=int,  # what --resume keeps; and the options':
                  w_target=float, lambda0=float, jump=str, inputs=str, dmd_input=str, guidance_interval=runs.numbers,
                  ema=float, anchor=int, anchor_weight=float, anchor_steps=int, anchor_hold=str)

STAGE2 = """
Stage 2 (this script): global consistency, only between milestones t^s = s T / M, the times a 2-, 3- or 4-step
sampler visits. Starting from a stage-1 student (--init), each iteration:

  image-free inputs:  hat z_0 = the current student's q-step samples (no grad), re-noised with fresh noise
                      z_{t_m} = alpha_{t_m} hat z_0 + sigma_{t_m} eps at a random milestone t_m (pure noise at
                      t_m = T, as the sampler starts), t_n = t_m - T/M
  teacher target:     hat z_{t_n} = p teacher solver steps with CFG from z_{t_m} (Psi: DDIM / Euler)
  consistency:        L_GoCD  = d( x0_theta(z_{t_m}, t_m), sg[x0_theta(hat z_{t_n}, t_n)] )   (hat z_0 at t_n = 0)
  GAN (lambda1):      hinge; D = frozen teacher encoder + trainable heads; real = sg[x0 at t_n], fake = x0 at t_m
  DMD (lambda2):      real score = teacher with CFG, fake score = LoRA adapter `fake` on the same base, trained
                      online (--fake-updates denoising steps per student step); DMD2's normalised gradient on x0
  total:              L = L_GoCD + lambda1 L_GAN + lambda2 L_DMD

One copy of the base weights serves the teacher (no adapter), the student (adapter `student`), the fake score
(adapter `fake`) and the discriminator's backbone. Each flag's value per teacher family is in its help. Ablations
(the paper's Table 3): --distance mse, --lambda1 0, --lambda2 0. Options the paper does not have (the last group of
flags) are at the end of this file.

  python global_cd.py                                   # after python local_cd.py: the embedded teacher, minutes
  torchrun --nproc_per_node 4 global_cd.py --init local.safetensors --prompts prompts.txt --llpips sdxl_llpips.safetensors
  python sample.py --steps 2                            # samples global.safetensors
"""


def parse_args(argv=None):
    p = runs.Parser(description=__doc__ + STAGE2, formatter_class=argparse.RawDescriptionHelpFormatter,
                    presets=PRESETS)
    a = p.add_argument
    a("--init", default="local.safetensors", help="the stage-1 checkpoint to continue (its teacher, M and w are "
      "used); or teacher (an option, below)")
    a("--teacher", default=None, help="optional check: the teacher --init must have been distilled from (with --init "
      "teacher: the teacher, default digits)")
    a("--prompts", default=None, help="text file, one prompt per line (SDXL / FLUX); the embedded teacher uses 0..9")
    a("--p", type=runs.count, help="p: teacher solver steps from t_m to t_n")
    a("--q", type=runs.count, help="q: student steps that make the image-free inputs")
    a("--w", type=runs.weight, default=None, help="w: CFG scale of the teacher target and the DMD real score "
      "(default: the stage-1 checkpoint's)")
    a("--distance", "--d", dest="d", choices=["mse", "llpips"], help=DISTANCE_HELP)
    a("--llpips", type=os.path.abspath, help=LLPIPS_HELP)
    a("--lambda1", type=runs.weight, help="lambda1: weight of the GAN term (0: off, no discriminator)")
    a("--lambda2", type=runs.weight, help="lambda2: weight of the DMD term (0: off, no fake score)")
    a("--fake-rank", type=runs.count, help="LoRA rank of the fake score (none: the student's)")
    a("--fake-updates", type=lambda x: runs.number(x, int, 0), help="fake-score updates per student update (DMD2's "
      "two time-scales)")
    a("--lr", type=runs.positive, help="AdamW learning rate of the student")
    a("--lr-aux", type=runs.positive, help="learning rate of the discriminator heads and the fake score")
    a("--batch", type=runs.count, help="samples per iteration, rank and micro-batch")
    a("--grad-accum", type=runs.count, default=1, help="micro-batches per iteration: each rank draws N x --batch "
      "prompts and their image-free inputs (the q-step rollout, no gradients, at that size), then the student's, the "
      "discriminator's and the fake score's steps each run over the N micro-batches and step once on their mean: the "
      "recipe's batch on fewer GPUs (batch x ranks x N), every gradient of one micro-batch's size. With --adapters "
      "base the micro-batches' gradients add up in bf16")
    a("--iters", type=runs.count, help="iterations")
    a("--out", default="global.safetensors", help="the student LoRA; resume state goes to *.state.safetensors")
    a("--save-every", type=runs.count, help="iterations between saves of the checkpoint pair")
    a("--keep-every", type=runs.whole, default=0, help="also keep the student every N iterations: a copy of "
      "the checkpoint named by its step beside --out (global.step_000040.safetensors; a save of the pair at "
      "that step too), never overwritten by later saves, a LoRA's size on disk each; python eval.py --history "
      "scores them (default 0: keep none)")
    a("--resume", action="store_true", help="continue the run saved at --out (LoRAs, heads, optimizers, step, RNG)")
    a("--overwrite", action="store_true", help="replace an existing --out (a fresh run refuses to, by default)")
    a("--grad-checkpointing", action="store_true", help="trade compute for memory (SDXL / FLUX)")
    a("--dtype", choices=list(teachers.DTYPES), default=None, help=teachers.DTYPE_HELP)
    a("--adapters", choices=teachers.ADAPTERS, default="autocast", help=teachers.ADAPTERS_HELP)
    a("--compile", action="store_true", help=runs.COMPILE_HELP)
    a("--encode-batch", type=runs.count, default=32, help="prompts per text-encoder call")
    a("--encode-chunk", type=runs.count, default=256, help="prompts encoded together and kept on the host (per rank)")
    a("--seed", type=int, default=0)
    a("--log-every", type=runs.count, default=10, help="iterations per line of the metrics log, <out>.log.jsonl")
    a("--report-to", choices=["jsonl", "tensorboard"], default="jsonl", help=runs.REPORT_HELP)
    a("--val-every", type=lambda x: runs.number(x, int, 0), help="iterations between validation grids, "
      "<out>.val/step_<N>.png (the student at 2 and 4 steps from fixed noise; also at the start and the end; 0: none)")
    a("--val-prompts", nargs="+", default=None, help="the validation grid's prompts: a text file or the prompts "
      "(default: the embedded teacher's digits, else the first 4 of --prompts)")
    a("--device", default=None)
    add_option_arguments(p.add_argument_group("options the paper does not have (end of global_cd.py)"))
    return p.parse_args(argv)


def student_meta(args, resumed):
    """(where the student comes from, its checkpoint's metadata), read before any model loads: the stage-1 checkpoint
    --init, or resuming, this run's own; with --init teacher, the teacher itself (an option). Each mistake one line."""
    if args.lambda0 == args.lambda1 == args.lambda2 == 0:
        raise SystemExit("error: --lambda0, --lambda1 and --lambda2 are all 0: nothing to train")
    source, stage = (args.out, "global") if args.resume else (args.init, "local")
    try:
        meta = teacher_as_student(args) if args.init == "teacher" and not args.resume else \
            teachers.checkpoint_meta(source, (stage,))
        if args.teacher is not None and args.teacher != meta["teacher"]:
            raise ValueError(f"{source} was distilled from teacher {meta['teacher']!r}, not {args.teacher!r}")
    except (ValueError, FileNotFoundError) as e:
        if args.resume:
            raise SystemExit(f"error: cannot resume: {e}")
        hint = " (run stage 1 first: python local_cd.py)" if isinstance(e, FileNotFoundError) else ""
        raise SystemExit(f"error: {e}{hint}")
    check_options(args, resumed, int(meta["M"]))
    return source, meta


def main(argv=None):
    args = parse_args(argv)
    run = runs.Trainer(args, "global", RUN_VALUES)  # torchrun, precision; --resume takes the run's own values
    source, meta = student_meta(args, run.resumed)  # the student's teacher, M, w, rank: from its checkpoint
    hub = {"variant": meta.get("variant") or None, "revision": meta.get("revision") or None}
    lora_rank, M = int(meta["rank"]), int(meta["M"])

    def pair_bytes(n_lora, latent):  # once the presets are in: the fake score's rank is known
        args.fake_rank = args.fake_rank or lora_rank
        return runs.pair_bytes_global(n_lora, n_lora * args.fake_rank // lora_rank if args.lambda2 > 0 else 0,
                                      held=(args.ema > 0) + (args.anchor > 0))
    run.check(meta["teacher"], hub["revision"], PRESETS, pair_bytes, lora_rank, int(meta.get("resolution", 1024)))
    if not 1 <= args.q <= M:
        raise SystemExit(f"error: --q: the student samples in 1..{M} steps, not {args.q}")
    if args.anchor_hold == "samples" and args.q < 2:
        raise SystemExit(f"error: --anchor-hold samples holds the 2..q-step samplers; --q is {args.q}")
    d = distance(args.d, args.llpips, run.device)  # L-LPIPS read whole now: a broken file is said before the teacher
    if args.init == "teacher" and not args.resume:  # an option: the student starts as the teacher
        load = lambda: student_from_teacher(args, meta, run.device, run.dtype)  # noqa: E731
    else:
        load = lambda: teachers.load_student(source, run.device, (meta["stage"],), dtype=run.dtype)  # noqa: E731
    teacher, _, meta = run.load(meta["teacher"], hub, load)
    args.w = float(meta["w"]) if args.w is None else args.w

    torch.manual_seed(args.seed)  # the same initial heads and fake adapter on every rank
    disc = Discriminator(teacher) if args.lambda1 > 0 else None
    parts = {"student": (args.lr, (0.9, 0.999), None)}  # what trains: name -> (lr, betas, module; None: an adapter)
    if disc:
        parts["disc"] = (args.lr_aux, (0.0, 0.99), disc)
    if args.lambda2 > 0:
        lora.inject(teacher.denoiser, teacher.student_lora["lora_targets"], "fake", args.fake_rank)
        parts["fake"] = (args.lr_aux, (0.9, 0.999), None)
    stream = teachers.open_prompt_stream(teacher, run.prompts, args, run.rank, run.world)  # encoded when drawn
    run.train(teacher, parts, stream, held=add_held_adapters(teacher, args))  # (options' copies, if any)
    gen = torch.Generator().manual_seed(args.seed * 1000 + run.rank)  # each rank draws its own samples and noise
    paper = dict(M=M, p=args.p, q=args.q, w=args.w, lambda1=args.lambda1, lambda2=args.lambda2,
                 fake_updates=args.fake_updates)
    if options_chosen(args):  # an option the paper does not have: the iteration with its pieces (end of this file)
        method = WithOptions(teacher, d, disc, **paper, **option_values(args), step=lambda: run.step)
    else:
        method = GlobalCD(teacher, d, disc, **paper)
    hparams = {**paper, "d": args.d, "llpips": args.llpips or "",
               "fake_rank": args.fake_rank if args.lambda2 > 0 else 0, "lr": args.lr, "lr_aux": args.lr_aux,
               "batch": args.batch * run.world * args.grad_accum, "iters": args.iters, "seed": args.seed,
               "run": run.id, **runs.prompts_meta(run.prompts),
               "init": meta.get("init", args.init) if args.resume else args.init,
               "init_step": meta.get("init_step", meta.get("step")) if args.resume else meta.get("step"),
               "skip": meta.get("skip"), **option_values(args)}
    if args.resume:
        state, _ = run.resume()
        if run.master:  # ranks > 0 continue with fresh random streams; a single-process resume continues exactly
            gen.set_state(state["rng"])
        stream.drawn = run.step * args.batch * args.grad_accum  # every rank draws a batch of prompts per iteration
    run.log(f"stage 2 on {teacher.id} from {source}: {runs.said_all(hparams)}; per rank {args.batch} x "
            f"{args.grad_accum} micro-batches; {teachers.precision_said(run.dtype, run.adapter_dtype)}")
    planned = (args.iters - run.step) * args.batch * args.grad_accum
    run.log(f"prompts: {len(run.prompts)}; each rank draws {planned} more ({args.batch * args.grad_accum} per "
            f"iteration), {min(planned, stream.share)} distinct (its share: {stream.share}), {planned * run.world} in "
            "all")
    save = lambda: run.save({**hparams, **pipeline_grid(M, teacher)}, {"rng": gen.get_state()})  # noqa: E731
    run.start(sorted({k for k in (2, 4) if k <= M} or {M}),
              lambda cond, z_T, k: student_sample(teacher, cond, z_T, k, M), save)

    while run.step < args.iters:
        cond, _ = stream.take(args.batch * args.grad_accum)
        logs = method.iteration(cond, run.update, args.grad_accum, gen, run.autocast)
        run.next(logs, save)
    run.end(save)
    run.log(f"wrote {args.out}; sample it with: python sample.py --ckpt {args.out} --steps 2  (or 3, 4)")


# ==== Options the paper does not have ================================================================================
# Research options, measured in docs/results.md; none is a preset. They join the paper's path at one place each: their
# flags (add_option_arguments, in parse_args), their checks (student_meta), the student's source (--init teacher, in
# main), the copies of the student they hold (add_held_adapters, in main) and the iteration (WithOptions, which main
# builds instead of GlobalCD when an option is chosen).

def add_option_arguments(g):
    g.add_argument("--M", type=runs.count, default=None, help="with --init teacher: the milestone grid's segments "
                   "(default 8; a stage-1 checkpoint brings its own)")
    g.add_argument("--rank", type=runs.count, default=None, help="with --init teacher: the student's LoRA rank "
                   "(default 64, stage 1's)")
    g.add_argument("--w-target", type=runs.weight, default=None, help="the teacher target's CFG scale alone, the DMD "
                   "real score keeping --w (default: --w, the paper's one w; more guidance in the target buys "
                   "alignment at FD's cost)")
    g.add_argument("--lambda0", type=runs.weight, default=1.0, help="lambda0: weight of the consistency term L_GoCD "
                   "(the paper: 1; 0: off, the DMD2-style baseline)")
    g.add_argument("--jump", choices=["adjacent", "any"], default="adjacent", help="t_n: adjacent, the milestone below "
                   "t_m (the paper's), or any, k segments below (k uniform in 1..M per iteration, t_n >= 0) with p "
                   "teacher steps per segment: the 1-step sampler's T -> 0 jump trained directly (about (M + 1) / 2 "
                   "times the teacher's solver steps)")
    g.add_argument("--inputs", choices=["renoise", "sampler"], default="renoise", help="the image-free inputs "
                   "z_{t_m}: renoise, the student's q-step samples re-noised with fresh noise to a random milestone "
                   "(the paper's), or sampler, a state the student's own k-step sampler calls it at, t_n the milestone "
                   "it jumps to (k uniform in 1..q; --jump does not apply; trains the very steps sampling takes, "
                   "DMD2's backward simulation)")
    g.add_argument("--dmd-input", choices=["x0_m", "one_step"], default="x0_m", help="what DMD moves: x0_m, the "
                   "student's x0 at the iteration's milestone t_m (the paper's), or one_step, its 1-step sample "
                   "x0_theta(z_T, T) from fresh noise (one more student forward and backward; toward a 1-step "
                   "student); the fake score learns the same samples")
    g.add_argument("--guidance-interval", nargs=2, type=runs.weight, metavar=("LO", "HI"), default=None,
                   help="CFG (w, --w-target) in the teacher target and DMD's real score only at noise levels t in "
                   f"[LO, HI] (0..{T}), the plain conditional model (w = 1) elsewhere, as guidance-interval samplers "
                   "do (default: every t, the paper's)")
    g.add_argument("--ema", type=runs.fraction, default=0.0, metavar="MU", help="the consistency target x0(hat "
                   "z_{t_n}, t_n) from an EMA of the student with this decay (theta^-, adapter `ema`, updated after "
                   "each student step) instead of the current student's stop-gradient (0, the paper's)")
    g.add_argument("--anchor", type=runs.whole, default=0, metavar="N", help="from iteration N on, a frozen copy of "
                   "the student at N (adapter `anchor`) holds the 2-4-step samplers (--anchor-hold x0, the default: at the "
                   "milestones t_m < T, the "
                   "ones they call the student at after their first step, the loss adds --anchor-weight x "
                   "d(x0_theta(z_{t_m}), sg[x0_anchor(z_{t_m})])), while the 1-step jump (t_m = T) trains on as before "
                   "(0: off). The term joins the consistency term (lambda0 weighs both; the log's cons holds both, its "
                   "anchor the term alone)")
    g.add_argument("--anchor-weight", type=runs.weight, default=1.0, metavar="A", help="the anchor term's weight "
                   "(with --anchor)")
    g.add_argument("--anchor-steps", type=runs.whole, default=0, metavar="K", help="with --anchor: the 1-step jump "
                   "also learns the anchor's K-step samples, --anchor-weight x d(x0_theta(z_T, T), sg[the anchor's "
                   "K-step sample from z_T]) on fresh noise z_T for each prompt of the batch (one more student "
                   "forward and backward, K anchor forwards; 0: off)")
    g.add_argument("--anchor-hold", choices=["x0", "samples"], default="x0", help="with --anchor: what holds the "
                   "2-4-step samplers: x0, the x0 at the training inputs' milestones t_m < T (above), or samples, "
                   "their outputs: d(the student's k-step sample from z_T, sg[the anchor's k-step sample from z_T]) on "
                   "fresh noise, k uniform in 2..q per iteration, the gradient through the student's k calls (k more "
                   "student forwards and backwards, k anchor forwards)")
    # --init teacher (see --init): a fresh LoRA on --teacher, the student starting as the teacher itself on the grid
    # of --M milestones; with --lambda0 0 --inputs sampler, the DMD2-style baseline (no consistency term, no stage 1)


def options_chosen(args):
    """Whether the run departs from the paper's iteration (args.w known)."""
    return (args.w_target not in (None, args.w) or args.lambda0 != 1 or args.jump != "adjacent"
            or args.inputs != "renoise" or args.dmd_input != "x0_m" or args.guidance_interval is not None
            or args.ema > 0 or args.anchor > 0)


def option_values(args):
    """The options' values by name (the paper's when none is chosen): WithOptions takes them, a checkpoint records
    them."""
    return {"w_target": args.w if args.w_target is None else args.w_target, "lambda0": args.lambda0,
            "jump": args.jump, "inputs": args.inputs, "dmd_input": args.dmd_input,
            "guidance_interval": args.guidance_interval or "", "ema": args.ema, "anchor": args.anchor,
            "anchor_weight": args.anchor_weight, "anchor_steps": args.anchor_steps, "anchor_hold": args.anchor_hold}


def check_options(args, resumed, M):
    if (args.M or args.rank) and not (args.init == "teacher" or args.resume):
        raise SystemExit("error: --M and --rank go with --init teacher; a stage-1 checkpoint brings its own")
    if args.inputs == "sampler" and args.jump != "adjacent":
        raise SystemExit("error: --jump any: with --inputs sampler, t_n is the milestone the sampler jumps to; leave "
                         "--jump out")
    if args.guidance_interval and not args.guidance_interval[0] < args.guidance_interval[1] <= T:
        lo, hi = args.guidance_interval
        raise SystemExit(f"error: --guidance-interval: LO < HI <= {T}, not {runs.said(lo)} {runs.said(hi)}")
    for flag, on in (("--anchor-steps", args.anchor_steps), ("--anchor-hold samples", args.anchor_hold == "samples")):
        if on and not args.anchor:
            raise SystemExit(f"error: {flag} goes with --anchor (the iteration the copy is taken at)")
    if args.anchor_steps > M:
        raise SystemExit(f"error: --anchor-steps: the anchor samples in 1..{M} steps, not {args.anchor_steps}")
    for key in ("M", "rank") if args.resume else ():  # given again on --resume: they must be the run's (resumed)
        if getattr(args, key) not in (None, int(resumed.get(key, 0))):
            raise SystemExit(f"error: cannot resume: --{key} {getattr(args, key)} differs from the run's {key} = "
                             f"{resumed.get(key)}")


def teacher_as_student(args):
    """--init teacher: the metadata a stage-1 checkpoint would bring, for a student that starts as the teacher."""
    return {"teacher": args.teacher or "digits", "M": args.M or 8, "rank": args.rank or 64, "step": 0, "skip": "",
            "stage": "local"}


def student_from_teacher(args, meta, device, dtype):
    """--init teacher: the teacher with a fresh student LoRA (B = 0: the student is the teacher), the same A for the
    same --seed; w the stage-1 preset's of its family."""
    import local_cd
    teacher = teachers.load_teacher(meta["teacher"], device, dtype=dtype)
    torch.manual_seed(args.seed)
    teachers.add_student(teacher, int(meta["rank"]))
    return teacher, None, {**meta, "w": local_cd.PRESETS[teacher.family]["w"]}


class WithOptions(GlobalCD):
    """The paper's iteration with the options chosen: --inputs sampler, --jump any, --w-target, --dmd-input one_step,
    --lambda0, --guidance-interval, --ema, --anchor. What they do not change is GlobalCD's. step(): the run's
    iteration (--ema and --anchor take their copies of the student by it)."""

    def __init__(self, teacher, d, disc, *, w_target, lambda0, jump, inputs, dmd_input, guidance_interval="", ema=0.0,
                 anchor=0, anchor_weight=1.0, anchor_steps=0, anchor_hold="x0", step=lambda: 0, **paper):
        super().__init__(teacher, d, disc, **paper)
        self.w_target, self.lambda0, self.jump = w_target, lambda0, jump
        self.sampler, self.one_step = inputs == "sampler", dmd_input == "one_step"
        self.ema, self.anchor, self.anchor_weight, self.step = ema, anchor, anchor_weight, step
        self.anchor_steps, self.anchor_hold = anchor_steps, anchor_hold
        self.anchor_logs = []  # the anchor term of each micro-batch of an iteration, for its log
        if guidance_interval:  # w and w_target become functions of t (local_cd.cfg takes either)
            self.w, self.w_target = (guided(w, *guidance_interval) for w in (self.w, self.w_target))

    def iteration(self, cond, update, grad_accum, gen, autocast):
        """The paper's iteration between the copies of the student the options hold: --ema's theta^- starts as the
        student and follows it after each step, theta^- <- mu theta^- + (1 - mu) theta; --anchor's is taken once, at
        its iteration."""
        net = self.teacher.denoiser
        if self.ema and self.step() == 0:
            lora.blend(net, "student", "ema")
        if self.anchor and self.step() == self.anchor:
            lora.blend(net, "student", "anchor")
        self.anchor_logs, self.gen = [], gen
        logs = super().iteration(cond, update, grad_accum, gen, autocast)
        if self.ema:
            lora.blend(net, "student", "ema", self.ema)
        if self.anchor_logs:
            logs["anchor"] = sum(self.anchor_logs) / len(self.anchor_logs)
        return logs

    def consistency(self, z_m, t_m, z_n, t_n, cond):
        """L_GoCD with --ema's target (x0 of theta^- at t_n); from --anchor's iteration on, plus anchor_weight x
        the anchor term: d(x0_theta(z_{t_m}, t_m), sg[x0_anchor(z_{t_m}, t_m)]) on the samples at t_m < T (or with
        --anchor-hold samples, d(the student's k-step sample, sg[the anchor's]) from fresh noise), and with
        --anchor-steps K, d(x0_theta(z_T, T), sg[the anchor's K-step sample from z_T]) on fresh noise."""
        teacher = self.teacher
        loss, x0_m, x0_n = global_loss(teacher, self.d, z_m, t_m, z_n, t_n, cond, "ema" if self.ema else "student")
        if not self.anchor or self.step() < self.anchor:
            return loss, x0_m, x0_n
        hold = self.hold_samples(cond, len(z_m)) if self.anchor_hold == "samples" else \
            self.hold_x0(z_m, t_m, x0_m, cond)
        l_anchor = hold.to(loss.dtype)
        if self.anchor_steps:  # the 1-step jump, taught by the anchor's K-step sampler
            z_T, x0_1 = self.one_step_sample(cond, len(z_m), self.gen)
            with torch.no_grad():
                target = student_sample(teacher, cond, z_T, self.anchor_steps, self.M, adapter="anchor")
            l_anchor = l_anchor + self.d(x0_1, target).to(loss.dtype)
        self.anchor_logs.append(l_anchor.mean().detach())
        return loss + self.anchor_weight * l_anchor, x0_m, x0_n

    def hold_x0(self, z_m, t_m, x0_m, cond):
        """--anchor-hold x0: d(x0_theta(z_{t_m}), sg[x0_anchor(z_{t_m})]) per sample, at the milestones t_m < T (the
        2-4-step samplers' later calls), 0 at t_m = T."""
        l_hold, held = torch.zeros(len(z_m), device=z_m.device), (t_m < T).nonzero().flatten()
        if len(held):
            with torch.no_grad(), lora.adapter(self.teacher.denoiser, "anchor"):
                x0_a = self.teacher.x0(z_m[held], t_m[held], teachers.cond_index(cond, held))
            l_hold = l_hold.index_add(0, held, self.d(x0_m[held], x0_a).float())
        return l_hold

    def hold_samples(self, cond, n):
        """--anchor-hold samples: d(the student's k-step sample from z_T, sg[the anchor's from the same z_T]) per
        sample, on fresh noise, k uniform in 2..q (one k per iteration), the gradient through the student's k calls."""
        k = int(torch.randint(2, self.q + 1, (1,), generator=self.gen))
        z_T = self.teacher.noise(n, self.gen)
        with torch.no_grad():
            target = student_sample(self.teacher, cond, z_T, k, self.M, adapter="anchor")
        return self.d(student_sample(self.teacher, cond, z_T, k, self.M), target)

    def inputs(self, cond, gen, autocast):
        if self.sampler:
            with autocast():
                z_m, t_m, t_n = sampler_steps(self.teacher, cond, self.q, self.M, gen)
            return z_m, t_m.to(self.teacher.device), t_n.to(self.teacher.device)
        return image_free_inputs(self.teacher, cond, self.q, self.M, gen, autocast,
                                 pair=any_jump if self.jump == "any" else milestone_pair)

    def target(self, z_m, t_m, t_n, cond):
        """p teacher steps per segment of the longest jump (--jump any, --inputs sampler jump more than one), at
        --w-target."""
        k = round(float((t_m - t_n).max()) * self.M / T)
        return teacher_target(self.teacher, z_m, t_m, t_n, cond, self.w_target, self.p * k)

    def dmd_x0(self, x0_m, cond, gen):
        """--dmd-input one_step: x0_theta(z_T, T) from fresh noise, with gradient: the student's 1-step sample."""
        return self.one_step_sample(cond, len(x0_m), gen)[1] if self.one_step else x0_m

    def one_step_sample(self, cond, n, gen):
        """(z_T, x0_theta(z_T, T)): fresh noise and the student's 1-step sample from it, with gradient."""
        z_T = self.teacher.noise(n, gen)
        with lora.adapter(self.teacher.denoiser, "student"):
            return z_T, self.teacher.x0(z_T, torch.full((n,), float(T), device=z_T.device), cond)


def guided(w, lo, hi):
    """--guidance-interval: w at the noise levels t in [lo, hi], 1 (the conditional model, no guidance) elsewhere, as
    a function of each sample's t (local_cd.cfg takes it)."""
    return lambda t: torch.where((lo <= t) & (t <= hi), w, 1.0).view(-1, 1, 1, 1)


def add_held_adapters(teacher, args):
    """The copies of the student an option holds (--ema: `ema`, --anchor: `anchor`), as adapters of its shape on the
    same base; their names, for the trainer to save and resume them with the run."""
    names = [k for k, on in (("ema", args.ema > 0), ("anchor", args.anchor > 0)) if on]
    shape = teacher.student_lora
    for k in names:
        for p in lora.inject(teacher.denoiser, shape["lora_targets"], k, shape["rank"], shape["alpha"]):
            p.requires_grad_(False)  # no optimizer's: lora.blend sets them
    return names


def any_jump(s, M, gen):
    """--jump any: (t_m, t_n) = (t^s, t^{max(s - k, 0)}), k uniform in 1..M drawn once per iteration (one solver
    length for the batch), so the jumps a 1-step (k = M, t_m = T) or 2-step sampler makes are trained directly too."""
    k = int(torch.randint(1, M + 1, (1,), generator=gen))
    return milestones(M)[s].float(), milestones(M)[(s - k).clamp(min=0)].float()


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
    states = [teacher.noise(B, gen)]  # the sampler's states: z_T, then one per step
    with lora.adapter(teacher.denoiser, "student"):
        for j in range(int(i.max())):  # its steps, up to the latest state a sample is at (not one step beyond)
            states.append(solve(lambda z_, t_: teacher.x0(z_, t_, cond), states[-1], ts[j:j + 2], teacher.alpha_sigma))
    ts = torch.tensor(ts, dtype=torch.float32)
    return torch.stack(states)[i, torch.arange(B)], ts[i], ts[i + 1]


if __name__ == "__main__":
    with runs.explain_out_of_memory(), runs.explain_interrupt("global_cd.py", lambda: parse_args().out):
        main()
