"""Every server setting, read in one place: environment variables with the `ADSA_` prefix.

`server.__main__` generates one CLI flag per field from this class (so flags and variables
cannot drift), and `Settings.model_spec()` / `Settings.engine_config()` are the only mapping
from settings onto `adsa_core` types. Engine defaults come from `EngineConfig` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, get_origin

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adsa_core.config import MATMUL_DTYPE_HELP, CacheConfig, EngineConfig, parse_budget
from adsa_core.kv.policy import get_policy

if TYPE_CHECKING:
    from adsa_core.loading import ModelSpec

_ENGINE = EngineConfig()  # defaults shown in --help and used when a setting is left alone
_CACHE = CacheConfig()


def _split_commas(v: object) -> object:
    """'a, b,,c' -> ['a', 'b', 'c'] (env vars and flags are plain strings; JSON lists also work)."""
    if isinstance(v, str):
        return [part.strip() for part in v.split(",") if part.strip()]
    return v


class Settings(BaseSettings):
    # no inf or nan: nan passes no bound check, and an infinite drain timeout crashed the start-up with a traceback
    model_config = SettingsConfigDict(env_prefix="ADSA_", extra="forbid", validate_default=True, allow_inf_nan=False)

    # --- listener
    host: str = Field(
        "127.0.0.1", description="Address to bind (0.0.0.0: every interface, as the container image sets)"
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")

    # --- model (all unset: the embedded emoji demo model)
    gpt_model: str | None = Field(None, description="GPT preset, e.g. GPT-XL (random weights without --gpt-ckpt)")
    gpt_config: str | None = Field(None, description="LlamaGen-style GPT JSON config (file or inline JSON)")
    gpt_ckpt: str | None = Field(None, description="GPT checkpoint (official LlamaGen format)")
    vq_ckpt: str | None = Field(None, description="VQ tokenizer checkpoint (images need it)")
    vq_config: str | None = Field(None, description="VQ JSON config (file or inline JSON)")
    image_size: int | None = Field(None, ge=16, description="Image size in pixels (preset models)")
    num_classes: int | None = Field(None, ge=1, description="Classes of a class-conditional preset")
    text_encoder: str | None = Field(None, description="Local FLAN-T5 directory (text-to-image models)")
    model_seed: int = Field(0, ge=0, description="Seed for random weights when no checkpoint is given")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on cuda, float32 on cpu"
    )
    # the values of adsa_core.loading.MATMUL_DTYPES (a test keeps them equal)
    matmul_dtype: Literal["auto", "fp8"] = Field(
        "auto",
        description=MATMUL_DTYPE_HELP,
    )

    # --- KV cache and engine
    kv_policy: str = Field(_CACHE.policy, description="Default KV policy (dense, adsa, window, line, ...)")
    kv_budget: int | float | None = Field(
        _CACHE.budget, description="Default KV budget: int tokens, float fraction in (0, 1], or none (no eviction)"
    )
    kv_prefix: int | None = Field(None, ge=1, description="Never-evicted prefix tokens (unset: from the budget)")
    kv_local: int | None = Field(None, ge=1, description="Never-evicted local window (unset: from the budget)")
    max_batch_size: int | None = Field(
        None, ge=1, description="Images decoded together (unset: on CUDA as many CFG images at the default budget "
        "as the KV pool holds, up to 512; 8 on a CPU)"
    )
    kv_pool_tokens: int | None = Field(None, ge=1, description="KV pool size in token slots (unset: by memory)")
    kv_pool_memory_fraction: float = Field(
        _ENGINE.kv_pool_memory_fraction, gt=0, le=1, description="Share of free device memory for the KV pool"
    )
    max_queue: int = Field(_ENGINE.max_queue, ge=1, description="Waiting images beyond this get HTTP 429")
    cuda_graphs: bool = Field(_ENGINE.cuda_graphs, description="Capture the decode step in CUDA graphs")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the decode step and the VQ decoder for every batch bucket at warm-up. "
        "auto: on for CUDA"
    )
    vq_autotune: bool = Field(
        _ENGINE.vq_autotune,
        description="Compile the VQ decoder with Inductor's max-autotune (GPU, compile on): the decode 10-15 % faster "
        "(1.63 against 1.81 ms an image on an H200), 1-2 % of an image's GPU time (+0.5 % images/s measured), for ~5 "
        "minutes more at the first start; set compile_cache_dir so that restarts reuse it",
    )
    compile_cache_dir: str | None = Field(
        None, description="Persistent torch.compile / Triton cache (a volume): a restart skips the compile"
    )
    # the values of adsa_core.kv.pool.KV_CACHE_DTYPES (a test keeps them equal; pool imports torch)
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        _ENGINE.kv_cache_dtype,  # type: ignore[arg-type]  # EngineConfig keeps a str; validate_default checks it
        description="KV cache storage. auto: the model's dtype; fp8: e4m3 K/V, half the KV memory and bandwidth, "
        "GPUs with compute capability >= 8.9 (H100, L4)",
    )
    health_stall_s: float = Field(
        120.0,
        gt=0,
        description="/healthz fails after this long without a report from the engine (it reports after every "
        "step and every 0.2 s while idle: silence is a step that hangs)",
    )

    # --- requests
    request_timeout_s: float = Field(300.0, gt=0, description="Deadline of a generate request (HTTP 504)")
    preview_every_rows: int = Field(
        4, ge=0, description="Default partial-preview interval of streamed requests, in token rows (0: off)"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get HTTP 413")
    read_timeout_s: float = Field(
        30.0, gt=0, description="A client must send a request's headers, then its body, within this long "
        "(else the connection is closed, or HTTP 408 for a body)"
    )
    drain_timeout_s: float = Field(60.0, ge=0, description="SIGTERM: how long in-flight requests may finish")

    # --- access and logging
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer keys for /v1/*; empty: no auth"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated allowed CORS origins; empty: CORS off"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="Log level")
    log_format: Literal["text", "json"] = Field(
        "text", description="Log lines as text, or one JSON object each (with request_id) for log pipelines"
    )

    _split = field_validator("cors_origins", mode="before")(_split_commas)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v: object) -> object:
        """Split as the origins are; but ',' or ' , ' names no key: read as 'no auth' it would open the API to
        anyone, without a word."""
        keys = _split_commas(v)
        if isinstance(v, str) and v.strip() and not keys:
            raise ValueError(f"{v!r} names no key (leave it unset or empty to run without keys)")
        return keys

    @field_validator("kv_budget", mode="before")
    @classmethod
    def _budget(cls, v: object) -> object:
        return parse_budget(v) if isinstance(v, str) else v  # env vars and flags are text

    @field_validator("kv_policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        get_policy(v)  # an unknown name fails here, at start-up, not after the server has begun to listen
        return v

    @field_validator("*", mode="before")
    @classmethod
    def _lower(cls, v: object, info: ValidationInfo) -> object:
        """A word setting (a Literal of lower-case words) in any case, as its flag takes it (server/__main__.py)."""
        word = get_origin(cls.model_fields[info.field_name or ""].annotation) is Literal
        return v.lower() if word and isinstance(v, str) else v

    def model_spec(self) -> ModelSpec:
        from adsa_core.loading import ModelSpec  # lazily: loading imports the torch model code

        return ModelSpec(
            gpt_model=self.gpt_model,
            gpt_config=self.gpt_config,
            gpt_ckpt=self.gpt_ckpt,
            vq_ckpt=self.vq_ckpt,
            vq_config=self.vq_config,
            image_size=self.image_size,
            num_classes=self.num_classes,
            text_encoder=self.text_encoder,
            device=self.device,
            dtype=self.dtype,
            seed=self.model_seed,
            matmul_dtype=self.matmul_dtype,
        )

    def cache_config(self) -> CacheConfig:
        """Raises adsa_core.config.ConfigError for an impossible policy/budget."""
        return CacheConfig(policy=self.kv_policy, budget=self.kv_budget, prefix=self.kv_prefix, local=self.kv_local)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            kv_pool_tokens=self.kv_pool_tokens,
            kv_pool_memory_fraction=self.kv_pool_memory_fraction,
            max_queue=self.max_queue,
            cuda_graphs=self.cuda_graphs,
            kv_cache_dtype=self.kv_cache_dtype,
            compile_step={"auto": None, "on": True, "off": False}[self.compile],
            vq_autotune=self.vq_autotune,
            default_cache=self.cache_config(),
        )

    def engine_env(self) -> dict[str, str]:
        """Environment of the engine-core process: its log format, and where torch.compile and Triton keep
        their caches."""
        env: dict[str, str] = {"ADSA_LOG_FORMAT": self.log_format}
        if self.compile_cache_dir:
            root = self.compile_cache_dir
            env.update(TORCHINDUCTOR_CACHE_DIR=f"{root}/inductor", TRITON_CACHE_DIR=f"{root}/triton")
        return env
