"""LogCD stage 1, local consistency distillation -- and the foundation every later stage imports.

Paper: "LogCD: Local-to-global Consistency Distillation for Few-step Image Generation" (CVPR 2026), Method 1.
This file holds what all stages share (DESIGN.md sections 3, 7): the teachers (the embedded digits teacher,
SDXL, FLUX.1-dev), their noise schedules on one time axis t in [0, T], the solver Psi, CFG, milestones and
checkpoints. Importing it does nothing; the stage-1 training loop runs behind `if __name__ == "__main__":`.

Time: t in [0, T], T = 1000, for every teacher; t = 0 is the clean latent (alpha = 1, sigma = 0).
  DDPM teachers (SDXL, the digits toy): t = k is the training index k - 1 (so t = T is index 999, "trailing").
  Flow teachers (FLUX): sigma = shift(t / T), alpha = 1 - sigma.
"""
import hashlib
import json
import math
import os
import subprocess

import torch

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
    z = alpha_s x0_hat + sigma_s noises[i]. Returns the final z (at ts[-1] = 0: the clean latent)."""
    B = z.shape[0]
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        t_, s_ = torch.full((B,), t, device=z.device), torch.full((B,), s, device=z.device)
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


def cached_encode(prompts, encode_fn, cache_dir):
    """Encodes each distinct prompt once ever: one safetensors file per prompt under cache_dir (sha1 of the text).
    encode_fn(list_of_prompts) -> dict of batch-first tensors. Returns the stacked dict, on the CPU."""
    os.makedirs(cache_dir, exist_ok=True)
    path = {p: os.path.join(cache_dir, hashlib.sha1(p.encode()).hexdigest() + ".safetensors") for p in prompts}
    todo = sorted({p for p in prompts if not os.path.exists(path[p])})
    if todo:
        out = encode_fn(todo)
        for i, p in enumerate(todo):
            lora.save(path[p], {k: v[i].detach().cpu() for k, v in out.items()}, {"prompt": p})
    rows = [lora.load(path[p])[0] for p in prompts]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


# ---- teachers --------------------------------------------------------------------------------------------------

class Teacher:
    """What every stage needs of a teacher. Subclasses set: id, prediction, denoiser (the nn.Module LoRA goes
    into), lora_prefix (diffusers key prefix), lora_targets (regex of module paths), latent_shape (C, H, W),
    default_w, and implement alpha_sigma, forward, encode, null, decode."""
    embedded = False
    _null = None  # the null-prompt conditioning, encoded once

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

    def __init__(self, folder, device, id):
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), dtype=torch.float32)
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            super().__init__(unet, json.load(f), device)
        tensors, meta = lora.load(os.path.join(folder, "prompt_embeds.safetensors"))
        self.embeds = tensors["embeds"].to(device)
        n = self.embeds.shape[0] - 1
        self.prompts = meta.get("prompts", "|".join([str(i) for i in range(n)] + [""])).split("|")
        self.id, self.folder = id, folder
        c = unet.config
        self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)

    def encode(self, prompts):
        rows = []
        for p in prompts:
            if p not in self.prompts:
                raise ValueError(f"the embedded teacher knows the prompts {self.prompts[:-1]} and '', not {p!r}")
            rows.append(self.prompts.index(p))
        return {"encoder_hidden_states": self.embeds[rows]}

    def null(self, n):
        return {"encoder_hidden_states": self.embeds[-1:].expand(n, -1, -1)}

    def decode(self, z):
        return z.float().clamp(-1, 1)


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
        self.cache_dir = os.path.join(CACHE, "prompts", hashlib.sha1(id.encode()).hexdigest()[:12])

    def _encode(self, prompts):
        p = self.pipe
        for m in (p.text_encoder, p.text_encoder_2):
            m.to(self.device)
        with torch.no_grad():
            e, _, pooled, _ = p.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
        for m in (p.text_encoder, p.text_encoder_2):
            m.to("cpu")  # text encoders leave the GPU once the prompts are cached
        return {"encoder_hidden_states": e, "text_embeds": pooled}

    def encode(self, prompts):
        c = cached_encode(list(prompts), self._encode, self.cache_dir)
        c = {k: v.to(self.device) for k, v in c.items()}
        c["time_ids"] = self.time_ids.to(self.device).expand(len(prompts), -1)
        return c

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
        self.cache_dir = os.path.join(CACHE, "prompts", hashlib.sha1(id.encode()).hexdigest()[:12])

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

    def _encode(self, prompts):
        p = self.pipe
        for m in (p.text_encoder, p.text_encoder_2):
            m.to(self.device)
        with torch.no_grad():
            e, pooled, _ = p.encode_prompt(prompts, prompt_2=None, device=self.device, max_sequence_length=512)
        for m in (p.text_encoder, p.text_encoder_2):
            m.to("cpu")
        return {"encoder_hidden_states": e, "pooled_projections": pooled}

    def encode(self, prompts):
        return {k: v.to(self.device) for k, v in cached_encode(list(prompts), self._encode, self.cache_dir).items()}

    def null(self, n):
        self._null = self._null or self.encode([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null.items()}

    def decode(self, z):
        c = self.vae.config
        with torch.no_grad():
            x = self.vae.decode(z.float() / c.scaling_factor + (c.shift_factor or 0.0)).sample
        return x.clamp(-1, 1)


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_teacher(name_or_dir="digits", device=None, resolution=1024, dtype=None, true_cfg=False):
    """A teacher by name (digits, sdxl, flux), folder or hub id. A folder in the embedded layout (unet/, scheduler/,
    prompt_embeds.safetensors) loads as a digits-style teacher; a diffusers SDXL / FLUX pipeline folder or hub id as
    that family. Frozen weights in bf16 on CUDA (fp32 on CPU); the embedded teacher always fp32."""
    device = device or default_device()
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    id = name_or_dir
    path = TEACHERS.get(name_or_dir, name_or_dir)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "prompt_embeds.safetensors")):
            if not (os.path.isdir(os.path.join(path, "unet")) and os.path.isdir(os.path.join(path, "scheduler"))):
                raise ValueError(f"{path}: an embedded-layout teacher needs unet/ and scheduler/ beside prompt_embeds.safetensors")
            if os.path.abspath(path) == os.path.abspath(TEACHERS["digits"]):
                id = "digits"
            return DigitsTeacher(path, device, id)
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
    if "StableDiffusionXL" in cls:
        from diffusers import StableDiffusionXLPipeline
        return SDXLTeacher(StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype), device, id, resolution)
    if "Flux" in cls:
        from diffusers import FluxPipeline
        return FluxTeacher(FluxPipeline.from_pretrained(path, dtype=dtype), device, id, resolution, true_cfg)
    raise ValueError(f"{path} is a {cls}; LogCD supports SDXL-style UNets, FLUX transformers and the embedded layout")


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


def save_checkpoint(path, teacher, stage, meta, extra=None):
    """The student LoRA (diffusers keys) + `extra` tensors (optimizer states, ...) + metadata, written atomically.
    meta: the stage's hyper-parameters (M, skip, w, p, q, step, ...); teacher, resolution and LoRA shape are added."""
    tensors = lora.state_dict(teacher.denoiser, "student", teacher.lora_prefix)
    tensors.update(extra or {})
    meta = {"format": "logcd", "stage": stage, "teacher": teacher.id, "lora_prefix": teacher.lora_prefix,
            "resolution": getattr(teacher, "resolution", teacher.latent_shape[-1]), **teacher.student_lora,
            "git_commit": git_commit(), **meta}
    lora.save(path, tensors, meta)


def read_checkpoint(path, stages=("local", "global"), teacher_id=None):
    """(tensors, metadata) of a LogCD checkpoint; one clear error if it is not one, or is of another stage/teacher."""
    tensors, meta = lora.load(path)
    if meta.get("format") != "logcd" or not any(k.endswith(".lora_A.weight") for k in tensors):
        raise ValueError(f"{path} is not a LogCD checkpoint (no LoRA or no LogCD metadata)")
    if meta.get("stage") not in stages:
        raise ValueError(f"{path} is a {meta.get('stage')!r} checkpoint; expected {' or '.join(stages)}")
    if teacher_id is not None and meta.get("teacher") != teacher_id:
        raise ValueError(f"{path} was trained from teacher {meta.get('teacher')!r}, not {teacher_id!r}")
    return tensors, meta


def load_student(path, device=None, stages=("local", "global"), teacher_id=None):
    """Teacher + student adapter from a checkpoint, its metadata naming everything (no flag has to be repeated)."""
    tensors, meta = read_checkpoint(path, stages, teacher_id)
    teacher = load_teacher(meta["teacher"], device, resolution=int(meta.get("resolution", 1024)))
    add_student(teacher, int(meta["rank"]), float(meta["alpha"]), meta.get("lora_targets"))
    lora.load_state_dict(teacher.denoiser, "student", tensors, teacher.lora_prefix)
    return teacher, tensors, meta


if __name__ == "__main__":
    raise SystemExit("the stage-1 training loop is not written yet (issue 3); this file provides the foundation")
