"""The host time of reading the denoiser's dtype, once before every forward: diffusers' ModelMixin.dtype (walks every
module) against teachers.Teacher.dtype (the first parameter's), on SDXL's UNet with the student LoRA in. Empty
weights built from bench.py's SDXL config: nothing is downloaded or allocated.

    python docs/dtype_read.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

import bench  # noqa: E402
import lora  # noqa: E402
import teachers  # noqa: E402

with init_empty_weights():
    unet = UNet2DConditionModel(**bench.SDXL_UNET)
with torch.device("meta"):
    lora.inject(unet, teachers.DDPMTeacher.lora_targets, "student", 64, 64)
teacher = teachers.Teacher()
teacher.denoiser = unet
modules = sum(1 for _ in unet.named_modules())
for name, read in (("diffusers ModelMixin.dtype", lambda: unet.dtype), ("teachers.Teacher.dtype", lambda: teacher.dtype)):
    n, start = 100, time.perf_counter()
    for _ in range(n):
        assert read() == torch.float32
    print(f"{name}: {(time.perf_counter() - start) / n * 1e3:.3f} ms per read (SDXL UNet + LoRA, {modules} modules)")
