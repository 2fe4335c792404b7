"""Frozen configuration: model presets, KV-cache policy settings, engine settings.

This module imports nothing from the rest of the project but the torch-free policy registry
(kv.policy), so every layer (model, kv, engine, server, loadtest) can share these types.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .kv.policy import get_policy

# (n_layer, n_head, dim) of the official LlamaGen GPT presets (arXiv 2406.06525, table 1).
GPT_PRESETS: dict[str, tuple[int, int, int]] = {
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-3B": (24, 32, 3200),
}

SEED_END = 2**63  # seeds are signed 64-bit integers: image i of a request uses seed + i, which must stay below


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the offending field."""


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class GPTConfig:
    """LlamaGen `ModelArgs`, inference fields only, with LlamaGen's field names."""

    dim: int = 1280
    n_layer: int = 36
    n_head: int = 20
    n_kv_head: int | None = None  # None: same as n_head (all official presets)
    multiple_of: int = 256  # FFN hidden width is rounded up to this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1  # > 0 means the checkpoint has a "no class" row for CFG
    model_type: str = "c2i"  # "c2i" (class label) or "t2i" (caption features)
    vocab_size: int = 16384
    cls_token_num: int = 1  # condition tokens before the image tokens (t2i: 120)
    block_size: int = 256  # image tokens, a square: (image_size / downsample) ** 2

    def __post_init__(self) -> None:
        if self.model_type not in ("c2i", "t2i"):
            raise ConfigError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.dim % self.n_head:
            raise ConfigError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            raise ConfigError(f"block_size {self.block_size} is not a square number of tokens")
        if self.head_dim % 4:
            raise ConfigError(f"head_dim {self.head_dim} must be a multiple of 4 for 2-D RoPE")
        if self.model_type == "c2i" and self.cls_token_num != 1:
            raise ConfigError("class-conditional models use exactly one condition token (cls_token_num=1)")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def seq_len(self) -> int:
        """Tokens that ever enter the KV cache: condition tokens + all image tokens but the last."""
        return self.cls_token_num + self.block_size - 1

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of one token over all layers and heads."""
        return 2 * self.n_layer * self.kv_heads * self.head_dim * dtype_bytes

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from LlamaGen-style JSON. Training-only LlamaGen fields are accepted and ignored."""
        training_only = {
            "token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate",
            "initializer_range", "max_batch_size", "max_seq_len",
        }
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - training_only
        if unknown:
            raise ConfigError(f"unknown GPT config field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def gpt_preset(
    name: str,
    image_size: int = 384,
    downsample: int = 16,
    model_type: str = "c2i",
    **overrides,
) -> GPTConfig:
    """An official preset at an image size, e.g. gpt_preset("GPT-XL", 384)."""
    if name not in GPT_PRESETS:
        raise ConfigError(f"unknown GPT preset {name!r}; choose one of {', '.join(GPT_PRESETS)}")
    if image_size % downsample:
        raise ConfigError(f"image size {image_size} is not a multiple of the VQ downsampling {downsample}")
    n_layer, n_head, dim = GPT_PRESETS[name]
    kw: dict = dict(
        n_layer=n_layer, n_head=n_head, dim=dim, model_type=model_type,
        block_size=(image_size // downsample) ** 2,
        cls_token_num=120 if model_type == "t2i" else 1,
    )
    kw.update(overrides)
    return GPTConfig(**kw)


@dataclass(frozen=True)
class VQConfig:
    """LlamaGen VQ tokenizer `ModelArgs` (plus the base width `ch`, 128 in official checkpoints)."""

    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    ch: int = 128
    num_res_blocks: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "encoder_ch_mult", tuple(self.encoder_ch_mult))
        object.__setattr__(self, "decoder_ch_mult", tuple(self.decoder_ch_mult))
        for name in ("ch", "z_channels"):
            if getattr(self, name) % 32:
                raise ConfigError(f"VQ {name}={getattr(self, name)} must be a multiple of 32 (GroupNorm groups)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.decoder_ch_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> VQConfig:
        training_only = {"codebook_show_usage", "commit_loss_beta", "entropy_loss_ratio", "dropout_p"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - training_only
        if unknown:
            raise ConfigError(f"unknown VQ config field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["encoder_ch_mult"] = list(self.encoder_ch_mult)
        d["decoder_ch_mult"] = list(self.decoder_ch_mult)
        return d


# Default never-evicted regions (chosen with the fidelity harness; docs/FIDELITY.md, "Default prefix n and local
# window m"). g = one image row (grid_size), c = condition tokens.
DEFAULT_PREFIX_ROWS = 1  # prefix n: c + this many image rows at most
DEFAULT_LOCAL_ROWS = 2  # local window m: this many image rows + 1 at most (never less than one row + 1)
MIDDLE_SHARE = 1 / 8  # the evictable middle keeps at least ceil(MIDDLE_SHARE * budget) slots


def default_regions(
    gpt: GPTConfig, budget: int, prefix: int | None = None, local: int | None = None
) -> tuple[int, int]:
    """Prefix n and local window m for a budget of `budget` slots; explicit values are kept exactly.

    room = budget - ceil(budget / 8) slots may be never-evicted (the rest is the middle adsa chooses from).
      m = k rows + 1 for the largest k <= 2 with (n or c) + k g + 1 <= room, else one row + 1 (the floor:
          the token directly above and its left neighbour stay local; DESIGN.md section 4);
      n = room - m, at most c + one row, at least c.
    The local window comes first because it matters most, in whole rows + 1 (a window of 2 g - 1 or 3/2 g
    is much worse than 2 g + 1, closer to g + 1). Budgets too small even for n = c, m = g + 1 are refused
    by CacheConfig.resolve, as are impossible explicit values.
    Demo (c = 1, g = 16, 256 slots): 1/2 -> (17, 33), 1/4 -> (17, 33), 1/6 (43) -> (4, 33), 1/8 (32) -> (11, 17).
    """
    c, g = gpt.cls_token_num, gpt.grid_size
    room = budget - math.ceil(MIDDLE_SHARE * budget)
    if local is None:
        base = c if prefix is None else prefix
        rows = next((k for k in range(DEFAULT_LOCAL_ROWS, 1, -1) if base + k * g + 1 <= room), 1)
        local = rows * g + 1
    if prefix is None:
        prefix = max(c, min(c + DEFAULT_PREFIX_ROWS * g, room - local))
    return prefix, local


def check_budget(budget: object) -> None:
    """A KV budget is slots per sequence per layer per head: an int is tokens (>= 1), a float a fraction of the
    sequence length in (0, 1], None the whole sequence (no eviction ever happens). Raises ConfigError."""
    if budget is None:
        return
    if isinstance(budget, bool):
        raise ConfigError("kv budget must be a token count or a fraction, not a boolean")
    if not isinstance(budget, (int, float)):
        raise ConfigError(f"kv budget must be a number: a token count or a fraction, not {budget!r}")
    if isinstance(budget, float) and not (0.0 < budget <= 1.0):  # NaN fails this too
        raise ConfigError(f"kv budget fraction {budget} is outside (0, 1]")
    if isinstance(budget, int) and budget <= 0:
        raise ConfigError(f"kv budget {budget} tokens must be positive")


def parse_budget(text: str) -> int | float | None:
    """The one reading of a KV budget written as text (command lines, environment variables):
    '256' -> 256 tokens; '0.25', '2.5e-1' or '1/4' -> a fraction; 'none' or 'full' -> None (no eviction).
    Case and surrounding spaces are ignored; anything else, or a value check_budget refuses, is a ConfigError."""
    s = text.strip().lower()
    if s in ("none", "full"):
        return None
    num, slash, den = s.partition("/")
    try:
        if slash:
            value: int | float = float(num) / float(den)
        else:
            value = int(s) if s.lstrip("+-").isdigit() else float(s)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"kv budget {text!r} is not a token count (256), a fraction (0.25, 1/4) or none"
        ) from None
    check_budget(value)
    return value


@dataclass(frozen=True)
class CacheConfig:
    """What a sequence keeps in its KV cache. Budget and policy may differ per request.

    prefix / local None: `default_regions` (two image rows + 1 of local window, condition tokens + up to one
    image row of prefix, an eighth of the budget left to the evictable middle). Explicit values are used as
    given.
    """

    policy: str = "line"  # a name registered in kv.policy (the default: docs/FIDELITY.md, "The frontier")
    budget: int | float | None = 0.5  # see check_budget; text becomes one through parse_budget
    prefix: int | None = None  # positions p < prefix are never evicted; None: default_regions
    local: int | None = None  # positions p > t - local are never evicted; None: default_regions

    def __post_init__(self) -> None:
        try:
            get_policy(self.policy)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_budget(self.budget)

    def resolve(self, gpt: GPTConfig) -> ResolvedCache:
        """Concrete slot counts for one model; raises ConfigError for impossible combinations."""
        seq_len = gpt.seq_len
        evicts = get_policy(self.policy).evicts
        if not evicts or self.budget is None:
            budget = seq_len
        elif isinstance(self.budget, float):
            budget = max(1, int(round(self.budget * seq_len)))
        else:
            budget = int(self.budget)
        budget = min(budget, seq_len)
        prefix, local = default_regions(gpt, budget, self.prefix, self.local)
        if not evicts:
            return ResolvedCache(self.policy, seq_len, prefix, local, seq_len)
        if prefix < gpt.cls_token_num:
            raise ConfigError(f"kv prefix {prefix} must cover the {gpt.cls_token_num} condition tokens")
        if local < 1:
            raise ConfigError(f"kv local window {local} must be at least 1")
        if budget < seq_len and budget <= prefix + local:
            hint = " (an integer counts tokens: the whole cache is 1.0)" if self.budget == 1 else ""
            raise ConfigError(f"kv budget {budget} token{'s' * (budget != 1)} must be larger than prefix {prefix} + "
                              f"local window {local}{hint}")
        return ResolvedCache(self.policy, budget, prefix, local, seq_len)


def min_budget(gpt: GPTConfig, prefix: int | None = None, local: int | None = None) -> int:
    """The smallest budget in tokens that CacheConfig.resolve accepts for an evicting policy with this prefix and
    local window (None: default_regions'; GPT-XL 384: 27, the demo: 19). Clients size their budget controls with it."""
    for budget in range(1, gpt.seq_len):
        try:
            CacheConfig(budget=budget, prefix=prefix, local=local).resolve(gpt)
        except ConfigError:
            continue
        return budget
    return gpt.seq_len


@dataclass(frozen=True)
class ResolvedCache:
    """A CacheConfig made concrete for one model."""

    policy: str
    budget: int  # slots per (sequence, layer, head)
    prefix: int  # positions p < prefix are never evicted
    local: int  # positions p > t - local are never evicted (t = position being decoded)
    seq_len: int  # tokens the sequence will ever hold without eviction

    @property
    def evicts(self) -> bool:
        return self.budget < self.seq_len


# the help of every --matmul-dtype flag and ADSA_MATMUL_DTYPE (no "%": argparse formats help with it)
MATMUL_DTYPE_HELP = ("fp8: the transformer blocks' matmuls in e4m3 with row-wise scales (experimental: quality in "
                     "docs/FIDELITY.md; a few percent faster offline and no faster served, docs/PERFORMANCE.md runs "
                     "32-34; needs compute capability >= 8.9 and bfloat16 on a GPU)")


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide settings (the server maps ADSA_* settings onto these)."""

    max_batch_size: int | None = None  # images in flight (each CFG image is two sequences); None: from the pool
    # (engine.capacity.default_max_batch: as many CFG images at the default budget as the pool holds, on CUDA)
    kv_pool_tokens: int | None = None  # pool capacity in token slots; None: from kv_pool_memory_fraction
    kv_pool_memory_fraction: float = 0.5  # of free device memory, when kv_pool_tokens is None
    page_size: int = 16  # slots per page
    max_queue: int = 256  # waiting requests beyond this are refused (HTTP 429)
    spill_limit_bytes: int = 16 << 20  # pinned CPU bytes per sequence for its evicted K/V
    spill_arena_bytes: int = 2 << 30  # pinned CPU memory for all spilled K/V (a ring, reclaimed per request)
    cuda_graphs: bool = True  # capture the decode step per batch bucket (GPU only)
    # torch.compile the decode step's blocks and the VQ decoder (GPU only; compiled per batch bucket at warm-up).
    # None: on for CUDA
    compile_step: bool | None = False
    decode_images: bool = True  # VQ-decode finished requests to uint8 pixels (offline tools decode themselves)
    # images per VQ decode call, each call padded to this many (a static shape keeps every image's pixels
    # independent of the images finishing beside it); None: 16 on CUDA (1.35x faster per image than 8 on an
    # H100), 1 on a CPU (where padding costs as much as decoding)
    vq_decode_batch: int | None = None
    # compile the VQ decoder under Inductor's max-autotune (with compile_step, GPU only): its Triton templates
    # timed against cuDNN per convolution, its own kernels' launch parameters by coordinate descent. 1.59-1.63
    # against 1.81-1.86 ms an image at chunks of 16 on an H200 (docs/PERFORMANCE.md runs 34-35), for ~5 minutes
    # of compile at warm-up: use it with a kept compile cache (TORCHINDUCTOR_CACHE_DIR), which a restart reads
    vq_autotune: bool = False
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "fp8": e4m3 K/V (half the bytes read per step)
    default_cache: CacheConfig = field(default_factory=CacheConfig)
