"""What LogCD costs at the real sizes, measured with random weights built from the published model configs (cost
does not depend on weight values, so nothing is downloaded). Runs unchanged on CPU (tiny models, for CI) and CUDA.

    python bench.py --model sdxl --what sample           # teacher 25 steps with CFG vs the student's 2 / 3 / 4 steps
    python bench.py --model sdxl --what step1 --batch 4  # a stage-1 iteration (update + teacher share) vs one forward
    python bench.py --model sdxl --what step2 --batch 4  # a stage-2 iteration: consistency + GAN + DMD + fake score
    python bench.py --model flux --what step2 --batch 1 --grad-checkpointing   # FLUX.1-dev WITH DMD on one GPU
    python bench.py --model sdxl --what llpips --batch 4 # L-LPIPS vs VAE decode + pixel LPIPS (forward + backward)
    python bench.py --model flux --what llpips-train     # training L-LPIPS: a step, an encode, the paper's budget
    python bench.py --model sdxl --what load --dtype bfloat16  # host memory of loading the UNet (a CPU will do)
    python bench.py --model flux --what encode --batch 32      # prompts per second, bytes stored per prompt
    python bench.py --model sdxl --what all --json       # every row of the README's GPU table, and the projection
    python bench.py --model sdxl --what step1 --batch 4 --regime autocast base base+compile --profile  # kernel launches
    python bench.py --model tiny-sdxl --what all         # what CI runs (tiny shapes, CPU)

Timings are the best of --repeats runs after one warm-up (which, compiled, is when the compiler runs); peak memory is
CUDA's allocator peak (not measured on CPU). Prompts are random embeddings of the right shape: the text encoders are
timed apart (--what encode; training encodes a chunk of prompts every few hundred draws). Precision as in training
(teachers.precision): base weights bf16 on CUDA, fp32 on a CPU unless --dtype says otherwise; LoRA and optimizer
state fp32; adapter forwards under autocast, or from bf16 copies (--regime base), compiled by region or not
(--regime ...+compile): training's --adapters and --compile, each regime named run side by side.
A row that does not fit on the GPU is reported as such, with the memory it needed at least.
"""
import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import torch

import lora
from lora import count_forwards  # the model calls bench.py reports are counted, not computed
from local_cd import PRESETS, cfg, distance, solve, student_times, teacher_times
from runs import compile_blocks, memory_needed
from teachers import DTYPE_HELP, DTYPES, DDPMTeacher, FluxTeacher, add_student, precision

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
TINY_SDXL_UNET = dict(  # the tests' tiny SDXL
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
FLUX = dict(num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,  # FLUX.1-dev
            joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY_FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
FLUX_SCHEDULE = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                 "max_image_seq_len": 4096}
SDXL_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, scaling_factor=0.13025)
FLUX_VAE = {**SDXL_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,  # FLUX.1-dev's
            "use_quant_conv": False, "use_post_quant_conv": False}
# the paper's SDXL recipe: 12K stage-1 + 3K stage-2 iterations on 4 A100s, 70 A100 hours in all
RECIPE = {"stage1_iters": 12000, "stage2_iters": 3000, "gpus": 4, "paper_gpu_hours": 70}


@contextlib.contextmanager
def built_on(device, dtype):
    """Parameters are created on `device` in `dtype`: FLUX.1-dev in fp32 on the host would be 48 GB and minutes of
    random initialisation before the cast."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def build(model, device, dtype):
    """(teacher, cond(n) -> random prompt conditioning) for sdxl, flux, tiny-sdxl, tiny-flux. teacher.null is the
    unconditional prompt (zeros), so no text encoder is needed."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from diffusers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    tiny = model.startswith("tiny")
    if model.endswith("sdxl"):
        with built_on(device, dtype):
            unet = UNet2DConditionModel(**(TINY_SDXL_UNET if tiny else SDXL_UNET))
        teacher = DDPMTeacher(unet, SD_SCHEDULE, device)
        size = unet.config.sample_size
        teacher.latent_shape, teacher.id = (4, size, size), model
        text, pooled, res = (32, 16, 16) if tiny else (2048, 1280, 1024)

        def cond(n):  # both text encoders' embeddings, the pooled one, and SDXL's micro-conditioning time_ids
            return {"encoder_hidden_states": torch.randn(n, 77, text, device=device),
                    "text_embeds": torch.randn(n, pooled, device=device),
                    "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * n, device=device).float()}
    else:
        with built_on(device, dtype):
            tr = FluxTransformer2DModel(patch_size=1, in_channels=16 if tiny else 64, **(TINY_FLUX if tiny else FLUX))
        # FluxTeacher reads the latent size off the VAE's depth (4 blocks: 8x) and the shift off the scheduler config
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8,) * 4, norm_num_groups=8, latent_channels=4 if tiny else 16)
        pipe = types.SimpleNamespace(transformer=tr, vae=vae, scheduler=types.SimpleNamespace(config=FLUX_SCHEDULE))
        teacher = FluxTeacher(pipe, device, model, resolution=64 if tiny else 1024)
        text, pooled, tokens = (32, 16, 16) if tiny else (4096, 768, 512)

        def cond(n):  # T5 tokens and CLIP's pooled embedding
            return {"encoder_hidden_states": torch.randn(n, tokens, text, device=device),
                    "pooled_projections": torch.randn(n, pooled, device=device)}
    teacher.null = lambda n: {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond(n).items()}
    return teacher, cond


def char_tokenizer(folder):
    """(a CLIPTokenizer, its vocabulary size) from a hand-written vocabulary: one token per character, no download.
    Text encoders are padded to their full length (77 CLIP, 512 T5), so their cost does not depend on the vocabulary."""
    import string

    from transformers import CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ",.!?'-":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    # without model_max_length the pipelines fail with "OverflowError: int too big to convert"
    vocab_file, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    return CLIPTokenizer(vocab_file, merges, model_max_length=77), len(vocab)


# the text encoders' configs: CLIP ViT-L/14 (SDXL and FLUX), OpenCLIP ViT-bigG/14 (SDXL), T5 v1.1 XXL (FLUX)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
              hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, feed_forward_proj="gated-gelu")
TINY_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
TINY_T5 = dict(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)


def text_teacher(model, device, dtype, folder):
    """A teacher whose text encoders have the real architecture (random weights, a hand-written tokenizer) and whose
    denoiser is a tiny stand-in (encoding never runs it): what `--what encode` times, through Teacher.encode."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from teachers import FluxTeacher, SDXLTeacher
    tiny = model.startswith("tiny")
    tok, n = char_tokenizer(folder)
    ids = dict(vocab_size=n, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8,) * 4, norm_num_groups=8, latent_channels=4)
    torch.manual_seed(0)
    with built_on(device, dtype):
        clip_l = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_L), **ids))
        if model.endswith("sdxl"):
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**(TINY_CLIP if tiny else CLIP_G), **ids))
        else:
            t5 = T5EncoderModel(T5Config(vocab_size=n, **(TINY_T5 if tiny else T5_XXL)))
    if model.endswith("sdxl"):
        unet = UNet2DConditionModel(**TINY_SDXL_UNET)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=clip_g, tokenizer=tok,
                                         tokenizer_2=tok, unet=unet, scheduler=EulerDiscreteScheduler(**SD_SCHEDULE))
        return SDXLTeacher(pipe, device, model, resolution=64)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, **TINY_FLUX)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip_l, tokenizer=tok,
                        text_encoder_2=t5, tokenizer_2=tok, transformer=tr)
    return FluxTeacher(pipe, device, model, resolution=64)


def bench_encode(model, batch, repeats, device, dtype):
    """Prompt encoding as training runs it (Teacher.encode: `batch` prompts per text-encoder call) and what one
    prompt's embeddings take to store: the bytes the prompt stream keeps per prompt, on the host, for a chunk."""
    with tempfile.TemporaryDirectory() as d:
        teacher = text_teacher(model, device, dtype, d)
        teacher.encode_batch = batch
        prompts = [f"a photo of a cat number {i} sitting on a red chair by the sea, oil painting" for i in range(batch)]
        sec, mem = timed(lambda: teacher.encode(prompts, device="cpu"), repeats, device)
        out = teacher.encode(prompts[:1], device="cpu")
    per_prompt = sum(v[0].numel() * v.element_size() for v in out.values())
    shapes = ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in out.items())
    return [row(f"encode {batch} prompts in one call ({shapes})", sec, None, None, mem, prompts_per_second=batch / sec,
                bytes_per_prompt=per_prompt)]


def timed(f, repeats, device, warmup=1):
    """(best seconds of `repeats` runs after `warmup` runs, peak CUDA memory of the last run in GiB or None)."""
    cuda = str(device).startswith("cuda")
    times = []
    for _ in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        f()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[warmup:]), (torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)


OP_KINDS = {  # operator names by kind, as torch.profiler reports them (on CPU and CUDA alike)
    "casts": ("aten::_to_copy",),  # of tensors: a Python scalar made a tensor (a CPU's AdamW, x * 0.5) is no kernel
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution"),
    "norms": ("aten::native_group_norm", "aten::native_layer_norm", "aten::native_group_norm_backward",
              "aten::native_layer_norm_backward"),
}


def profiled(what, f, device):
    """One run of f under torch.profiler, as a row: the operators it calls by kind (dtype casts of tensors --
    autocast's and the adapters' --, matmuls and convolutions, normalisations, all aten operators) and, on CUDA, its
    GPU kernels and their busy time against the wall time: what shows whether a step is launch-bound."""
    from torch.profiler import ProfilerActivity, profile
    cuda = str(device).startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, record_shapes=True) as prof:
        t0 = time.perf_counter()
        f()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ops = [e for e in prof.events() if e.device_type.name == "CPU" and e.name.startswith("aten::")]
    counts = {kind: sum(e.name in names and (kind != "casts" or bool(e.input_shapes and e.input_shapes[0]))
                        for e in ops) for kind, names in OP_KINDS.items()}
    extra = {f"op_{kind}": n for kind, n in counts.items()}
    extra["op_all_aten"] = len(ops)
    if cuda:
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        extra["gpu_kernels"], extra["gpu_busy_s"] = len(kernels), sum(e.device_time for e in kernels) / 1e6
    said = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    return row(f"{what}, profiled once: {said}, {extra['op_all_aten']} aten ops", wall, None, None, None, **extra)


def timed_calls(model, batch, f, repeats, device):
    """timed(f), and the model calls one run of f makes (counted, in calls of `batch` samples)."""
    with count_forwards(model) as calls:
        sec, mem = timed(f, repeats, device)
    return sec, mem, sum(n for _, n in calls) / (repeats + 1) / batch  # timed runs f repeats + 1 times


def forward_floor(model, f, batch):
    """What one run of f costs at the least, in forwards at `batch`, counted: each model call its batch / `batch`,
    twice when it runs with gradients (its backward, with no weight gradient for the frozen base, costs about one
    forward). Checkpointing's recomputation is not added and a call cut short (the discriminator's) counts whole:
    the method's floor, not an implementation's. Runs f once (a warm-up)."""
    with count_forwards(model, grad=True) as calls:
        f()
    return sum(n / batch * (2 if with_grad else 1) for _, n, with_grad in calls)


def row(what, seconds, one=None, calls=None, peak=None, **extra):
    return {"what": what, "calls": calls, "seconds": seconds, "x_one_forward": seconds / one if one else None,
            "peak_GiB": peak, **extra}


def one_forward(teacher, cond, batch, repeats, device):
    z, c, t = teacher.noise(batch), cond(batch), torch.full((batch,), 500.0, device=device)
    with torch.no_grad():
        sec, mem, calls = timed_calls(teacher.denoiser, batch, lambda: teacher.forward(z, t, c), repeats, device)
    return row(f"one forward, batch {batch}", sec, sec, calls, mem)


def bench_sample(teacher, cond, batch, repeats, device, teacher_steps=25, student_steps=(2, 3, 4), M=8):
    """Teacher n-step sampling with CFG against the student's k-step sampling (LoRA rank 64 merged, no CFG pass).
    Target: k steps cost k model calls and no more; SDXL 2 steps >= 12x faster than 25 steps with CFG."""
    z, c = teacher.noise(batch), cond(batch)
    w = PRESETS[teacher.family]["w"]  # the family's CFG scale (stage 1's preset)
    add_student(teacher, rank=64)
    first = one_forward(teacher, cond, batch, repeats, device)
    rows, one = [first], first["seconds"]
    with torch.no_grad():
        sec, mem, calls = timed_calls(teacher.denoiser, batch, lambda: solve(
            lambda z_, t_: cfg(teacher, z_, t_, c, w), z, teacher_times(teacher_steps), teacher.alpha_sigma),
            repeats, device)
        rows.append(row(f"teacher, {teacher_steps} steps, CFG w={w:g}", sec, one, calls, mem))
        with lora.merged(teacher.denoiser, "student"):
            t = torch.full((batch,), 500.0, device=device)
            sec, mem, calls = timed_calls(teacher.denoiser, batch, lambda: teacher.forward(z, t, c), repeats, device)
            rows.append(row(f"one forward, batch {batch}, LoRA merged", sec, one, calls, mem))
            for k in student_steps:
                sec, mem, calls = timed_calls(teacher.denoiser, batch, lambda: solve(
                    lambda z_, t_: teacher.x0(z_, t_, c), z, student_times(k, M), teacher.alpha_sigma), repeats, device)
                rows.append(row(f"student, {k} steps (LoRA merged)", sec, one, calls, mem,
                                speedup_vs_teacher=rows[1]["seconds"] / sec))
    return rows


REGIMES = ("autocast", "base", "autocast+compile", "base+compile")  # --regime


def regime(name, device, dtype_name):
    """A training regime as --regime names it: training's --adapters (autocast / base), + compile for its --compile.
    Returns what the benches need: autocast, adapter_dtype (teachers.precision), compile, and the end of a row's
    label."""
    adapters, _, compiled = name.partition("+")
    _, autocast, adapter_dtype = precision(device, dtype_name, adapters)
    label = f", adapters in {str(adapter_dtype).removeprefix('torch.')}" * bool(adapter_dtype) + ", compiled" * bool(
        compiled)
    return types.SimpleNamespace(name=name, autocast=autocast, adapter_dtype=adapter_dtype, compile=bool(compiled),
                                 label=label)


def bench_step1(teacher, cond, batch, repeats, device, r, M=8, skip=20, checkpointing=False, profile=False):
    """A stage-1 iteration: the update (local_loss forward + backward + fused AdamW, rank-64 LoRA, in regime r:
    training's --adapters and --compile) and the teacher's share (one TrajectoryBuffer refill at the family's
    preset, timed once, divided by the iterations it feeds), against one plain forward at the same batch. Target
    (the target): the update at batch 4 <= 3.5x one forward."""
    from local_cd import TrajectoryBuffer, local_loss, milestones, segment
    rows = [one_forward(teacher, cond, batch, repeats, device)]
    one = rows[0]["seconds"]
    z_m, z_n, c = teacher.noise(batch), teacher.noise(batch), cond(batch)
    g = torch.Generator().manual_seed(0)
    t_m = (torch.rand(batch, generator=g, dtype=torch.float64) * 1000).clamp(min=skip + 1).float().to(device)
    t_s = milestones(M)[segment(t_m.cpu(), M)].float().to(device)
    t_n = torch.maximum(t_m - skip, t_s)
    params = add_student(teacher, rank=64)
    if checkpointing:
        lora.gradient_checkpointing(teacher.denoiser)
    if r.compile:
        compile_blocks(teacher.denoiser)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=str(device).startswith("cuda") or None)
    work = lora.Working(teacher.denoiser, "student", r.adapter_dtype)
    mse = distance("mse")

    def update():
        with lora.adapter(teacher.denoiser, "student"), r.autocast():
            loss, _ = local_loss(teacher, mse, z_m, t_m, z_n, t_n, t_s, c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        work.step(opt)

    floor = forward_floor(teacher.denoiser, update, batch)
    sec, mem = timed(update, repeats, device)
    ckpt = ", grad checkpointing" * checkpointing + r.label
    rows.append(row(f"stage-1 update, batch {batch}{ckpt}", sec, one, None, mem,
                    lora_params=sum(p.numel() for p in params), floor=floor, x_floor=sec / (floor * one)))
    if profile:
        rows.append(profiled(f"stage-1 update, batch {batch}{ckpt}", update, device))
    # the teacher's share: one refill of trajectories at the preset; each pair is then served `reuse` times
    pre = PRESETS[teacher.family]
    prompts = types.SimpleNamespace(take=lambda n: (cond(n), torch.zeros(n, dtype=torch.long)), drawn=0)  # random
    buf = TrajectoryBuffer(teacher, prompts, M, skip, PRESETS[teacher.family]["w"],
                           pre["trajectories"], pre["buffer"], pre["reuse"], g)
    # as in training: bf16 weights, no autocast (compiled: a first refill compiles the teacher's variant)
    refill, _ = timed(buf.refill, 1, device, warmup=int(r.compile))
    iters_fed = buf.made * pre["reuse"] / batch
    rows.append(row(f"teacher share per iteration (refill of {pre['trajectories']} trajectories / {iters_fed:.0f} "
                    "iterations)", refill / iters_fed, one, None, None))
    rows.append(row(f"stage-1 iteration, batch {batch}{ckpt}", sec + refill / iters_fed, one, None, mem,
                    regime=r.name))
    return rows


def bench_step2(teacher, cond, batch, repeats, device, r, checkpointing=False, lambda1=0.1, lambda2=1.0,
                profile=False):
    """A stage-2 iteration exactly as global_cd.py runs it (global_cd.iteration: q = 4 student steps for the
    image-free inputs, p = 3 teacher CFG steps, student forward + backward, GAN generator and discriminator steps,
    DMD with the real and fake scores, 2 fake-score updates), with the student, the fake score (rank 64 each) and the
    discriminator's backbone all on ONE copy of the base weights. Target: FLUX.1-dev with DMD at batch 1
    fits one 80 GB GPU (with gradient checkpointing)."""
    import global_cd
    rows = [one_forward(teacher, cond, batch, repeats, device)]
    params = add_student(teacher, rank=64)
    pre = global_cd.PRESETS[teacher.family]  # its p, q, fake updates and learning rates
    disc = global_cd.Discriminator(teacher) if lambda1 > 0 else None
    fake = lora.inject(teacher.denoiser, teacher.student_lora["lora_targets"], "fake", 64) if lambda2 > 0 else None
    if checkpointing:
        lora.gradient_checkpointing(teacher.denoiser)
    if r.compile:
        compile_blocks(teacher.denoiser)
    fused = str(device).startswith("cuda") or None
    opts = {"student": torch.optim.AdamW(params, lr=pre["lr"], fused=fused)}
    if disc:
        opts["disc"] = torch.optim.AdamW(disc.parameters(), lr=pre["lr_aux"], betas=(0.0, 0.99), fused=fused)
    if fake:
        opts["fake"] = torch.optim.AdamW(fake, lr=pre["lr_aux"], fused=fused)
    work = {k: lora.Plain(disc.parameters()) if k == "disc" else lora.Working(teacher.denoiser, k, r.adapter_dtype)
            for k in opts}

    def update(name, losses):  # runs.Trainer.update's, on one rank, without its checks
        opts[name].zero_grad(set_to_none=True)
        for loss in losses:
            loss.backward()
        work[name].step(opts[name])
        return loss.detach()

    gen, c = torch.Generator().manual_seed(0), cond(batch)
    d = distance("mse")  # L-LPIPS on latents costs ~1% of this (the llpips row)
    method = global_cd.GlobalCD(teacher, d, disc, M=8, p=pre["p"], q=pre["q"], w=PRESETS[teacher.family]["w"], lambda1=lambda1,
                                lambda2=lambda2, fake_updates=pre["fake_updates"])

    def iteration():
        method.iteration(c, update, 1, gen, r.autocast)
    floor = forward_floor(teacher.denoiser, iteration, batch)
    sec, mem = timed(iteration, repeats, device)
    parts = f"lambda1={lambda1:g} lambda2={lambda2:g}, {pre['fake_updates']} fake updates"
    ckpt = ", grad checkpointing" * checkpointing + r.label
    one = rows[0]["seconds"]
    rows.append(row(f"stage-2 iteration, batch {batch}, {parts}{ckpt}", sec, one, None, mem, floor=floor,
                    x_floor=sec / (floor * one), regime=r.name))
    if profile:
        rows.append(profiled(f"stage-2 iteration, batch {batch}{ckpt}", iteration, device))
    return rows


def bench_val(teacher, cond, repeats, device, r, model, prompts=4, M=8):
    """A validation grid as the training scripts draw one: the student (rank-64 adapter, under autocast) at 2, 4 and
    M steps from fixed noise on 4 prompts (as runs.validation samples them), then the decodes, by a VAE of SDXL's size
    built here (FLUX's: 16 latent channels; the bench teachers' own VAEs are stand-ins). Its share of training: the
    grid's seconds over the preset's --val-every stage-1 iterations (the step1 row)."""
    from diffusers import AutoencoderKL

    from local_cd import student_sample
    add_student(teacher, rank=64)
    lora.Working(teacher.denoiser, "student", r.adapter_dtype)  # as training computes it
    one = one_forward(teacher, cond, prompts, repeats, device)
    steps, c, z_T = (2, 4, M), cond(prompts), teacher.noise(prompts)
    @torch.no_grad()
    def rows():
        for k in steps:
            with r.autocast():
                student_sample(teacher, c, z_T, k, M)
    sec, mem, calls = timed_calls(teacher.denoiser, prompts, rows, repeats, device)
    tiny = model.startswith("tiny")
    config = {**SDXL_VAE, "latent_channels": 16 if teacher.family == "flux" else 4}
    if tiny:
        config.update(block_out_channels=(8,) * 4, norm_num_groups=8)
    vae = AutoencoderKL(**config).to(device).requires_grad_(False)  # fp32, as the teachers decode
    side = 8 if tiny else 128  # latents of 1024 px
    z = torch.randn(1, config["latent_channels"], side, side, device=device)
    with torch.no_grad():
        dec, dec_mem = timed(lambda: vae.decode(z).sample, repeats, device)
    every = PRESETS[teacher.family]["val_every"]
    n = len(steps) * prompts
    return [one, row(f"validation grid: {prompts} prompts at {'/'.join(map(str, steps))} steps (the student)", sec,
                     one["seconds"], calls, mem),
            row(f"validation grid: {n} VAE decodes at {side * 8} px, one at a time", n * dec, one["seconds"], None,
                dec_mem, val_every=every)]


def bench_llpips(batch, repeats, device, size):
    """Forward + backward of the two ways to a perceptual loss on latents: L-LPIPS on the latents, or decoding with
    the VAE (SDXL's architecture) and running pixel LPIPS-VGG. size: latent side (128 = SDXL's 1024 px)."""
    from diffusers import AutoencoderKL

    from llpips import LLPIPS
    torch.manual_seed(0)
    vae = AutoencoderKL(**SDXL_VAE).to(device).requires_grad_(False)  # fp32: SDXL's VAE overflows in fp16
    latent, pixel = LLPIPS(4).to(device).requires_grad_(False), LLPIPS(3, pixel=True).to(device).requires_grad_(False)
    x, y = torch.randn(batch, 4, size, size, device=device), torch.randn(batch, 4, size, size, device=device)
    scale = SDXL_VAE["scaling_factor"]

    def decode(x):
        return vae.decode(x / scale).sample

    ways = {"L-LPIPS on latents": lambda x: latent(x, y).sum(),
            "VAE decode + pixel LPIPS": lambda x: pixel(decode(x), decode(y)).sum()}
    rows = []
    for name, f in ways.items():
        sec, mem = timed(lambda: f(x.clone().requires_grad_(True)).backward(), repeats, device)
        rows.append(row(f"{name}, batch {batch}, {size}x{size}x4 latents, fwd+bwd", sec, None, None, mem))
    rows[1]["x_llpips"] = rows[1]["seconds"] / rows[0]["seconds"]
    return rows


def bench_llpips_train(model, batch, repeats, device, epochs=10):
    """What training L-LPIPS on BAPPS costs (llpips.py), and the paper's budget for it (10 epochs) COMPUTED from it:
    one training step as the trainer takes it (llpips.train_step on a batch gathered from float16 latents on the host
    and cast on its way: two distances, the ranking net, BCE, Adam) on 32x32 latents of the model's channels (SDXL 4,
    FLUX 16: 64 px patches upsampled 4x), the val scoring each epoch does, and the model's VAE encoder on 256 px
    patches (llpips.ENCODE_BATCH at a time), all with random weights. Tiny models: a 1/8-width trunk, 8x8 latents,
    a small VAE on 64 px patches."""
    import math

    from diffusers import AutoencoderKL

    import llpips
    from teachers import vae_encode
    tiny, family = model.startswith("tiny"), ("FLUX" if model.endswith("flux") else "SDXL")
    config = dict(FLUX_VAE if family == "FLUX" else SDXL_VAE)
    if tiny:
        config.update(block_out_channels=(8,) * 4, norm_num_groups=8)
    C, side, width, pixels = config["latent_channels"], 8 if tiny else 32, 0.125 if tiny else 1.0, 64 if tiny else 256
    torch.manual_seed(0)
    net, ranker = llpips.LLPIPS(C, width).to(device), llpips.RankNet().to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(ranker.parameters()), lr=1e-4, betas=(0.5, 0.999))
    adam_steps = []
    opt.register_step_post_hook(lambda *_: adam_steps.append(1))
    # latents as the trainer holds them: float16 on the host, a random batch of them per step
    pool = {k: torch.randn(4 * batch, C, side, side).half() for k in ("ref", "p0", "p1")}
    pool["judge"] = torch.rand(4 * batch)
    gen = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randperm(4 * batch, generator=gen)[:batch]
        llpips.train_step(net, ranker, opt, *(pool[k][idx].to(device, torch.float32)
                                              for k in ("ref", "p0", "p1", "judge")))
    net.train()
    sec, mem, calls = timed_calls(net, batch, step, repeats, device)
    tag = ", 1/8-width trunk" * tiny
    rows = [row(f"L-LPIPS training step, batch {batch}, {C}x{side}x{side} latents{tag} (2 distances + ranking net + "
                f"BCE + Adam)", sec, None, calls, mem, adam_steps=len(adam_steps) / (repeats + 1))]
    net.eval()
    n = 4 * batch  # val triplets scored in one llpips.two_afc call
    sec, mem, calls = timed_calls(net, n, lambda: llpips.two_afc(net, pool, device=device), repeats, device)
    rows.append(row(f"L-LPIPS val scoring, {n} triplets (2 distances each, no gradients)", sec, None, calls, mem,
                    seconds_per_triplet=sec / n))
    vae = AutoencoderKL(**config).to(device).requires_grad_(False)  # fp32, as llpips.py encodes
    b = llpips.ENCODE_BATCH
    x = torch.rand(b, 3, pixels, pixels, device=device) * 2 - 1
    sec, mem, calls = timed_calls(vae.encoder, b, lambda: vae_encode(vae, x), repeats, device)
    latent = tuple(vae_encode(vae, x[:1]).shape[1:])
    rows.append(row(f"VAE encode ({family}'s architecture), {b} patches at {pixels} px -> {'x'.join(map(str, latent))}",
                    sec, None, calls, mem, seconds_per_patch=sec / b, latent=list(latent)))
    # the paper's budget: `epochs` epochs over BAPPS train, val scored after each, every patch encoded once
    n_train, n_val = (sum(llpips.BAPPS_TRIPLETS[s].values()) for s in ("train", "val"))
    steps, patches = epochs * math.ceil(n_train / batch), 3 * (n_train + n_val)
    seconds = (steps * rows[0]["seconds"] + epochs * n_val * rows[1]["seconds_per_triplet"]
               + patches * rows[2]["seconds_per_patch"])
    rows.append(row(f"paper's L-LPIPS budget, COMPUTED from the rows above: {epochs} epochs of BAPPS 2AFC train "
                    f"({n_train} triplets: {steps} steps at batch {batch}), val ({n_val} triplets) scored each epoch, "
                    f"{patches} patches encoded once", seconds, computed_hours=seconds / 3600, steps=steps,
                    patches=patches))
    return rows


LOAD_PROBE = """import sys, time, torch, diffusers
def mem():  # GiB: peak resident, private (anonymous) and file-mapped resident memory of this process
    d = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return [int(d[k].split()[0]) / 2 ** 20 for k in ("VmHWM", "RssAnon", "RssFile")]
cls = getattr(diffusers, sys.argv[1])
before, t0 = mem(), time.perf_counter()
m = cls.from_pretrained(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
seconds = time.perf_counter() - t0
sum(float(p.float().sum()) for p in m.parameters())  # read every weight, as moving the model to a GPU does
print(seconds, *[after - b for after, b in zip(mem(), before)])
"""


def bench_load(model, dtype):
    """Host memory of loading the denoiser in `dtype` the way load_teacher does (diffusers' from_pretrained), each
    load in a fresh process (Linux /proc/self/status), from a file in `dtype` (FLUX.1-dev's are bf16) and, for SDXL,
    from an fp32 file (the hub's unet). Random weights at the real size, written to a temporary folder first: SDXL
    needs about 14 GiB of RAM and 10 GB of disk, FLUX.1-dev about 26 GiB and 24 GB."""
    rows = []
    for file_dtype in dict.fromkeys([dtype, torch.float32] if model.endswith("sdxl") else [dtype]):
        teacher, _ = build(model, "cpu", file_dtype)
        net = teacher.denoiser
        n, cls = sum(p.numel() for p in net.parameters()), type(net).__name__
        with tempfile.TemporaryDirectory() as d:
            net.save_pretrained(d)
            del teacher, net
            gc.collect()
            name = str(dtype).removeprefix("torch.")
            out = subprocess.run([sys.executable, "-c", LOAD_PROBE, cls, d, name], capture_output=True, text=True,
                                 check=True).stdout.split()
        seconds, peak, private, mapped = map(float, out[-4:])
        rows.append(row(f"load the {cls} ({n / 1e9:.2f}B parameters) as {dtype} from a {file_dtype} file", seconds,
                        host_peak_GiB=peak, host_private_GiB=private,
                        host_mapped_GiB=mapped, bytes_per_parameter=peak * 2 ** 30 / n))
    return rows


def projection(step1, step2, tag="", recipe=RECIPE):
    """GPU hours of the paper's SDXL recipe from measured per-iteration seconds (per-GPU batch as measured; the
    all-reduce of the LoRA gradients between GPUs is not included)."""
    hours = recipe["gpus"] * (recipe["stage1_iters"] * step1 + recipe["stage2_iters"] * step2) / 3600
    k1, k2 = recipe["stage1_iters"] // 1000, recipe["stage2_iters"] // 1000
    return {"what": f"paper's SDXL recipe: {k1}K stage-1 + {k2}K stage-2 iterations on {recipe['gpus']} GPUs{tag}",
            "gpu_hours": hours,
            "paper_gpu_hours": recipe["paper_gpu_hours"], "fraction_of_paper": hours / recipe["paper_gpu_hours"]}


def measure(what, model, batch, repeats, device, dtype, r, checkpointing=False, lambda2=1.0, profile=False):
    """One bench on a freshly built model. A CUDA out-of-memory error becomes a row that says so."""
    teacher = None
    try:
        if what == "llpips":
            return bench_llpips(batch, repeats, device, 8 if model.startswith("tiny") else 128)
        if what == "llpips-train":
            return bench_llpips_train(model, batch, repeats, device)
        if what == "load":
            return bench_load(model, dtype)
        if what == "encode":
            return bench_encode(model, batch, repeats, device, dtype)
        teacher, cond = build(model, device, dtype)
        if what == "sample":
            return bench_sample(teacher, cond, batch, repeats, device)
        if what == "val":
            return bench_val(teacher, cond, repeats, device, r, model)
        if what == "step1":
            return bench_step1(teacher, cond, batch, repeats, device, r, checkpointing=checkpointing, profile=profile)
        return bench_step2(teacher, cond, batch, repeats, device, r, checkpointing=checkpointing,
                           lambda2=lambda2, profile=profile)
    except torch.OutOfMemoryError as e:
        need = memory_needed(e)
        hint = ("--grad-checkpointing helps" if not what.startswith("llpips") and not checkpointing
                else "a smaller --batch helps")
        first = str(e).splitlines()[0][:90]
        return [row(f"{what}, batch {batch}{', grad checkpointing' * checkpointing}{r.label}: DOES NOT FIT, needs more "
                    f"than {need:.1f} GiB ({first}); {hint}", float("nan"), peak=need)]
    finally:
        del teacher
        gc.collect()
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()


def plan(model, batch):
    """--what all: the README table's rows, (what, batch, checkpointing)."""
    if model.endswith("flux"):  # FLUX needs checkpointing for training at 1024 px
        return [("sample", 1, False), ("step1", batch or 2, True), ("step2", batch or 1, True)]
    return [("sample", 1, False), ("step1", batch or 4, False), ("step1", batch or 4, True),
            ("step2", batch or 4, False), ("step2", batch or 4, True), ("llpips", 1, False)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sdxl", "flux", "tiny-sdxl", "tiny-flux"], default="tiny-sdxl")
    p.add_argument("--what", choices=["sample", "step1", "step2", "val", "llpips", "llpips-train", "load", "encode",
                                      "all"],
                   default="sample",
                   help="sample: teacher vs student sampling; step1 / step2: one training iteration of a stage vs one "
                   "forward; val: a validation grid (the student at 2 / 4 / 8 steps on 4 prompts, decoded); llpips: "
                   "L-LPIPS vs VAE decode + LPIPS; llpips-train: an L-LPIPS training step (batch 50), its val "
                   "scoring and the VAE encoder on 256 px patches, and the paper's 10 epochs on BAPPS computed from "
                   "them; load: host memory of loading the denoiser; "
                   "encode: prompts per second and bytes stored per prompt; all: the README's GPU rows (not load) "
                   "and the recipe's GPU hours")
    p.add_argument("--grad-checkpointing", action="store_true", help="step1 / step2: with gradient checkpointing")
    p.add_argument("--lambda2", type=float, default=1.0,
                   help="step2: DMD weight (0: no fake score, as the paper's FLUX)")
    p.add_argument("--batch", type=int, default=None, help="images per model call (a CFG pass doubles it); default 1, "
                   "with --what all the presets' (SDXL 4, FLUX 2 for stage 1 and 1 for stage 2), with llpips-train "
                   "llpips.py's 50 triplets")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help=DTYPE_HELP)
    p.add_argument("--regime", nargs="+", choices=REGIMES, default=["autocast"], help="step1 / step2: each training "
                   "regime named, side by side: training's --adapters (autocast / base), + compile for its --compile")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="step1 / step2: also one run under torch.profiler: operators "
                   "by kind (dtype casts, matmuls, norms), GPU kernels and their busy time against the wall time")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--save", default=None, help="also write the JSON to this file (rewritten after each bench)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda:  # as in training (runs.init_distributed): cuDNN attention's backward crashed on FLUX
        torch.backends.cuda.enable_cudnn_sdp(False)
    elif args.model in ("sdxl", "flux"):
        print(f"note: {args.model} at full size on a CPU takes minutes per forward; the tiny-* models are for CPUs")
    jobs = [(args.what, args.batch or (50 if args.what == "llpips-train" else 1), args.grad_checkpointing)]
    if args.what == "all":
        jobs = plan(args.model, args.batch)
    # a training bench once per --regime, each decided as the training scripts decide it
    jobs = [(what, batch, ckpt, name) for what, batch, ckpt in jobs
            for name in (args.regime if what in ("step1", "step2") else args.regime[:1])]
    dtype = precision(device, args.dtype)[0]
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out = {"model": args.model, "device": name, "dtype": str(dtype), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "rows": []}
    rows = out["rows"]
    for what, batch, ckpt, name in jobs:
        rows += measure(what, args.model, batch, args.repeats, device, dtype, regime(name, device, args.dtype), ckpt,
                        args.lambda2, args.profile)
        if args.save:
            with lora.atomic(args.save) as tmp, open(tmp, "w") as f:
                json.dump(out, f, indent=1)
    if args.what == "all" and args.model.endswith("sdxl"):
        b = args.batch or 4

        def seconds(stage, name):  # the regime's first row that fit: without checkpointing where it fits
            return next((r["seconds"] for r in rows if r["what"].startswith(f"{stage} iteration, batch {b}")
                         and r.get("regime") == name and r["seconds"] == r["seconds"]), None)
        for name in args.regime:  # one projection per regime
            s1, s2 = seconds("stage-1", name), seconds("stage-2", name)
            if s1 and s2:
                rows.append(projection(s1, s2, regime(name, device, args.dtype).label))
    if args.save:
        with lora.atomic(args.save) as tmp, open(tmp, "w") as f:
            json.dump(out, f, indent=1)
    if args.json:
        print(json.dumps(out, indent=1))
        return rows
    dev = out["device"]  # (`name` is now the last regime's)
    print(f"{args.model} on {dev} ({dtype}, torch {torch.__version__}), best of {args.repeats} after a warm-up:")
    print("| what | model calls | seconds | x one forward | speed-up vs teacher | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "computed_hours" in r:
            print(f"| {r['what']} | | {r['computed_hours']:.2f} hours on {dev}, computed | | | |")
            continue
        if "gpu_hours" in r:
            print(f"| {r['what']} | | {r['gpu_hours']:.1f} GPU hours ({dev}) | | {r['fraction_of_paper']:.2f} of "
                  f"the paper's {r['paper_gpu_hours']} A100 hours | |")
            continue
        mem = f"{r['peak_GiB']:.1f}" if r["peak_GiB"] is not None else "not measured (CPU)"
        if "host_peak_GiB" in r:  # a load row: host memory, not GPU
            mem = (f"host: peak {r['host_peak_GiB']:.2f} ({r['bytes_per_parameter']:.2f} bytes per parameter), "
                   f"private {r['host_private_GiB']:.2f}, file-mapped {r['host_mapped_GiB']:.2f}")
        x = f"{r['x_one_forward']:.2f}" if r["x_one_forward"] else "-"
        if "floor" in r:  # a training step against its counted floor
            x += f" (floor {r['floor']:.1f}: {r['x_floor']:.2f}x it)"
        speedup = f"{r['speedup_vs_teacher']:.1f}" if "speedup_vs_teacher" in r else (
            f"L-LPIPS {r['x_llpips']:.1f}x cheaper" if "x_llpips" in r else "-")
        if "seconds_per_patch" in r or "seconds_per_triplet" in r:  # llpips-train's rows
            per = "patch" if "seconds_per_patch" in r else "triplet"
            speedup = f"{r[f'seconds_per_{per}'] * 1e3:.3f} ms per {per}"
        if "bytes_per_prompt" in r:  # an encode row
            speedup = f"{r['prompts_per_second']:.1f} prompts/s, {r['bytes_per_prompt'] / 2 ** 20:.3f} MiB per prompt"
        print(f"| {r['what']} | {r['calls'] or '-'} | {r['seconds']:.4f} | {x} | {speedup} | {mem} |")
    return rows


if __name__ == "__main__":
    main()
