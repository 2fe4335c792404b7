"""What fp8 matmuls (`--matmul-dtype fp8`) cost in quality on the demo model (CPU), the way fp8 K/V was measured.

    PYTHONPATH=. python3 tools/fp8_weights_quality.py 128    # 128 classes spread over the demo's, seeds 2000..

The same model loaded twice, with full-precision (fp32) and with fp8 matmuls (adsa_core/model/fp8.py: every
matmul of the transformer blocks in e4m3 with row-wise scales, `torch._scaled_mm`; on a CPU it computes what a
GPU's fp8 GEMM computes up to summation order). Dense samples of the demo's default sampling are forced
through the engine with both (teacher-forced KL per token, top-1 agreement), then both sample freely from the
same seeds and the demo's classifier recognises the images (docs/FIDELITY.md, "fp8 matmuls").
"""

from __future__ import annotations

import argparse

import torch

from adsa_core.engine import GenerationRequest
from adsa_core.engine.offline import run_requests
from adsa_core.eval.features import ClassifierFeatures
from adsa_core.eval.harness import ImageSet, Options, image_metrics, pixels
from adsa_core.loading import DEMO_DIR, LoadedModels, ModelSpec, load_models
from adsa_core.sampling import SamplingParams


def generate(models: LoadedModels, labels: list[int], forced: list[torch.Tensor] | None = None) -> list:
    sampling = SamplingParams(**models.sampling_defaults)
    out: dict = {}
    reqs = [GenerationRequest(condition=c, seed=2000 + i, sampling=sampling, request_id=str(i),
                              want_logits=forced is not None, forced_tokens=None if forced is None else forced[i])
            for i, c in enumerate(labels)]
    run_requests(models, reqs, 32, out.__setitem__)
    return [out[i] for i in range(len(labels))]


def recognition(models: LoadedModels, codes: torch.Tensor, images: ImageSet) -> tuple[float, float]:
    """adsa-fidelity's recognition (the demo's classifier on the PNG pixels) and its standard error."""
    clf = ClassifierFeatures(DEMO_DIR / "classifier.pt", models.device)
    out, _, _ = image_metrics(pixels(models, codes, 16), codes, images, Options(), None, clf, None)
    return out["recognition_acc"], out["recognition_se"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("n", type=int, nargs="?", default=128, help="classes, spread over the demo's (one seed each)")
    a = p.parse_args()
    full = load_models(ModelSpec(device="cpu"))
    fp8 = load_models(ModelSpec(device="cpu", matmul_dtype="fp8"))
    labels = [i * full.gpt_config.num_classes // a.n for i in range(a.n)]
    codes = [ev.codes for ev in generate(full, labels)]
    lp_full = torch.stack([ev.logprobs for ev in generate(full, labels, codes)])  # (n, T, V)
    lp_fp8 = torch.stack([ev.logprobs for ev in generate(fp8, labels, codes)])
    kl = (lp_full.exp() * (lp_full - lp_fp8)).sum(-1)
    agree = (lp_full.argmax(-1) == lp_fp8.argmax(-1)).double().mean()
    print(f"teacher-forced, {a.n} images: KL(fp32 matmuls || fp8 matmuls) {kl.mean():.5f} per token, "
          f"top-1 agree {agree:.4f}", flush=True)
    codes_fp8 = torch.stack([ev.codes for ev in generate(fp8, labels)])
    images = ImageSet(torch.tensor(labels), 2000 + torch.arange(a.n))
    for name, c in (("fp32 matmuls", torch.stack(codes)), ("fp8 matmuls", codes_fp8)):
        acc, se = recognition(full, c, images)
        print(f"recognition, {name}: {acc:.3f} +- {se:.3f}", flush=True)
    same = (codes_fp8 == torch.stack(codes)).double().mean()
    print(f"free-running from the same seeds: {same:.4f} of tokens equal", flush=True)


if __name__ == "__main__":
    main()
