"""Train the emoji demo model: VQ tokenizer, then the CNN classifier, then the class-conditional GPT.

Data: `tools/emoji_data.py` (128 px renders of Noto Color Emoji, one class per base emoji).
Every phase trains on light augmentations of the renders (random shifts of up to 4 px and
scales 0.9-1.1, white fill), drawn on the GPU from a seeded generator.

- VQ: LlamaGen's VQModel at 8x downsampling (128 px -> 16 x 16 = 256 tokens), l2-normalised
  8-d codebook; loss L1 + L2 reconstruction + codebook + 0.25 * commitment, straight-through;
  codes unused for `--vq-reinit-every` steps are re-initialised to random encoder outputs.
- classifier (adsa_core/eval/classifier.py): cross-entropy with label smoothing on augmented renders,
  a fraction of them passed through the VQ (encode -> decode) so it also recognises the
  tokenizer's reconstructions, which is what generated images are.
- GPT: LlamaGen's Transformer (c2i) on the VQ codes of a bank of augmented renders, sampled
  class-balanced, labels dropped to `num_classes` with probability 0.1 (for CFG).
Finally: held-out metrics, a sweep of sampling settings scored by the classifier, a diagnostic
grid, and fp16 weights + config.json for adsa_core/assets/demo/.

Device run (the whole thing, ~8 minutes on one H200; the shipped model is this plus a second,
continuing run: see adsa_core/assets/demo/MODEL_CARD.md):
    PYTHONUNBUFFERED=1 python3 tools/train_demo.py --data .device-carry/emoji.npz --out $OUT
CPU smoke test (seconds, 32 px): add --tiny.
Assemble the shipped assets from a run's output folder (merges the GPT's parts), then the sample grid:
    python3 tools/train_demo.py --assemble OUTDIR adsa_core/assets/demo
    python3 tools/train_demo.py --sample-grid adsa_core/assets/demo --device cpu
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import emoji_data  # noqa: E402

from adsa_core.config import GPTConfig, VQConfig  # noqa: E402
from adsa_core.eval.classifier import ClassifierConfig, EmojiClassifier, load_classifier, save_classifier  # noqa: E402
from adsa_core.model.checkpoint import init_gpt_weights, load_gpt, load_vq  # noqa: E402
from adsa_core.model.llamagen import Transformer  # noqa: E402
from adsa_core.model.vq import VQModel  # noqa: E402
from adsa_core.reference import generate  # noqa: E402
from adsa_core.sampling import SamplingParams  # noqa: E402

PART_BYTES = 15 << 20  # files coming back from the device are limited to 16 MiB each


# ----------------------------------------------------------------------------- utilities

class Log:
    """Prints with elapsed time and keeps the lines for train_log.json."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        self.lines.append(line)

    def elapsed(self) -> float:
        return time.time() - self.t0


def cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine from `peak` down to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


class StepPlan:
    """A fixed number of steps, or (steps=None) as many as fit in `minutes`, measured after a few steps.

    Either way the count is fixed early, so the cosine schedule is a normal one; the count is
    printed so a run can be repeated with explicit `--*-steps`.
    """

    def __init__(self, steps: int | None, minutes: float, log: Log, name: str, probe: int = 40):
        self.total = steps if steps is not None else 10**9
        self.auto, self.minutes, self.log, self.name, self.probe = steps is None, minutes, log, name, probe
        self.t_start = time.time()
        self.t_probe = self.t_start

    def update(self, step: int) -> None:
        """Call after each step (device work is synchronised here only at the two probe steps)."""
        if not self.auto:
            return
        if step == self.probe // 4:  # the first steps include warm-up (cuDNN autotuning): skip them
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t_probe = time.time()
        elif step == self.probe:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            rate = (self.probe - self.probe // 4) / (time.time() - self.t_probe)
            spent = time.time() - self.t_start
            self.total = max(self.probe + 1, self.probe + int(rate * (self.minutes * 60 - spent)))
            self.auto = False
            self.log(f"{self.name}: {rate:.2f} steps/s -> {self.total} steps in {self.minutes} min")


class Meter:
    """Running means of scalar tensors without a host sync per step (read at print time)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.last: dict[str, float] = {}

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.n += 1

    def read(self) -> dict[str, float]:
        """Means since the last read (the previous means when nothing was added since)."""
        if self.n:
            self.last = {k: round(v.item() / self.n, 5) for k, v in self.sums.items()}
            self.sums, self.n = {}, 0
        return self.last


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def augment(x: torch.Tensor, gen: torch.Generator, shift_px: float = 4.0,
            scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Random shift (up to `shift_px` each way) and zoom, filling with white. x: (B, 3, H, W) in [-1, 1]."""
    B, _, H, W = x.shape
    dev = x.device
    s = torch.empty(B, device=dev).uniform_(scale[0], scale[1], generator=gen)
    t = torch.empty(B, 2, device=dev).uniform_(-shift_px, shift_px, generator=gen)
    t = t * torch.tensor([2.0 / W, 2.0 / H], device=dev)  # pixels -> normalised coordinates
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / s  # output point -> input point: (p - t) / s
    theta[:, :, 2] = -t / s[:, None]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # sample x - 1 with zero padding, so what comes from outside the image is white (+1)
    return F.grid_sample(x - 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1.0


def save_half(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float16) -> list[Path]:
    """{"model": state_dict} in fp16, split into parts under PART_BYTES each when larger.

    One file: `path`. Several: `path.part0`, `path.part1`, ... (see `merge_parts`).
    """
    sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
          for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    for old in path.parent.glob(path.name + ".part*"):
        old.unlink()
    if total <= PART_BYTES:
        torch.save({"model": sd}, path)
        return [path]
    if path.exists():
        path.unlink()
    parts: list[dict] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if size + nbytes > PART_BYTES and parts[-1]:
            parts.append({})
            size = 0
        parts[-1][k] = v
        size += nbytes
    out = []
    for i, p in enumerate(parts):
        out.append(path.with_name(f"{path.name}.part{i}"))
        torch.save({"model": p}, out[-1])
    return out


def merge_parts(path: Path) -> Path:
    """Join `path.part*` (from `save_half`) into `path`; a no-op when `path` exists already."""
    parts = sorted(path.parent.glob(path.name + ".part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not parts:
        return path
    sd: dict = {}
    for p in parts:
        sd.update(torch.load(p, map_location="cpu", weights_only=True)["model"])
    torch.save({"model": sd}, path)
    return path


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def image_grid(rows: list[torch.Tensor], size: int) -> Image.Image:
    """rows: each (n, 3, H, W) in [-1, 1] -> one PNG-able picture, `size` px per cell, white gaps."""
    n = max(r.shape[0] for r in rows)
    pad = 2
    canvas = np.full((len(rows) * (size + pad), n * (size + pad), 3), 255, np.uint8)
    for i, r in enumerate(rows):
        r = F.interpolate(r.float().clamp(-1, 1), size=(size, size), mode="area")
        r = ((r + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for j in range(r.shape[0]):
            canvas[i * (size + pad):i * (size + pad) + size, j * (size + pad):j * (size + pad) + size] = r[j]
    return Image.fromarray(canvas)


# ----------------------------------------------------------------------------- VQ

def vq_forward(vq: VQModel, x: torch.Tensor, beta: float = 0.25
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruction, codes (B, h, w), codebook loss, commitment loss (LlamaGen's VectorQuantizer)."""
    z = F.normalize(vq.encode_latent(x).float(), dim=1)  # (B, C, h, w)
    codebook = vq.quantize.codebook().float()  # (K, C), l2-normalised
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, C)
    codes = (zf @ codebook.t()).argmax(dim=1)  # nearest on the sphere = largest cosine
    zq = codebook[codes].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)  # (B, C, h, w)
    codebook_loss = F.mse_loss(zq, z.detach())
    commit_loss = beta * F.mse_loss(zq.detach(), z)
    zq = z + (zq - z).detach()  # straight-through
    recon = vq.decode_latent(zq)
    return recon, codes.view(z.shape[0], z.shape[2], z.shape[3]), codebook_loss, commit_loss


def train_vq(args, images: torch.Tensor, device: torch.device, log: Log, out: Path) -> tuple[VQModel, dict]:
    cfg = VQConfig(codebook_size=args.codebook_size, codebook_embed_dim=8, codebook_l2_norm=True,
                   encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4), z_channels=args.vq_z,
                   ch=args.vq_ch, num_res_blocks=2)
    torch.manual_seed(args.seed)
    vq = VQModel(cfg).to(device)
    if args.init_vq:
        vq = load_vq(cfg, args.init_vq, device)
        log(f"VQ: loaded {args.init_vq}")
    log(f"VQ: {n_params(vq) / 1e6:.2f}M parameters (encoder {n_params(vq.encoder) / 1e6:.2f}M, "
        f"decoder {n_params(vq.decoder) / 1e6:.2f}M), codebook {cfg.codebook_size} x 8")
    stats: dict = {"params": n_params(vq)}
    if args.vq_steps == 0:
        return vq.eval(), stats
    vq.train()
    opt = torch.optim.AdamW(vq.parameters(), lr=args.vq_lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = make_generator(device, args.seed + 1)
    plan = StepPlan(args.vq_steps, args.vq_minutes, log, "VQ")
    K = cfg.codebook_size
    usage = torch.zeros(K, device=device)
    meter, used_frac = Meter(), float("nan")
    step = 0
    t_save = time.time()
    while step < plan.total:
        lr = cosine_lr(step, plan.total, args.vq_lr, args.warmup)
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        idx = torch.randint(0, images.shape[0], (args.vq_batch,), device=device, generator=gen)
        x = augment(to_float(images[idx]), gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            recon, codes, cb_loss, commit_loss = vq_forward(vq, x)
        recon = recon.float()
        l1, l2 = (recon - x).abs().mean(), (recon - x).pow(2).mean()
        loss = l1 + l2 + cb_loss + commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        usage += torch.bincount(codes.flatten(), minlength=K)
        step += 1
        plan.update(step)
        if step % args.vq_reinit_every == 0:
            dead = (usage == 0).nonzero().flatten()
            used_frac = 1 - dead.numel() / K
            if dead.numel() and step < 0.9 * plan.total:
                # Re-seed dead codes with random (normalised) encoder outputs of this batch.
                with torch.no_grad():
                    z = F.normalize(vq.encode_latent(x[:16]).float(), dim=1)
                    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
                    pick = torch.randint(0, zf.shape[0], (dead.numel(),), device=device, generator=gen)
                    new = zf[pick] + 0.01 * torch.randn(dead.numel(), zf.shape[1], device=device, generator=gen)
                    vq.quantize.embedding.weight.data[dead] = new.to(vq.quantize.embedding.weight.dtype)
                    state = opt.state.get(vq.quantize.embedding.weight, {})
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in state:
                            state[key][dead] = 0
            usage.zero_()
        meter.add(l1=l1, l2=l2, codebook=cb_loss, commit=commit_loss)
        if step % args.print_every == 0 or step == plan.total:
            m = meter.read()
            log(f"VQ step {step}/{plan.total} lr {lr:.2e} l1 {m['l1']:.4f} l2 {m['l2']:.4f} "
                f"codebook {m['codebook']:.4f} commit {m['commit']:.4f} codes used (last window) {used_frac:.3f} "
                f"| {step * args.vq_batch / (time.time() - plan.t_start):.0f} img/s")
        if time.time() - t_save > args.save_every_s:
            save_half(vq, out / "vq.pt")
            t_save = time.time()
        if log.elapsed() > args.deadline_minutes * 60 * args.vq_deadline_frac:
            log(f"VQ: stopping at step {step}: time budget")
            break
    stats.update(steps=step, final={**meter.read(), "codes_used_last_window": round(used_frac, 4)})
    vq.eval()
    save_half(vq, out / "vq.pt")
    return vq, stats


@torch.no_grad()
def encode_codes(vq: VQModel, x: torch.Tensor) -> torch.Tensor:
    """Codes (B, h, w): the encoder under bf16 autocast on GPU, the nearest-code search in fp32
    (so codes match what `VQModel.encode` gives in fp32)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        z = vq.encode_latent(x)
    return vq.quantize.nearest(z.float())


@torch.no_grad()
def vq_roundtrip(vq: VQModel, x: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) -> (codes (B, h*w) int64, reconstructions clamped to [-1, 1])."""
    codes, recons = [], []
    for i in range(0, x.shape[0], batch):
        c = encode_codes(vq, x[i:i + batch])
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            r = vq.decode_code(c)
        codes.append(c.flatten(1))
        recons.append(r.float().clamp(-1, 1))
    return torch.cat(codes), torch.cat(recons)


# ----------------------------------------------------------------------------- classifier

def train_classifier(args, images: torch.Tensor, labels: torch.Tensor, num_classes: int, vq: VQModel,
                     device: torch.device, log: Log, out: Path) -> tuple[EmojiClassifier, dict]:
    torch.manual_seed(args.seed + 2)
    model = EmojiClassifier(ClassifierConfig(num_classes=num_classes, width=args.cls_width,
                                             image_size=args.image_size)).to(device)
    if args.init_cls:
        model = load_classifier(args.init_cls, device)
        log(f"classifier: loaded {args.init_cls}")
    log(f"classifier: {n_params(model) / 1e6:.2f}M parameters, features {model.config.feature_dim}")
    stats: dict = {"params": n_params(model)}
    if args.cls_steps == 0:
        return model.eval(), stats
    model.train()
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.cls_lr, betas=(0.9, 0.99))
    gen = make_generator(device, args.seed + 3)
    plan = StepPlan(args.cls_steps, args.cls_minutes, log, "classifier")
    step, meter = 0, Meter()
    while step < plan.total:
        lr = cosine_lr(step, plan.total, args.cls_lr, args.warmup, floor=0.02)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, images.shape[0], (args.cls_batch,), device=device, generator=gen)
        x = augment(to_float(images[idx]), gen)
        n_rec = int(args.cls_recon_frac * x.shape[0])
        if n_rec:
            x = torch.cat([vq_roundtrip(vq, x[:n_rec])[1], x[n_rec:]])
        y = labels[idx]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meter.add(loss=loss, acc=(logits.argmax(1) == y).float().mean())
        step += 1
        plan.update(step)
        if step % args.print_every == 0 or step == plan.total:
            m = meter.read()
            log(f"classifier step {step}/{plan.total} lr {lr:.2e} loss {m['loss']:.4f} train acc {m['acc']:.3f}")
        if log.elapsed() > args.deadline_minutes * 60 * args.cls_deadline_frac:
            log(f"classifier: stopping at step {step}: time budget")
            break
    model.eval()
    save_classifier(model, out / "classifier.pt")
    m = meter.read()
    stats.update(steps=step, final_loss=m.get("loss"), final_train_acc=m.get("acc"))
    return model, stats


@torch.no_grad()
def classify(model: EmojiClassifier, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Logits (B, num_classes) for images in [-1, 1]."""
    out = []
    for i in range(0, x.shape[0], batch):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            out.append(model(x[i:i + batch]).float())
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> dict:
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"top1": round((logits.argmax(1) == y).float().mean().item(), 4),
            "top5": round((top5 == y[:, None]).any(1).float().mean().item(), 4)}


# ----------------------------------------------------------------------------- GPT

def gpt_config(args, num_classes: int) -> GPTConfig:
    return GPTConfig(model_type="c2i", vocab_size=args.codebook_size, block_size=(args.image_size // 8) ** 2,
                     num_classes=num_classes,
                     class_dropout_prob=0.1, cls_token_num=1, dim=args.gpt_dim, n_layer=args.gpt_layers,
                     n_head=args.gpt_dim // 64 if args.gpt_dim >= 64 else 1)


@torch.no_grad()
def code_bank(vq: VQModel, images: torch.Tensor, n_aug: int, gen: torch.Generator, batch: int = 512
              ) -> torch.Tensor:
    """(n_aug * N, 256) int16 codes: the first copy un-augmented, the others random augmentations."""
    rounds = []
    for r in range(n_aug):
        codes = []
        for i in range(0, images.shape[0], batch):
            x = to_float(images[i:i + batch])
            if r:
                x = augment(x, gen)
            codes.append(encode_codes(vq, x).flatten(1).to(torch.int16))
        rounds.append(torch.cat(codes))
    return torch.cat(rounds)


def train_gpt(args, images: torch.Tensor, labels: torch.Tensor, num_classes: int, vq: VQModel,
              device: torch.device, log: Log, out: Path) -> tuple[Transformer, dict]:
    cfg = gpt_config(args, num_classes)
    torch.manual_seed(args.seed + 4)
    if args.init_gpt:
        model = load_gpt(cfg, args.init_gpt, device)
        log(f"GPT: loaded {args.init_gpt}")
    else:
        model = Transformer(cfg)
        init_gpt_weights(model)
        torch.nn.init.zeros_(model.output.weight)  # as LlamaGen: start from uniform predictions
        model = model.to(device)
    log(f"GPT: {n_params(model) / 1e6:.2f}M parameters (dim {cfg.dim}, {cfg.n_layer} layers, "
        f"{cfg.n_head} heads, vocab {cfg.vocab_size}, {cfg.num_classes} classes)")
    stats: dict = {"params": n_params(model), "config": cfg.to_dict()}
    if args.gpt_steps == 0:
        return model.eval(), stats
    gen = make_generator(device, args.seed + 5)
    t0 = time.time()
    bank = code_bank(vq, images, args.gpt_augs, gen)  # (R * N, 256)
    bank_labels = labels.repeat(args.gpt_augs)
    val_bank = code_bank(vq, images, 2, make_generator(device, args.seed + 99))[images.shape[0]:]
    log(f"GPT: code bank of {bank.shape[0]} sequences ({args.gpt_augs} per image) in {time.time() - t0:.1f}s")
    # Class-balanced sampling: every class is drawn equally often, whatever its number of images.
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = (1.0 / counts[bank_labels]).float()
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1 or "embedding" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.gpt_lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    plan = StepPlan(args.gpt_steps, args.gpt_minutes, log, "GPT")
    step, meter = 0, Meter()
    t_save = time.time()
    while step < plan.total:
        lr = cosine_lr(step, plan.total, args.gpt_lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.multinomial(weights, args.gpt_batch, replacement=True, generator=gen)
        codes = bank[idx].long()  # (B, 256)
        y = bank_labels[idx]
        drop = torch.rand(y.shape[0], device=device, generator=gen) < cfg.class_dropout_prob
        y = torch.where(drop, torch.full_like(y, num_classes), y)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(codes[:, :-1], y)  # (B, 256, V): row j predicts token j
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        meter.add(loss=loss)
        step += 1
        plan.update(step)
        if step % args.print_every == 0 or step == plan.total:
            log(f"GPT step {step}/{plan.total} lr {lr:.2e} loss {meter.read()['loss']:.4f} "
                f"| {step * args.gpt_batch / (time.time() - plan.t_start):.0f} seq/s")
        if time.time() - t_save > args.save_every_s:
            save_half(model, out / "gpt.pt")
            t_save = time.time()
        if log.elapsed() > args.deadline_minutes * 60 * args.gpt_deadline_frac:
            log(f"GPT: stopping at step {step}: time budget")
            break
    model.eval()
    save_half(model, out / "gpt.pt")
    stats.update(steps=step, final_train_loss=meter.read().get("loss"),
                 val_loss=round(gpt_loss(model, val_bank, labels, device), 4))
    log(f"GPT: train loss {stats['final_train_loss']}, held-out augmentations loss {stats['val_loss']}")
    return model, stats


@torch.no_grad()
def gpt_loss(model: Transformer, bank: torch.Tensor, labels: torch.Tensor, device: torch.device,
             batch: int = 256) -> float:
    total, n = 0.0, 0
    for i in range(0, bank.shape[0], batch):
        codes, y = bank[i:i + batch].long(), labels[i:i + batch]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(codes[:, :-1], y)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1), reduction="sum").item()
        n += codes.numel()
    return total / n


# ----------------------------------------------------------------------------- evaluation

SWEEP = [  # (cfg_scale, temperature, top_k, top_p)
    (1.5, 1.0, 0, 1.0), (2.0, 1.0, 0, 1.0), (2.5, 1.0, 0, 1.0), (3.0, 1.0, 0, 1.0), (4.0, 1.0, 0, 1.0),
    (2.0, 0.9, 0, 1.0), (3.0, 0.9, 0, 1.0), (4.0, 1.0, 0, 0.9),
]


def sample_images(gpt: Transformer, vq: VQModel, labels: torch.Tensor, params: SamplingParams,
                  seeds: torch.Tensor, batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, labels.shape[0], batch):
        codes = generate(gpt, labels[i:i + batch], params, seeds=seeds[i:i + batch])
        with torch.no_grad(), torch.autocast(labels.device.type, dtype=torch.bfloat16,
                                             enabled=labels.device.type == "cuda"):
            out.append(vq.decode_code(codes).float().clamp(-1, 1))
    return torch.cat(out)


def evaluate(args, images: torch.Tensor, labels: torch.Tensor, num_classes: int, vq: VQModel,
             clf: EmojiClassifier, gpt: Transformer, device: torch.device, log: Log, out: Path) -> dict:
    res: dict = {}
    gen = make_generator(device, args.seed + 77)
    clean = torch.cat([to_float(images[i:i + 512]) for i in range(0, images.shape[0], 512)])
    held = torch.cat([augment(clean[i:i + 512], gen) for i in range(0, clean.shape[0], 512)])
    codes, recon = vq_roundtrip(vq, clean)
    _, held_recon = vq_roundtrip(vq, held)
    mse = (recon - clean).pow(2).mean().item()
    res["vq"] = {"recon_mse": round(mse, 5), "psnr_db": round(10 * math.log10(4 / mse), 2),
                 "held_out_psnr_db": round(10 * math.log10(4 / (held_recon - held).pow(2).mean().item()), 2),
                 "codes_used_on_renders": int(codes.unique().numel())}
    res["classifier"] = {
        "renders": accuracy(classify(clf, clean), labels),
        "held_out_augmented": accuracy(classify(clf, held), labels),
        "held_out_augmented_vq_recon": accuracy(classify(clf, held_recon), labels),
    }
    log(f"eval: VQ {res['vq']}")
    log(f"eval: classifier {res['classifier']}")

    g = torch.Generator().manual_seed(args.seed + 11)
    n = min(args.eval_n, num_classes)
    eval_labels = torch.randperm(num_classes, generator=g)[:n].to(device)
    seeds = torch.arange(n, device=device) + 1000
    rows = [clean[:12], recon[:12]]  # (image_grid resizes every cell to 64 px)
    res["sampling"] = []
    best, best_acc = None, -1.0
    for cfg_scale, temp, top_k, top_p in SWEEP[:args.sweep]:
        params = SamplingParams(cfg_scale=cfg_scale, temperature=temp, top_k=top_k, top_p=top_p)
        t0 = time.time()
        imgs = sample_images(gpt, vq, eval_labels, params, seeds)
        dt = time.time() - t0
        acc = accuracy(classify(clf, imgs), eval_labels)
        res["sampling"].append({"cfg_scale": cfg_scale, "temperature": temp, "top_k": top_k, "top_p": top_p,
                                **acc, "seconds": round(dt, 2)})
        log(f"eval: sampling cfg {cfg_scale} T {temp} top_k {top_k} top_p {top_p}: classifier top1 "
            f"{acc['top1']:.3f} top5 {acc['top5']:.3f} ({n} images, {dt:.1f}s)")
        rows.append(imgs[:12])
        # Prefer plain sampling (T = 1, no truncation) unless truncation is clearly better.
        score = acc["top1"] - (0.0 if (temp, top_k, top_p) == (1.0, 0, 1.0) else 0.03)
        if score > best_acc:
            best, best_acc = params, score
        if log.elapsed() > args.deadline_minutes * 60:
            log("eval: stopping the sweep: time budget")
            break
    assert best is not None
    greedy = sample_images(gpt, vq, eval_labels[:12], SamplingParams(cfg_scale=4.0, greedy=True), seeds[:12])
    rows.append(greedy)
    res["sampling_default"] = {"cfg_scale": best.cfg_scale, "temperature": best.temperature,
                               "top_k": best.top_k, "top_p": best.top_p}
    res["eval_classes"] = eval_labels[:12].tolist()
    image_grid(rows, 64).save(out / "diag.png")
    return res


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / ".device-carry" / "emoji.npz")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny models, a few steps, few classes")
    ap.add_argument("--limit-classes", type=int, default=None, help="train on the first N classes only")
    ap.add_argument("--image-size", type=int, default=128, help="resize the renders (tests use 32 px)")
    ap.add_argument("--deadline-minutes", type=float, default=8.8, help="whole-run time budget")
    ap.add_argument("--print-every", type=int, default=100)
    ap.add_argument("--save-every-s", type=float, default=60.0)
    ap.add_argument("--warmup", type=int, default=200)
    # VQ
    ap.add_argument("--codebook-size", type=int, default=2048)
    ap.add_argument("--vq-ch", type=int, default=32)
    ap.add_argument("--vq-z", type=int, default=128)
    ap.add_argument("--vq-lr", type=float, default=5e-4)
    ap.add_argument("--vq-batch", type=int, default=128)
    ap.add_argument("--vq-steps", type=int, default=None, help="default: as many as fit in --vq-minutes")
    ap.add_argument("--vq-minutes", type=float, default=2.8)
    ap.add_argument("--vq-reinit-every", type=int, default=200)
    ap.add_argument("--vq-deadline-frac", type=float, default=0.4)
    ap.add_argument("--init-vq", type=Path, default=None)
    # classifier
    ap.add_argument("--cls-width", type=int, default=24)
    ap.add_argument("--cls-lr", type=float, default=2e-3)
    ap.add_argument("--cls-batch", type=int, default=256)
    ap.add_argument("--cls-steps", type=int, default=None)
    ap.add_argument("--cls-minutes", type=float, default=0.7)
    ap.add_argument("--cls-recon-frac", type=float, default=0.5,
                    help="fraction of each batch passed through the VQ first")
    ap.add_argument("--cls-deadline-frac", type=float, default=0.55)
    ap.add_argument("--init-cls", type=Path, default=None)
    # GPT
    ap.add_argument("--gpt-dim", type=int, default=320)
    ap.add_argument("--gpt-layers", type=int, default=6)
    ap.add_argument("--gpt-lr", type=float, default=1e-3)
    ap.add_argument("--gpt-batch", type=int, default=256)
    ap.add_argument("--gpt-augs", type=int, default=32, help="code-bank copies per image (first un-augmented)")
    ap.add_argument("--gpt-steps", type=int, default=None)
    ap.add_argument("--gpt-minutes", type=float, default=3.3)
    ap.add_argument("--gpt-deadline-frac", type=float, default=0.92)
    ap.add_argument("--init-gpt", type=Path, default=None)
    ap.add_argument("--eval-n", type=int, default=256, help="classes sampled per sweep setting")
    ap.add_argument("--sweep", type=int, default=len(SWEEP), help="sampling settings tried (of SWEEP)")
    ap.add_argument("--sample-grid", type=Path, default=None, metavar="ASSET_DIR",
                    help="write ASSET_DIR/samples.png (8 x 4 random classes, 64 px, the config's sampling) and exit")
    ap.add_argument("--remap-classes", nargs=3, type=Path, default=None,
                    metavar=("OLD_CLASSES", "NEW_CLASSES", "ASSET_DIR"),
                    help="re-index a trained model's classes to a subset (see remap_classes) and exit")
    ap.add_argument("--assemble", nargs=2, type=Path, metavar=("RUN_DIR", "ASSET_DIR"), default=None,
                    help="copy a run's weights/config into the asset folder (merging split files) and exit")
    args = ap.parse_args(argv)
    if args.tiny:
        args.limit_classes = args.limit_classes or 6
        args.vq_steps = 2 if args.vq_steps is None else args.vq_steps
        args.cls_steps = 2 if args.cls_steps is None else args.cls_steps
        args.gpt_steps = 2 if args.gpt_steps is None else args.gpt_steps
        args.codebook_size, args.vq_batch, args.cls_batch, args.gpt_batch = 64, 2, 4, 4
        args.cls_width, args.gpt_dim, args.gpt_layers, args.gpt_augs, args.eval_n = 8, 64, 1, 2, 2
        args.sweep, args.vq_ch, args.vq_z, args.image_size = 1, 32, 32, 32
        args.warmup, args.print_every = 1, 1
    return args


def assemble(run_dir: Path, asset_dir: Path) -> None:
    asset_dir.mkdir(parents=True, exist_ok=True)
    for name in ("gpt.pt", "vq.pt"):
        merge_parts(run_dir / name)
    for name in ("gpt.pt", "vq.pt", "classifier.pt", "config.json"):
        shutil.copyfile(run_dir / name, asset_dir / name)
    print(f"assembled {asset_dir}: " + ", ".join(
        f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(asset_dir.iterdir())))


def remap_classes(asset_dir: Path, old_classes: list[dict], new_classes: list[dict]) -> list[int]:
    """Re-index a trained model's classes to `new_classes` (a subset, matched by emoji), in place.

    Used once: the first demo model was trained with 24 classes that held only skin-toned
    variants (e.g. "victory hand: light skin tone") next to their untoned base class; the data
    now folds them into the base. Each new class keeps its base's GPT class embedding (so it
    draws the untoned emoji) and classifier head row; the null-class row stays last.
    Returns the old id of every new class.
    """
    old_by_emoji = {c["emoji"]: c["id"] for c in old_classes}
    missing = [c["emoji"] for c in new_classes if c["emoji"] not in old_by_emoji]
    if missing:
        raise ValueError(f"new classes missing from the old list: {missing[:5]}")
    old_ids = [old_by_emoji[c["emoji"]] for c in new_classes]
    cfg_path = asset_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    n_old = cfg["gpt"]["num_classes"]
    gpt_path = asset_dir / cfg["gpt_ckpt"]
    sd = torch.load(gpt_path, map_location="cpu", weights_only=True)["model"]
    key = "cls_embedding.embedding_table.weight"
    sd[key] = torch.cat([sd[key][old_ids], sd[key][n_old:]]).contiguous()  # keep the null-class row last
    torch.save({"model": sd}, gpt_path)
    clf_path = asset_dir / cfg["classifier_ckpt"]
    obj = torch.load(clf_path, map_location="cpu", weights_only=True)
    for k in ("head.weight", "head.bias"):
        obj["model"][k] = obj["model"][k][old_ids].contiguous()
    obj["config"]["num_classes"] = len(new_classes)
    torch.save(obj, clf_path)
    cfg["gpt"]["num_classes"] = len(new_classes)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return old_ids


@torch.no_grad()
def sample_grid(asset_dir: Path, device: str, seed: int = 5) -> Path:
    """samples.png of an asset folder: 32 random classes (torch.randperm with `seed`), image seeds 0..31."""
    cfg = json.loads((asset_dir / "config.json").read_text())
    gpt = load_gpt(GPTConfig.from_dict(cfg["gpt"]), asset_dir / cfg["gpt_ckpt"], device)
    vq = load_vq(VQConfig.from_dict(cfg["vq"]), asset_dir / cfg["vq_ckpt"], device)
    labels = torch.randperm(gpt.config.num_classes, generator=torch.Generator().manual_seed(seed))[:32].to(device)
    codes = generate(gpt, labels, SamplingParams(**cfg["sampling"]), seeds=torch.arange(32, device=device))
    imgs = torch.cat([vq.decode_code(codes[i:i + 8]).float().clamp(-1, 1) for i in range(0, 32, 8)])
    path = asset_dir / "samples.png"
    image_grid([imgs[i:i + 8] for i in range(0, 32, 8)], 64).save(path)
    return path


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.assemble:
        assemble(*args.assemble)
        return {}
    if args.remap_classes:
        old, new, asset_dir = args.remap_classes
        ids = remap_classes(asset_dir, json.loads(old.read_text(encoding="utf-8")),
                            json.loads(new.read_text(encoding="utf-8")))
        print(f"remapped {asset_dir}: {len(ids)} classes")
        return {}
    if args.sample_grid:
        print(f"wrote {sample_grid(args.sample_grid, args.device)}")
        return {}
    log = Log()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        log(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    args.out.mkdir(parents=True, exist_ok=True)

    data = emoji_data.load(args.data)
    classes, labels_np, images_np = data["classes"], data["labels"], data["images"]
    if args.limit_classes is not None:
        keep = labels_np < args.limit_classes
        classes, labels_np, images_np = classes[:args.limit_classes], labels_np[keep], images_np[keep]
    num_classes = len(classes)
    images = torch.from_numpy(images_np.copy()).to(device)  # (N, H, W, 3) uint8
    if images.shape[1] != args.image_size:
        small = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(args.image_size,) * 2, mode="area")
        images = small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    labels = torch.from_numpy(labels_np).long().to(device)
    log(f"data: {images.shape[0]} images, {num_classes} classes ({data['stats'].get('font_version')})")

    vq, vq_stats = train_vq(args, images, device, log, args.out)
    clf, clf_stats = train_classifier(args, images, labels, num_classes, vq, device, log, args.out)
    gpt, gpt_stats = train_gpt(args, images, labels, num_classes, vq, device, log, args.out)
    res = evaluate(args, images, labels, num_classes, vq, clf, gpt, device, log, args.out)

    config = {
        "name": "emoji-demo", "image_size": args.image_size, "gpt": gpt.config.to_dict(), "vq": vq.config.to_dict(),
        "gpt_ckpt": "gpt.pt", "vq_ckpt": "vq.pt", "classifier_ckpt": "classifier.pt", "classes": "classes.json",
        "sampling": res["sampling_default"],
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "vq": vq_stats, "classifier": clf_stats,
              "gpt": {k: v for k, v in gpt_stats.items() if k != "config"}, "eval": res,
              "seconds": round(log.elapsed(), 1), "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "log": log.lines}
    (args.out / "train_log.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"done in {log.elapsed():.0f}s; sampling default {res['sampling_default']}")
    return report


if __name__ == "__main__":
    main()
