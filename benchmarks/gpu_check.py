"""One prepared device check: the CUDA paths proven (correctness first), then timed, into one JSON.

    python benchmarks/gpu_check.py --device cuda --out gpu_check.json          # <= 8 min on one H100/H200
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/check.json  # tiny sizes, the suite runs it

Correctness (one PASS/FAIL line each; fixed random weights, real photos):
  * cfcd_r50, dolg_r50, gem_efficientnet_lite2: fp32 on the device (TF32 off) and fp32 channels_last equal
    the CPU fp32 descriptors (cosine >= 0.99999); bf16 autocast + channels_last within cosine >= 0.999;
  * multi-scale extraction (5 CFCD scales): the fast batched path equals the reference path on the device;
  * a MadaCos step of the real Trainer on the device (fp32; and bf16 autocast + channels_last) against a
    plain fp32 CPU step from the same weights: loss and gradients within the stated tolerances;
  * exact search on the device returns the CPU (NumPy full-matrix) top-100;
  * ``torchrun --nproc_per_node 1 -m cfcd extract`` writes the same store as ``python -m cfcd extract``.
Speed (each figure with its reference path from the same run, and the ratio):
  * CFCD-R50/R101 extraction, 5 scales, 1024x768 JPEGs from disk, decoding included: the reference
    procedure (fp32, batch 1, CPU resizing, decoding on the main thread) against ours (bf16, batched by
    size, channels_last, pinned memory, decoding workers; ``--compile`` adds a torch.compile run), plus
    the decoding alone with the same workers (the CPU-side ceiling);
  * stage-1 training, CFCD-R50 at 512x512 from JPEG files: plain fp32 loop against the Trainer;
  * exact search, 70 queries over 1M x 512 float16 on the device against the NumPy reference on the
    CPU; FAISS IVF-PQ on the GPU when this faiss build has GPU support.

On the CPU (``--device cpu``) the "device" paths run on the CPU too, in the layouts the GPU uses
(channels_last, bf16 autocast, batches): so the script is tested by the suite and cannot rot.

Robustness: every section runs in its own try/except with a time limit (SIGALRM) and records FAIL
with the error; the JSON is rewritten after every section; speed sections are skipped when the global
budget (``--budget``, 480 s) would be exceeded; the exit code is 1 if any line FAILed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(SRC))

# Every figure the JSON holds (None, with a reason in "notes", when a section was skipped or is unavailable).
FIGURES = (
    "extract.cfcd_r50.reference_img_s", "extract.cfcd_r50.ours_img_s", "extract.cfcd_r50.speedup",
    "extract.cfcd_r50.decode_only_img_s", "extract.cfcd_r50.min_cosine",
    "extract.cfcd_r101.reference_img_s", "extract.cfcd_r101.ours_img_s", "extract.cfcd_r101.speedup",
    "extract.cfcd_r101.decode_only_img_s", "extract.cfcd_r101.min_cosine",
    "train.cfcd_r50.plain_img_s", "train.cfcd_r50.ours_img_s", "train.cfcd_r50.speedup",
    "search.exact.reference_ms", "search.exact.ours_ms", "search.exact.speedup",
    "search.ivfpq_gpu.ms", "search.ivfpq_gpu.recall_at_100",
)
OPTIONAL_FIGURES = ("search.ivfpq_gpu.ms", "search.ivfpq_gpu.recall_at_100")  # faiss without GPU: None
TARGETS = {"extract.cfcd_r50.ours_img_s": 500.0, "extract.cfcd_r101.ours_img_s": 300.0, "train.cfcd_r50.speedup": 3.0}

# bounds of the correctness lines
COS_FP32 = 0.99999
COS_BF16 = 0.999
COS_BF16_CPU = 0.995  # bf16 autocast on a CPU is emulated on most x86 parts, with other rounding
COS_EXTRACT_FP32 = 0.9999  # fast vs reference multi-scale: device resize vs cv2 (float32 vs double coordinates)
# one SGD step of a 50-layer net: bf16 autocast perturbs every gradient by ~1e-2 relative
TRAIN_TOL = {"fp32": {"loss_rel": 1e-4, "grad_cos": 0.9999, "weights_rel": 1e-5},
             "bf16": {"loss_rel": 2e-2, "grad_cos": 0.98, "weights_rel": 1e-2}}


@dataclass
class Sizes:
    model_px: int           # square input of the model checks
    extract_w: int
    extract_h: int
    extract_n: int          # images timed on our path
    extract_ref_n: int      # images timed on the reference path
    extract_batch: int
    train_px: int
    train_batch: int
    train_steps: int
    train_warmup: int
    train_images: int
    train_classes: int
    step_px: int            # the training-step check
    step_batch: int
    step_classes: int
    search_n: int
    search_dim: int
    search_nq: int
    search_reps: int
    torchrun_model: str
    torchrun_n: int


# extraction: 1024 files (256 distinct photos, hard-linked 4 times: the decode work per file is the same) so that
# worker start-up is small against the timed run; training: one epoch covers warm-up + timed steps (a new
# epoch restarts the DataLoader workers inside the timing).
FULL = Sizes(model_px=224, extract_w=1024, extract_h=768, extract_n=1024, extract_ref_n=16, extract_batch=32,
             train_px=512, train_batch=64, train_steps=15, train_warmup=3, train_images=1280, train_classes=81313,
             step_px=224, step_batch=16, step_classes=1000, search_n=1_000_000, search_dim=512, search_nq=70,
             search_reps=5, torchrun_model="cfcd_r50", torchrun_n=16)
QUICK = Sizes(model_px=64, extract_w=64, extract_h=48, extract_n=2, extract_ref_n=1, extract_batch=2,
              train_px=32, train_batch=4, train_steps=1, train_warmup=1, train_images=8, train_classes=100,
              step_px=48, step_batch=8, step_classes=100, search_n=20_000, search_dim=64, search_nq=70,
              search_reps=2, torchrun_model="gem_efficientnet_lite0", torchrun_n=3)


def _load_benchmark(name: str):
    """benchmarks/<name>.py as a module (its photo/JPEG generators and timed paths are reused)."""
    spec = importlib.util.spec_from_file_location(f"cfcd_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (a hung section must not eat the budget)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"timed out after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Run:
    """Collects PASS/FAIL lines, figures and notes; writes the JSON after every section."""

    def __init__(self, args, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.t0 = time.perf_counter()
        self.checks: list[dict] = []
        self.sections: list[dict] = []
        self.figures: dict[str, float | None] = {k: None for k in FIGURES}
        self.notes: dict[str, str] = {}
        self.env = environment(args.device)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def remaining(self) -> float:
        return self.args.budget - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def check(self, name: str, ok: bool, detail: str, **values) -> bool:
        status = "PASS" if ok else "FAIL"
        self.checks.append({"name": name, "status": status, "detail": detail, "values": _plain(values)})
        print(f"{status} {name}: {detail}", flush=True)
        return ok

    def figure(self, key: str, value: float | None, note: str | None = None) -> None:
        self.figures[key] = None if value is None else float(value)
        if note:
            self.notes[key] = note

    def section(self, name: str, fn, *, kind: str, need_s: float, limit_s: float) -> None:
        if kind in ("speed", "optional") and self.remaining() < need_s:
            reason = f"skipped: {self.remaining():.0f} s of the {self.args.budget:.0f} s budget left, needs ~{need_s:.0f} s"
            self.sections.append({"name": name, "status": "SKIP", "seconds": 0.0, "error": reason})
            self.log(f"SKIP {name}: {reason}")
            prefix = {"search_speed": "search"}.get(name, name) + "."
            for key in FIGURES:
                if key.startswith(prefix) and self.figures[key] is None:
                    self.notes.setdefault(key, reason)
            self.write()
            return
        self.log(f"--- {name} ({kind})")
        start, cpu_start = time.perf_counter(), _cpu_seconds()
        status, error = "OK", None
        try:
            with time_limit(min(limit_s, max(30.0, self.remaining() + 60.0)) if kind != "correctness" else limit_s):
                fn(self)
        except Exception as exc:  # noqa: BLE001 - one broken section never stops the others
            status, error = "FAIL", f"{type(exc).__name__}: {exc}"
            tb = traceback.format_exc(limit=8)
            if kind == "optional":  # e.g. torch.compile: reported, not a failed check
                status = "WARN"
                self.notes[name] = error
                self.log(f"WARN {name}: {error}")
            else:
                self.check(f"{name} (section)", False, error, traceback=tb[-3000:])
            print(tb, file=sys.stderr, flush=True)
        finally:
            self._release()
        seconds = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_start
        self.sections.append({"name": name, "status": status, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
                              "error": error})
        self.log(f"{name} done in {seconds:.1f} s ({cpu:.1f} CPU s incl. subprocesses)")
        self.write()

    def _release(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def result(self) -> dict:
        counts = {s: sum(c["status"] == s for c in self.checks) for s in ("PASS", "FAIL")}
        targets = {k: {"target": t, "measured": self.figures.get(k),
                       "met": None if self.figures.get(k) is None else bool(self.figures[k] >= t)}
                   for k, t in TARGETS.items()}
        return {
            "env": self.env,
            "args": vars(self.args),
            "sizes": vars(self.sizes),
            "checks": self.checks,
            "figures": self.figures,
            "notes": self.notes,
            "targets": targets,
            "sections": self.sections,
            "summary": {**counts, "skipped_sections": sum(s["status"] == "SKIP" for s in self.sections),
                        "elapsed_s": round(self.elapsed(), 1)},
        }

    def write(self) -> None:
        if self.args.out:
            from cfcd.utils.io import atomic_write_json

            atomic_write_json(self.args.out, self.result())


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": device, "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    for name in ("timm", "faiss", "PIL", "cv2", "numpy"):
        try:
            if name == "timm":
                from cfcd.models._compat import import_timm

                module = import_timm()
            else:
                module = __import__(name)
            env[name] = getattr(module, "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            env[name] = f"unavailable ({type(exc).__name__})"
    return env


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def min_cosine(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def strict_fp32():
    """No TF32 on the device while comparing fp32 paths (restored after)."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Context:
    """Shared inputs: generated JPEGs (1024x768 photos, training crops), real photos as tensors."""

    def __init__(self, args, sizes: Sizes, workdir: Path):
        self.args, self.sizes, self.workdir = args, sizes, workdir
        self.device = args.device
        self.cuda = args.device.startswith("cuda")
        self.workers = args.workers if args.workers is not None else (
            max(1, min(16, (os.cpu_count() or 2) - 2)) if self.cuda else 1)
        self._photos = None
        self._train_list = None

    def photo_files(self) -> Path:
        if self._photos is None:
            bench_extract = _load_benchmark("extract")
            s = self.sizes
            directory = self.workdir / f"photos_{s.extract_w}x{s.extract_h}"
            n = max(s.extract_n, s.torchrun_n, 8)
            distinct = min(n, 256)
            paths = bench_extract.make_photos(directory, distinct, s.extract_w, s.extract_h)
            for i in range(distinct, n):
                link = directory / f"photo_{i:05d}.jpg"
                if not link.exists():
                    try:
                        os.link(paths[i % distinct], link)
                    except OSError:
                        import shutil

                        shutil.copyfile(paths[i % distinct], link)
            self._photos = directory
        return self._photos

    def image_list(self, n: int):
        from cfcd.data.lists import read_image_list

        full = read_image_list(self.photo_files())
        keep = [i for i, image_id in enumerate(full.ids) if image_id.startswith("photo_")][:n]
        return full.subset(keep)

    def train_list(self) -> Path:
        if self._train_list is None:
            bench_train = _load_benchmark("train")
            s = self.sizes
            root = self.workdir / "train_jpegs"
            if not (root / "train_list.txt").is_file():
                bench_train.make_jpegs(root, s.train_images, min(s.train_classes, max(2, s.train_images // 4)))
            self._train_list = root / "train_list.txt"
        return self._train_list

    def model_batch(self, preprocess, n: int = 2):
        """``n`` real photos, square-resized to the check size, normalised for the model (RGB decode)."""
        import cv2
        import torch
        from skimage import data

        px = self.sizes.model_px
        photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()][:n]
        x = np.stack([cv2.resize(p[..., :3], (px, px), interpolation=cv2.INTER_AREA) for p in photos])
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
        return preprocess(x).contiguous()


_FIXED: dict = {}


def fixed_model(name: str, seed: int = 0):
    """A registered model with fixed random weights (no embedded/pretrained weights) and non-trivial BN stats;
    a fresh copy each call (built once)."""
    if (name, seed) not in _FIXED:
        _FIXED[(name, seed)] = _build_fixed_model(name, seed)
    return copy.deepcopy(_FIXED[(name, seed)])


def _build_fixed_model(name: str, seed: int):
    import torch

    import cfcd.models

    torch.manual_seed(seed)
    model = cfcd.models.create(name, pretrained=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 0.5 + 0.75)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# correctness


def check_models(run: Run, ctx: Context) -> None:
    import torch

    dev = torch.device(ctx.device)
    for name in ("cfcd_r50", "dolg_r50", "gem_efficientnet_lite2"):
        model = fixed_model(name)
        x = ctx.model_batch(model.preprocess)
        with torch.no_grad():
            reference = model(x).numpy()  # CPU, fp32, NCHW: the reference
            on_device = copy.deepcopy(model).to(dev)
            xd = x.to(dev)
            with strict_fp32():
                fp32 = on_device(xd).cpu().numpy()
                on_device = on_device.to(memory_format=torch.channels_last)
                xcl = xd.contiguous(memory_format=torch.channels_last)
                fp32_cl = on_device(xcl).cpu().numpy()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                bf16 = on_device(xcl).float().cpu().numpy()
        where = f"{dev.type} fp32"
        c = min_cosine(fp32, reference)
        run.check(f"model {name} {where} == CPU fp32", c >= COS_FP32, f"min cosine {c:.7f} (>= {COS_FP32})", cosine=c)
        c = min_cosine(fp32_cl, reference)
        run.check(f"model {name} {where} channels_last == CPU fp32", c >= COS_FP32,
                  f"min cosine {c:.7f} (>= {COS_FP32})", cosine=c)
        c = min_cosine(bf16, reference)
        bound = COS_BF16 if ctx.cuda else COS_BF16_CPU
        run.check(f"model {name} {dev.type} bf16 autocast channels_last ~ CPU fp32", c >= bound,
                  f"min cosine {c:.6f} (>= {bound})", cosine=c)
        del model, on_device


def check_multiscale(run: Run, ctx: Context) -> None:
    import torch

    from cfcd.data.images import load_image
    from cfcd.extract import ExtractOptions, Extractor, describe_batch, parse_scales
    from cfcd.extract.describe import normalisation_tensors

    recipe = parse_scales("cfcd")
    images = ctx.image_list(8 if ctx.cuda else 2)
    model = fixed_model("cfcd_r50")
    common = dict(scales=recipe, device=ctx.device, workers=min(ctx.workers, 4), progress=False)
    with strict_fp32():
        naive, failures, _ = Extractor(model, ExtractOptions(**common, mode="naive", batch_size=1)).extract(images)
    assert not failures, failures
    for precision, bound in (("fp32", COS_EXTRACT_FP32), ("bf16", COS_BF16 if ctx.cuda else COS_BF16_CPU)):
        with strict_fp32():
            fast, failures, _ = Extractor(model, ExtractOptions(**common, precision=precision, batch_size=4)).extract(images)
        assert not failures, failures
        c = min_cosine(fast, naive)
        run.check(f"multi-scale fast {precision} == reference ({ctx.device}, {len(images)} images, 5 scales)",
                  c >= bound, f"min cosine {c:.7f} (>= {bound})", cosine=c)
    if not ctx.cuda:
        # the Extractor uses channels_last on CUDA only: run describe_batch in that layout on the CPU too
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        mean, std = normalisation_tensors(model.preprocess, torch.device("cpu"))
        arrays = [load_image(p, channel_order=model.preprocess.channel_order) for p in images.paths[:2]]
        batch = torch.from_numpy(np.stack(arrays))
        with torch.inference_mode():
            cl = describe_batch(model_cl, batch, recipe, mean=mean, std=std, precision="bf16", channels_last=True)
        c = min_cosine(cl.numpy(), naive[:2])
        run.check("multi-scale describe_batch bf16 channels_last (cpu) ~ reference", c >= COS_BF16_CPU,
                  f"min cosine {c:.6f} (>= {COS_BF16_CPU})", cosine=c)


def _train_config(ctx: Context, out_dir: Path, amp: str) -> dict:
    from cfcd.train.config import load_config

    s = ctx.sizes
    lst = ctx.train_list()
    return load_config(None, {
        "name": "gpu_check_step", "model": {"name": "cfcd_r50"},
        "loss": {"global": "madacos", "num_classes": s.step_classes},
        "data": {"root": str(lst.parent), "train_list": str(lst), "im_size": s.step_px, "workers": 0, "val_list": None},
        "optim": {"lr": 0.01, "warmup_epochs": 0},
        "train": {"global_batch": s.step_batch, "micro_batch": s.step_batch, "seed": 0, "out_dir": str(out_dir),
                  "amp": amp, "channels_last": True, "tensorboard": False, "progress": False},
    })


def check_train_step(run: Run, ctx: Context) -> None:
    """The Trainer's step on the device vs a plain fp32 CPU step (the reference loop) from the same weights."""
    import torch
    import torch.nn.functional as F

    from cfcd.train.data import collate
    from cfcd.train.trainer import Trainer

    s = ctx.sizes
    for amp, tol in (("none", TRAIN_TOL["fp32"]), ("bf16", TRAIN_TOL["bf16"])):
        label = "fp32" if amp == "none" else "bf16 autocast + channels_last"
        trainer = Trainer(_train_config(ctx, ctx.workdir / f"step_{amp}", amp), device=ctx.device, resume=False)
        trainer.build()
        if not ctx.cuda and amp == "bf16":
            # the Trainer enables bf16/channels_last on CUDA only; run its step in the CUDA layout on the CPU
            trainer.autocast_dtype = torch.bfloat16
            trainer.model.to(memory_format=torch.channels_last)
        ref_model = copy.deepcopy(trainer.model).cpu().float().to(memory_format=torch.contiguous_format).train()
        ref_head = copy.deepcopy(trainer.head).cpu().float().train()
        images, labels, _ = collate([trainer.dataset[i] for i in range(s.step_batch)])
        o = trainer.cfg.optim
        params = list(ref_model.parameters()) + list(ref_head.parameters())
        opt = torch.optim.SGD(params, lr=0.01, momentum=float(o.momentum), nesterov=bool(o.nesterov),
                              weight_decay=float(o.weight_decay))
        opt.zero_grad(set_to_none=True)
        ref_loss = F.cross_entropy(ref_head.logits(ref_model.forward_features(images)["global"], labels), labels)
        ref_loss.backward()
        opt.step()

        trainer.module.train()
        window_images = images.contiguous(memory_format=torch.channels_last) if amp == "bf16" else images
        with strict_fp32() if amp == "none" else contextlib.nullcontext():
            out = trainer.train_step([(window_images, labels)], 0.01)
        synchronize(ctx.device)
        ours_loss = float(out["loss"])
        ref_loss = ref_loss.detach()
        ref_g = torch.cat([p.grad.flatten() for p in ref_model.parameters() if p.grad is not None])
        ours_g = torch.cat([p.grad.float().cpu().flatten() for p in trainer.model.parameters() if p.grad is not None])
        grad_cos = float(F.cosine_similarity(ref_g.double(), ours_g.double(), dim=0))
        w_ref = torch.cat([p.detach().flatten() for p in ref_model.parameters()])
        w_ours = torch.cat([p.detach().float().cpu().flatten() for p in trainer.model.parameters()])
        update_rel = float((w_ours - w_ref).norm() / max(1e-12, float(w_ref.norm())))
        loss_rel = abs(ours_loss - float(ref_loss)) / max(1e-12, abs(float(ref_loss)))
        ok = loss_rel <= tol["loss_rel"] and grad_cos >= tol["grad_cos"] and update_rel <= tol["weights_rel"]
        run.check(f"train step MadaCos cfcd_r50 {ctx.device} {label} == plain fp32 CPU step", ok,
                  f"loss {ours_loss:.5f} vs {float(ref_loss):.5f} (rel {loss_rel:.1e} <= {tol['loss_rel']:.0e}), "
                  f"gradient cosine {grad_cos:.6f} (>= {tol['grad_cos']}), weights after the step rel diff {update_rel:.1e} "
                  f"(<= {tol['weights_rel']:.0e})",
                  loss=ours_loss, ref_loss=float(ref_loss), loss_rel=loss_rel, grad_cos=grad_cos,
                  weights_rel_diff=update_rel, tolerance=tol, batch=s.step_batch, size=s.step_px)
        trainer.close()
        del trainer, ref_model, ref_head


class SearchData:
    def __init__(self, sizes: Sizes):
        bench_search = _load_benchmark("search")
        clusters = max(10, sizes.search_n // 100)
        self.db32 = bench_search.generate(sizes.search_n, sizes.search_dim, clusters, seed=0)
        self.db16 = self.db32.astype(np.float16)
        self.queries = bench_search.generate_queries(sizes.search_nq, sizes.search_dim, clusters, 0.4)
        self.reference = None
        self.reference_s = None

    def numpy_reference(self, k: int = 100):
        """The plain path: the full nq x N float32 score matrix on the CPU, argpartition, sort."""
        if self.reference is None:
            start = time.perf_counter()
            scores = self.queries @ self.db16.astype(np.float32).T
            top = np.argpartition(-scores, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
            idx = np.take_along_axis(top, order, 1)
            self.reference_s = time.perf_counter() - start
            self.reference = (np.take_along_axis(scores, idx, 1), idx)
        return self.reference


_SEARCH: SearchData | None = None


def search_data(sizes: Sizes) -> SearchData:
    global _SEARCH
    if _SEARCH is None:
        _SEARCH = SearchData(sizes)
    return _SEARCH


def check_search(run: Run, ctx: Context) -> None:
    from cfcd.index import build_index

    data = search_data(ctx.sizes)
    ref_scores, ref_idx = data.numpy_reference()
    index = build_index(data.db16, "exact", device=ctx.device)
    res = index.search(data.queries, 100)
    same, tied = 0, 0
    for qi in range(len(data.queries)):
        a, b = set(res.indices[qi].tolist()), set(ref_idx[qi].tolist())
        if a == b:
            same += 1
            continue
        # a differing neighbour must be a tie at the 100th score (float rounding of equal products)
        kth = ref_scores[qi, -1]
        diff_scores = np.asarray(data.queries[qi] @ data.db16[list(a ^ b)].astype(np.float32).T)
        if np.all(np.abs(diff_scores - kth) <= 1e-5):
            tied += 1
    max_score_diff = float(np.abs(res.scores - ref_scores).max())
    ok = same + tied == len(data.queries) and max_score_diff <= 1e-4
    run.check(f"exact search {ctx.device} top-100 == NumPy CPU ({ctx.sizes.search_n} x {ctx.sizes.search_dim} float16, "
              f"{len(data.queries)} queries)", ok,
              f"{same} identical, {tied} differ only by ties at the 100th score; max score diff {max_score_diff:.1e}",
              identical=same, ties=tied, max_score_diff=max_score_diff)


def check_torchrun(run: Run, ctx: Context) -> None:
    """``torchrun --nproc_per_node 1 -m cfcd extract`` == the plain in-process ``extract_to_store`` (same
    weights file, images and options)."""
    import cfcd.models
    from cfcd.extract import ExtractOptions, extract_to_store, parse_scales
    from cfcd.store import open_store

    s = ctx.sizes
    weights = ctx.workdir / "torchrun_weights"
    if not (weights / "config.json").is_file():
        cfcd.models.save_weights(fixed_model(s.torchrun_model), weights)
    image_list = ctx.image_list(s.torchrun_n)
    root = ctx.photo_files()
    listing = ctx.workdir / "torchrun_images.txt"
    listing.write_text("".join(f"{Path(p).relative_to(root)}\n" for p in image_list.paths))
    scales = "cfcd" if ctx.cuda else "single"
    workers = min(ctx.workers, 4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": str(ctx.args.threads or os.environ.get("OMP_NUM_THREADS", "2"))}
    out = ctx.workdir / "store_torchrun"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               "-m", "cfcd", "extract", "--model", s.torchrun_model, "--weights", str(weights), "--images", str(listing),
               "--root", str(root), "--device", ctx.device, "--precision", "fp32", "--workers", str(workers),
               "--scales", scales, "--no-cudnn-benchmark", "--no-progress", "--overwrite", "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=ctx.args.torchrun_timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun extraction failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
    run.log(f"torchrun cfcd extract: {time.perf_counter() - start:.1f} s")
    from cfcd.data.lists import read_image_list

    plain_out = ctx.workdir / "store_plain"
    model = cfcd.models.create(s.torchrun_model, weights=weights)
    from cfcd.cli.extract import default_crop_rule

    options = ExtractOptions(scales=parse_scales(scales), device=ctx.device, precision="fp32", workers=workers,
                             progress=False, crop_rule=default_crop_rule(s.torchrun_model), cudnn_benchmark=False)
    extract_to_store(model, read_image_list(listing, root=root), plain_out, options, weights=weights, overwrite=True,
                     log=run.log)
    a, b = open_store(plain_out), open_store(out)
    same_ids = list(a.ids) == list(b.ids)
    diff = float(np.abs(np.asarray(a.descriptors, np.float32) - np.asarray(b.descriptors, np.float32)).max()) if same_ids else float("inf")
    cos = min_cosine(a.descriptors, b.descriptors) if same_ids else float("nan")
    bound = COS_FP32 if not ctx.cuda else COS_EXTRACT_FP32  # two processes may pick other (TF32) conv kernels
    run.check(f"torchrun 1 process extract == plain extract ({s.torchrun_model}, {len(a.ids)} images, {ctx.device})",
              same_ids and cos >= bound and len(a.ids) == s.torchrun_n,
              f"same ids in order: {same_ids}, min cosine {cos:.7f} (>= {bound}), max abs diff {diff:.1e}",
              max_abs_diff=diff, cosine=cos)


# ------------------------------------------------------------------------------------------------
# speed


def decode_only(image_list, workers: int, channel_order: str) -> float:
    """images/s of the extraction's decoding alone (same DataLoader workers, no model): the CPU ceiling."""
    import torch

    from cfcd.extract.engine import DecodeDataset, _identity

    dataset = DecodeDataset(image_list, list(range(len(image_list))), {"channel_order": channel_order})
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                                         prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    count = sum(1 for _, tensor, _, _ in loader if tensor is not None)
    return count / (time.perf_counter() - start)


def speed_extract(run: Run, ctx: Context, name: str) -> None:
    import torch

    from cfcd.extract import ExtractOptions, Extractor, parse_scales

    s = ctx.sizes
    recipe = parse_scales("cfcd")
    model = fixed_model(name)
    full = ctx.image_list(s.extract_n)
    ref_list = full.subset(range(min(s.extract_ref_n, len(full))))
    key = f"extract.{name}"

    def timed(options, image_list, warm_list):
        extractor = Extractor(model, options)
        extractor.extract(warm_list)  # cuDNN autotuning of every shape, allocator, page cache: not timed
        synchronize(ctx.device)
        start = time.perf_counter()
        rows, failures, _ = extractor.extract(image_list)
        synchronize(ctx.device)
        if failures:
            raise RuntimeError(f"failures: {failures[:3]}")
        return rows, time.perf_counter() - start

    ref_rows, ref_s = timed(ExtractOptions(scales=recipe, device=ctx.device, mode="naive", precision="fp32",
                                           batch_size=1, workers=0, progress=False), ref_list, ref_list.subset([0]))
    ref_rate = len(ref_list) / ref_s
    run.figure(f"{key}.reference_img_s", ref_rate)
    run.log(f"{name} reference (fp32, batch 1): {ref_rate:.2f} img/s over {len(ref_list)} images")
    # bf16 on the GPU; fp32 on a CPU, where emulated bf16 is slow and the timing is only a smoke test
    precision = "bf16" if ctx.cuda else "fp32"
    ours = ExtractOptions(scales=recipe, device=ctx.device, precision=precision, batch_size=s.extract_batch,
                          workers=ctx.workers, progress=False)
    warm = full.subset(range(min(len(full), 4 * s.extract_batch)))
    rows, ours_s = timed(ours, full, warm)
    rate = len(full) / ours_s
    run.figure(f"{key}.ours_img_s", rate)
    run.figure(f"{key}.speedup", rate / ref_rate)
    cos = min_cosine(rows[: len(ref_list)], ref_rows)
    run.figure(f"{key}.min_cosine", cos)
    run.log(f"{name} ours ({precision}, batch {s.extract_batch}, {ctx.workers} workers): {rate:.1f} img/s, "
            f"{rate / ref_rate:.1f}x, min cosine {cos:.5f}")
    bound = COS_BF16 if precision == "bf16" else COS_EXTRACT_FP32
    run.check(f"extract speed run {name}: ours ~ reference on the timed images", cos >= bound,
              f"min cosine {cos:.6f} (>= {bound})", cosine=cos)
    dec = decode_only(full, ctx.workers, model.preprocess.channel_order)
    run.figure(f"{key}.decode_only_img_s", dec)
    run.log(f"{name} decoding alone ({ctx.workers} workers): {dec:.1f} img/s")
    if ctx.cuda:
        run.figure(f"{key}.max_mem_gib", torch.cuda.max_memory_allocated() / 2**30)
        torch.cuda.reset_peak_memory_stats()


def speed_train(run: Run, ctx: Context) -> None:
    bench_train = _load_benchmark("train")
    s = ctx.sizes
    lst = ctx.train_list()
    args = argparse.Namespace(model="cfcd_r50", device=ctx.device, size=s.train_px, batch=s.train_batch,
                              steps=s.train_steps, warmup=s.train_warmup, images=s.train_images,
                              workers=ctx.workers, num_classes=s.train_classes, amp="bf16", compile=False,
                              strict_fp32=False, root=lst.parent, list=lst)
    plain = bench_train.run_plain(args)
    run.figure("train.cfcd_r50.plain_img_s", plain["images_per_s"])
    run.log(f"train plain fp32: {plain['images_per_s']:.1f} img/s")
    ours = bench_train.run_trainer(args)
    run.figure("train.cfcd_r50.ours_img_s", ours["images_per_s"])
    run.figure("train.cfcd_r50.speedup", ours["images_per_s"] / plain["images_per_s"])
    run.log(f"train ours (Trainer, bf16, channels_last): {ours['images_per_s']:.1f} img/s, "
            f"{ours['images_per_s'] / plain['images_per_s']:.2f}x")
    for k in ("max_mem_gib",):
        if k in plain:
            run.figure(f"train.cfcd_r50.plain_{k}", plain[k])
        if k in ours:
            run.figure(f"train.cfcd_r50.ours_{k}", ours[k])


def speed_compile(run: Run, ctx: Context) -> None:
    """Optional (``--compile``): our extraction and training with torch.compile (compile time not timed)."""
    import torch

    from cfcd.extract import ExtractOptions, Extractor, parse_scales

    torch._dynamo.config.cache_size_limit = 64  # 2 orientations x 5 scales: shapes recompile (then go dynamic)
    s = ctx.sizes
    model = fixed_model("cfcd_r50")
    model.forward = torch.compile(model.forward)
    full = ctx.image_list(s.extract_n)
    extractor = Extractor(model, ExtractOptions(scales=parse_scales("cfcd"), device=ctx.device, precision="bf16",
                                                batch_size=s.extract_batch, workers=ctx.workers, progress=False))
    start = time.perf_counter()
    extractor.extract(full.subset(range(min(len(full), 4 * s.extract_batch))))
    run.log(f"torch.compile warm-up (compilation) {time.perf_counter() - start:.0f} s")
    synchronize(ctx.device)
    start = time.perf_counter()
    extractor.extract(full)
    synchronize(ctx.device)
    run.figure("extract.cfcd_r50.ours_compile_img_s", len(full) / (time.perf_counter() - start))
    run.log(f"cfcd_r50 extraction + torch.compile: {run.figures['extract.cfcd_r50.ours_compile_img_s']:.1f} img/s")
    bench_train = _load_benchmark("train")
    lst = ctx.train_list()
    args = argparse.Namespace(model="cfcd_r50", device=ctx.device, size=s.train_px, batch=s.train_batch,
                              steps=s.train_steps, warmup=s.train_warmup, images=s.train_images, workers=ctx.workers,
                              num_classes=s.train_classes, amp="bf16", compile=True, strict_fp32=False,
                              root=lst.parent, list=lst)
    run.figure("train.cfcd_r50.ours_compile_img_s", bench_train.run_trainer(args)["images_per_s"])


def speed_search(run: Run, ctx: Context) -> None:
    from cfcd.index import build_index, recall_at_k

    data = search_data(ctx.sizes)
    ref_scores, ref_idx = data.numpy_reference()
    index = build_index(data.db16, "exact", device=ctx.device)
    index.search(data.queries[:2], 100)  # upload the database to the device once (float16 stays half)
    times = []
    for _ in range(ctx.sizes.search_reps):
        synchronize(ctx.device)
        start = time.perf_counter()
        res = index.search(data.queries, 100)
        times.append(time.perf_counter() - start)
    ours = float(np.median(times))
    run.figure("search.exact.reference_ms", data.reference_s * 1e3)
    run.figure("search.exact.ours_ms", ours * 1e3)
    run.figure("search.exact.speedup", data.reference_s / ours)
    run.log(f"exact search {len(data.queries)} q x {ctx.sizes.search_n}: ours {ours * 1e3:.1f} ms, "
            f"NumPy CPU {data.reference_s * 1e3:.1f} ms")
    run.check("exact search speed run: results == reference", recall_at_k(res.indices, ref_idx, 100) >= 0.999,
              f"recall@100 {recall_at_k(res.indices, ref_idx, 100):.5f}")
    try:
        import faiss
    except ImportError:
        faiss = None
    if faiss is None or not hasattr(faiss, "StandardGpuResources") or not ctx.cuda:
        why = "faiss has no GPU support in this build (faiss-cpu)" if faiss is not None else "faiss is not installed"
        if not ctx.cuda:
            why = "CPU run"
        run.figure("search.ivfpq_gpu.ms", None, why)
        run.figure("search.ivfpq_gpu.recall_at_100", None, why)
        run.log(f"IVF-PQ on the GPU: unavailable ({why})")
        return
    d = ctx.sizes.search_dim
    resources = faiss.StandardGpuResources()
    config = faiss.GpuIndexIVFPQConfig()
    config.useFloat16LookupTables = True
    nlist = 1024
    gpu = faiss.GpuIndexIVFPQ(resources, d, nlist, 64, 8, faiss.METRIC_INNER_PRODUCT, config)
    rng = np.random.default_rng(0)
    sample = data.db32[rng.choice(len(data.db32), size=min(len(data.db32), 65536), replace=False)]
    start = time.perf_counter()
    gpu.train(np.ascontiguousarray(sample))
    gpu.add(np.ascontiguousarray(data.db32))
    build_s = time.perf_counter() - start
    gpu.nprobe = 16
    gpu.search(data.queries[:2], 100)
    start = time.perf_counter()
    _, idx = gpu.search(data.queries, 100)
    ms = (time.perf_counter() - start) * 1e3
    run.figure("search.ivfpq_gpu.ms", ms)
    run.figure("search.ivfpq_gpu.recall_at_100", recall_at_k(idx, ref_idx, 100))
    run.figure("search.ivfpq_gpu.build_s", build_s)
    run.log(f"IVF-PQ GPU nlist {nlist} m 64 nprobe 16: {ms:.2f} ms, recall@100 {run.figures['search.ivfpq_gpu.recall_at_100']:.3f}")


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (its tested CPU mode)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU mode of the suite)")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON with every figure (rewritten after each section)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; speed sections that do not fit are skipped")
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: CPUs - 2, at most 16, on CUDA)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (extraction and training; "
                        "CUDA only, last, an optional section whose failure is a warning)")
    parser.add_argument("--workdir", default=None, help="generated JPEGs etc. (default: a temporary directory)")
    parser.add_argument("--only", nargs="*", default=None, help="run these sections only (models, multiscale, "
                        "train_step, search, torchrun, extract.cfcd_r50, extract.cfcd_r101, train, search_speed, compile)")
    parser.add_argument("--torchrun-timeout", type=float, default=None, help="seconds per extraction subprocess")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.torchrun_timeout is None:
        args.torchrun_timeout = 90.0 if args.quick else 180.0

    import cv2
    import torch

    # Before any cv2 call: a DataLoader worker forked after cv2 has started its thread pool hangs in the
    # cv2.setNumThreads(1) of cfcd.train.data.worker_init (the pool's threads do not exist in the child).
    cv2.setNumThreads(1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("FAIL setup: --device cuda but CUDA is not available", flush=True)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    run = Run(args, sizes)
    run.log(f"gpu_check on {run.env.get('gpu', run.env['cpu'])}: torch {run.env['torch']}, CUDA {run.env['cuda']}, "
            f"{'quick' if args.quick else 'full'} sizes, budget {args.budget:.0f} s")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cfcd-gpu-check-")
        workdir = Path(tmp.name)
    else:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, sizes, workdir)
    quick = args.quick
    plan = [
        ("models", "correctness", lambda r: check_models(r, ctx), 0, 240),
        ("multiscale", "correctness", lambda r: check_multiscale(r, ctx), 0, 240),
        ("train_step", "correctness", lambda r: check_train_step(r, ctx), 0, 240),
        ("search", "correctness", lambda r: check_search(r, ctx), 0, 240),
        ("torchrun", "correctness", lambda r: check_torchrun(r, ctx), 0, 2 * args.torchrun_timeout + 30),
        ("extract.cfcd_r50", "speed", lambda r: speed_extract(r, ctx, "cfcd_r50"), 5 if quick else 60, 300),
        ("extract.cfcd_r101", "speed", lambda r: speed_extract(r, ctx, "cfcd_r101"), 5 if quick else 60, 300),
        ("train", "speed", lambda r: speed_train(r, ctx), 5 if quick else 75, 300),
        ("search_speed", "speed", lambda r: speed_search(r, ctx), 5 if quick else 30, 300),
    ]
    if args.compile and ctx.cuda:
        plan.append(("compile", "optional", lambda r: speed_compile(r, ctx), 150, 400))
    try:
        for name, kind, fn, need, limit in plan:
            if args.only is not None and name not in args.only:
                continue
            run.section(name, fn, kind=kind, need_s=need, limit_s=limit)
    finally:
        run.write()
        if tmp is not None:
            tmp.cleanup()
    result = run.result()
    print("\n== figures ==")
    for key, value in result["figures"].items():
        shown = "-" if value is None else f"{value:.4g}"
        print(f"  {key:42s} {shown}{'   (' + result['notes'][key] + ')' if key in result['notes'] else ''}")
    for key, t in result["targets"].items():
        print(f"  target {key}: >= {t['target']}: {'met' if t['met'] else ('not met' if t['met'] is False else 'not measured')}")
    summary = result["summary"]
    print(f"== {summary['PASS']} PASS, {summary['FAIL']} FAIL, {summary['skipped_sections']} sections skipped, "
          f"{summary['elapsed_s']} s; JSON: {args.out}", flush=True)
    return 1 if summary["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
