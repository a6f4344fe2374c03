"""What LogCD costs at the real sizes, measured with random weights built from the published model configs (cost
does not depend on weight values, so nothing is downloaded). Runs unchanged on CPU (tiny models, for CI) and CUDA.

    python bench.py --model sdxl --what sample     # teacher 25 steps with CFG vs the student's 2 / 3 / 4 steps
    python bench.py --model flux --what sample
    python bench.py --model sdxl --what step1 --batch 4        # a stage-1 update vs one forward at batch 4
    python bench.py --model tiny-sdxl --what sample --json   # what CI runs

Timings are the best of --repeats runs after one warm-up; peak memory is CUDA's allocator peak (not measured on CPU).
Prompts are random embeddings of the right shape: the text encoders are not part of what is timed.
(Still to come in issue 6: the stage-2 iteration, the recipe's GPU-hour projection, L-LPIPS vs VAE decode + LPIPS.)
"""
import argparse
import json
import time
import types

import torch

import lora
from local_cd import DDPMTeacher, FluxTeacher, add_student, solve, student_times, teacher_times

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
TINY_FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
FLUX_SCHEDULE = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                 "max_image_seq_len": 4096}


def build(model, device, dtype):
    """(teacher, cond(n) -> random prompt conditioning) for sdxl, flux, tiny-sdxl, tiny-flux."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from diffusers.utils import logging
    logging.set_verbosity_error()  # casting a freshly built model to bf16 is what we mean to do
    torch.manual_seed(0)
    if model.endswith("sdxl"):
        tiny = model == "tiny-sdxl"
        unet = UNet2DConditionModel(**(TINY_SDXL_UNET if tiny else SDXL_UNET)).to(dtype)
        teacher = DDPMTeacher(unet, SD_SCHEDULE, device)
        teacher.latent_shape, teacher.default_w, teacher.id = (4, unet.config.sample_size, unet.config.sample_size), 7.0, model
        text, pooled, res = (32, 16, 16) if tiny else (2048, 1280, 1024)

        def cond(n):
            return {"encoder_hidden_states": torch.randn(n, 77, text, device=device),
                    "text_embeds": torch.randn(n, pooled, device=device),
                    "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * n, device=device).float()}
        # SDXL's null prompt: zero embeddings, the same micro-conditioning
        teacher.null = lambda n: {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in cond(n).items()}
        return teacher, cond
    tiny = model == "tiny-flux"
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16 if tiny else 64, **(TINY_FLUX if tiny else FLUX)).to(dtype)
    # FluxTeacher reads the latent size off the VAE's depth and the shift off the scheduler config; no text encoders
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8) if tiny else (128, 256, 512, 512), norm_num_groups=8 if tiny else 32,
                        latent_channels=4 if tiny else 16)
    pipe = types.SimpleNamespace(transformer=tr, vae=vae, scheduler=types.SimpleNamespace(config=FLUX_SCHEDULE))
    teacher = FluxTeacher(pipe, device, model, resolution=64 if tiny else 1024)
    text, pooled, tokens = (32, 16, 16) if tiny else (4096, 768, 512)
    return teacher, lambda n: {"encoder_hidden_states": torch.randn(n, tokens, text, device=device),
                               "pooled_projections": torch.randn(n, pooled, device=device)}


def timed(f, repeats, device):
    """(best seconds of `repeats` runs after a warm-up, peak CUDA memory in GiB or None)."""
    cuda = str(device).startswith("cuda")
    times = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        f()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:]), (torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)


def bench_sample(teacher, cond, batch, repeats, device, teacher_steps=25, student_steps=(2, 3, 4), M=8):
    """Teacher n-step sampling with CFG against the student's k-step sampling (LoRA rank 64 merged, no CFG pass).
    Target (issue 6): k steps cost k model calls and no more; SDXL 2 steps >= 12x faster than 25 steps with CFG."""
    z, c = teacher.noise(batch), cond(batch)
    w = teacher.default_w
    add_student(teacher, rank=64)
    rows = []
    with torch.no_grad():
        t = torch.full((batch,), 500.0, device=device)
        one, mem = timed(lambda: teacher.forward(z, t, c), repeats, device)
        rows.append({"what": f"one forward, batch {batch}", "calls": 1, "seconds": one, "x_one_forward": 1.0,
                     "peak_GiB": mem})
        sec, mem = timed(lambda: solve(lambda z_, t_: teacher.x0(z_, t_, c, w=w), z, teacher_times(teacher_steps),
                                       teacher.alpha_sigma), repeats, device)
        passes = 1 if isinstance(teacher, FluxTeacher) and not teacher.true_cfg else 2
        teacher_row = {"what": f"teacher, {teacher_steps} steps, CFG w={w:g}", "calls": teacher_steps * passes,
                       "seconds": sec, "x_one_forward": sec / one, "peak_GiB": mem}
        rows.append(teacher_row)
        with lora.merged(teacher.denoiser, "student"):
            for k in student_steps:
                sec, mem = timed(lambda: solve(lambda z_, t_: teacher.x0(z_, t_, c), z, student_times(k, M),
                                               teacher.alpha_sigma), repeats, device)
                rows.append({"what": f"student, {k} steps (LoRA merged)", "calls": k, "seconds": sec,
                             "x_one_forward": sec / one, "peak_GiB": mem,
                             "speedup_vs_teacher": teacher_row["seconds"] / sec})
    return rows


def bench_step1(teacher, cond, batch, repeats, device, M=8, skip=20, checkpointing=False):
    """One stage-1 update on a batch of training pairs (local_loss forward + backward + AdamW step, rank-64 LoRA,
    bf16 autocast on CUDA) against one plain forward at the same batch. The teacher's share of a real iteration
    (0.64 forwards per pair from the trajectory buffer, no gradient) is not in it. Target (issue 6): <= 3.5x."""
    from local_cd import distance, local_loss, milestones, segment
    z_m, z_n, c = teacher.noise(batch), teacher.noise(batch), cond(batch)
    g = torch.Generator().manual_seed(0)
    t_m = (torch.rand(batch, generator=g, dtype=torch.float64) * 1000).clamp(min=skip + 1).float().to(device)
    t_s = milestones(M)[segment(t_m.cpu(), M)].float().to(device)
    t_n = torch.maximum(t_m - skip, t_s)
    with torch.no_grad():
        one, _ = timed(lambda: teacher.forward(z_m, t_m, c), repeats, device)
    params = add_student(teacher, rank=64)
    if checkpointing:
        lora.gradient_checkpointing(teacher.denoiser)
    cuda = str(device).startswith("cuda")
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda or None)
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    mse = distance("mse")

    def step():
        with lora.adapter(teacher.denoiser, "student"), autocast:
            loss, _, _ = local_loss(teacher, mse, z_m, t_m, z_n, t_n, t_s, c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sec, mem = timed(step, repeats, device)
    return [{"what": f"one forward, batch {batch}", "calls": 1, "seconds": one, "x_one_forward": 1.0, "peak_GiB": None},
            {"what": f"stage-1 update, batch {batch}{', grad checkpointing' if checkpointing else ''}", "calls": None,
             "seconds": sec, "x_one_forward": sec / one, "peak_GiB": mem}]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["sdxl", "flux", "tiny-sdxl", "tiny-flux"], default="tiny-sdxl")
    p.add_argument("--what", choices=["sample", "step1"], default="sample", help="sample: teacher vs student sampling; "
                   "step1: one stage-1 update vs one forward")
    p.add_argument("--grad-checkpointing", action="store_true", help="step1: with gradient checkpointing")
    p.add_argument("--batch", type=int, default=1, help="images per model call (a CFG pass doubles it)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.model in ("sdxl", "flux"):
        print(f"note: {args.model} at full size on a CPU takes minutes per forward; the tiny-* models are for CPUs")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    teacher, cond = build(args.model, device, dtype)
    if args.what == "sample":
        rows = bench_sample(teacher, cond, args.batch, args.repeats, device)
    else:
        rows = bench_step1(teacher, cond, args.batch, args.repeats, device, checkpointing=args.grad_checkpointing)
    if args.json:
        print(json.dumps({"model": args.model, "device": torch.cuda.get_device_name() if device.startswith("cuda")
                          else "cpu", "dtype": str(dtype), "rows": rows}, indent=1))
        return rows
    print(f"{args.model} on {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'} ({dtype}), "
          f"batch {args.batch}, best of {args.repeats}:")
    print("| what | model calls | seconds | x one forward | speed-up vs teacher | peak GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        mem = f"{r['peak_GiB']:.1f}" if r["peak_GiB"] is not None else "not measured (CPU)"
        speedup = f"{r['speedup_vs_teacher']:.1f}" if "speedup_vs_teacher" in r else "-"
        print(f"| {r['what']} | {r['calls'] or '-'} | {r['seconds']:.4f} | {r['x_one_forward']:.2f} | {speedup} | {mem} |")
    return rows


if __name__ == "__main__":
    main()
