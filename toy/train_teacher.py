"""Train the embedded digits teacher from scratch (CPU, about 15 minutes on 2 cores).

    python -m toy.train_teacher --out toy/teacher --overwrite

An epsilon-prediction diffusion model with Stable Diffusion's noise schedule (1000 steps, scaled_linear
0.00085 -> 0.012), conditioned by cross-attention on a learned prompt table: rows 0-9 are the prompts "0".."9",
row 10 the empty prompt "" (label dropout), so classifier-free guidance works as on SDXL. The output folder has
the layout every `--teacher DIR` reads: unet/ (diffusers save_pretrained), scheduler/, prompt_embeds.safetensors.
"""
import argparse
import copy
import math
import os
import shutil

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from tqdm import tqdm

from runs import Parser, count, positive, weight
from toy.digits import PROMPTS, RES, load_digits

p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="toy/teacher", help="output folder")
p.add_argument("--overwrite", action="store_true", help="replace an existing --out (once the new teacher is whole)")
p.add_argument("--steps", type=count, default=2400, help="optimizer steps")
p.add_argument("--batch", type=count, default=64)
p.add_argument("--lr", type=positive, default=1e-3, help="peak AdamW learning rate (cosine decay, 100 warm-up steps)")
p.add_argument("--p-uncond", type=weight, default=0.15, help="label dropout: share of samples trained on the empty prompt")
p.add_argument("--ema", type=weight, default=0.999, help="EMA decay of the saved weights")
p.add_argument("--tokens", type=count, default=4, help="L: tokens per prompt embedding")
p.add_argument("--dim", type=count, default=32, help="D: prompt embedding width (the UNet's cross_attention_dim)")
p.add_argument("--width", type=count, default=32, help="the UNet's channels at full resolution (x2 below it; a multiple "
               "of 8): 32 is the embedded teacher, another width a second teacher of the same layout")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
if args.width % 8:  # norm_num_groups = 8
    raise SystemExit(f"error: --width {args.width} is not a multiple of 8 (the UNet's 8 norm groups)")
if os.path.exists(args.out) and not args.overwrite:  # before the training: the teacher in --out is not lost
    raise SystemExit(f"error: {args.out} exists; replace it with --overwrite, or give another --out")
if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
    raise SystemExit(f"error: --out {args.out}: the folder {os.path.dirname(os.path.abspath(args.out))} does not exist")

torch.manual_seed(args.seed)
x_data, y_data = load_digits()
unet = UNet2DConditionModel(
    sample_size=RES, in_channels=1, out_channels=1, layers_per_block=1,
    block_out_channels=(args.width, 2 * args.width, 2 * args.width),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=args.dim, attention_head_dim=8, norm_num_groups=8)
# the "text encoder" of the toy: a learned table of 11 prompt embeddings, frozen once saved
embeds = torch.nn.Parameter(torch.randn(len(PROMPTS) + 1, args.tokens, args.dim) * 0.5)
scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", clip_sample=False, timestep_spacing="trailing")
alphas_cumprod = scheduler.alphas_cumprod
ema = copy.deepcopy(unet).requires_grad_(False)
ema_embeds = embeds.detach().clone()
opt = torch.optim.AdamW(list(unet.parameters()) + [embeds], lr=args.lr, weight_decay=0.0)
lr_at = lambda i: args.lr * min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * i / args.steps))
print(f"teacher UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, {len(x_data)} digits at {RES}x{RES}")

for i in (bar := tqdm(range(args.steps))):
    idx = torch.randint(0, len(x_data), (args.batch,))
    x0, y = x_data[idx], y_data[idx]
    y = torch.where(torch.rand(args.batch) < args.p_uncond, torch.full_like(y, len(PROMPTS)), y)
    k = torch.randint(0, 1000, (args.batch,))  # DDPM training index (teacher time t = k + 1)
    a = alphas_cumprod[k].view(-1, 1, 1, 1)
    eps = torch.randn_like(x0)
    z = a.sqrt() * x0 + (1 - a).sqrt() * eps
    loss = F.mse_loss(unet(z, k, embeds[y]).sample, eps)
    for g in opt.param_groups:
        g["lr"] = lr_at(i)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    with torch.no_grad():  # EMA with the usual warm-up, so the random init does not linger in the saved weights
        decay = min(args.ema, (1 + i) / (10 + i))
        for pe, pm in zip(ema.parameters(), unet.parameters()):
            pe.lerp_(pm, 1 - decay)
        ema_embeds.lerp_(embeds, 1 - decay)
    bar.set_postfix(loss=f"{loss.item():.4f}")

# the teacher is written whole into a folder beside --out, which then takes --out's place: an interrupted save leaves
# the old teacher (or none), never half of one
tmp, old = f"{args.out}.tmp{os.getpid()}", f"{args.out}.old{os.getpid()}"
try:
    ema.save_pretrained(os.path.join(tmp, "unet"))
    scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
    save_file({"embeds": ema_embeds.contiguous()}, os.path.join(tmp, "prompt_embeds.safetensors"),
              metadata={"prompts": "|".join(PROMPTS + [""]), "trained_by": "python -m toy.train_teacher"})
    if os.path.exists(args.out):
        os.replace(args.out, old)
    os.replace(tmp, args.out)
finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
print(f"saved the teacher to {args.out}")
