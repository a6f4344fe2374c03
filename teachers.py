"""The teachers LogCD distils, behind one interface: the embedded digits teacher, SDXL and FLUX.1-dev.

What every stage needs of a teacher, and nothing of the method itself:
  - one time axis t in [0, T], T = 1000, for every teacher; t = 0 is the clean latent (alpha = 1, sigma = 0).
    DDPM teachers (SDXL, the digits toy): t = k is the training index k - 1 (so t = T is index 999, "trailing").
    Flow teachers (FLUX): sigma = shift(t / T), alpha = 1 - sigma;
  - the model's output as x0_hat (to_x0), the prompts' conditioning, decoding to images;
  - loading by name, folder or hub id, and the one precision decision (bf16 base, fp32 adapters);
  - prompt files of any length, encoded a chunk at a time (PromptFile, PromptStream);
  - the student: a LoRA adapter on the teacher's denoiser, and its checkpoints (diffusers keys + LogCD metadata).
The method (Psi, CFG, the stage losses) is in local_cd.py and global_cd.py.
"""
import array
import hashlib
import json
import math
import os
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


# ---- a teacher's output as x0_hat ----------------------------------------------------------------------------------

def to_x0(out, z_t, alpha, sigma, prediction):
    """The model output as x0_hat: the only place prediction types are told apart."""
    if prediction == "epsilon":  # z = alpha x0 + sigma eps
        return (z_t - sigma * out) / alpha
    if prediction == "v_prediction":  # v = alpha eps - sigma x0, alpha^2 + sigma^2 = 1
        return alpha * z_t - sigma * out
    if prediction == "flow":  # z = (1 - sigma) x0 + sigma eps, v = eps - x0
        return z_t - sigma * out
    raise ValueError(f"unknown prediction type {prediction!r}")


# ---- conditioning: a dict of batch-first tensors ------------------------------------------------------------------

def cond_cat(*conds):
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_index(cond, idx):
    return {k: v[idx] for k, v in cond.items()}


# ---- teachers --------------------------------------------------------------------------------------------------

class Teacher:
    """What every stage needs of a teacher. Subclasses set: id, prediction, denoiser (the nn.Module LoRA goes
    into), lora_prefix (diffusers key prefix), lora_targets (regex of module paths), latent_shape (C, H, W),
    family (the key of the presets: digits, sdxl, flux), and implement alpha_sigma, forward, encode, null,
    decode, encode_images (images -> latents). guidance_embedded: w enters the model as an input (FLUX.1-dev), one
    pass, instead of classifier-free guidance's two."""
    embedded = False
    guidance_embedded = False
    variant = revision = None  # which files of a hub teacher (diffusers' from_pretrained arguments)
    _null = None  # the null-prompt conditioning, encoded once
    encode_batch = 32  # prompts per text-encoder call (--encode-batch)
    encode_calls = truncated = 0  # counters: text-encoder calls, prompts cut to an encoder's limit

    @property
    def dtype(self):
        """The frozen weights' dtype, which every forward casts its inputs to: the first parameter's (a LoRALayer
        registers its base before its adapters). diffusers' `denoiser.dtype` walks all 5870 modules of SDXL's UNet
        with the LoRA layers in on each read, 16 ms of a 2-core CPU (docs/dtype_read.py), on the host's path before
        every forward (15 of them in a stage-2 iteration); a forward of the b2 CFG pair takes 58 ms on an H200."""
        return next(self.denoiser.parameters()).dtype

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

    def x0(self, z, t, cond, guidance=None):
        """x0_hat of the denoiser as it stands (teacher, or student with an adapter active), without guidance
        (CFG is local_cd.cfg); guidance: FLUX.1-dev's guidance embedding."""
        out = self.forward(z, t, cond) if guidance is None else self.forward(z, t, cond, guidance)
        alpha, sigma = self.alpha_sigma(t)
        return to_x0(out.float(), z.float(), alpha, sigma, self.prediction)

    def noise(self, n, generator=None):
        return torch.randn(n, *self.latent_shape, generator=generator).to(self.device)  # CPU draws: same on any device


class DDPMTeacher(Teacher):
    """A UNet2DConditionModel with a DDPM noise schedule. As such it is the embedded-layout teacher (unet/,
    scheduler/, prompt_embeds.safetensors; latent = image); SDXLTeacher adds text encoders and a VAE."""
    lora_prefix = "unet"
    family = "sdxl"  # a UNet teacher takes SDXL's presets (DigitsTeacher: the embedded ones)
    # the usual SD/SDXL LoRA targets: attention, feed-forward, resnet convs, resampling convs, time projection
    lora_targets = (r"(^|\.)(to_q|to_k|to_v|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|conv1|conv2|"
                    r"conv_shortcut|downsamplers\.0\.conv|upsamplers\.0\.conv|time_emb_proj)$")

    def __init__(self, unet, scheduler_config, device):
        self.denoiser, self.device = unet.to(device).requires_grad_(False).eval(), device
        self.prediction = scheduler_config.get("prediction_type", "epsilon")
        self.scheduler_config = dict(scheduler_config)  # sample.py --solver builds diffusers' solvers from it
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
        dtype = self.dtype
        out = self.denoiser(z.to(dtype), (t - 1).float(), encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                            added_cond_kwargs={k: v.to(dtype) for k, v in extra.items()} or None)
        return out.sample


class DigitsTeacher(DDPMTeacher):
    """A folder in the embedded layout: the prompts are rows of a table, the latent is the image."""
    embedded = True
    family = "digits"

    def __init__(self, folder, device, id, dtype=torch.float32):
        from diffusers import UNet2DConditionModel
        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), dtype=dtype)
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            super().__init__(unet, json.load(f), device)
        tensors, meta = lora.load(os.path.join(folder, "prompt_embeds.safetensors"))
        self.embeds = tensors["embeds"].to(device)
        n = self.embeds.shape[0] - 1
        self.prompts = meta.get("prompts", "|".join([str(i) for i in range(n)] + [""])).split("|")
        if len(self.prompts) != n + 1 or self.prompts[-1] != "":  # the rows ARE the prompts
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
        return vae_encode(self.vae, x)


class FluxTeacher(Teacher):
    """black-forest-labs/FLUX.1-dev (or any FluxPipeline folder): a rectified flow, Euler = Psi. Latents are kept
    as (16, H/8, W/8) images (so Psi and the losses see images) and packed into 2x2 tokens only inside forward.
    FLUX.1-dev is guidance-distilled: its "CFG" is the guidance embedding, ONE pass with guidance = w and no null
    prompt. true_cfg=True uses the paper's two-pass form instead (for transformers without guidance embedding)."""
    prediction = "flow"
    family = "flux"
    lora_prefix = "transformer"
    guidance = 3.5  # FLUX.1-dev's default guidance: a call that gives none (the student's) runs at it, as FluxPipeline
    lora_targets = r"(^|\.)(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp|proj_out)$"

    def __init__(self, pipe, device, id, resolution=1024, true_cfg=False):
        self.pipe, self.id, self.device, self.resolution = pipe, id, device, resolution
        self.denoiser = pipe.transformer.to(device).requires_grad_(False).eval()
        self.guidance_embedded = self.denoiser.config.guidance_embeds and not true_cfg
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
        dtype = self.dtype
        # pack 2x2 latent patches into tokens: (B, C, H, W) -> (B, HW/4, 4C)
        x = z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, H * W // 4, C * 4)
        _, sigma = self.alpha_sigma(t)
        e = cond["encoder_hidden_states"]
        g = None
        if self.denoiser.config.guidance_embeds:
            # the student runs at the teacher's default guidance, as a FluxPipeline loading the LoRA would
            # guidance: a number, or one per sample (any shape holding B numbers)
            g = torch.as_tensor(self.guidance if guidance is None else guidance, dtype=dtype, device=z.device)
            g = g.reshape(-1).expand(B)
        v = self.denoiser(hidden_states=x.to(dtype), timestep=sigma.view(-1).to(dtype), guidance=g,
                          pooled_projections=cond["pooled_projections"].to(dtype), encoder_hidden_states=e.to(dtype),
                          txt_ids=torch.zeros(e.shape[1], 3, device=z.device, dtype=dtype),
                          img_ids=self.img_ids.to(dtype), return_dict=False)[0]
        return v.view(B, H // 2, W // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)

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
        return vae_encode(self.vae, x)


# ---- a teacher's VAE alone: what L-LPIPS needs of a teacher (llpips.py encodes BAPPS with it) ----------------------

def vae_encode(vae, x):
    """Images (B, 3, H, W) in [-1, 1] -> the latents the denoiser sees. The one images -> latents rule of SDXL and
    FLUX (the teachers' encode_images and llpips.py call it): the posterior's mean, not a sample, so that one image
    always has one latent."""
    c = vae.config
    with torch.no_grad():
        # z = (mean - shift_factor) * scaling_factor      (SDXL has no shift_factor; FLUX's is 0.1159)
        return (vae.encode(x.float()).latent_dist.mean - (c.shift_factor or 0.0)) * c.scaling_factor


def load_vae(name_or_dir, device=None, variant=None, revision=None):
    """The AutoencoderKL of a teacher (sdxl, flux, a diffusers pipeline folder or hub id) without the rest of its
    pipeline -- no UNet, no 12B transformer, no text encoders --, fp32 (SDXL's VAE overflows in fp16), frozen.
    variant / revision are from_pretrained's (e.g. fp16, a commit hash)."""
    from diffusers import AutoencoderKL
    family, path = locate(name_or_dir, revision)
    if family == "digits":
        raise ValueError(f"{path}: the embedded layout has no VAE (its latents are its images)")
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, revision=revision,
                                            dtype=torch.float32)
    except Exception as e:  # diffusers raises OSError, ValueError, EnvironmentError or hub errors here
        if not os.path.isdir(path):
            raise hub_error(path, e) from None
        first = str(e).strip().splitlines()[0][:150] if str(e).strip() else ""
        raise ValueError(f"cannot load the VAE of {path!r} (variant {variant}, revision {revision}): "
                         f"{type(e).__name__}: {first}") from None
    return vae.to(device or default_device()).eval().requires_grad_(False)


def locate(name_or_dir="digits", revision=None):
    """(family, path) of a teacher, from its folder's layout or its pipeline config alone: no weights are read, so a
    run can check its inputs against the teacher (its presets, its L-LPIPS) before any model loads. family: digits
    (the embedded layout), sdxl (a UNet pipeline) or flux; path: the folder or hub id to load from."""
    path = TEACHERS.get(name_or_dir, name_or_dir)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "prompt_embeds.safetensors")):
            if not (os.path.isdir(os.path.join(path, "unet")) and os.path.isdir(os.path.join(path, "scheduler"))):
                raise ValueError(f"{path}: an embedded-layout teacher needs unet/ and scheduler/ beside "
                                 "prompt_embeds.safetensors")
            return "digits", path
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise ValueError(f"{path} is not a teacher folder: expected unet/ + scheduler/ + prompt_embeds.safetensors "
                             "(the embedded layout) or a diffusers SDXL / FLUX pipeline (model_index.json)")
    elif name_or_dir == "digits":
        raise FileNotFoundError(f"the embedded teacher is missing at {path}: restore it with `git checkout toy/teacher` "
                                "or retrain it with `python -m toy.train_teacher`")
    elif name_or_dir in ("sdxl", "flux"):
        return name_or_dir, path  # the hub's SDXL base / FLUX.1-dev
    elif "/" not in path:
        raise ValueError(f"unknown teacher {name_or_dir!r}: use digits, sdxl, flux, a teacher folder or a hub id")
    elif os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:  # a hub id is owner/name
        raise ValueError(f"{path}: no such folder")
    from diffusers import DiffusionPipeline
    try:
        cls = DiffusionPipeline.load_config(path, revision=revision)["_class_name"]
    except Exception as e:
        raise hub_error(path, e) from None
    if "StableDiffusionXL" in cls:
        return "sdxl", path
    if "Flux" in cls:
        return "flux", path
    raise ValueError(f"{path} is a {cls}; LogCD supports SDXL-style UNets, FLUX transformers and the embedded layout")


def hub_error(path, e):
    """What a user reads when the hub cannot give a teacher's files: one line, and the way round it."""
    return ValueError(f"cannot read {path!r} from the hub ({type(e).__name__}); offline or gated? download it first "
                      f"(hf download {path} --local-dir DIR) and pass DIR")


def download(name_or_dir, variant=None, revision=None):
    """Fetches a hub teacher's files (those of `variant` where it has them) into the hub cache, once; a folder needs
    nothing. Under torchrun rank 0 calls it and the other ranks wait (runs.rank_zero_first): one download, not one per
    rank."""
    family, path = locate(name_or_dir, revision)
    if family != "digits" and not os.path.isdir(path):
        from diffusers import DiffusionPipeline
        try:
            DiffusionPipeline.download(path, variant=variant, revision=revision)
        except Exception as e:
            raise hub_error(path, e) from None


def denoiser_size(name_or_dir, rank, resolution=1024, revision=None):
    """(LoRA parameters of a rank-`rank` student, latent shape (C, H, W)) of a teacher, from its configs alone: the
    denoiser is built on the meta device (no memory, no weights read) and the student's adapters counted on it.
    What a run checks before any model loads: the L-LPIPS's channels, the disk a checkpoint pair takes."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    family, path = locate(name_or_dir, revision)
    if family == "digits":
        cls, sub, targets, hub = UNet2DConditionModel, "unet", DDPMTeacher.lora_targets, {}
    else:
        cls, sub = (FluxTransformer2DModel, "transformer") if family == "flux" else (UNet2DConditionModel, "unet")
        targets, hub = (FluxTeacher if family == "flux" else DDPMTeacher).lora_targets, {"revision": revision}
    try:
        config = cls.load_config(path, subfolder=sub, **hub)
        vae = {} if family == "digits" else AutoencoderKL.load_config(path, subfolder="vae", **hub)
    except Exception as e:
        if os.path.isdir(path):
            raise ValueError(f"{path}: cannot read its {sub}/ or vae/ config ({type(e).__name__})") from None
        raise hub_error(path, e) from None
    with torch.device("meta"):
        model = cls.from_config(config)
    n = sum(p.numel() for p in lora.inject(model, targets, "student", rank))
    if family == "digits":
        return n, (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    f = 2 ** (len(vae["block_out_channels"]) - 1)
    channels = model.config.in_channels // 4 if family == "flux" else model.config.in_channels
    return n, (channels, resolution // f, resolution // f)


def load_teacher(name_or_dir="digits", device=None, resolution=1024, dtype=None, true_cfg=False, variant=None,
                 revision=None):
    """A teacher by name (digits, sdxl, flux), folder or hub id. A folder in the embedded layout (unet/, scheduler/,
    prompt_embeds.safetensors) loads as a digits-style teacher; a diffusers SDXL / FLUX pipeline folder or hub id as
    that family (variant, revision: diffusers' own from_pretrained arguments). Frozen weights in `dtype` (default:
    precision's, bf16 on CUDA, fp32 on a CPU)."""
    device = device or default_device()
    dtype = dtype or precision(device)[0]
    family, path = locate(name_or_dir, revision)
    if family == "digits":
        same = os.path.abspath(path) == os.path.abspath(TEACHERS["digits"])
        return DigitsTeacher(path, device, "digits" if same else name_or_dir, dtype)
    # from_pretrained maps the weight files and builds every model straight in `dtype`: a bf16 file is used in place
    # (the page cache holds one copy for all ranks), an fp32 one (SDXL's unet) costs one private bf16 copy. No fp32
    # model is ever built (bench.py --what load measures it).
    from diffusers import FluxPipeline, StableDiffusionXLPipeline
    try:
        pipe = (StableDiffusionXLPipeline if family == "sdxl" else FluxPipeline).from_pretrained(
            path, dtype=dtype, variant=variant, revision=revision)
    except Exception as e:
        if os.path.isdir(path):  # a local folder's own fault: diffusers' first line says which
            said = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise ValueError(f"cannot load the teacher in {path} ({type(e).__name__}: {said})") from None
        raise hub_error(path, e) from None
    if family == "sdxl":
        teacher = SDXLTeacher(pipe, device, name_or_dir, resolution)
    else:
        teacher = FluxTeacher(pipe, device, name_or_dir, resolution, true_cfg)
    teacher.variant, teacher.revision = variant, revision  # a checkpoint records them: its student loads the same
    return teacher


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- precision: what runs in which dtype, decided here for every script ---------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype; fp16 would need loss scaling: not offered
DTYPE_HELP = "dtype of the frozen base weights: bfloat16 (default on CUDA) or float32 (default on a CPU)"
ADAPTERS = ("autocast", "base")  # --adapters
ADAPTERS_HELP = ("how the fp32 LoRA meets a bf16 base in training: autocast (default) casts the adapters to bf16 in "
                 "every layer and forward under torch.autocast, which also runs norms in fp32; base keeps bf16 copies "
                 "of them that the forwards use, the fp32 masters in AdamW (refreshed after each step), and no "
                 "autocast: fewer kernels per step; the same LoRA files. No effect on an fp32 base")


def precision(device, name=None, adapters="autocast"):
    """(dtype, autocast, adapter_dtype) of a run on `device`: the one precision decision of every script.
    - The frozen base weights are `dtype`: --dtype, else bf16 on CUDA and fp32 on a CPU.
    - The LoRA adapters, their AdamW state and the discriminator heads stay fp32; so does the consistency distance d,
      L-LPIPS included (local_cd.distance runs it outside autocast).
    - A forward with an adapter active (not merged), on a bf16 base, computes the adapter in bf16 one of two ways
      (--adapters): inside `autocast()`, which casts the fp32 adapter weights on the fly (CUDA's autocast also lifts
      norms and softmax to fp32; a CPU's does not); or from bf16 copies of them (adapter_dtype = dtype: lora.Working
      keeps the copies and steps the fp32 masters), with autocast() doing nothing. lora.LoRALayer refuses fp32
      adapters on a bf16 base outside autocast: the mistake that crashed stage 2 on GPUs.
    - A forward with no adapter (the teacher) needs no autocast: stage 1's trajectories and sampling run it plainly
      in the base dtype, stage 2 inside the autocast() of its iteration. A merged adapter (sampling) runs plainly,
      as a diffusers pipeline runs it.
    A CPU runs the bf16 regimes too (--dtype bfloat16, torch.autocast("cpu")): that is how the tests see what a GPU
    runs. In fp32, autocast() does nothing and adapter_dtype is None (the fp32 parameters themselves)."""
    cuda = str(device).startswith("cuda")
    dtype = DTYPES[name] if name else torch.bfloat16 if cuda else torch.float32
    copies = adapters == "base" and dtype != torch.float32

    def autocast():
        return torch.autocast("cuda" if cuda else "cpu", dtype, enabled=dtype != torch.float32 and not copies)
    return dtype, autocast, dtype if copies else None


def precision_said(dtype, adapter_dtype):
    """The precision decision in a run's first log line."""
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        return "base float32, LoRA float32"
    how = "from bf16 copies (--adapters base)" if adapter_dtype else "under autocast"
    return f"base {name}, LoRA float32 computed {how}"


# ---- prompts: files of any length, encoded a chunk at a time -------------------------------------------------------

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
        self.truncated = 0  # of those encoded, the ones cut to an encoder's token limit
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
        cut = self.teacher.truncated
        cond = self.teacher.encode([self.prompts[int(i)] for i in idx], device="cpu")
        self.encoded += len(idx)
        self.truncated += self.teacher.truncated - cut
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
    key = f"{os.path.abspath(args.out)}|{teacher.id}|{teacher.dtype}|{getattr(teacher, 'resolution', '')}"
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
            f"cache, {stream.truncated} cut to an encoder's token limit (as the pipelines cut them)")


# ---- the student on a teacher, and its checkpoints ----------------------------------------------------------------

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
            "dtype": str(teacher.dtype).removeprefix("torch."),  # of the base it was trained on
            "variant": teacher.variant or "", "revision": teacher.revision or "",
            "git_commit": git_commit(), **meta}
    lora.save(path, tensors, meta)


def read_checkpoint(path, stages=("local", "global"), teacher_id=None):
    """(tensors, metadata) of a LogCD checkpoint; one clear error if it is not one, or is of another stage/teacher."""
    meta = checkpoint_meta(path, stages, teacher_id)
    return lora.load(path)[0], meta


def checkpoint_meta(path, stages=("local", "global"), teacher_id=None):
    """The metadata of a LogCD checkpoint, its tensors unread (read_checkpoint's checks, before any model loads)."""
    keys, meta = lora.header(path)
    if "run" in meta and "format" not in meta and path.endswith(".state.safetensors"):
        raise ValueError(f"{path} is the training state that --resume reads, not a checkpoint; use "
                         f"{path[:-len('.state.safetensors')]}.safetensors")
    if meta.get("format") != "logcd" or not any(k.endswith(".lora_A.weight") for k in keys):
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
    return meta


def load_student(path, device=None, stages=("local", "global"), teacher_id=None, dtype=None):
    """Teacher + student adapter from a checkpoint, its metadata naming everything (no flag has to be repeated)."""
    tensors, meta = read_checkpoint(path, stages, teacher_id)
    teacher = load_teacher(meta["teacher"], device, int(meta.get("resolution", 1024)), dtype,
                           variant=meta.get("variant") or None, revision=meta.get("revision") or None)
    add_student(teacher, int(meta["rank"]), float(meta["alpha"]), meta.get("lora_targets"))
    lora.load_state_dict(teacher.denoiser, "student", tensors, teacher.lora_prefix)
    return teacher, tensors, meta


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
