"""Time the public LlamaGen sampler from its own code: the baseline adsa-bench's reference row stands for.

Imports LlamaGen's own `generate`, GPT and VQ modules from a checkout (`--llamagen`, e.g. a folder carried to
the device beside the repo; only torch is needed: gpt.py, generate.py, vq_model.py and utils/drop_path.py),
sets up the models as autoregressive/sample/sample_c2i.py does (TF32, cuDNN deterministic, bf16 GPT, fp32 VQ,
`torch.compile(mode="reduce-overhead", fullgraph=True)` on the GPT) with random weights, and times, per batch:
one `generate` call (gen_s) and one `decode_code` of the whole batch (decode_s), after a warm-up of both at the
same batch (compile, CUDA graph, cuDNN). img/s = batch / (gen_s + decode_s), as in
shared/anchors/llamagen_reference.json. One JSON line per batch on stdout (and appended to --out).

    PYTHONPATH=$PWD python3 tools/public_sampler_bench.py --llamagen .device-carry/llamagen --batches 1,8,64,128
    python3 tools/public_sampler_bench.py --llamagen .device-carry/llamagen --gpt-model GPT-B --image-size 256 \\
        --batches 2 --device cpu --no-compile      # a CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def load_public(llamagen: Path):
    """LlamaGen's generate(), GPT_models and VQ_models, imported from its checkout as its scripts do."""
    sys.path.insert(0, str(llamagen.resolve()))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_models
    from tokenizer.tokenizer_image.vq_model import VQ_models
    return generate, GPT_models, VQ_models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llamagen", type=Path, required=True, help="a checkout of FoundationVision/LlamaGen")
    p.add_argument("--gpt-model", default="GPT-XL")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batches", default="1,8,64,128")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines here too")
    a = p.parse_args()

    # sample_c2i.py's process settings
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.set_grad_enabled(False)
    torch.nn.Linear.reset_parameters = lambda self: None  # the model draws its own weights anyway
    torch.nn.LayerNorm.reset_parameters = lambda self: None
    generate, GPT_models, VQ_models = load_public(a.llamagen)
    dev = torch.device(a.device)
    torch.manual_seed(0)
    latent = a.image_size // 16
    vq = VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8).to(dev).eval()  # fp32, as sample_c2i
    gpt = GPT_models[a.gpt_model](vocab_size=16384, block_size=latent**2, num_classes=1000, cls_token_num=1,
                                  model_type="c2i").to(device=dev, dtype=torch.bfloat16).eval()
    # LlamaGen zero-initialises the output layer (every logit tied); a trained one is not: draw it like the rest
    gpt.output.weight.normal_(0.0, gpt.config.initializer_range)
    model = torch.compile(gpt, mode="reduce-overhead", fullgraph=True) if not a.no_compile else gpt
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for batch in (int(b) for b in a.batches.split(",")):
        labels = torch.arange(batch, device=dev) % 1000
        qzshape = [batch, 8, latent, latent]
        try:
            t_warm = time.perf_counter()
            codes = generate(model, labels, latent**2, cfg_scale=a.cfg_scale, cfg_interval=-1, temperature=1.0,
                             top_k=a.top_k, top_p=1.0, sample_logits=True)  # compile + graph for this batch
            vq.decode_code(codes, qzshape)
            sync()
            warm_s = time.perf_counter() - t_warm
            del codes
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            codes = generate(model, labels, latent**2, cfg_scale=a.cfg_scale, cfg_interval=-1, temperature=1.0,
                             top_k=a.top_k, top_p=1.0, sample_logits=True)
            sync()
            t1 = time.perf_counter()
            images = vq.decode_code(codes, qzshape)  # between -1 and 1
            sync()
            t2 = time.perf_counter()
        except torch.cuda.OutOfMemoryError:
            row = {"model": a.gpt_model, "size": a.image_size, "batch": batch, "error": "OOM", "card": card}
        else:
            gen_s, decode_s = t1 - t0, t2 - t1
            row = {"model": a.gpt_model, "size": a.image_size, "batch": batch, "compile": not a.no_compile,
                   "gen_s": round(gen_s, 4), "decode_s": round(decode_s, 4),
                   "img_per_s": round(batch / (gen_s + decode_s), 3),
                   "tok_per_s": round(batch * latent**2 / gen_s, 1),
                   "ms_per_token": round(1000 * gen_s / latent**2, 3),
                   "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else 0.0,
                   "warmup_s": round(warm_s, 1), "shape": list(images.shape), "card": card,
                   "torch": torch.__version__, "what": "public LlamaGen generate() + VQ decode_code, from its code"}
        line = json.dumps(row)
        print(line, flush=True)
        if a.out is not None:
            with a.out.open("a") as f:
                f.write(line + "\n")
        torch.cuda.empty_cache() if dev.type == "cuda" else None


if __name__ == "__main__":
    main()
