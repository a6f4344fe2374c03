"""LogCD stage 1, local consistency distillation -- and the foundation every later stage imports.

Paper: "LogCD: Local-to-global Consistency Distillation for Few-step Image Generation" (CVPR 2026), Method 1.
This file holds what all stages share (DESIGN.md sections 3, 7): the teachers (the embedded digits teacher,
SDXL, FLUX.1-dev), their noise schedules on one time axis t in [0, T], the solver Psi, CFG, milestones and
checkpoints. Importing it does nothing; the stage-1 training loop (main) runs when it is a script.

Time: t in [0, T], T = 1000, for every teacher; t = 0 is the clean latent (alpha = 1, sigma = 0).
  DDPM teachers (SDXL, the digits toy): t = k is the training index k - 1 (so t = T is index 999, "trailing").
  Flow teachers (FLUX): sigma = shift(t / T), alpha = 1 - sigma.
"""
import argparse
import array
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess

import torch
import torch.nn.functional as F

import lora

T = 1000
HERE = os.path.dirname(os.path.abspath(__file__))
TEACHERS = {  # --teacher names; anything else is a folder or a hub id
    "digits": os.path.join(HERE, "toy", "teacher"),
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux": "black-forest-labs/FLUX.1-dev",
}
CACHE = os.environ.get("LOGCD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "logcd"))


# ---- time: milestones and step grids ------------------------------------------------------------------------------

def milestones(M):
    """t^s = s T / M, s = 0..M."""
    return torch.arange(M + 1, dtype=torch.float64) * T / M


def segment(t, M):
    """s such that t lies in (t^s, t^{s+1}]; t = 0 belongs to segment 0."""
    return (torch.ceil(torch.as_tensor(t, dtype=torch.float64) * M / T).long() - 1).clamp(0, M - 1)


def student_times(k, M):
    """k sampling steps on the milestone grid, from T down to 0: milestone indices round(M (k - i) / k), i = 0..k.
    M = 8: k = 4 -> 1000 750 500 250 0; k = 3 -> 1000 625 375 0; k = 2 -> 1000 500 0. Any k in 1..M."""
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


def to_x0(out, z_t, alpha, sigma, prediction):
    """The model output as x0_hat: the only place prediction types are told apart."""
    if prediction == "epsilon":  # z = alpha x0 + sigma eps
        return (z_t - sigma * out) / alpha
    if prediction == "v_prediction":  # v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1
        return alpha * z_t - sigma * out
    if prediction == "flow":  # z = (1 - sigma) x0 + sigma eps, v = eps - x0
        return z_t - sigma * out
    raise ValueError(f"unknown prediction type {prediction!r}")


def cfg(out_c, out_null, w):
    """Classifier-free guidance in the paper's (Ho-Salimans) form: eps_w = eps(null) + w (eps(c) - eps(null)).
    w = 1 is the plain conditional model (diffusers' guidance_scale uses the same convention)."""
    return out_null + w * (out_c - out_null)


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


# ---- conditioning: a dict of batch-first tensors ------------------------------------------------------------------

def cond_cat(*conds):
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_index(cond, idx):
    return {k: v[idx] for k, v in cond.items()}


def sha1(text):
    return hashlib.sha1(text.encode()).hexdigest()


class PromptFile:
    """A caption file, one prompt per line, UTF-8, blank lines skipped. Read by line offsets, so a million captions
    cost 8 MB of memory, not the captions themselves. Checked whole when opened: a file that is not UTF-8 text is
    refused with one line before any model loads. Indexing and iteration give the stripped captions."""

    def __init__(self, path):
        offsets, pos, digest = array.array("q"), 0, hashlib.sha1()  # 8 bytes per line, also while reading
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    if b"\0" in line:
                        raise UnicodeDecodeError("utf-8", line, 0, 1, "NUL byte")
                    blank = not line.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise ValueError(f"{path} is not a prompts file: line {n} is not UTF-8 text (expected one caption "
                                     "per line)") from None
                if not blank:
                    offsets.append(pos)
                pos += len(line)
                digest.update(line)
        if not offsets:
            raise ValueError(f"the prompts file {path} is empty")
        self.path, self.offsets, self.sha1 = path, torch.frombuffer(offsets, dtype=torch.int64), digest.hexdigest()

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            return f.readline().decode("utf-8").strip()

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def read_prompts(spec, teacher):
    """The prompts: a PromptFile (a single existing path or *.txt) or the list given. The embedded teacher defaults
    to its own prompts (the digits); other teachers need prompts."""
    if spec is None:
        if not teacher.embedded:
            raise ValueError("--prompts is required for this teacher (a text file, one prompt per line)")
        return [p for p in teacher.prompts if p]
    if len(spec) == 1 and (os.path.exists(spec[0]) or spec[0].endswith(".txt")):
        return prompt_file(spec[0])
    return spec


def prompt_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"prompts file {path} " + ("is a folder" if os.path.isdir(path) else "does not exist"))
    return PromptFile(path)


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


class PromptStream:
    """The prompts one rank draws, in order, and their embeddings, a chunk at a time: what makes a caption file of
    any length cost the same memory.
    Order: a seeded permutation of all N prompts is dealt to the ranks (rank r holds every world-th from the r-th
    on: its share, N / world prompts; a file with fewer prompts than ranks is every rank's share), and each rank
    draws its share in a new seeded order every epoch. So no two ranks draw or encode the same prompt, every prompt
    of a share is drawn once per epoch, and D draws see min(D, N / world) distinct prompts per rank.
    Embeddings: the next `chunk` draws are encoded together (teacher.encode: the text encoders on the GPU only
    meanwhile; a share no larger than a chunk is encoded once for the whole run), kept on the host and written to
    disk under `cache` + `key`, so that a resumed run reads them back; prune() (at each checkpoint) deletes the
    files of the chunks before the one in use. take(n) moves n prompts' embeddings to the device."""

    def __init__(self, teacher, prompts, seed=0, rank=0, world=1, chunk=256, cache=None, key=""):
        self.teacher, self.prompts, self.seed, self.rank, self.chunk = teacher, prompts, seed, rank, chunk
        dealt = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
        self.mine = dealt[rank::world].clone() if len(prompts) >= world else dealt  # this rank's share: indices
        self.share = len(self.mine)
        self.drawn, self.cached, self._epoch = 0, None, None  # cached: (chunk, embeddings, prompt indices)
        self.encoded = self.reused = 0  # prompts this rank encoded / read back from the disk cache
        source = prompts.sha1 if isinstance(prompts, PromptFile) else sha1("\n".join(prompts))
        self.cache = cache and os.path.join(cache, f"{sha1(f'{key}|{source}|{seed}|{chunk}')[:16]}-{rank}of{world}")

    def _share_row(self, i):
        """Which prompt of this rank's share its i-th draw is: each epoch the share in a new seeded order."""
        epoch, k = divmod(i, self.share)
        if self._epoch is None or self._epoch[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1024 + self.rank)
            self._epoch = (epoch, torch.randperm(self.share, generator=g))
        return int(self._epoch[1][k])

    def _position(self, i):
        """(chunk, row) of this rank's i-th draw: chunk c holds draws c * chunk .. (c + 1) * chunk - 1, or, when the
        share fits in one chunk, chunk 0 holds the share."""
        return (0, self._share_row(i)) if self.share <= self.chunk else divmod(i, self.chunk)

    def _path(self, c):
        return self.cache and f"{self.cache}-{c}.safetensors"

    def _chunk(self, c):
        """Embeddings (on the host) and prompt indices of chunk c, read back from the disk cache or encoded."""
        if self.share <= self.chunk:
            idx = self.mine
        else:
            idx = self.mine[[self._share_row(i) for i in range(c * self.chunk, (c + 1) * self.chunk)]]
        path = self._path(c)
        if path and os.path.exists(path):
            try:
                tensors, _ = lora.load(path)
                if torch.equal(tensors.pop("prompt_index"), idx):
                    self.reused += len(idx)
                    return tensors, idx
            except (FileNotFoundError, ValueError, KeyError):
                pass  # gone or unreadable: encoded again below
        cond = self.teacher.encode([self.prompts[int(i)] for i in idx], device="cpu")
        self.encoded += len(idx)
        if path:
            lora.save(path, {**cond, "prompt_index": idx}, {"teacher": self.teacher.id})
        return cond, idx

    def take(self, n):
        """(conditioning of this rank's next n prompts on the teacher's device, their prompt indices)."""
        rows, idx = [], []
        for i in range(self.drawn, self.drawn + n):
            c, r = self._position(i)
            if self.cached is None or self.cached[0] != c:
                self.cached = None  # the old chunk goes before the new one is encoded
                self.cached = (c, *self._chunk(c))
            rows.append({k: v[r:r + 1] for k, v in self.cached[1].items()})
            idx.append(int(self.cached[2][r]))
        self.drawn += n
        return {k: v.to(self.teacher.device) for k, v in cond_cat(*rows).items()}, torch.tensor(idx)

    def prune(self):
        """Deletes the cached chunks before the one in use: a run resumed from the checkpoint being written needs
        none of them. Disk per rank: the chunks drawn since the last checkpoint."""
        if self.cache and self.cached is not None:
            for c in range(self.cached[0] - 1, -1, -1):
                if not os.path.exists(self._path(c)):
                    break
                os.remove(self._path(c))


def open_prompt_stream(teacher, prompts, args, rank, world):
    """A training run's PromptStream: --encode-batch prompts per text-encoder call, --encode-chunk per chunk, the
    chunks cached on disk for this --out (not for the embedded teacher, whose 'encoding' is a table lookup), apart
    for every teacher, dtype and resolution (SDXL's time_ids are part of the conditioning)."""
    teacher.encode_batch = args.encode_batch
    cache = None if teacher.embedded else os.path.join(CACHE, "prompts")
    key = f"{os.path.abspath(args.out)}|{teacher.id}|{teacher.denoiser.dtype}|{getattr(teacher, 'resolution', '')}"
    return PromptStream(teacher, prompts, args.seed, rank, world, args.encode_chunk, cache, key)


def prompts_seen(stream, world):
    """The end-of-run line on the prompts: distinct ones drawn on rank 0 and on all ranks (their shares are disjoint,
    so the counts add up), what rank 0 encoded or read back, and how many were cut to an encoder's limit."""
    import torch.distributed as dist
    mine = torch.tensor(min(stream.drawn, stream.share), device=stream.teacher.device)  # nccl: a GPU tensor
    total = mine.clone()
    if world > 1:
        dist.all_reduce(total)
    return (f"prompts seen: {int(mine)} distinct on rank 0, {min(int(total), len(stream.prompts))} on all {world} "
            f"ranks (of {len(stream.prompts)}); rank 0 encoded {stream.encoded} and read {stream.reused} back from the "
            f"cache, {stream.teacher.truncated} cut to an encoder's token limit (as the pipelines cut them)")


# ---- teachers --------------------------------------------------------------------------------------------------

class Teacher:
    """What every stage needs of a teacher. Subclasses set: id, prediction, denoiser (the nn.Module LoRA goes
    into), lora_prefix (diffusers key prefix), lora_targets (regex of module paths), latent_shape (C, H, W),
    default_w, and implement alpha_sigma, forward, encode, null, decode, encode_images (images -> latents)."""
    embedded = False
    _null = None  # the null-prompt conditioning, encoded once
    encode_batch = 32  # prompts per text-encoder call (--encode-batch)
    encode_calls = truncated = 0  # counters: text-encoder calls, prompts cut to an encoder's limit

    def check_prompts(self, prompts):
        """Raises ValueError for a prompt this teacher cannot encode: said before any work, as encoding comes later.
        A text encoder takes any prompt."""

    def encode(self, prompts, device=None):
        """Embeddings of `prompts` (a dict of batch-first tensors on `device`, default the teacher's), encode_batch
        prompts per call, the text encoders on the teacher's device only meanwhile. A prompt longer than an
        encoder's limit is cut as the pipelines cut it and counted in self.truncated, not warned about one by one."""
        from diffusers.utils import logging as diffusers_logging
        from tqdm import tqdm
        from transformers.utils import logging as transformers_logging
        prompts, B, out = list(prompts), self.encode_batch, []
        levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # the pipelines warn for every cut prompt; counted instead
        transformers_logging.set_verbosity_error()
        try:
            for m in self.text_encoders:
                m.to(self.device)
            for i in tqdm(range(0, len(prompts), B), desc="encoding prompts", disable=len(prompts) <= 4 * B):
                batch = prompts[i:i + B]
                with torch.no_grad():
                    out.append({k: v.to(device or self.device) for k, v in self._encode(batch).items()})
                self.encode_calls += 1
                self.truncated += sum(any(len(t(p).input_ids) > n for t, n in self.token_limits) for p in batch)
        except torch.OutOfMemoryError:
            raise SystemExit(f"error: out of GPU memory while encoding prompts (the text encoders on the GPU, {B} "
                             "prompts per text-encoder call): try a smaller --encode-batch") from None
        finally:
            for m in self.text_encoders:
                m.to("cpu")  # the text encoders leave the GPU between chunks
            diffusers_logging.set_verbosity(levels[0])
            transformers_logging.set_verbosity(levels[1])
        return cond_cat(*out)

    def x0(self, z, t, cond, w=None, null=None):
        """x0_hat of the denoiser as it stands (teacher, or student with an adapter active); with w, CFG against the
        null prompt (one batched pass for both halves)."""
        if w is None:
            out = self.forward(z, t, cond)
        else:
            null = self.null(z.shape[0]) if null is None else null
            out_c, out_null = self.forward(torch.cat([z, z]), torch.cat([t, t]), cond_cat(cond, null)).chunk(2)
            out = cfg(out_c, out_null, w)
        alpha, sigma = self.alpha_sigma(t)
        return to_x0(out.float(), z.float(), alpha, sigma, self.prediction)

    def noise(self, n, generator=None):
        return torch.randn(n, *self.latent_shape, generator=generator).to(self.device)  # CPU draws: same on any device


class DDPMTeacher(Teacher):
    """A UNet2DConditionModel with a DDPM noise schedule. As such it is the embedded-layout teacher (unet/,
    scheduler/, prompt_embeds.safetensors; latent = image); SDXLTeacher adds text encoders and a VAE."""
    lora_prefix = "unet"
    # the usual SD/SDXL LoRA targets: attention, feed-forward, resnet convs, resampling convs, time projection
    lora_targets = (r"(^|\.)(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2|"
                    r"conv_shortcut|downsamplers\.0\.conv|upsamplers\.0\.conv|time_emb_proj)$")

    def __init__(self, unet, scheduler_config, device):
        self.denoiser, self.device = unet.to(device).requires_grad_(False).eval(), device
        self.prediction = scheduler_config.get("prediction_type", "epsilon")
        from diffusers import DDPMScheduler
        ac = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.double()
        # log alpha_bar at t = 0..T: t = 0 is clean, t = k is training index k - 1; linear in between
        self.log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), ac.log()]).to(device)

    def alpha_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64, device=self.device).reshape(-1).clamp(0, T)
        lo = t.floor().long().clamp(max=T - 1)
        log_ab = torch.lerp(self.log_ab[lo], self.log_ab[lo + 1], t - lo)
        alpha, sigma = (0.5 * log_ab).exp(), (1 - log_ab.exp()).clamp_min(0).sqrt()
        return alpha.float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)

    def forward(self, z, t, cond):
        """Raw UNet output; the UNet reads t = k as its training index k - 1 (kept in fp32: bf16 rounds 999 to 1000)."""
        extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        dtype = self.denoiser.dtype
        out = self.denoiser(z.to(dtype), (t - 1).float(), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                            added_cond_kwargs={k: v.to(dtype) for k, v in extra.items()} or None)
        return out.sample


class DigitsTeacher(DDPMTeacher):
    """A folder in the embedded layout (DESIGN.md section 8): the prompts are rows of a table, the latent is the image."""
    embedded = True
    default_w = 1.5  # measured on the embedded teacher: README, "The embedded teacher"

    def __init__(self, folder, device, id, dtype=torch.float32):
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), dtype=dtype)
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            super().__init__(unet, json.load(f), device)
        tensors, meta = lora.load(os.path.join(folder, "prompt_embeds.safetensors"))
        self.embeds = tensors["embeds"].to(device)
        n = self.embeds.shape[0] - 1
        self.prompts = meta.get("prompts", "|".join([str(i) for i in range(n)] + [""])).split("|")
        if len(self.prompts) != n + 1 or self.prompts[-1] != "":  # the rows ARE the prompts (DESIGN.md 8)
            raise ValueError(f"{folder}/prompt_embeds.safetensors has {n + 1} rows (the last one the empty prompt) "
                             f"but its metadata names {len(self.prompts)} prompts, '|'-separated; fix or drop the "
                             "metadata")
        self.id, self.folder = id, folder
        c = unet.config
        self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)

    def check_prompts(self, prompts):
        unknown = sorted(set(prompts) - set(self.prompts))
        if unknown:
            raise ValueError(f"the embedded teacher knows the prompts {self.prompts[:-1]} and '', not {unknown[0]!r}")

    def encode(self, prompts, device=None):
        rows = []
        for p in prompts:
            if p not in self.prompts:
                raise ValueError(f"the embedded teacher knows the prompts {self.prompts[:-1]} and '', not {p!r}")
            rows.append(self.prompts.index(p))
        return {"encoder_hidden_states": self.embeds[rows].to(device or self.device)}

    def null(self, n):
        return {"encoder_hidden_states": self.embeds[-1:].expand(n, -1, -1)}

    def decode(self, z):
        return z.float().clamp(-1, 1)

    def encode_images(self, x):
        """Images (B, 3, H, W) in [-1, 1] -> latents: grey, resized to the teacher's resolution (identity VAE)."""
        return F.interpolate(x.float().mean(1, keepdim=True), size=self.latent_shape[1:], mode="area")


class SDXLTeacher(DDPMTeacher):
    """stabilityai/stable-diffusion-xl-base-1.0 (or any StableDiffusionXLPipeline folder): two text encoders,
    pooled embeddings and micro-conditioning time_ids, VAE latents scaled by vae.config.scaling_factor."""
    default_w = 7.0

    def __init__(self, pipe, device, id, resolution=1024):
        super().__init__(pipe.unet, dict(pipe.scheduler.config), device)
        self.pipe, self.id, self.resolution = pipe, id, resolution
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.latent_shape = (pipe.unet.config.in_channels, resolution // f, resolution // f)
        self.vae = pipe.vae.to(device)
        if self.vae.dtype != torch.float32:
            self.vae.to(torch.float32)  # fp32 decode: SDXL's VAE overflows in fp16
        # micro-conditioning: (original size, crop top-left, target size)
        self.time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)

    @property
    def text_encoders(self):
        return self.pipe.text_encoder, self.pipe.text_encoder_2

    @property
    def token_limits(self):
        return [(t, t.model_max_length) for t in (self.pipe.tokenizer, self.pipe.tokenizer_2)]  # CLIP's 77

    def _encode(self, prompts):
        e, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": e, "text_embeds": pooled,
                "time_ids": self.time_ids.to(self.device).expand(len(prompts), -1)}

    def null(self, n):
        if self._null is None:
            c = self.encode([""])
            if self.pipe.config.get("force_zeros_for_empty_prompt", True):  # SDXL's own unconditional input
                c = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in c.items()}
            self._null = c
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def decode(self, z):
        with torch.no_grad():
            x = self.vae.decode(z.float() / self.vae.config.scaling_factor).sample
        return x.clamp(-1, 1)

    def encode_images(self, x):
        with torch.no_grad():
            return self.vae.encode(x.float()).latent_dist.mean * self.vae.config.scaling_factor


class FluxTeacher(Teacher):
    """black-forest-labs/FLUX.1-dev (or any FluxPipeline folder): a rectified flow, Euler = Psi. Latents are kept
    as (16, H/8, W/8) images (so Psi and the losses see images) and packed into 2x2 tokens only inside forward.
    FLUX.1-dev is guidance-distilled: its "CFG" is the guidance embedding, ONE pass with guidance = w and no null
    prompt. true_cfg=True uses the paper's two-pass form instead (for transformers without guidance embedding)."""
    prediction = "flow"
    lora_prefix = "transformer"
    lora_targets = r"(^|\.)(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|proj_out)$"
    default_w = 3.5  # FLUX.1-dev's guidance scale

    def __init__(self, pipe, device, id, resolution=1024, true_cfg=False):
        self.pipe, self.id, self.device, self.resolution = pipe, id, device, resolution
        self.denoiser = pipe.transformer.to(device).requires_grad_(False).eval()
        self.true_cfg = true_cfg or not self.denoiser.config.guidance_embeds
        f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        self.latent_shape = (self.denoiser.config.in_channels // 4, resolution // f, resolution // f)
        self.vae = pipe.vae.to(device)
        if self.vae.dtype != torch.float32:
            self.vae.to(torch.float32)
        c = pipe.scheduler.config
        n_tokens = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        if c.get("use_dynamic_shifting", False):  # FLUX's resolution-dependent shift: mu linear in the token count
            m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
            self.shift = math.exp(c["base_shift"] + m * (n_tokens - c["base_image_seq_len"]))
        else:
            self.shift = float(c.get("shift", 1.0))
        h, w = self.latent_shape[1] // 2, self.latent_shape[2] // 2
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # token positions (0, row, col)
        self.img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(h * w, 3).float().to(device)

    def alpha_sigma(self, t):
        u = torch.as_tensor(t, dtype=torch.float64, device=self.device).reshape(-1).clamp(0, T) / T
        # sigma = shift u / (1 + (shift - 1) u): FLUX's time shift (exp(mu) for the dynamic form)
        sigma = self.shift * u / (1 + (self.shift - 1) * u)
        return (1 - sigma).float().view(-1, 1, 1, 1), sigma.float().view(-1, 1, 1, 1)

    def forward(self, z, t, cond, guidance=None):
        B, C, H, W = z.shape
        dtype = self.denoiser.dtype
        # pack 2x2 latent patches into tokens: (B, C, H, W) -> (B, HW/4, 4C)
        x = z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
        _, sigma = self.alpha_sigma(t)
        e = cond["encoder_hidden_states"]
        g = None
        if self.denoiser.config.guidance_embeds:
            # the student runs at the teacher's default guidance, as a FluxPipeline loading the LoRA would
            g = torch.full((B,), self.default_w if guidance is None else guidance, device=z.device, dtype=dtype)
        v = self.denoiser(hidden_states=x.to(dtype), timestep=sigma.view(-1).to(dtype), guidance=g,
                          pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=e.to(dtype),
                          txt_ids=torch.zeros(e.shape[1], 3, device=z.device, dtype=dtype),
                          img_ids=self.img_ids.to(dtype), return_dict=False)[0]
        return v.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

    def x0(self, z, t, cond, w=None, null=None):
        if w is None or self.true_cfg:
            return super().x0(z, t, cond, w, null)
        _, sigma = self.alpha_sigma(t)  # guidance-distilled: w enters as the guidance embedding, one pass
        return to_x0(self.forward(z, t, cond, guidance=w).float(), z.float(), 1 - sigma, sigma, "flow")

    @property
    def text_encoders(self):
        return self.pipe.text_encoder, self.pipe.text_encoder_2

    @property
    def token_limits(self):
        return [(self.pipe.tokenizer, self.pipe.tokenizer.model_max_length), (self.pipe.tokenizer_2, 512)]  # CLIP, T5

    def _encode(self, prompts):
        e, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device=self.device, max_sequence_length=512)
        return {"encoder_hidden_states": e, "pooled_projections": pooled}

    def null(self, n):
        self._null = self._null or self.encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def decode(self, z):
        c = self.vae.config
        with torch.no_grad():
            x = self.vae.decode(z.float() / c.scaling_factor + (c.shift_factor or 0.0)).sample
        return x.clamp(-1, 1)

    def encode_images(self, x):
        c = self.vae.config
        with torch.no_grad():
            return (self.vae.encode(x.float()).latent_dist.mean - (c.shift_factor or 0.0)) * c.scaling_factor


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- precision: what runs in which dtype (DESIGN.md section 11), decided here for every script --------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype; fp16 would need loss scaling: not offered
DTYPE_HELP = "dtype of the frozen base weights: bfloat16 (default on CUDA) or float32 (default on a CPU)"
DISTANCE_HELP = ("d: the consistency distance (under torchrun write --distance: torchrun takes --d for an abbreviation "
                 "of its own --duplicate-* flags)")


def precision(device, name=None):
    """(dtype, autocast) of a run on `device`: the one precision decision of every script.
    - The frozen base weights are `dtype`: --dtype, else bf16 on CUDA and fp32 on a CPU.
    - The LoRA adapters, their AdamW state and the discriminator heads stay fp32; so does the consistency distance d,
      L-LPIPS included (local_cd.distance runs it outside autocast).
    - A forward with an adapter active (not merged) runs inside `autocast()`: matmuls and convs in the base dtype,
      the fp32 adapter weights cast on the fly (CUDA's autocast also lifts norms and softmax to fp32; a CPU's does
      not). lora.LoRALayer refuses a bf16 base outside it: the mistake that crashed stage 2 on GPUs.
    - A forward with no adapter (the teacher) needs no autocast: stage 1's trajectories and sampling run it plainly
      in the base dtype, stage 2 inside the autocast() of its iteration. A merged adapter (sampling) runs plainly,
      as a diffusers pipeline runs it.
    A CPU runs the bf16 regime too (--dtype bfloat16, torch.autocast("cpu")): that is how the tests see what a GPU
    runs. In fp32, autocast() does nothing."""
    cuda = str(device).startswith("cuda")
    dtype = DTYPES[name] if name else torch.bfloat16 if cuda else torch.float32

    def autocast():
        return torch.autocast("cuda" if cuda else "cpu", dtype, enabled=dtype != torch.float32)
    return dtype, autocast


def load_teacher(name_or_dir="digits", device=None, resolution=1024, dtype=None, true_cfg=False):
    """A teacher by name (digits, sdxl, flux), folder or hub id. A folder in the embedded layout (unet/, scheduler/,
    prompt_embeds.safetensors) loads as a digits-style teacher; a diffusers SDXL / FLUX pipeline folder or hub id as
    that family. Frozen weights in `dtype` (default: precision's, bf16 on CUDA, fp32 on a CPU)."""
    device = device or default_device()
    dtype = dtype or precision(device)[0]
    id = name_or_dir
    path = TEACHERS.get(name_or_dir, name_or_dir)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "prompt_embeds.safetensors")):
            if not (os.path.isdir(os.path.join(path, "unet")) and os.path.isdir(os.path.join(path, "scheduler"))):
                raise ValueError(f"{path}: an embedded-layout teacher needs unet/ and scheduler/ beside prompt_embeds.safetensors")
            if os.path.abspath(path) == os.path.abspath(TEACHERS["digits"]):
                id = "digits"
            return DigitsTeacher(path, device, id, dtype)
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise ValueError(f"{path} is not a teacher folder: expected unet/ + scheduler/ + prompt_embeds.safetensors "
                             "(the embedded layout) or a diffusers SDXL / FLUX pipeline (model_index.json)")
    elif name_or_dir == "digits":
        raise FileNotFoundError(f"the embedded teacher is missing at {path}: restore it with `git checkout toy/teacher` "
                                "or retrain it with `python -m toy.train_teacher`")
    elif "/" not in path:
        raise ValueError(f"unknown teacher {name_or_dir!r}: use digits, sdxl, flux, a teacher folder or a hub id")
    from diffusers import DiffusionPipeline
    try:
        cls = DiffusionPipeline.load_config(path)["_class_name"]
    except Exception as e:
        raise ValueError(f"cannot read the pipeline config of {path!r} ({type(e).__name__}); offline or gated? "
                         f"download it first (hf download {path} --local-dir DIR) and pass DIR") from None
    if "StableDiffusionXL" not in cls and "Flux" not in cls:
        raise ValueError(f"{path} is a {cls}; LogCD supports SDXL-style UNets, FLUX transformers and the embedded "
                         "layout")
    # from_pretrained maps the weight files and builds every model straight in `dtype`: a bf16 file is used in place
    # (the page cache holds one copy for all ranks), an fp32 one (SDXL's unet) costs one private bf16 copy. No fp32
    # model is ever built (bench.py --what load measures it).
    if "StableDiffusionXL" in cls:
        from diffusers import StableDiffusionXLPipeline
        return SDXLTeacher(StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype), device, id, resolution)
    from diffusers import FluxPipeline
    return FluxTeacher(FluxPipeline.from_pretrained(path, dtype=dtype), device, id, resolution, true_cfg)


# ---- checkpoints ------------------------------------------------------------------------------------------------

def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def add_student(teacher, rank=64, alpha=None, targets=None):
    """The student f_theta = teacher + LoRA adapter `student` (B = 0: it starts as the teacher)."""
    targets, alpha = targets or teacher.lora_targets, rank if alpha is None else alpha
    teacher.student_lora = {"rank": rank, "alpha": alpha, "lora_targets": targets}  # goes into checkpoints
    return lora.inject(teacher.denoiser, targets, "student", rank, alpha)


def save_checkpoint(path, teacher, stage, meta):
    """The student LoRA (diffusers keys, so pipe.load_lora_weights reads it) + metadata, written atomically.
    meta: the stage's hyper-parameters (M, skip, w, p, q, step, ...); teacher, resolution and LoRA shape are added.
    Training state for --resume goes to a file of its own (state_path), which diffusers never has to read."""
    tensors = lora.state_dict(teacher.denoiser, "student", teacher.lora_prefix)
    meta = {"format": "logcd", "stage": stage, "teacher": teacher.id, "lora_prefix": teacher.lora_prefix,
            "resolution": getattr(teacher, "resolution", teacher.latent_shape[-1]), **teacher.student_lora,
            "dtype": str(teacher.denoiser.dtype).removeprefix("torch."),  # of the base it was trained on
            "git_commit": git_commit(), **meta}
    lora.save(path, tensors, meta)


def state_path(path):
    """local.safetensors -> local.state.safetensors: optimizer, RNG and data state for --resume."""
    return path[:-len(".safetensors")] + ".state.safetensors" if path.endswith(".safetensors") else path + ".state"


def read_state(path, meta, lora_prefix):
    """(state tensors, state metadata, where the student LoRA to resume is, its key prefix) of the run saved at `path`
    (checkpoint metadata `meta`). The state file holds the student LoRA too (prefix "student"), so a save interrupted
    between its two files (state written, checkpoint not) still resumes, at the state's step. A state without it
    (runs before issue 16) must be of the checkpoint's step, and the LoRA comes from the checkpoint."""
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


def check_fresh_out(args):
    """A run without --resume does not replace an existing --out (or its state file) unless --overwrite says so."""
    for path in (args.out, state_path(args.out)):
        if not args.resume and not args.overwrite and os.path.exists(path):
            raise SystemExit(f"error: {path} exists; continue its run with --resume, or replace it with --overwrite")


def new_run_id():
    """A fresh run's identity: its checkpoint and state file carry it, and --resume requires them to agree."""
    import uuid
    return uuid.uuid4().hex[:12]


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


def read_checkpoint(path, stages=("local", "global"), teacher_id=None):
    """(tensors, metadata) of a LogCD checkpoint; one clear error if it is not one, or is of another stage/teacher."""
    tensors, meta = lora.load(path)
    if "run" in meta and "format" not in meta and path.endswith(".state.safetensors"):
        raise ValueError(f"{path} is the training state that --resume reads, not a checkpoint; use "
                         f"{path[:-len('.state.safetensors')]}.safetensors")
    if meta.get("format") != "logcd" or not any(k.endswith(".lora_A.weight") for k in tensors):
        raise ValueError(f"{path} is not a LogCD checkpoint (no LoRA or no LogCD metadata)")
    if meta.get("stage") not in stages:
        raise ValueError(f"{path} is a {meta.get('stage')!r} checkpoint; expected {' or '.join(stages)}")
    if teacher_id is not None and meta.get("teacher") != teacher_id:
        raise ValueError(f"{path} was trained from teacher {meta.get('teacher')!r}, not {teacher_id!r}")
    for key, kind in (("teacher", str), ("M", int), ("rank", int), ("alpha", float)):
        try:
            kind(meta[key])
        except (KeyError, ValueError):
            raise ValueError(f"{path}: its metadata lacks a valid {key!r} ({meta.get(key)!r}); it was not written by "
                             "local_cd.py / global_cd.py, or was edited") from None
    return tensors, meta


def load_student(path, device=None, stages=("local", "global"), teacher_id=None, dtype=None):
    """Teacher + student adapter from a checkpoint, its metadata naming everything (no flag has to be repeated)."""
    tensors, meta = read_checkpoint(path, stages, teacher_id)
    teacher = load_teacher(meta["teacher"], device, resolution=int(meta.get("resolution", 1024)), dtype=dtype)
    add_student(teacher, int(meta["rank"]), float(meta["alpha"]), meta.get("lora_targets"))
    lora.load_state_dict(teacher.denoiser, "student", tensors, teacher.lora_prefix)
    return teacher, tensors, meta


# ---- distributed: torchrun, no DDP wrapper (the LoRA gradients are averaged by hand, in one flat all-reduce) ---------

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


def memory_needed(e):
    """The least GiB a run that hit this CUDA out-of-memory error needs: the peak in use plus the failed allocation."""
    m = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB)", str(e))
    asked = float(m.group(1)) / (1024 if m.group(2) == "MiB" else 1) if m else 0.0
    return torch.cuda.max_memory_allocated() / 2 ** 30 + asked


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
    """--resume keeps the run's batch (samples per iteration, over all ranks) also on another number of ranks: --batch,
    which is per rank, becomes the run's batch / world. A --batch given must give the run's batch; a world that does
    not divide it is refused in one line."""
    if "batch" not in meta:
        return
    total = int(meta["batch"])
    if "batch" in args.given and args.batch * world != total:
        raise SystemExit(f"error: cannot resume: --batch {args.batch} on {world} rank(s) is {args.batch * world} "
                         f"samples per iteration, the run's batch is {total}; leave --batch out")
    if total % world:
        divisors = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0)
        raise SystemExit(f"error: cannot resume: the run's batch of {total} does not split over {world} ranks; resume "
                         f"on {divisors} rank(s)")
    args.batch = total // world


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
        raise SystemExit(f"interrupted: {path} holds step {step}; continue with: {launch} {script} {again} --resume"
                         .replace("  ", " ")) from None
    finally:
        signal.signal(signal.SIGTERM, before)


def fill_presets(args, preset):
    """Every flag left at None takes the teacher family's preset value."""
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def all_reduce_grads(params, world):
    """p.grad <- the mean of p.grad over ranks, for all params at once (a missing grad counts as zero)."""
    import torch.distributed as dist
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params]) / world
    dist.all_reduce(flat)
    torch.nn.utils.vector_to_parameters(flat, [p.grad for p in params])


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


# ==== Stage 1: local consistency distillation ======================================================================

def trajectory_times(M, skip, offset=0):
    """The teacher's solver grid for the image-free training data, T down to 0, and which steps are training pairs.
    In each segment (t^s, t^{s+1}]: t^{s+1}, then t_m = t^{s+1} - offset, t_m - skip, ... and finally t^s. Every
    step after the segment's first goes from t_m to t_n = max(t_m - skip, t^s): one training pair per teacher step.
    (The first, t^{s+1} -> t^{s+1} - offset, only moves the grid: offset in [0, skip) lets t_m reach every t.)"""
    ts, is_pair = [float(T)], []
    for s in reversed(range(M)):
        lo, hi = s * T / M, (s + 1) * T / M
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
        self.cfg_passes = 1 if isinstance(teacher, FluxTeacher) and not teacher.true_cfg else 2

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
            z_next = Psi(z, self.teacher.x0(z, t_, cond, w=self.w), t_, s_, self.teacher.alpha_sigma)
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
            raise ValueError("its trajectory pool was saved before prompt streams (git log: issue 15); start a new run")
        dev = self.teacher.device
        self.pool = {k[len("buffer."):]: v.to(dev) for k, v in tensors.items() if k.startswith("buffer.")} or None
        self.conds = {k[len("buffer_cond."):]: v.to(dev) for k, v in tensors.items() if k.startswith("buffer_cond.")}
        counters = dict(counters)
        self.prompts.drawn = int(counters.pop("prompts_drawn", 0))
        for k, v in counters.items():
            setattr(self, k, int(v))


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


RUN_VALUES = dict(teacher=str, resolution=int, M=int, skip=float, w=float, d=str, llpips=str, lr=float, rank=int,
                  seed=int)  # what --resume keeps of a run

PRESETS = {  # the paper's hyper-parameters per teacher family; the embedded teacher's finish in minutes on a CPU
    "digits": dict(iters=400, batch=64, lr=1e-3, trajectories=16, buffer=4096, reuse=4, save_every=100),
    "sdxl": dict(iters=12000, batch=4, lr=1e-4, w=7.0, trajectories=4, buffer=512, reuse=4, save_every=500),
    "flux": dict(iters=6000, batch=2, lr=1e-4, w=3.5, trajectories=2, buffer=256, reuse=4, save_every=500),
}


def family(teacher):
    return "digits" if teacher.embedded else "flux" if isinstance(teacher, FluxTeacher) else "sdxl"


def distance(name, llpips_path=None, channels=None, device="cpu"):
    """d(x, y) of the consistency loss, per sample: mse, or L-LPIPS (a perceptual distance on latents, llpips.py)."""
    if name == "mse":
        return lambda x, y: (x.float() - y.float()).pow(2).flatten(1).mean(1)
    if not llpips_path or not os.path.exists(llpips_path):
        raise SystemExit(f"error: --d llpips needs L-LPIPS weights for this teacher (--llpips FILE; "
                         f"{llpips_path or 'none given'} not found): train them with llpips.py, or use --d mse")
    import llpips
    try:
        net = llpips.load(llpips_path, device)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if channels is not None and net.channels != channels:
        raise SystemExit(f"error: {llpips_path} compares {net.channels}-channel latents; this teacher's have {channels}")

    def d(x, y):
        # in fp32, outside autocast: the loss compares nearly equal latents, whose L-LPIPS under bf16 autocast is
        # rounding noise (toy L-LPIPS, latents 0.01 apart: 75% mean relative error)
        with torch.autocast(x.device.type, enabled=False):
            return net(x.float(), y.float())
    return d


def parse_args(argv=None):
    p = Parser(description=__doc__ + STAGE1, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--teacher", default="digits", help="digits (embedded, default), sdxl, flux, a teacher folder or hub id")
    a("--prompts", default=None, help="text file, one prompt per line (SDXL / FLUX); the embedded teacher uses 0..9")
    a("--M", type=count, default=8, help="M: number of segments; milestones t^s = s T / M")
    a("--skip", type=positive, default=20, help="skip: t_n = max(t_m - skip, t^s), in teacher timesteps")
    a("--w", type=weight, default=None, help="w: CFG scale of the teacher target, eps(null) + w (eps(c) - eps(null)) "
      "(paper: 7 for SDXL; FLUX.1-dev: its guidance embedding, 3.5; embedded teacher: its measured default)")
    a("--d", "--distance", choices=["mse", "llpips"], default="mse", help=DISTANCE_HELP)
    a("--llpips", default=None, help="L-LPIPS weights for --d llpips (embedded teacher: toy/llpips.safetensors)")
    a("--rank", type=count, default=64, help="LoRA rank r (alpha = r)")
    a("--lr", type=positive, default=None, help="AdamW learning rate (paper: 1e-4; embedded preset: 1e-3)")
    a("--batch", type=count, default=None, help="training pairs per iteration and rank")
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
    a("--resolution", type=count, default=1024, help="SDXL / FLUX image size")
    a("--encode-batch", type=count, default=32, help="prompts per text-encoder call")
    a("--encode-chunk", type=count, default=256, help="prompts encoded together and kept on the host (per rank)")
    a("--seed", type=int, default=0)
    a("--log-every", type=count, default=50)
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
  torchrun --nproc_per_node 4 local_cd.py --teacher sdxl --prompts prompts.txt
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
    # autocast(), d in fp32; the teacher's trajectories (no adapter) plainly in `dtype`
    dtype, autocast = precision(device, args.dtype)

    check_fresh_out(args)
    if args.resume:  # the run's own teacher, M, skip, w, ...: flags left out are taken from it, flags given must agree
        take_run_values(args, lora.metadata(args.out), RUN_VALUES)
        take_run_batch(args, lora.metadata(args.out), world)
    try:
        prompts = run_prompts(args, lora.metadata(args.out))  # checked whole before any model loads
        teacher = load_teacher(args.teacher, device, args.resolution, dtype)
        prompts = prompts or read_prompts(None, teacher)
        teacher.check_prompts(prompts)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    fill_presets(args, PRESETS[family(teacher)])
    args.w = teacher.default_w if args.w is None else args.w
    if args.d == "llpips" and args.llpips is None and teacher.id == "digits":
        args.llpips = os.path.join(HERE, "toy", "llpips.safetensors")  # the embedded teacher's own L-LPIPS
    d = distance(args.d, args.llpips, teacher.latent_shape[0], device)

    torch.manual_seed(args.seed)  # the same LoRA init on every rank
    params = add_student(teacher, args.rank)
    if args.grad_checkpointing:
        lora.gradient_checkpointing(teacher.denoiser)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=cuda or None)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank draws its own trajectories and pairs
    stream = open_prompt_stream(teacher, prompts, args, rank, world)  # prompts encoded a chunk at a time, when drawn
    buffer = TrajectoryBuffer(teacher, stream, args.M, args.skip, args.w, args.trajectories, args.buffer,
                              args.reuse, gen)
    hparams = {"M": args.M, "skip": args.skip, "w": args.w, "d": args.d, "llpips": args.llpips or "", "lr": args.lr,
               "batch": args.batch * world, "seed": args.seed, "run": new_run_id(), **prompts_meta(prompts)}
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

    def save():
        stream.prune()  # every rank: its cached prompt chunks that a resume from here no longer needs
        if not master:
            return
        tensors, counters = buffer.state()
        meta = {**hparams, "step": step}
        lora.save(state_path(args.out), {**optimizer_tensors(opt), **tensors, "rng": gen.get_state(),
                                         **lora.state_dict(teacher.denoiser, "student", "student")},
                  {"step": step, "run": hparams["run"], "buffer": json.dumps(counters), "student_forwards": n_student})
        save_checkpoint(args.out, teacher, "local", meta)

    log(f"stage 1 on {teacher.id}: M={args.M} skip={args.skip:g} w={args.w:g} d={args.d} rank={args.rank} "
        f"lr={args.lr:g} batch={args.batch}x{world} iters={args.iters} ({sum(p.numel() for p in params) / 1e6:.2f}M "
        f"LoRA parameters, base {dtype})")
    planned = buffer.planned_refills(args.iters - step, args.batch) * args.trajectories
    log(f"prompts: {len(prompts)}; each rank draws about {planned} more ({args.trajectories} per pool refill), "
        f"{min(planned, stream.share)} distinct (its share: {stream.share}), {planned * world} in all; more per run: "
        "a lower --reuse, at more teacher forwards per pair")
    bar = tqdm(total=args.iters, initial=step, disable=not master, desc="local CD")
    while step < args.iters:
        z_m, t_m, z_n, t_n, t_s, cond = buffer.sample(args.batch)
        with lora.adapter(teacher.denoiser, "student"), autocast():
            loss, _, n = local_loss(teacher, d, z_m, t_m, z_n, t_n, t_s, cond)
        n_student += n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ddp:  # average the LoRA gradients over ranks (one flat all-reduce) and the loss for logging
            all_reduce_grads(params, world)
            loss = mean_over_ranks(loss, world)
        if not torch.isfinite(loss):
            bar.close()
            raise SystemExit(f"error: loss is {loss.item()} at step {step}; stopped. {args.out} keeps the last good "
                             "checkpoint (try a lower --lr)")
        opt.step()
        step += 1
        bar.update(1)
        served = max(buffer.served, 1)
        if master and (step % args.log_every == 0 or step == args.iters):
            bar.set_postfix(loss=f"{loss.item():.4g}", teacher_fwd_per_pair=f"{buffer.teacher_forwards / served:.2f}",
                            student_fwd_per_pair=f"{n_student / served:.2f}")
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
    log(f"wrote {args.out}; sample it with: python sample.py --ckpt {args.out} --steps 4")
    if ddp:  # a cheap guard: every rank must hold rank 0's LoRA
        log(f"LoRA identical on all {world} ranks: max difference {rank_difference(params):.3g}")
        dist.destroy_process_group()


if __name__ == "__main__":
    with explain_out_of_memory(), explain_interrupt("local_cd.py", lambda: parse_args().out):
        main()
