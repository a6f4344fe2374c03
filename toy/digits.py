"""scikit-learn's bundled digits (1797 8x8 images, no download) as 1-channel images in [-1, 1]."""
import torch
import torch.nn.functional as F

RES = 16  # the embedded teacher's resolution: 8x8 digits upsampled 2x
PROMPTS = [str(d) for d in range(10)]  # row k of prompt_embeds is the prompt "k"; row 10 is the empty prompt ""


def load_digits(res=RES):
    """Returns (images float32 (N, 1, res, res) in [-1, 1], labels int64 (N,)), always in the same order."""
    from sklearn.datasets import load_digits as sk_load_digits
    d = sk_load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1  # pixel values 0..16 -> [-1, 1]
    x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x, torch.tensor(d.target, dtype=torch.int64)


def split(n, held_out=0.2, seed=0):
    """A fixed train / held-out index split (used by the evaluator's classifier)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(n * held_out)
    return perm[k:], perm[:k]
