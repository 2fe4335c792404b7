"""adsa-fidelity: how far a sparse KV cache (adsa, window, line) moves a LlamaGen model from the dense cache.

    adsa-fidelity --policies dense,adsa,window --budgets 0.5,0.25,0.1667 --classes 0-23 --seeds 4 --out fid/
    adsa-fidelity --gpt-model GPT-XL --gpt-ckpt c2i_XL_384.pt --vq-ckpt vq_ds16_c2i.pt --classes 207,360 \\
        --inception pt_inception.pt --reference-images imagenet_ref.npz --out fid_xl/

For every (class, seed) image and every cache setting (policy, budget, prefix n, local m):
  (a) teacher-forced: the dense sample's tokens are forced through the policy's cache; per token we
      compare the policy's CFG-guided next-token distribution with dense's: KL(dense || policy),
      top-1 agreement and the NLL of the forced token;
  (b) free-running: the same seed sampled under the policy, decoded to pixels: token and pixel
      agreement with the dense image, recognition accuracy and FID on a classifier's (or a local
      Inception TorchScript's) features against real images.
Writes fidelity.json, fidelity.md (one table row per setting) and grid.png into --out.
Metrics are explained in docs/FIDELITY.md.

This module is the command line: it turns the flags into a FidelityPlan and `run_fidelity(plan)` loads the
models, runs adsa_core.eval.harness and writes what adsa_core.eval.report formats.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..argtypes import positive_int
from ..cli_common import (
    DTYPE_CHOICES,
    Parser,
    UsageError,
    add_model_args,
    budget_arg,
    int_list,
    model_spec_from_args,
    run_main,
)
from ..config import ConfigError
from ..kv.policy import policy_names
from ..kv.pool import KV_CACHE_DTYPES
from ..loading import DEMO_DIR, ModelSpec, load_models
from ..sampling import SamplingParams
from .features import ClassifierFeatures, FeatureExtractor, TorchScriptFeatures, load_reference
from .harness import ImageSet, Options, evaluate, evaluate_sampling, plan_settings
from .report import gpt_weights_sha256, markdown_table, round_sig, sampling_markdown, save_grid

PROG = "adsa-fidelity"


@dataclass(frozen=True)
class FidelityPlan:
    """One adsa-fidelity run, as the command line asked for it (see build_parser for each field's flag)."""

    model: ModelSpec
    out: Path
    policies: list[str] = field(default_factory=lambda: list(policy_names()))
    budgets: list[int | float | None] = field(default_factory=lambda: [0.5, 0.25, 1 / 6])
    kv_prefix: int | None = None  # None: CacheConfig's default regions
    kv_local: int | None = None
    sweep_budget: list[int | float | None] | None = None  # None: the middle of `budgets`
    sweep_prefix: list[int] | None = None
    sweep_local: list[int] | None = None
    sampling_overrides: dict = field(default_factory=dict)  # cfg_scale, temperature, top_k, top_p given
    sampling_sweep: list[dict] | None = None  # set: compare these sampling candidates instead of policies
    classes: list[int] | None = None  # None: 8 spread over the model's classes
    seeds: int = 2  # per class: first_seed .. first_seed + seeds - 1
    first_seed: int = 0
    batch_size: int | None = None  # None: 256 on cuda, 16 on cpu
    kv_cache_dtype: str = "auto"
    classifier: str | None = None  # None: the demo model's, if any
    reference_images: str | None = None  # None: the demo's reference_stats.npz, if shipped
    inception: str | None = None
    inception_input: str = "uint8"
    inception_size: int | None = None
    fid: bool = True
    dense_check: bool = True
    grid_max: int = 16
    show_progress: bool = False
    command: str = PROG  # the command line, for the report


def _policies(text: str) -> list[str]:
    items = [t for t in text.replace(" ", "").split(",") if t]
    bad = [t for t in items if t not in policy_names()]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(bad) or '(none)'}; choose from {', '.join(policy_names())}"
        )
    return items


def _budgets(text: str) -> list[int | float | None]:
    out = [budget_arg(t) for t in text.split(",") if t.strip()]
    if not out:
        raise argparse.ArgumentTypeError("no budgets given")
    return out


_SAMPLING_KEYS = {
    "cfg": "cfg_scale",
    "cfg_scale": "cfg_scale",
    "t": "temperature",
    "temperature": "temperature",
    "top_k": "top_k",
    "k": "top_k",
    "top_p": "top_p",
    "p": "top_p",
}


def _sampling_list(text: str) -> list[dict]:
    """'cfg=2,t=0.9;cfg=1.5,top_k=100' -> [{'cfg_scale': 2.0, 'temperature': 0.9}, {...}] (unset: the default)."""
    out = []
    for cand in text.split(";"):
        if not cand.strip():
            continue
        d: dict = {}
        for kv in cand.split(","):
            k, sep, v = kv.strip().partition("=")
            key = _SAMPLING_KEYS.get(k.strip())
            if not sep or key is None:
                raise argparse.ArgumentTypeError(
                    f"bad sampling setting {kv.strip()!r}; use e.g. "
                    "cfg=2,t=0.9,top_k=100,top_p=0.95 (candidates separated by ;)"
                )
            try:
                d[key] = int(v) if key == "top_k" else float(v)
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad value in sampling setting {kv.strip()!r}") from None
        out.append(d)
    if not out:
        raise argparse.ArgumentTypeError("no sampling candidates given")
    return out


def _batch(text: str) -> int | None:
    return None if text == "auto" else positive_int(text)


def _classes(text: str) -> list[int]:
    """'0,5,9', inclusive ranges '0-23', strided ranges '0-1869:30', mixed."""
    out: list[int] = []
    for t in text.replace(" ", "").split(","):
        if "-" in t[1:]:
            rng, _, step = t.partition(":")
            a, _, b = rng.partition("-")
            try:
                lo, hi, st = int(a), int(b), int(step or 1)
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad class range {t!r}") from None
            if hi < lo or st < 1:
                raise argparse.ArgumentTypeError(f"empty class range {t!r}")
            out.extend(range(lo, hi + 1, st))
        elif t:
            out.extend(int_list(t))
    if not out:
        raise argparse.ArgumentTypeError("no classes given")
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError("a class is listed twice")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Fidelity of sparse KV-cache policies against the dense cache "
        "(teacher-forced KL/agreement/NLL; free-running recognition, FID, PSNR).",
    )
    add_model_args(p)
    e = p.add_argument_group("what to compare")
    e.add_argument(
        "--policies",
        type=_policies,
        default=list(policy_names()),
        help=f"comma-separated, from {', '.join(policy_names())} (default all; dense always runs)",
    )
    e.add_argument(
        "--budgets",
        type=_budgets,
        default=[0.5, 0.25, 1 / 6],
        metavar="B,B,...",
        help="KV budgets: fractions (0.25, 1/6) or token counts (64) (default 1/2, 1/4, 1/6)",
    )
    e.add_argument(
        "--kv-prefix",
        type=int,
        metavar="N",
        help="prefix n for the policy x budget rows "
        "(default: CacheConfig's, condition tokens + one image row, less at small budgets)",
    )
    e.add_argument(
        "--kv-local",
        type=int,
        metavar="M",
        help="local window m (default: CacheConfig's, two image rows, less at small budgets)",
    )
    e.add_argument("--sweep-prefix", type=int_list, metavar="N,N,...", help="extra rows: these prefixes ...")
    e.add_argument("--sweep-local", type=int_list, metavar="M,M,...", help="... x these local windows ...")
    e.add_argument(
        "--sweep-budget",
        type=_budgets,
        metavar="B,B,...",
        help="... at these budgets (default: the middle of --budgets); pairs that do not fit a budget are skipped",
    )
    e.add_argument(
        "--sampling-sweep",
        type=_sampling_list,
        metavar="SPEC;SPEC;...",
        help="instead of the policy table: dense images under each sampling candidate, e.g. "
        "'cfg=2;cfg=2,t=0.9;cfg=1.5,top_k=100' (unset keys: the default sampling, which is always "
        "measured too); writes sampling.json, sampling.md and grid.png",
    )
    e.add_argument(
        "--classes",
        type=_classes,
        metavar="C,C-C:S",
        help="class labels, e.g. 0,5,9 or 0-23 or 0-1869:30 (default: 8 spread over the model's)",
    )
    e.add_argument("--seeds", type=positive_int, default=2, metavar="N", help="seeds per class: SEED..SEED+N-1")
    e.add_argument("--seed", type=int, default=0, help="first seed (default 0)")

    s = p.add_argument_group("sampling (defaults: LlamaGen's, or the demo model's)")
    s.add_argument("--cfg-scale", type=float)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument(
        "--batch-size",
        type=_batch,
        default=None,
        metavar="N|auto",
        help="images in flight (default auto: 256 on cuda, 16 on cpu)",
    )
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda:N")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    s.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="K/V storage of every row, dense included (fp8: e4m3); compare runs to see fp8's cost")

    f = p.add_argument_group("image metrics")
    f.add_argument(
        "--classifier",
        metavar="PATH",
        help="EmojiClassifier checkpoint for recognition accuracy and FID features (default: the demo model's)",
    )
    f.add_argument(
        "--reference-images",
        metavar="DIR|NPZ",
        help="real images for FID: a folder of images, or an "
        ".npz with images (+labels), features (+labels) or mu/sigma (default for the demo: its "
        "reference_stats.npz when shipped)",
    )
    f.add_argument(
        "--inception",
        metavar="PATH",
        help="local TorchScript feature network (e.g. Inception) for FID instead of the classifier; never downloaded",
    )
    f.add_argument(
        "--inception-input",
        choices=("uint8", "float01", "float11"),
        default="uint8",
        help="what the TorchScript takes (default uint8 0..255)",
    )
    f.add_argument("--inception-size", type=positive_int, metavar="PX", help="resize to PX first (default: no resize)")
    f.add_argument("--no-fid", action="store_true", help="skip FID")
    f.add_argument(
        "--no-dense-check",
        action="store_true",
        help="do not re-force dense's samples through the "
        "dense cache (its row is then 0 / 1 by definition; saves one pass of the images)",
    )

    o = p.add_argument_group("outputs")
    o.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="fidelity.json, fidelity.md, grid.png (with --sampling-sweep: sampling.json, sampling.md, grid.png)",
    )
    o.add_argument("--grid-max", type=positive_int, default=16, help="images per row in grid.png (default 16)")
    o.add_argument("--progress", action="store_true", help="progress bar on stderr even when not a TTY")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    run_fidelity(plan_from_args(build_parser().parse_args(argv), argv))
    return 0


def plan_from_args(a: argparse.Namespace, argv: list[str] | None = None) -> FidelityPlan:
    """The plan of parsed flags; bad sampling values and missing files fail here, before any weights load."""
    overrides = {
        k: v
        for k, v in dict(cfg_scale=a.cfg_scale, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p).items()
        if v is not None
    }
    SamplingParams(**overrides)
    for cand in a.sampling_sweep or []:
        try:
            SamplingParams(**{**overrides, **cand})
        except ValueError as e:
            raise UsageError(f"--sampling-sweep: {e}") from None
    for path, flag in (
        (a.reference_images, "--reference-images"),
        (a.classifier, "--classifier"),
        (a.inception, "--inception"),
    ):
        if path and not Path(path).exists():
            raise UsageError(f"{flag} not found: {path}")
    return FidelityPlan(
        model=model_spec_from_args(a), out=Path(a.out), policies=a.policies, budgets=a.budgets,
        kv_prefix=a.kv_prefix, kv_local=a.kv_local, sweep_budget=a.sweep_budget, sweep_prefix=a.sweep_prefix,
        sweep_local=a.sweep_local, sampling_overrides=overrides, sampling_sweep=a.sampling_sweep,
        classes=a.classes, seeds=a.seeds, first_seed=a.seed, batch_size=a.batch_size,
        kv_cache_dtype=a.kv_cache_dtype, classifier=a.classifier, reference_images=a.reference_images,
        inception=a.inception, inception_input=a.inception_input, inception_size=a.inception_size,
        fid=not a.no_fid, dense_check=not a.no_dense_check, grid_max=a.grid_max,
        show_progress=a.progress or sys.stderr.isatty(),
        command=" ".join([PROG, *(sys.argv[1:] if argv is None else argv)]),
    )  # fmt: skip


def run_fidelity(plan: FidelityPlan) -> dict:
    """Loads the model, runs the passes and writes {fidelity|sampling}.{json,md} and grid.png into plan.out;
    returns the JSON report."""
    spec = plan.model
    models = load_models(spec)
    gpt = models.gpt_config
    if gpt.model_type != "c2i":
        raise ConfigError(f"{models.name} is text-conditional; adsa-fidelity evaluates class-conditional models")
    classes = plan.classes or sorted({round(i * gpt.num_classes / 8) for i in range(min(8, gpt.num_classes))})
    for c in classes:
        if not 0 <= c < gpt.num_classes:
            raise ConfigError(f"class {c} is outside 0..{gpt.num_classes - 1}")
    sweep_sampling = plan.sampling_sweep is not None
    settings = (
        []
        if sweep_sampling
        else plan_settings(
            plan.policies, plan.budgets, gpt, plan.kv_prefix, plan.kv_local, plan.sweep_budget, plan.sweep_prefix,
            plan.sweep_local,
        )
    )
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    defaults = {k: v for k, v in models.sampling_defaults.items() if k in known}
    sampling = SamplingParams(**{**defaults, **plan.sampling_overrides})
    notes: list[str] = []

    # Recognition: the classifier given, or the demo's. FID features: Inception if given, else the classifier.
    clf_path = plan.classifier
    if clf_path is None and spec.is_demo:
        meta = json.loads((DEMO_DIR / "config.json").read_text())
        if meta.get("classifier_ckpt") and (DEMO_DIR / meta["classifier_ckpt"]).is_file():
            clf_path = str(DEMO_DIR / meta["classifier_ckpt"])
    classifier = ClassifierFeatures(clf_path, models.device) if clf_path else None
    if classifier is None:
        notes.append("no classifier (--classifier): recognition accuracy skipped")
    elif classifier.model.config.num_classes != gpt.num_classes:
        raise ConfigError(
            f"the classifier knows {classifier.model.config.num_classes} classes, the model {gpt.num_classes}"
        )
    extractor: FeatureExtractor | None = (
        TorchScriptFeatures(plan.inception, models.device, plan.inception_input, plan.inception_size)
        if plan.inception
        else classifier
    )
    reference = None
    if models.vq is None:
        notes.append("no VQ decoder (--vq-ckpt): image metrics skipped")
    elif not plan.fid:
        notes.append("FID skipped (--no-fid)")
    elif extractor is None:
        notes.append("FID skipped: no feature network (give --classifier or --inception)")
    else:
        ref_path = plan.reference_images
        if ref_path is None and spec.is_demo and not plan.inception:
            shipped = DEMO_DIR / "reference_stats.npz"
            ref_path = str(shipped) if shipped.is_file() else None
        if ref_path is None:
            notes.append(
                "FID skipped: no reference (give --reference-images DIR|NPZ"
                + ("; the demo assets ship no reference_stats.npz" if spec.is_demo else "")
                + ")"
            )
        else:
            reference = load_reference(ref_path, extractor, classes, 64, models.classes)
            if not reference.class_restricted:
                notes.append(
                    "FID reference is not restricted to the evaluated classes: compare FIDs between "
                    "rows, not with other runs"
                )
    images = ImageSet.make(classes, plan.seeds, plan.first_seed)
    batch = plan.batch_size or (256 if models.device.type == "cuda" else 16)
    opts = Options(batch_size=batch, grid_max=plan.grid_max, dense_check=plan.dense_check,
                   kv_cache_dtype=plan.kv_cache_dtype)

    if sweep_sampling:
        candidates = [dataclasses.replace(sampling, **cand) for cand in plan.sampling_sweep]
        if sampling not in candidates:  # the default is always measured: candidates are judged against it
            candidates.insert(0, sampling)
        n_runs = len(candidates)
    else:
        n_runs = 2 * len(settings) - (0 if opts.dense_check else 1)  # requests per image
    bar = tqdm(
        total=n_runs * len(images.seeds) * gpt.block_size,
        unit="tok",
        file=sys.stderr,
        desc=PROG,
        disable=not plan.show_progress,
        dynamic_ncols=True,
    )
    t0 = time.perf_counter()
    with bar:
        if sweep_sampling:
            rows, grids = evaluate_sampling(
                models, candidates, images, opts, extractor, classifier, reference, bar.update
            )
            for r in rows:
                r["is_default"] = r["sampling"] == dataclasses.asdict(sampling)
        else:
            rows, grids = evaluate(
                models, settings, images, sampling, opts, extractor, classifier, reference, bar.update
            )
    seconds = time.perf_counter() - t0

    device = str(models.device)
    if models.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(models.device)})"
    report = {
        "command": plan.command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "dtype": str(models.dtype).removeprefix("torch."),
        "kv_cache_dtype": opts.kv_cache_dtype,
        "torch": torch.__version__,
        "model": models.name,
        "gpt_ckpt_sha256": gpt_weights_sha256(spec),
        "image_size": models.image_size,
        "block_size": gpt.block_size,
        "seq_len": gpt.seq_len,
        "grid_size": gpt.grid_size,
        "classes": classes,
        "class_names": [models.classes[c]["name"] for c in classes] if models.classes else None,
        "seeds_per_class": plan.seeds,
        "first_seed": plan.first_seed,
        "n_images": len(images.seeds),
        "sampling": dataclasses.asdict(sampling),
        "batch_size": batch,
        "features": extractor.name if extractor is not None and reference is not None else None,
        "reference": reference.source if reference is not None else None,
        "seconds": round(seconds, 2),
        "notes": notes,
        "rows": [{k: (round_sig(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
    }
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    name = "sampling" if sweep_sampling else "fidelity"
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / f"{name}.md").write_text(sampling_markdown(report) if sweep_sampling else markdown_table(report))
    if grids:
        idx = images.grid_order(opts.grid_max)
        names = report["class_names"]
        col = [
            f"{int(images.labels[i])}{' ' + names[classes.index(int(images.labels[i]))] if names else ''} "
            f"s{int(images.seeds[i])}"
            for i in idx
        ]
        save_grid(grids, col, out / "grid.png")
    # always, TTY or not: without it a run that succeeded said nothing of where its report went
    what = f"{len(rows)} sampling candidates" if sweep_sampling else f"{len(rows)} settings"
    print(f"{PROG}: {what} x {len(images.seeds)} images in {seconds:.1f} s -> {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(main())
