"""The one command line of the evaluation, and the paper's Table 1 metrics for real teachers (SDXL / FLUX): the CLIP
score and FID of a model's images on a prompts file, with the prompts files and reference images they need. The
embedded digits teacher's judge and the paper's tables at toy scale are in toy/tables.py (its docstring, at the end
of --help, says how they work); `--table`, `--train-classifier` and `--replot` run them from here.

    python eval.py --table teacher      # teacher DDIM at 25 / 8 / 4 / 3 / 2 steps (the yardstick for every stage)
    python eval.py --table cfg          # the teacher across CFG scales w (how its default w was chosen)
    python eval.py --table student --ckpt local.safetensors --steps 8 4 3 2
    python eval.py --table main --jobs 2   # Table 1: the teacher (DDIM, best diffusers solver), the baselines
                                           # (LCM-, PCM-, DMD2-style, each tuned on seed 3), stage 1 only, LogCD
    python eval.py --table ablation     # Table 3: local MSE -> local L-LPIPS -> + global -> + GAN -> + DMD
    python eval.py --table M            # Tables 4-6: M in {4, 8, 16}; --table p: p in 1..4; --table q: q in 1..4
    python eval.py --table terms --jobs 2  # each stage-2 term's alignment and FD, at 1 to 4 steps
    python eval.py --table onestep --jobs 2   # the 1-step options;  --table targets: its targets, the options
    python eval.py --table second --jobs 2 --teacher toy/teacher_w24   # recipe and best option, 2nd teacher
    python eval.py --table main --quick # the same code on tiny trainings and 40 samples per row (CI: the table's shape)
    python eval.py --clip-score openai/clip-vit-large-patch14 --samples s.safetensors   # real teachers (below)
    python eval.py --prepare-coco captions_val2017.json val2017/ --out coco5k      # MSCOCO-2017 5K (below)
    python eval.py --prepare-prompts captions_train2017.json --exclude coco5k/prompts.txt --out prompts.txt  # training
    python eval.py --score sdxl_global.safetensors --steps 4 3 2 --prompts coco5k/prompts.txt \
        --reference coco5k/reference --images runs/coco5k/global  # --score sdxl --steps 25: the teacher's row
    python eval.py --train-classifier   # retrain the judge (deterministic; its weights are committed)
    python eval.py --history runs/s0/global.safetensors runs/s1/global.safetensors   # kept students along training
    python eval.py --history runs/a*/global.safetensors --against runs/b*/global.safetensors --labels A B  # compared

For SDXL / FLUX students, `--clip-score MODEL --samples FILE` scores `sample.py --save-tensors FILE` output (e.g.
from MSCOCO / MJHQ prompt files) with transformers' CLIPModel: 100 x cosine(image, prompt), averaged.
`--score MODEL` (a student checkpoint, or a teacher with its CFG) is the paper's Table 1 on a GPU: per step count k,
one image per prompt into <images>/<k>_steps/<index>.png (sample.py's loop; image i's noise seeded by seed + i, so an
interrupted run continues where it stopped), then the FID against --reference (torchmetrics' Inception-v3, images
first resized to --fid-size) and the CLIP score (--clip-model), a row per k, kept in <images>/scores.json.
`--prepare-coco` / `--prepare-mjhq` write a prompts file and its reference images (docs/notes.md: the protocol).
`--prepare-prompts SOURCE ... --out FILE` writes a training prompts file: every caption of COCO captions .json, .jsonl,
.csv (--column) or text files, one line each, deduplicated, without any caption of the --exclude files (the scored
5K); it prints what it read and how many it kept and dropped (as duplicates, excluded, empty).
"""
import argparse
import csv
import json
import os
import tempfile

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lora
from runs import plot_log
from local_cd import PRESETS
from teachers import load_student, load_teacher
from toy import tables


# ---- CLIP score for real teachers -----------------------------------------------------------------------------------

@torch.no_grad()
def clip_score(model, tokenizer, images, prompts, batch=32):
    """CLIP score of images (N, 3, H, W) in [-1, 1] against their prompts: 100 x max(cos(image, text), 0), mean
    over the images (the metric of the paper's Tables 1-2). model: a transformers CLIPModel. Square images are
    preprocessed as CLIP's own image processor does it (bicubic, antialiased; a downscale without antialiasing moved
    the tiny test CLIP's scores by 0.2 to 1.4 points): within 0.1 points of torchmetrics' CLIPScore (a test)."""
    c = model.config.vision_config
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # CLIP's preprocessing
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(images), batch):
        x = (images[i:i + batch].float() + 1) / 2
        x = F.interpolate(x, size=(c.image_size, c.image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        tok = tokenizer(prompts[i:i + batch], padding=True, truncation=True, return_tensors="pt").to(device)
        f_img = model.get_image_features(pixel_values=((x - mean) / std).to(device))
        f_txt = model.get_text_features(**tok)
        # transformers 5 returns outputs whose pooler_output is the projected embedding; 4.x the tensor itself
        f_img, f_txt = (f if torch.is_tensor(f) else f.pooler_output for f in (f_img, f_txt))
        total += (100 * F.cosine_similarity(f_img, f_txt).clamp_min(0)).sum().item()
    return total / len(images)


def clip_score_file(model_path, samples):
    """`sample.py --save-tensors` output (images, prompts in the metadata, per-prompt samples in order) scored with a
    CLIPModel and its tokenizer from model_path (hub id or folder)."""
    tensors, meta = lora.load(samples)
    images, prompts = tensors["images"], meta["prompts"].split("|")
    per_prompt = len(images) // len(prompts)
    if images.shape[1] != 3:
        raise SystemExit(f"error: {samples} holds {images.shape[1]}-channel images; CLIP scores RGB images "
                         "(SDXL / FLUX samples; the embedded teacher has its own judge: --table)")
    return clip_score(*load_clip(model_path), images, [p for p in prompts for _ in range(per_prompt)])


def load_clip(path, device="cpu"):
    """(CLIPModel, its tokenizer) from a hub id or folder."""
    from transformers import AutoTokenizer, CLIPModel
    return CLIPModel.from_pretrained(path).eval().to(device), AutoTokenizer.from_pretrained(path)


# ---- the paper's Table 1 for real teachers: CLIP score and FID of a model's PNGs on a prompts file -----------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# the FID's feature network: torchmetrics' Inception-v3 (its 2048 pool features) or an nn.Module (the tests' own)
FID_FEATURE = 2048
FID_INSTALL = "pip install torchmetrics torch-fidelity"


def image_files(folder):
    """The images of a flat folder, sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def png_path(folder, i):
    return os.path.join(folder, f"{i:05d}.png")


def read_image(path, size=None):
    """An image file as a uint8 RGB tensor (3, H, W); with size: center-cropped to a square, then resized to size x size
    with PIL's bicubic filter (antialiased). --prepare-* writes the reference images this way and the FID reads the
    samples this way, so both reach the feature network alike."""
    import numpy as np
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size:
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s))
            if s != size:
                im = im.resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def write_png(image, path):
    """image: uint8 (3, H, W), or float in [-1, 1]; written atomically, so a PNG that exists is whole."""
    from PIL import Image
    if image.dtype != torch.uint8:
        image = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte()
    with lora.atomic(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(tmp, format="PNG")


def check_fid_packages():
    """One line before any work if the FID cannot be computed here (torchmetrics; torch-fidelity for its Inception)."""
    import importlib.util
    needed = ["torchmetrics"] + (["torch_fidelity"] if isinstance(FID_FEATURE, int) else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"error: the FID needs {' and '.join(missing)}: {FID_INSTALL}")


def fid_metric(device="cpu"):
    """torchmetrics' FrechetInceptionDistance on uint8 images, keeping the reference's features across reset(). With
    FID_FEATURE = 2048: Inception-v3 with the TF FID weights (torch-fidelity's port, downloaded once into the torch
    hub cache), which resizes every image to 299 x 299 itself (bilinear, antialiased), and its 2048 pool features."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        metric = FrechetInceptionDistance(feature=FID_FEATURE, reset_real_features=False)
    except ModuleNotFoundError as e:  # torchmetrics, torch-fidelity, or the torchvision torch-fidelity imports
        raise SystemExit(f"error: the FID needs {e.name or 'torch_fidelity'}: {FID_INSTALL}") from None
    return metric.to(device)


def add_images(metric, files, size, real, batch=50):
    """Feeds image files to the FID metric, `batch` at a time, each read at size x size (read_image)."""
    for i in tqdm(range(0, len(files), batch), desc=f"FID features ({'reference' if real else 'samples'})",
                  disable=len(files) <= batch):
        metric.update(torch.stack([read_image(f, size) for f in files[i:i + batch]]).to(metric.device), real=real)


def clip_score_files(model, tokenizer, files, prompts, batch=32):
    """clip_score of image files against their prompts, read `batch` at a time (5000 SDXL images in [-1, 1] would
    take 60 GB)."""
    total = 0.0
    for i in tqdm(range(0, len(files), batch), desc="CLIP score", disable=len(files) <= batch):
        images = torch.stack([read_image(f) for f in files[i:i + batch]]).float() / 127.5 - 1
        total += clip_score(model, tokenizer, images, prompts[i:i + batch], batch) * len(images)
    return total / len(files)


def embedded(name):
    """Whether a teacher name or folder is in the embedded layout (the digits): no RGB images, its own judge."""
    from teachers import TEACHERS
    return os.path.isfile(os.path.join(TEACHERS.get(name, name), "prompt_embeds.safetensors"))


def read_json(path, default=None):
    """The JSON in the file `path`, or `default` if there is no such file."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def generation(args, k, prompts):
    """What the PNGs of <images>/<k>_steps come from; a folder holding PNGs of another generation is refused, so that
    images of an older checkpoint, seed or prompts file are never scored as this one's."""
    if args.score.endswith(".safetensors"):  # a checkpoint is its run and step (teachers.save_checkpoint writes them)
        meta = lora.metadata(args.score)
        model = {"checkpoint_run": meta.get("run"), "checkpoint_step": meta.get("step")}
    else:
        model = {"teacher": args.score, "cfg": args.cfg, "resolution": args.resolution}
    return {**model, "steps": k, "seed": args.seed, "prompts_sha1": prompts.sha1}


def check_score(args):
    """Every mistake of a --score command in one line, before any model loads. Returns the prompts (a PromptFile), the
    reference images, the step counts and the checkpoint's metadata (None for a teacher)."""
    from local_cd import student_times
    from teachers import TEACHERS, prompt_file, read_checkpoint
    for flag, value in (("--prompts FILE", args.prompts), ("--reference DIR", args.reference),
                        ("--images DIR", args.images)):
        if not value:
            raise SystemExit(f"error: --score needs {flag}")
    try:
        prompts = prompt_file(args.prompts)
    except ValueError as e:
        raise SystemExit(f"error: --prompts: {e}") from None
    if not os.path.isdir(args.reference):
        raise SystemExit(f"error: --reference {args.reference} is not a folder")
    references = image_files(args.reference)
    if len(references) < 2:
        raise SystemExit(f"error: --reference {args.reference} holds {len(references)} images "
                         f"({' '.join(IMAGE_EXTENSIONS)}); the FID needs 2 or more")
    meta, teacher, steps = None, args.score, args.steps or [25]
    if args.score.endswith(".safetensors"):
        steps = args.steps or [4, 3, 2]
        try:
            _, meta = read_checkpoint(args.score)
            for k in steps:
                student_times(k, int(meta["M"]))
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        if args.cfg is not None:
            raise SystemExit(f"error: --cfg is for a teacher; the student was distilled with CFG (w = {meta.get('w')}) "
                             "and samples without a guidance pass")
        teacher = meta["teacher"]
    if teacher not in TEACHERS and not os.path.isdir(teacher) and "/" not in teacher:
        raise SystemExit(f"error: unknown teacher {teacher!r}: use sdxl, flux, a teacher folder or a hub id")
    if embedded(teacher):
        raise SystemExit(f"error: --score {args.score}: the teacher {teacher!r} draws no RGB images (the embedded "
                         "layout has its own judge: --table); --score is for SDXL / FLUX teachers and their students")
    try:
        from transformers import CLIPConfig
        CLIPConfig.from_pretrained(args.clip_model)
    except Exception as e:
        raise SystemExit(f"error: --clip-model {args.clip_model}: cannot read its config ({type(e).__name__}); "
                         "offline? download it first (hf download MODEL --local-dir DIR) and pass DIR") from None
    check_fid_packages()
    for k in steps:
        folder = os.path.join(args.images, f"{k}_steps")
        if os.path.isdir(folder) and any(f.endswith(".png") for f in os.listdir(folder)):
            path = os.path.join(folder, "generation.json")
            done = read_json(path)
            if done != generation(args, k, prompts):
                raise SystemExit(f"error: {folder} holds PNGs of another generation (its generation.json: {done}); "
                                 "remove it or pass another --images")
    try:  # last, so that a refused command writes nothing
        os.makedirs(args.images, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.images):
            pass
    except OSError as e:
        raise SystemExit(f"error: --images {args.images} is not a writable folder ({e.strerror})") from None
    return prompts, references, steps, meta


def load_model(args, meta, device):
    """(teacher, student?, w): the checkpoint's teacher with its student adapter, or the teacher with its CFG scale."""
    try:
        if meta is not None:
            return load_student(args.score, device)[0], True, None
        teacher = load_teacher(args.score, device, args.resolution)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return teacher, False, args.cfg if args.cfg is not None else PRESETS[teacher.family]["w"]


def generate_pngs(teacher, student, w, ts, prompts, indices, folder, seed, batch, chunk=256):
    """Writes image i, for i in `indices`, as folder/<i:05d>.png: the prompt prompts[i] from noise drawn by a generator
    seeded with seed + i, so that an image depends on neither the batch size nor the images made before it (an
    interrupted generation continues with the missing ones). sample.py's loop (sample.generate) does the sampling."""
    import sample as sample_py
    x0_fn = sample_py.x0_function(teacher, student, w)
    with torch.no_grad(), sample_py.sampling(teacher, student), tqdm(total=len(indices), desc=folder) as bar:
        for j in range(0, len(indices), chunk):  # a chunk's noise at a time: 5000 SDXL latents take 1.3 GB
            part = indices[j:j + chunk]
            z_T = torch.cat([teacher.noise(1, torch.Generator().manual_seed(seed + i)) for i in part])
            for sl, _, images in sample_py.generate(teacher, x0_fn, ts, [prompts[i] for i in part], z_T,
                                                    batch=batch, chunk=chunk):
                for i, image in zip(part[sl], images):
                    write_png(image, png_path(folder, i))
                bar.update(len(images))


def fid_against_reference(metric, files, size):
    """The FID of image files against the reference images already in `metric` (fid_metric)."""
    add_images(metric, files, size, real=False)
    fid = metric.compute().item()
    metric.reset()  # the samples' features go, the reference's stay
    return fid


def save_row(args, row, n_reference):
    """Adds a --score row, with what it was scored with, to <images>/scores.json (keyed by its step count)."""
    path = os.path.join(args.images, "scores.json")
    scores = read_json(path, {})
    feature = FID_FEATURE if isinstance(FID_FEATURE, int) else type(FID_FEATURE).__name__
    scores[str(row["steps"])] = {**row, "model": args.score, "prompts": args.prompts, "reference": args.reference,
                                 "reference_images": n_reference, "fid_size": args.fid_size, "fid_feature": feature,
                                 "clip_model": args.clip_model, "seed": args.seed}
    with lora.atomic(path) as tmp, open(tmp, "w") as f:
        json.dump(scores, f, indent=1)


REAL_METRICS = (("FID", "FID to the reference images (lower is better)"),
                ("CLIP score", "CLIP score (higher is better)"))


def scores_figure(files, teacher_files, path):
    """--score's rows against steps (the paper's Table 1 columns): a line per model, the mean over its scores.json
    files (one per --seed; error bars one std), and the teacher's row of most steps (mean over its files) as the
    dashed reference line."""
    by_model = {}
    for f in files:
        for row in read_json(f).values():
            by_model.setdefault(row["model"], {}).setdefault(row["steps"], []).append(row)
    rows = []
    for model, per_steps in by_model.items():
        for k, seen in sorted(per_steps.items()):
            row = {"row": f"{model} ({len(seen)} seed{'s' * (len(seen) > 1)})", "steps": k}
            for m, _ in REAL_METRICS:
                row[f"_{m}"], row[f"_{m}_std"] = tables.mean_std([r[m] for r in seen])
            rows.append(row)
    reference = None
    if teacher_files:
        tops = [max(read_json(f).values(), key=lambda r: r["steps"]) for f in teacher_files]
        reference = {"label": f"teacher {tops[0]['model']}, {tops[0]['steps']} steps ({len(tops)} seed"
                              f"{'s' * (len(tops) > 1)})"}
        for m, _ in REAL_METRICS:
            reference[f"_{m}"], reference[f"_{m}_std"] = tables.mean_std([r[m] for r in tops])
    tables.plot(rows, path, reference, REAL_METRICS, title=f"eval.py --score: {len(files)} scores.json")
    return path


def score_model(args):
    """--score: for each step count k, one image per prompt into <images>/<k>_steps/ (the PNGs already there are kept),
    then their FID against --reference and their CLIP score: a table row per k, kept in <images>/scores.json."""
    from local_cd import student_times, teacher_times
    from teachers import default_device
    prompts, references, steps, meta = check_score(args)
    device = args.device or default_device()
    model = metric = clip = None  # each loaded when first needed: a finished generation loads no teacher
    rows = []
    for k in steps:
        folder = os.path.join(args.images, f"{k}_steps")
        missing = [i for i in range(len(prompts)) if not os.path.exists(png_path(folder, i))]
        if missing:
            model = model or load_model(args, meta, device)
            teacher, student, w = model
            os.makedirs(folder, exist_ok=True)
            with lora.atomic(os.path.join(folder, "generation.json")) as tmp, open(tmp, "w") as f:
                json.dump(generation(args, k, prompts), f)
            ts = student_times(k, int(meta["M"])) if student else teacher_times(k)
            generate_pngs(teacher, student, w, ts, prompts, missing, folder, args.seed, args.batch)
        files = [png_path(folder, i) for i in range(len(prompts))]
        if metric is None:
            metric = fid_metric(device)
            add_images(metric, references, args.fid_size, real=True)
        clip = clip or load_clip(args.clip_model, device)
        rows.append({"model": os.path.basename(args.score.rstrip("/")), "steps": k,
                     "w": "-" if meta else ("default" if args.cfg is None else args.cfg), "images": len(files),
                     "CLIP score": clip_score_files(*clip, files, list(prompts)),
                     "FID": fid_against_reference(metric, files, args.fid_size)})
        save_row(args, rows[-1], len(references))
        print(tables.table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{len(prompts)} images per row; FID against {len(references)} images of {args.reference} at "
          f"{args.fid_size} px; CLIP score with {args.clip_model}; in {os.path.join(args.images, 'scores.json')}\n")
    print(tables.table(rows))
    return rows


# ---- a run's history: its kept checkpoints scored along training ---------------------------------------------------

def history_checkpoints(out):
    """{training step: checkpoint} of the run saved at `out`: the students it kept beside it (--keep-every; those of
    another run under the same name are left out) and `out` itself, its last."""
    from runs import kept_paths
    meta = lora.metadata(out)
    found = {s: p for s, p in kept_paths(out).items() if lora.metadata(p).get("run") == meta.get("run")}
    found[int(meta["step"])] = out
    return dict(sorted(found.items()))


def check_history(args):
    """Every mistake of a --history command in one line, before any model loads. Returns (the runs' teacher, M, the
    step counts, the metric, whether the teacher is the embedded layout)."""
    from local_cd import student_times
    from teachers import read_checkpoint
    metas, runs_ = [], args.history + [out for group in args.against or [] for out in group]
    for out in runs_:
        try:
            metas.append(read_checkpoint(out)[1])
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: --history: {e}") from None
    if len({m["teacher"] for m in metas}) > 1 or len({m["M"] for m in metas}) > 1:
        raise SystemExit("error: --history: the runs are of different teachers or M (" +
                         ", ".join(f"{o}: {m['teacher']}, M = {m['M']}" for o, m in zip(runs_, metas)) + ")")
    if args.labels and (len(args.labels) != 1 + len(args.against or []) or len(set(args.labels)) < len(args.labels)):
        raise SystemExit(f"error: --labels: {1 + len(args.against or [])} distinct names, one for --history's runs and "
                         f"one per --against, not {' / '.join(args.labels)}")
    teacher, M = metas[0]["teacher"], int(metas[0]["M"])
    steps = args.steps or [k for k in (1, 2, 3, 4) if k <= M]
    try:
        for k in steps:
            student_times(k, M)
    except ValueError as e:
        raise SystemExit(f"error: --steps: {e}") from None
    toy = embedded(teacher)
    metrics = [m for m, _ in (tables.TOY_METRICS if toy else REAL_METRICS)]
    metric = args.metric or metrics[0]
    if metric not in metrics:
        raise SystemExit(f"error: --metric {metric}: the {'embedded' if toy else 'real'} teacher's metrics are "
                         f"{' and '.join(metrics)}")
    if not toy:
        args.score, args.steps = args.history[0], steps
        check_score(args)  # --prompts, --reference, --images, the CLIP model, the FID packages
    return teacher, M, steps, metric, toy


def history_toy(out, steps, seed, per_prompt, net):
    """{(training step, k): {"FD", "alignment"}} of a run on the embedded teacher (the toy judge, per_prompt samples
    per digit, sampling seed `seed`: the run's training seed, as the tables sample), kept in
    <out stem>.history-scores.json as they are scored: an interrupted scoring continues."""
    cache = out.removesuffix(".safetensors") + ".history-scores.json"  # not .history.json: the figure's numbers
    run = lora.metadata(out).get("run")
    saved = read_json(cache, {})
    scores = saved.get("scores", {}) if saved.get("run") == run else {}  # a new run under the same name: anew
    found = {}
    for step, ckpt in history_checkpoints(out).items():
        for k in steps:
            key = f"{step} {k} {seed} {per_prompt}"
            if key not in scores:
                scores[key] = tables.score(*tables.sample(["--ckpt", ckpt], k, seed, per_prompt), net)
                with lora.atomic(cache) as tmp, open(tmp, "w") as f:
                    json.dump({"run": run, "scores": scores}, f, indent=0)
            found[step, k] = scores[key]
    return found


def history_real(args, out, steps, prompts):
    """{(training step, k): {"FID", "CLIP score"}} of a run on a real teacher: --score of each kept checkpoint into
    <images>/<run id>/step_<step>/ (resumable as --score is). A folder scored before is read back, not scored again,
    where its images are of this checkpoint, seed and prompts (generation.json) and its rows of this reference,
    FID size and CLIP model."""
    import copy
    found = {}
    for step, ckpt in history_checkpoints(out).items():
        a = copy.copy(args)
        a.score, a.steps = ckpt, steps
        a.images = os.path.join(args.images, lora.metadata(out).get("run", "run"), f"step_{step:06d}")
        rows = {int(k): r for k, r in read_json(os.path.join(a.images, "scores.json"), {}).items()}
        same = all(k in rows and read_json(os.path.join(a.images, f"{k}_steps", "generation.json")) ==
                   generation(a, k, prompts) and all(rows[k].get(f) == getattr(a, f) for f in
                                                      ("reference", "fid_size", "clip_model", "seed"))
                   for k in steps)
        if not same:
            rows = {r["steps"]: r for r in score_model(a)}
        found.update({(step, k): rows[k] for k in steps})
    return found


def history(args):
    """--history: every run's kept checkpoints scored at each step count; the table of the metric's mean over the
    runs (seeds) per training step, the best training step per step count, and the figure (a line per step count,
    error bars over the runs, the teacher as the reference line). With --against, the same for each other group of
    runs (e.g. the baseline's seeds) and a figure of all, a column of panels per step count, a line per group.
    Returns the rows (each with its group) and the best training steps of --history's runs."""
    teacher, M, steps, metric, toy = check_history(args)
    metrics = tables.TOY_METRICS if toy else REAL_METRICS
    against = args.against or []
    labels = args.labels or ["these runs"] + [f"against {i + 1}" if len(against) > 1 else "against"
                                              for i in range(len(against))]
    groups = dict(zip(labels, [args.history, *against]))
    rows, drawn, best = [], [], None
    for label, outs in groups.items():
        mine, best_k = history_rows(args, outs, steps, metric, toy, metrics, label if args.against else None)
        rows, best = rows + mine, best or best_k
        drawn += [r for r in mine if r["runs"] == len(outs)]  # the figure: the training steps every run has
    reference = None
    if toy:  # the teacher's own 25 steps, as many samples (another teacher of the embedded layout: its own scores)
        tables.TEACHER = teacher
        reference = tables.teacher_reference(tables.teacher_runs(tables.RUNS, teacher), False, tables.SEEDS,
                                             args.per_prompt)
    elif args.teacher_scores:
        tops = [max(read_json(f).values(), key=lambda r: r["steps"]) for f in args.teacher_scores]
        reference = {"label": f"teacher, {tops[0]['steps']} steps"}
        for m, _ in REAL_METRICS:
            reference[f"_{m}"], reference[f"_{m}_std"] = tables.mean_std([r[m] for r in tops])
    figure = args.figure or args.history[0].removesuffix(".safetensors") + ".history.png"
    runs_of = {label: f"{label} ({len(outs)} run{'s' * (len(outs) > 1)})" for label, outs in groups.items()}
    what = f"{len(groups)} groups of runs" if args.against else f"{len(args.history)} run(s)"
    try:
        tables.plot([{**r, "row": runs_of[r["group"]]} for r in drawn] if args.against else drawn, figure, reference,
                    metrics, title=f"{what} of {teacher}, M = {M}: the kept students", x="training step",
                    xlabel="training step (iterations)", by="k" if args.against else None)
        print(f"wrote {figure} and its numbers {figure.removesuffix('.png')}.json")
    except ImportError:
        print("(pip install matplotlib to draw the figure)")
    return rows, best


def history_rows(args, outs, steps, metric, toy, metrics, label):
    """--history's rows of one group of runs (mean and std over them per training step and step count), its table
    and best training steps, printed."""
    if toy:  # each run sampled with its training seed, as the tables sample
        net = tables.load_classifier()[0]
        scored = [history_toy(out, steps, int(lora.metadata(out).get("seed", 0)), args.per_prompt, net)
                  for out in outs]
    else:
        from teachers import prompt_file
        prompts = prompt_file(args.prompts)
        scored = [history_real(args, out, steps, prompts) for out in outs]
    at = sorted({s for run in scored for s, _ in run})
    rows = []
    for k in steps:
        for s in at:
            seen = [run[s, k] for run in scored if (s, k) in run]
            row = {"row": f"{k} step{'s' * (k > 1)}", "k": k, "training step": s, "runs": len(seen), "group": label}
            for m, _ in metrics:
                row[f"_{m}"], row[f"_{m}_std"] = tables.mean_std([r[m] for r in seen])
            rows.append(row)
    lower = metric in ("FD", "FID")
    print(f"\n{label + ': ' if label else ''}{metric} ({'lower' if lower else 'higher'} is better), mean over "
          f"{len(scored)} run(s) (+/- one std), by training step:")
    cell = {(r["training step"], r["k"]): f"{r[f'_{metric}']:.3f} +/- {r[f'_{metric}_std']:.3f}" for r in rows}
    print(tables.table([{"training step": s, **{f"{k} step{'s' * (k > 1)}": cell[s, k] for k in steps}} for s in at]))
    best = {}
    for k in steps:
        mine = [r for r in rows if r["k"] == k and r["runs"] == len(scored)]  # the steps every run has
        best[k] = (min if lower else max)(mine or [r for r in rows if r["k"] == k], key=lambda r: r[f"_{metric}"])
        print(f"best at {k} step{'s' * (k > 1)} by {metric}: training step {best[k]['training step']} ("
              f"{best[k][f'_{metric}']:.3f}); " + ", ".join(f"{m} {best[k][f'_{m}']:.3f}" for m, _ in metrics))
    return rows, best


# ---- preparing MSCOCO-2017 5K and MJHQ-5K: a prompts file and its reference images ----------------------------------

def one_line(caption):
    """A caption as every prompts file here holds it: each run of whitespace (newlines included) one space, none at
    the ends. One helper, so that --prepare-prompts --exclude matches what --prepare-coco / --prepare-mjhq wrote."""
    return " ".join(caption.split())


def coco_pairs(annotations, images):
    """(name, caption, image file) of every image of a COCO captions file (val2017: 5000), in ascending image id: the
    caption of lowest annotation id (COCO gives 5 or so), its whitespace, newlines included, made single spaces."""
    with open(annotations) as f:
        data = json.load(f)
    first = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        first.setdefault(a["image_id"], one_line(a["caption"]))
    pairs = []
    for im in sorted(data["images"], key=lambda im: im["id"]):
        if not first.get(im["id"]):
            raise SystemExit(f"error: {annotations}: image {im['id']} has no caption")
        pairs.append((f"{im['id']:012d}", first[im["id"]], os.path.join(images, im["file_name"])))
    return pairs


def mjhq_pairs(meta_data, images, per_category=500):
    """(name, prompt, image file) of MJHQ-5K as chosen here (the paper does not say which 5K): of each of MJHQ-30K's
    10 categories, the 500 image ids that sort first; meta_data.json maps id -> {category, prompt}, the images are
    <images>/<category>/<id>.jpg."""
    with open(meta_data) as f:
        meta = json.load(f)
    pairs = []
    for category in sorted({m["category"] for m in meta.values()}):
        ids = sorted(i for i, m in meta.items() if m["category"] == category)[:per_category]
        pairs += [(i, one_line(meta[i]["prompt"]), os.path.join(images, category, f"{i}.jpg")) for i in ids]
    return pairs


def prepare(pairs, out, size):
    """out/prompts.txt (line i: pair i's caption) and out/reference/<name>.png (center-cropped, bicubic to size)."""
    missing = [path for _, _, path in pairs if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f"error: {len(missing)} of the {len(pairs)} images are missing, e.g. {missing[0]}")
    empty = [name for name, caption, _ in pairs if not caption]
    if empty:
        raise SystemExit(f"error: {len(empty)} images have an empty caption, e.g. {empty[0]}")
    try:
        os.makedirs(os.path.join(out, "reference"), exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot write there ({e.strerror})") from None
    for name, _, path in tqdm(pairs, desc=f"{out}/reference"):
        write_png(read_image(path, size), os.path.join(out, "reference", f"{name}.png"))
    with lora.atomic(os.path.join(out, "prompts.txt")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(caption + "\n" for _, caption, _ in pairs)
    print(f"wrote {out}/prompts.txt ({len(pairs)} captions) and {len(pairs)} reference images of {size} x {size} "
          f"into {out}/reference")


# ---- the training prompts: every caption of COCO / JSONL / CSV / text files, one line each, deduplicated -------------

CAPTION_COLUMNS = ("caption", "prompt", "text")


def caption_column(where, columns, column):
    """--column if `columns` (a CSV header, a JSON object's keys) has it; without --column, the one of caption /
    prompt / text it has. Otherwise a one-line error that names the columns there are, so the user can pick one."""
    if column is None:
        found = [c for c in CAPTION_COLUMNS if c in columns]
        if len(found) == 1:
            return found[0]
        problem = f"{'none' if not found else 'more than one'} of the columns {' / '.join(CAPTION_COLUMNS)}"
    elif column in columns:
        return column
    else:
        problem = f"no column {column!r}"
    raise SystemExit(f"error: {where} has {problem}; its columns: {', '.join(map(str, columns)) or 'none'} "
                     "(say which with --column NAME)")


def coco_captions(path):
    """Every caption of a COCO captions file (captions_train2017.json: about 590K, five or so per image), in the
    file's order. The standard library parses no JSON stream, so the whole file is in memory while it is read."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}: line {e.lineno} is not JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise SystemExit(f"error: {path} is not UTF-8 text") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list) or not all(isinstance(a, dict) and isinstance(a.get("caption"), str)
                                                    for a in annotations):
        raise SystemExit(f'error: {path} is not a COCO captions file: a .json source needs an "annotations" list, '
                         'each item with a "caption"')
    return [a["caption"] for a in annotations]


def text_captions(path):
    """Each line of a UTF-8 text file, one caption per line. Split at line feeds only, as teachers.PromptFile splits
    (a carriage return before one is whitespace, which one_line removes)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: a byte-order mark is no caption
            except UnicodeDecodeError:
                raise SystemExit(f"error: {path}: line {n} is not UTF-8 text") from None
            yield text


def jsonl_captions(path, column):
    """The `column` field of each object of a JSON Lines file (blank lines skipped; null is an empty caption).
    Without --column the first object's keys choose it, and every later object must have it too."""
    for n, line in enumerate(text_captions(path), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}: line {n} is not JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise SystemExit(f"error: {path}: line {n} is not a JSON object")
        column = caption_column(f"{path} line {n}", list(item), column)
        if not isinstance(item[column], (str, type(None))):
            raise SystemExit(f"error: {path}: line {n}: {column!r} is not a string")
        yield item[column] or ""


def csv_captions(path, column):
    """The `column` field of each row of a CSV file whose first row is its header. Always comma-separated (no
    guessing: a file with another delimiter fails on its header, with its one column named); quoted fields, as
    spreadsheets and Python's csv module write them, may hold commas and newlines. Blank lines are skipped."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": the csv module handles line ends itself
        rows = csv.reader(f)
        try:
            header = next(rows, None)
            if header is None:
                raise SystemExit(f"error: {path} is empty: a .csv source starts with a header row")
            i = header.index(caption_column(path, header, column))
            for row in rows:
                if not row:  # a blank line
                    continue
                if i >= len(row):
                    raise SystemExit(f"error: {path}: line {rows.line_num} has {len(row)} fields, too few for "
                                     f"{header[i]!r}")
                yield row[i]
        except csv.Error as e:
            raise SystemExit(f"error: {path}: line {rows.line_num} is not CSV ({e})") from None
        except UnicodeDecodeError:  # decoded a block at a time: the bad byte is somewhere past the last line read
            raise SystemExit(f"error: {path} is not UTF-8 text (on line {rows.line_num + 1} or later)") from None


def training_captions(sources, excluded):
    """The captions of `sources` ((path, iterable of captions) pairs), each made one line (one_line), in order,
    without the empty ones, those in the set `excluded`, and repeats (of one kept before, compared after one_line).
    Returns the kept captions, the captions read per source ([(path, count)]) and the counts dropped. An excluded
    caption counts as excluded each time it comes, never as a duplicate: read = kept + duplicates + excluded + empty.
    Memory: the kept captions, once (a dict is the set that keeps their order)."""
    kept, read, dropped = {}, [], {"duplicates": 0, "excluded": 0, "empty": 0}
    for path, captions in sources:
        n = 0
        for n, caption in enumerate(captions, 1):
            caption = one_line(caption)
            if "\0" in caption:  # teachers.PromptFile refuses a file with one
                raise SystemExit(f"error: {path}: caption {n} holds a NUL character")
            if not caption:
                dropped["empty"] += 1
            elif caption in excluded:
                dropped["excluded"] += 1
            elif caption in kept:
                dropped["duplicates"] += 1
            else:
                kept[caption] = None
        read.append((path, n))
    return list(kept), read, dropped


def prepare_prompts(sources, column, excludes, out):
    """--prepare-prompts: the captions of `sources` (training_captions) into the prompts file `out`, one per line,
    without those of the `excludes` files. Every mistake is one line before anything is written."""
    if not out:
        raise SystemExit("error: --prepare-prompts needs --out FILE (e.g. --out prompts.txt)")
    if os.path.isdir(out):
        raise SystemExit(f"error: --out {out} is a folder; --prepare-prompts writes a file (e.g. --out prompts.txt)")
    for path in sources + excludes:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} {'is not a file' if os.path.exists(path) else 'does not exist'}")
        if os.path.realpath(path) == os.path.realpath(out):
            raise SystemExit(f"error: --out {out} is also a source or an --exclude file (it would be overwritten)")
    kinds = {".json": ("COCO captions", coco_captions), ".jsonl": ("JSON Lines", lambda p: jsonl_captions(p, column)),
             ".csv": ("CSV", lambda p: csv_captions(p, column))}
    kind = {p: kinds.get(os.path.splitext(p)[1].lower(), ("text, one per line", text_captions)) for p in sources}
    try:
        excluded = {one_line(c) for path in excludes for c in text_captions(path)} - {""}
        kept, read, dropped = training_captions(((p, kind[p][1](p)) for p in sources), excluded)
    except OSError as e:
        raise SystemExit(f"error: cannot read {e.filename} ({e.strerror})") from None
    total = sum(n for _, n in read)
    if not kept:
        raise SystemExit(f"error: no caption left to write: of {total} read, {dropped['duplicates']} duplicates, "
                         f"{dropped['excluded']} excluded, {dropped['empty']} empty")
    try:
        with lora.atomic(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(caption + "\n" for caption in kept)
    except OSError as e:
        raise SystemExit(f"error: --out {out}: cannot write there ({e.strerror})") from None
    except UnicodeEncodeError as e:  # JSON can escape half a surrogate pair, which is no character
        raise SystemExit(f"error: a caption holds {e.object[e.start:e.end]!r}, which UTF-8 cannot write") from None
    for path, n in read:
        print(f"read {n} captions from {path} ({kind[path][0]})")
    if excludes:
        print(f"excluding the {len(excluded)} distinct captions of {', '.join(excludes)}")
    print(f"wrote {out}: {len(kept)} captions kept of {total} read; dropped {dropped['duplicates']} duplicates, "
          f"{dropped['excluded']} excluded, {dropped['empty']} empty")


def main(argv=None):
    from runs import Parser, count, weight
    p = Parser(description=__doc__, epilog=tables.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=["teacher", "cfg", "student", *tables.TABLES], help="which table to print")
    p.add_argument("--ckpt", default="local.safetensors", help="the student checkpoint of --table student")
    p.add_argument("--steps", type=count, nargs="+", default=None, help="step counts of --table student (default 8 4 "
                   "3 2) and of --score (default: 4 3 2 for a student, 25 for a teacher)")
    p.add_argument("--teacher", default="digits", help="an embedded-layout teacher (name or folder): of --table "
                   "teacher / cfg, and of the paper's tables (another teacher's trainings go to <--runs>/<its folder "
                   "name>/)")
    p.add_argument("--cfg", type=weight, default=None, help="w for --table teacher and --score TEACHER (default: the "
                   "teacher's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-prompt", type=int, default=100, help="samples per digit (1000 per row by default)")
    p.add_argument("--runs", default=tables.RUNS, help="where the paper's tables keep their trainings (reused when "
                   "finished)")
    p.add_argument("--quick", action="store_true", help="the paper's tables on 2-iteration trainings, 2 seeds and 40 "
                   "samples per row, into a temporary folder: checks the table's shape, not its numbers")
    p.add_argument("--jobs", type=int, default=1, help="the paper's tables: trainings and scorings at a time, each on "
                   "cores / jobs threads (2 on 2 cores: 1.35x faster, equal up to float rounding; 1 reproduces the "
                   "README pipeline's checkpoints bit for bit)")
    p.add_argument("--rows", nargs="+", default=None, metavar="TEXT", help="the paper's tables: only the rows whose "
                   "label contains one of these (e.g. \"LogCD (stage 1\"): to redo one row after a change")
    p.add_argument("--grids", default=None, help="the paper's tables: write each row's seed-0 sample grid into DIR")
    p.add_argument("--figure", default=None, help="the paper's tables: PNG of FD and alignment against steps; with "
                   "--plot-scores, of FID and CLIP score")
    p.add_argument("--clip-score", default=None, metavar="MODEL", help="CLIPModel hub id or folder: score --samples")
    p.add_argument("--samples", default=None, help="sample.py --save-tensors output (SDXL / FLUX) for --clip-score")
    p.add_argument("--train-classifier", action="store_true")
    p.add_argument("--history", nargs="+", default=None, metavar="OUT", help="score a run's kept students (its --out "
                   "and the *.step_N.safetensors --keep-every wrote beside it; several runs: seeds, error bars) at "
                   "--steps (default 1 2 3 4): the toy judge's FD and alignment; for real teachers --score's FID and "
                   "CLIP score (with --prompts, a subset, --reference, --images). A table, the best training step "
                   "per step count by --metric, and the figure (--figure, default <OUT>.history.png)")
    p.add_argument("--against", nargs="+", action="append", default=None, metavar="OUT", help="--history: another "
                   "group of runs (e.g. the baseline's seeds; may be given again), scored the same way: its table "
                   "too, and the figure of all the groups, a column of panels per step count, a line per group")
    p.add_argument("--labels", nargs="+", default=None, metavar="NAME", help="--history --against: the groups' "
                   "names in the tables and the figure, --history's first (default: these runs, against)")
    p.add_argument("--metric", default=None, help="--history: choose by FD or alignment (the embedded teacher; "
                   "default FD), FID or 'CLIP score' (default FID)")
    p.add_argument("--curves", nargs="+", default=None, metavar="LOG", help="a training run's metrics log(s), "
                   "<out>.log.jsonl: draws the loss curves into <out>.loss.png (needs matplotlib)")
    p.add_argument("--replot", default=None, metavar="JSON", help="draws a --figure again from the numbers written "
                   "beside it (into --figure, default the PNG of the same name; needs matplotlib)")
    g = p.add_argument_group("the paper's Table 1 for real teachers (SDXL / FLUX), and their training prompts: --score "
                             "and --prepare-*")
    g.add_argument("--score", default=None, metavar="MODEL", help="a student checkpoint (X.safetensors) or a teacher "
                   "(sdxl, flux, a folder or hub id): one image per --prompts line at each --steps, into --images, "
                   "then their FID against --reference and their CLIP score")
    g.add_argument("--prompts", default=None, help="--score: the prompts file (one caption per line)")
    g.add_argument("--reference", default=None, help="--score: the folder of reference images for the FID")
    g.add_argument("--images", default=None, help="--score: where <k>_steps/<index>.png go (the PNGs already there "
                   "are kept: an interrupted run continues) and scores.json")
    g.add_argument("--clip-model", default="openai/clip-vit-large-patch14", help="--score: CLIPModel hub id or folder")
    g.add_argument("--batch", type=count, default=4, help="--score: images per model call")
    g.add_argument("--fid-size", type=count, default=512, help="--score, --prepare-coco / -mjhq: images are "
                   "center-cropped and resized to this size (PIL bicubic) before the FID network (which resizes to "
                   "299 itself)")
    g.add_argument("--resolution", type=count, default=1024, help="--score TEACHER: image size in pixels (a student's "
                   "is in its checkpoint)")
    g.add_argument("--device", default=None, help="--score: default cuda if available, else cpu")
    g.add_argument("--prepare-coco", nargs=2, metavar=("CAPTIONS_JSON", "IMAGES"), help="writes --out/prompts.txt and "
                   "--out/reference/ from captions_val2017.json and the val2017/ folder (MSCOCO-2017 5K)")
    g.add_argument("--prepare-mjhq", nargs=2, metavar=("META_DATA_JSON", "IMAGES"), help="the same from MJHQ-30K's "
                   "meta_data.json and its image folder: MJHQ-5K, 500 per category")
    g.add_argument("--prepare-prompts", nargs="+", metavar="SOURCE", help="writes the training prompts file --out: "
                   "every caption of the SOURCEs (.json: a COCO captions file, all its captions; .jsonl and .csv with "
                   "a header row: the field --column; anything else: text, one caption per line), whitespace made "
                   "single spaces, empty ones and repeats dropped, and those of --exclude")
    g.add_argument("--column", default=None, help="--prepare-prompts: the caption's field in .jsonl / .csv sources "
                   "(default: whichever one of caption, prompt, text the file has)")
    g.add_argument("--exclude", nargs="+", action="extend", default=None, metavar="FILE", help="--prepare-prompts: "
                   "captions never written, one per line: the scored ones (coco5k/prompts.txt), so none is trained on")
    g.add_argument("--out", default=None, help="--prepare-coco / -mjhq: the folder to write; --prepare-prompts: the "
                   "file")
    g.add_argument("--plot-scores", nargs="+", default=None, metavar="SCORES_JSON", help="--score's scores.json files "
                   "(several seeds of one model are averaged): FID and CLIP score against steps into --figure")
    g.add_argument("--teacher-scores", nargs="+", default=None, metavar="SCORES_JSON", help="--plot-scores: the "
                   "teacher's scores.json (its row of most steps is the reference line)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be 1 or more, got {args.jobs}")
    if (args.against or args.labels) and not args.history:
        raise SystemExit("error: --against and --labels go with --history")
    if args.train_classifier:
        tables.train_classifier()
    for path in (args.curves or []) + [args.replot] * bool(args.replot):
        if not os.path.isfile(path):
            raise SystemExit(f"error: {path} does not exist")
    try:
        for log in args.curves or ():
            print(f"wrote {plot_log(log)}")
        if args.replot:
            print(f"wrote {tables.replot(args.replot, args.figure)}")
    except ImportError:
        raise SystemExit("error: --curves and --replot draw with matplotlib: pip install matplotlib") from None
    if args.prepare_prompts:
        if args.prepare_coco or args.prepare_mjhq:
            raise SystemExit("error: --prepare-prompts writes a file and --prepare-coco / -mjhq a folder, both --out: "
                             "run them one at a time")
        return prepare_prompts(args.prepare_prompts, args.column, args.exclude or [], args.out)
    if args.prepare_coco or args.prepare_mjhq:
        if not args.out:
            raise SystemExit("error: --prepare-coco / --prepare-mjhq need --out DIR")
        try:
            pairs = coco_pairs(*args.prepare_coco) if args.prepare_coco else mjhq_pairs(*args.prepare_mjhq)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            what = "a COCO captions file" if args.prepare_coco else "MJHQ-30K's meta_data.json"
            raise SystemExit(f"error: cannot read {(args.prepare_coco or args.prepare_mjhq)[0]} as {what} "
                             f"({type(e).__name__}: {e})") from None
        return prepare(pairs, args.out, args.fid_size)
    if args.history:
        return history(args)
    if args.score:
        return score_model(args)
    if args.plot_scores:
        for path in args.plot_scores + (args.teacher_scores or []):
            if not os.path.isfile(path):
                raise SystemExit(f"error: {path} does not exist (eval.py --score writes <images>/scores.json)")
        print(f"wrote {scores_figure(args.plot_scores, args.teacher_scores, args.figure or 'scores.png')}")
        return None
    if args.clip_score:
        if not args.samples or not os.path.exists(args.samples):
            raise SystemExit("error: --clip-score needs --samples FILE (python sample.py ... --save-tensors FILE)")
        cs = clip_score_file(args.clip_score, args.samples)
        print(f"CLIP score {cs:.2f} ({args.samples}, {args.clip_score})")
        return cs
    if not args.table:
        return
    if args.table in tables.TABLES:
        return tables.print_paper_table(args)
    if args.rows:
        raise SystemExit(f"error: --rows picks rows of the paper's tables ({', '.join(tables.TABLES)}), not of "
                         f"--table {args.table}")
    return tables.print_sampling_table(args)


if __name__ == "__main__":
    main()
