"""Hand-written LoRA: several named adapters on ONE frozen base model.

    y = W x + (alpha / r) * B A x          A: r x in (random), B: out x r (zeros), so a fresh adapter is the identity

computed per layer whichever way is cheaper (`LoRALayer.folded`): apart, W x + alpha/r B (A x), for wide layers
(SDXL, FLUX), or folded into one weight, (W + alpha/r B A) x, where the adapter is as wide as the layer (the
embedded teacher's). The two are equal up to float rounding.

LogCD trains only LoRA (rank 64). Stage 2 keeps two adapters on the same base weights: `student` and `fake` (the
DMD fake score), and the teacher is the base with no adapter active. So one copy of the base serves teacher,
student, fake score and discriminator backbone:

    inject(unet, TARGETS, "student", rank=64)
    with adapter(unet, "student"): ...       # the student f_theta
    with adapter(unet, None): ...            # the teacher f_theta0
    with merged(unet, "student"): ...        # the student at plain-model speed (sampling)

Files are safetensors in the diffusers key format, `<prefix>.<module path>.lora_A.weight` / `.lora_B.weight`, so
`pipe.load_lora_weights(file)` reads an exported student. The scale alpha / r is folded into B on export (as if
alpha = r), so diffusers needs no alpha key and no scale fix-up.
"""
import contextlib
import errno
import os
import re
import socket

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file


class LoRALayer(nn.Module):
    """Wraps a frozen nn.Linear or nn.Conv2d; holds any number of named (A, B) pairs, at most one active."""

    def __init__(self, base):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.scale = {}
        self.active = None  # adapter name, or None = the base model
        self.merged = None  # adapter whose delta W is currently added into base.weight
        self.copies = {}  # adapter name -> its (A, B) in the base's dtype, when a `Working` computes it there

    def add(self, name, rank, alpha):
        b = self.base
        if isinstance(b, nn.Linear):
            A, B = nn.Linear(b.in_features, rank, bias=False), nn.Linear(rank, b.out_features, bias=False)
        else:  # conv: A has the base's kernel/stride/padding, B is 1x1 (the layout peft and diffusers use)
            A = nn.Conv2d(b.in_channels, rank, b.kernel_size, b.stride, b.padding, b.dilation, bias=False)
            B = nn.Conv2d(rank, b.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(A.weight, a=5 ** 0.5)
        nn.init.zeros_(B.weight)  # B = 0: the adapter starts as the identity, the student starts as the teacher
        self.lora_A[name] = A.to(b.weight.device)
        self.lora_B[name] = B.to(b.weight.device)
        self.scale[name] = alpha / rank

    def weights(self, name):
        """(A, B) as the forward computes with them: the fp32 parameters, or their copies in the base's dtype."""
        return self.copies.get(name) or (self.lora_A[name].weight, self.lora_B[name].weight)

    def delta_weight(self, name, A=None, B=None):
        """alpha/r * B A, shaped like base.weight (of the parameters, unless A, B are given)."""
        A, B = (self.lora_A[name].weight, self.lora_B[name].weight) if A is None else (A, B)
        dw = B.flatten(1) @ A.flatten(1)
        return (self.scale[name] * dw).view_as(self.base.weight)

    def forward(self, x):
        name = self.active
        if name == self.merged:  # the plain base (None), or the merged adapter
            return self.base(x)
        if self.merged is not None:
            raise RuntimeError(f"adapter {self.merged!r} is merged into the base; unmerge before using {name!r}")
        (A, B), b = self.weights(name), self.base
        if b.weight.dtype != A.dtype and not torch.is_autocast_enabled(x.device.type):
            # fp32 adapters on a bf16 base meet only under autocast (teachers.precision): outside it this layer
            # would feed fp32 into the next bf16 one. Said here, at the first layer, instead of a dtype error deeper in.
            raise RuntimeError(f"adapter {name!r} is active on a {b.weight.dtype} base outside autocast: run the "
                               "forward inside the script's autocast() (teachers.precision), or merge the adapter")
        conv = isinstance(b, nn.Conv2d)
        if self.folded(name):
            # y = (W + alpha/r B A) x: one layer whose weight carries the adapter (the gradient reaches A and B
            # through the product B A)
            W = b.weight.to(A.dtype) + self.delta_weight(name, A, B)
            return F.conv2d(x, W, b.bias, b.stride, b.padding, b.dilation, b.groups) if conv else F.linear(x, W, b.bias)
        # y = W x + alpha/r B A x as plain matmuls (convs), scale and sum in one add: a training step is launch-bound
        # at SDXL size, so each wrapped layer should cost as few ops (and Python calls) as it can
        y = b(x)
        h = F.conv2d(F.conv2d(x, A, None, b.stride, b.padding, b.dilation), B) if conv else F.linear(F.linear(x, A), B)
        return y.add(h.to(y.dtype), alpha=self.scale[name])

    def folded(self, name):
        """Whether the adapter runs folded into the weight, (W + alpha/r B A) x, rather than as W x + alpha/r B (A x):
        equal up to float rounding; whichever costs fewer multiply-adds per output position over a training step.
        Apart: A x and B (A x), their input gradients and A's and B's weight gradients, about 3 r (in k^2 + out).
        Folded: the gradient of the whole weight, in k^2 out (the frozen base alone needs none). SDXL's and FLUX's
        layers (320-3072 wide, r = 64) run apart; the embedded teacher's (32-64 wide, r = 64) folded."""
        b, r = self.base, self.lora_A[name].weight.shape[0]
        fan_in = b.weight[0].numel()  # in k^2 (a Linear: in)
        return getattr(b, "groups", 1) == 1 and fan_in * b.weight.shape[0] < 3 * r * (fan_in + b.weight.shape[0])


def layers(model):
    """(module path, LoRALayer) of every wrapped layer. Cached on the model (inject refreshes it): `adapter` runs
    many times per step -- once per block under gradient checkpointing -- and an SDXL UNet has ~4000 modules."""
    if "_lora_layers" not in model.__dict__:
        model.__dict__["_lora_layers"] = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    return model.__dict__["_lora_layers"]


def inject(model, targets, name, rank=64, alpha=None):
    """Adds adapter `name` (rank r, alpha defaulting to r) to every nn.Linear / nn.Conv2d of `model` whose module
    path matches the regex `targets` (re.search), wrapping it in a LoRALayer the first time. Freezes the base.
    Returns the adapter's parameters (fp32, whatever the base dtype)."""
    alpha = rank if alpha is None else alpha
    for path, p in model.named_parameters():  # freeze the base; adapters added before keep training
        if ".lora_" not in path:
            p.requires_grad_(False)
    for path, m in list(model.named_modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d)) and re.search(targets, path) and ".lora_" not in path:
            if not path.endswith(".base"):
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, LoRALayer(m))
    model.__dict__.pop("_lora_layers", None)
    found = layers(model)
    if not found:
        raise ValueError(f"LoRA targets {targets!r} match no Linear/Conv2d layer of {type(model).__name__}")
    params = []
    for _, layer in found:
        if name in layer.lora_A:
            raise ValueError(f"adapter {name!r} exists already")
        layer.add(name, rank, alpha)
        for mod in (layer.lora_A[name], layer.lora_B[name]):
            mod.float().requires_grad_(True)
            params += list(mod.parameters())
    return params


def parameters(model, name):
    return [p for _, l in layers(model) for m in (l.lora_A[name], l.lora_B[name]) for p in m.parameters()]


class Working:
    """Adapter `name` as the training forwards compute it, and its optimizer step (teachers.precision decides which):

    - dtype None: the fp32 parameters themselves (an fp32 run, or a bf16 one under autocast, which casts A and B to
      bf16 in every layer and forward); step(opt) is opt.step().
    - dtype bf16 (--adapters base): a copy of each fp32 parameter in the base's dtype, which the forwards and the
      backward use: no cast per layer and forward, and no autocast. The fp32 parameters stay the masters, which AdamW
      steps and files hold:
          masters.grad <- copies.grad, in fp32          (one multi-tensor copy)
          AdamW step on the masters
          copies <- masters, rounded to bf16           (one multi-tensor copy)
    `params` are the tensors backward reaches: what GradientSync averages (bf16 copies: half the bytes). Make it
    after the masters are final (loaded, broadcast): the copies are taken then and after each step."""

    def __init__(self, model, name, dtype=None):
        self.masters = self.params = parameters(model, name)
        if dtype is None or dtype == self.masters[0].dtype:
            return
        self.params = [p.detach().to(dtype).requires_grad_() for p in self.masters]
        self.grads = [torch.empty_like(p) for p in self.masters]  # the masters' fp32 gradients, allocated once
        pairs = iter(self.params)  # parameters() gives each layer's A, then its B
        for _, l in layers(model):
            l.copies[name] = (next(pairs), next(pairs))

    def step(self, opt):
        if self.params is self.masters:
            return opt.step()
        torch._foreach_copy_(self.grads, [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        for master, grad, p in zip(self.masters, self.grads, self.params):
            master.grad, p.grad = grad, None
        opt.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.masters)


class Plain:
    """Trainable parameters that are not an adapter (stage 2's discriminator heads), with Working's interface: the
    forwards use them as they are, `params` is what backward reaches, step(opt) is opt.step()."""

    def __init__(self, params):
        self.params = list(params)

    def step(self, opt):
        opt.step()


@torch.no_grad()
def blend(model, src, dst, mu=0.0):
    """Adapter dst <- mu dst + (1 - mu) src, layer by layer (mu = 0: a copy of src; both of one rank): the fp32
    parameters, and the copies in the base's dtype where a `Working` keeps them."""
    for _, l in layers(model):
        for mods in (l.lora_A, l.lora_B):
            if mu == 0:
                mods[dst].weight.copy_(mods[src].weight)
            else:  # dst + (1 - mu) (src - dst)
                mods[dst].weight.lerp_(mods[src].weight, 1 - mu)
        if dst in l.copies:
            for copy, mod in zip(l.copies[dst], (l.lora_A[dst], l.lora_B[dst])):
                copy.copy_(mod.weight)


@contextlib.contextmanager
def adapter(model, name):
    """Within the block, adapter `name` is active in every layer (None: the plain base model = the teacher)."""
    ls = [l for _, l in layers(model)]
    before = [l.active for l in ls]
    for l in ls:
        l.active = name
    try:
        yield model
    finally:
        for l, a in zip(ls, before):
            l.active = a


@contextlib.contextmanager
def count_forwards(model, grad=False):
    """Counts the calls of `model` with a forward pre-hook (a call cut short, as the discriminator's, counts too):
    yields a list that gets (the active adapter, the batch size) of each call -- with grad, (adapter, batch, whether
    it runs with gradients). The model calls bench.py reports, the stage-2 metrics log and the tests check are counted
    here, not computed from the step counts."""
    calls = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        wrapped = layers(model)
        call = (wrapped[0][1].active if wrapped else None, x.shape[0])
        calls.append(call + (torch.is_grad_enabled(),) if grad else call)
    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def gradient_checkpointing(model):
    """Turns on a diffusers model's gradient checkpointing so that the recomputation in backward runs with the
    adapter that was active in the forward. (Plain checkpointing recomputes with whatever adapter is active when
    backward runs -- usually none, outside the `adapter` block -- and torch stops with "a different number of
    tensors was saved".) Call it after the adapters are injected."""
    ls = [l for _, l in layers(model)]

    def checkpoint(block, *args):
        name = ls[0].active if ls else None  # `adapter` sets every layer alike

        def run(*a):
            with adapter(model, name):
                return block(*a)
        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)


def merge(model, name):
    """W <- W + alpha/r B A in every layer: the adapted model at the plain model's cost."""
    for _, l in layers(model):
        if l.merged is not None:
            raise RuntimeError(f"adapter {l.merged!r} is merged already; unmerge it first")
        with torch.no_grad():
            l.base.weight += l.delta_weight(name).to(l.base.weight.dtype)
        l.merged = name


def unmerge(model):
    for _, l in layers(model):
        if l.merged is not None:
            with torch.no_grad():
                l.base.weight -= l.delta_weight(l.merged).to(l.base.weight.dtype)
            l.merged = None


@contextlib.contextmanager
def merged(model, name):
    """The model with adapter `name` merged in and active (sampling speed); restored afterwards (on a bf16 base up to
    bf16 rounding: W + dW - dW is not W there)."""
    merge(model, name)
    try:
        with adapter(model, name):
            yield model
    finally:
        unmerge(model)


# ---- files ------------------------------------------------------------------------------------------------------

def state_dict(model, name, prefix):
    """Adapter `name` in the diffusers key format: `{prefix}.{path}.lora_A.weight`, B with alpha/r folded in."""
    out = {}
    for path, l in layers(model):
        out[f"{prefix}.{path}.lora_A.weight"] = l.lora_A[name].weight.detach().float().contiguous()
        out[f"{prefix}.{path}.lora_B.weight"] = (l.scale[name] * l.lora_B[name].weight.detach().float()).contiguous()
    return out


def load_state_dict(model, name, sd, prefix):
    """Inverse of state_dict: fills adapter `name` (created by inject with the same targets and rank)."""
    expected = {f"{prefix}.{path}" for path, _ in layers(model)}
    found = {k.rsplit(".lora_", 1)[0] for k in sd if k.startswith(prefix + ".") and ".lora_" in k}
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        raise ValueError(f"LoRA layers do not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:2]}); was it made for another model, or with other LoRA targets?")
    with torch.no_grad():
        for path, l in layers(model):
            A, B = sd[f"{prefix}.{path}.lora_A.weight"], sd[f"{prefix}.{path}.lora_B.weight"]
            if A.shape != l.lora_A[name].weight.shape or B.shape != l.lora_B[name].weight.shape:
                raise ValueError(f"LoRA shape mismatch at {path}: file has rank {A.shape[0]}, "
                                 f"model has rank {l.lora_A[name].weight.shape[0]}")
            l.lora_A[name].weight.copy_(A)
            l.lora_B[name].weight.copy_(B / l.scale[name])


@contextlib.contextmanager
def atomic(path):
    """Yields a temporary path beside `path`, renamed onto `path` when the block ends without an error (and removed
    when it does not): a crash, a kill, a full disk or Ctrl-C never leaves half a file, and `path` is the old file
    or the new one, whole. The new file's bytes reach the disk before the rename (fsync), so that a lost node, too,
    leaves one of the two. Every file the project writes goes through it. (A kill leaves the temporary file,
    <path>.tmp.<host>.<pid>, behind; remove_stale cleans those up.)"""
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"  # whose it is, on a filesystem several nodes share
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fd = os.open(folder, os.O_RDONLY)  # the rename itself, on the disk
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale(folder, prefix):
    """Removes the temporary files (`atomic`) of <folder>/<prefix>* that processes of this machine no longer running
    left behind (another machine's are its own business)."""
    pattern = re.escape(prefix) + r".*\.tmp\." + re.escape(socket.gethostname()) + r"\.(\d+)"
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = re.fullmatch(pattern, name)
        if m and not running(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))


def running(pid):
    """Whether a process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)  # signal 0: no signal, only the check
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def save(path, tensors, metadata):
    """Atomic safetensors write (`atomic`). A full disk is an OSError (ENOSPC) naming the file, as for any write."""
    with atomic(path) as tmp:
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                      metadata={k: str(v) for k, v in metadata.items()})
        except SafetensorError as e:
            if any(f"{how} {n}" in str(e) for how in ("os error", "code:") for n in (28, 122)):  # ENOSPC, EDQUOT
                raise OSError(errno.ENOSPC, "No space left on device", path) from None
            raise


def metadata(path):
    """The metadata of a safetensors file, without reading its tensors ({} if there is no readable file)."""
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return {}


def load(path):
    """(tensors, metadata) of a safetensors file, or one clear error for a missing / corrupt / truncated file."""
    _, metadata = header(path)
    try:
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def header(path):
    """(tensor names, metadata) of a safetensors file without reading its tensors, or load's clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        with safe_open(path, "pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


# ---- the kohya layout: A1111, ComfyUI, Forge, kohya's sd-scripts -----------------------------------------------

def kohya(tensors, meta):
    """A student's LoRA (diffusers keys, scale folded into B) in the key layout of kohya's sd-scripts, which A1111,
    ComfyUI and Forge read: `lora_unet_<module of the original model, "_" for ".">.lora_down.weight` (A),
    `.lora_up.weight` (B) and `.alpha` (= the rank: scale 1, B already holds alpha / r). The modules are named as in
    the original implementations: SDXL's UNet (input_blocks / middle_block / output_blocks) and FLUX's
    (double_blocks / single_blocks, whose q, k, v (and the MLP's input, in single blocks) are one fused linear each:
    their LoRAs are stacked, A along the rank, B block-diagonal, which is the same weight update exactly).
    Returns (tensors, metadata): ours, plus what sd-scripts writes about the network."""
    layers = {k[:-len(".lora_A.weight")]: (v, tensors[k[:-len("A.weight")] + "B.weight"])
              for k, v in tensors.items() if k.endswith(".lora_A.weight")}
    prefix = meta.get("lora_prefix") or next(iter(layers)).split(".")[0]
    layers = {k[len(prefix) + 1:]: ab for k, ab in layers.items()}
    names = flux_names(layers) if prefix == "transformer" else {(p,): sdxl_name(p, layers) for p in layers}
    out = {}
    for paths, name in names.items():
        A = torch.cat([layers[p][0] for p in paths])  # (n r, in): the parts' A stacked
        B = torch.block_diag(*[layers[p][1].flatten(1) for p in paths])  # (sum of outs, n r): each part's B alone
        B = B.reshape(*B.shape, *layers[paths[0]][1].shape[2:])  # a conv's 1 x 1
        key = "lora_unet_" + name.replace(".", "_")
        out[key + ".lora_down.weight"], out[key + ".lora_up.weight"] = A.contiguous(), B.contiguous()
        out[key + ".alpha"] = torch.tensor(float(A.shape[0]))
    rank = next(iter(layers.values()))[0].shape[0]
    info = {"ss_network_module": "networks.lora", "ss_network_dim": rank, "ss_network_alpha": rank,
            "ss_base_model_version": "flux1" if prefix == "transformer" else "sdxl_base_v1-0"}
    return out, {**meta, **info, "format": "kohya"}


RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
          "conv_shortcut": "skip_connection"}  # a diffusers ResnetBlock2D's layers in SDXL's original UNet
TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
       "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
       "add_embedding.linear_2": "label_emb.0.2"}


def sdxl_name(path, layers):
    """A diffusers UNet module path -> its name in SDXL's original UNet, where the blocks are numbered through:
    with L resnets per down block (L + 1 per up block; L = 2 in SDXL), down_blocks.b's layer j is input_blocks.(1 +
    b (L + 1) + j) (.0 its resnet, .1 its attention; the downsampler a layer of its own, .0.op), the mid block is
    middle_block.0 / .1 / .2 (resnet, attention, resnet), up_blocks.b's layer j is output_blocks.(b (L + 1) + j) (the
    upsampler in its last layer, after the attention if the block has one). L is read off the paths."""
    if path in TOP:
        return TOP[path]
    resnets = [int(p.split(".")[3]) for p in layers if p.startswith("down_blocks.") and ".resnets." in p]
    if not resnets:
        raise ValueError("the LoRA adapts no resnet of the down blocks: SDXL's layer numbering cannot be read off it")
    L = 1 + max(resnets)
    if path.startswith("mid_block."):
        _, kind, j, *rest = path.split(".")
        inner = RESNET[rest[0]] if kind == "resnets" else ".".join(rest)
        return f"middle_block.{2 * int(j) if kind == 'resnets' else 1}.{inner}"
    part, b, kind, j, *rest = path.split(".")
    inner = RESNET[rest[0]] if kind == "resnets" else ".".join(rest)
    b, j = int(b), int(j)
    if part == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * (L + 1) + L}.0.op"
        return f"input_blocks.{1 + b * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{inner}"
    if kind == "upsamplers":
        attention = any(p.startswith(f"up_blocks.{b}.attentions.") for p in layers)
        return f"output_blocks.{b * (L + 1) + L}.{2 if attention else 1}.conv"
    return f"output_blocks.{b * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{inner}"


FLUX_DOUBLE = {("attn.to_q", "attn.to_k", "attn.to_v"): "img_attn_qkv", ("attn.to_out.0",): "img_attn_proj",
               ("ff.net.0.proj",): "img_mlp_0", ("ff.net.2",): "img_mlp_2",
               ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"): "txt_attn_qkv",
               ("attn.to_add_out",): "txt_attn_proj", ("ff_context.net.0.proj",): "txt_mlp_0",
               ("ff_context.net.2",): "txt_mlp_2"}
FLUX_SINGLE = {("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"): "linear1", ("proj_out",): "linear2"}


def flux_names(layers):
    """{(diffusers module paths fused into one): its name in FLUX's original transformer} for the paths in
    `layers`: transformer_blocks.i -> double_blocks.i, single_transformer_blocks.i -> single_blocks.i, the last
    proj_out -> final_layer.linear."""
    names = {}
    for path in layers:
        part, *rest = path.split(".", 2)
        if path == "proj_out":
            names[(path,)] = "final_layer.linear"
            continue
        if part not in ("transformer_blocks", "single_transformer_blocks") or len(rest) < 2:
            raise ValueError(f"no kohya name for the LoRA layer {path}")
        double = part == "transformer_blocks"
        table, block = (FLUX_DOUBLE, "double_blocks") if double else (FLUX_SINGLE, "single_blocks")
        for group, name in table.items():
            if rest[1] in group:
                fused = tuple(f"{part}.{rest[0]}.{g}" for g in group)
                if not set(fused) <= set(layers):
                    raise ValueError(f"{name} of {block}.{rest[0]} is one layer in FLUX's original model: the LoRA "
                                     f"must adapt all of {', '.join(group)}, or none")
                names[fused] = f"{block}.{rest[0]}.{name}"
    missing = set(layers) - {p for g in names for p in g}
    if missing:
        raise ValueError(f"no kohya name for the LoRA layers {sorted(missing)[:3]}")
    return names


def main(argv=None):
    """python lora.py --kohya global.safetensors [--out global.kohya.safetensors]: the student for A1111, ComfyUI,
    Forge and kohya's scripts."""
    import argparse
    p = argparse.ArgumentParser(description="Export a student LoRA in another tool's key layout.")
    p.add_argument("ckpt", help="a student checkpoint of an SDXL or FLUX teacher (local / global.safetensors)")
    p.add_argument("--kohya", action="store_true", required=True, help="the kohya / A1111 layout (the only one)")
    p.add_argument("--out", help="default: <ckpt>.kohya.safetensors")
    args = p.parse_args(argv)
    out = args.out or args.ckpt.removesuffix(".safetensors") + ".kohya.safetensors"
    try:
        keys, meta = header(args.ckpt)
        if meta.get("format") != "logcd":
            raise ValueError(f"{args.ckpt} is not a LogCD student checkpoint")
        teacher = meta.get("teacher", "")
        if teacher == "digits" or os.path.isfile(os.path.join(teacher, "prompt_embeds.safetensors")):
            raise ValueError("an embedded-layout teacher's student has no kohya layout (it is for SDXL and FLUX)")
        if os.path.abspath(out) == os.path.abspath(args.ckpt):
            raise ValueError(f"--out {out} is the checkpoint itself")
        tensors, meta = kohya(*load(args.ckpt))
        save(out, tensors, meta)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}: {len(tensors) // 3} LoRA layers in the kohya layout, for A1111, ComfyUI, Forge and "
          "diffusers' load_lora_weights")


if __name__ == "__main__":
    main()
