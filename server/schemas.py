"""Request and response bodies of the HTTP API (OpenAI Images conventions plus AR extras).

Field constraints here are the first line of validation (HTTP 422 before anything reaches the
engine); what depends on the loaded model (label range, policy names, prompt vs class) is
checked in `server.service` against the engine's ModelInfo.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_IMAGES = 16  # per request; larger jobs should be split so one client cannot fill the queue alone
MAX_SEED = 2**63 - 1 - MAX_IMAGES  # image i uses seed + i, which must stay a signed 64-bit integer

ClassLabel = Annotated[int, Field(ge=0, le=1_000_000)]


class ErrorBody(BaseModel):
    """Every error response."""

    error: str = Field(description="What went wrong, for humans")
    type: str = Field(description="Stable machine-readable kind, e.g. invalid_request, queue_full")

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": "n: Input should be less than or equal to 16", "type": "invalid_request"}]
        }
    )


class GenerateRequest(BaseModel):
    """Generate `n` images for a class label (class models) or a prompt (text models)."""

    # strict: "5" is not a number and true is not 1; floats reject NaN and infinities
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [
                {"class_label": 3, "n": 2, "seed": 42, "cfg_scale": 4.0, "policy": "adsa", "kv_budget": 0.5},
                {"prompt": "a red fox in the snow", "seed": 7, "response_format": "png"},
            ]
        },
    )

    model: str | None = Field(None, max_length=200, description="Served model id; optional (one model per server)")
    class_label: ClassLabel | None = Field(None, description="Class-conditional models: one label for all n images")
    class_labels: list[ClassLabel] | None = Field(
        None, min_length=1, max_length=MAX_IMAGES, description="One image per label (n = len(class_labels))"
    )
    prompt: str | None = Field(None, min_length=1, max_length=4000, description="Text-conditional models")
    n: int | None = Field(None, ge=1, le=MAX_IMAGES, description="Images; default 1 (or len(class_labels))")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Image i uses seed + i; default random. Same seed, same bytes"
    )
    cfg_scale: float | None = Field(None, ge=0, le=100, description="Classifier-free guidance; <= 1 turns it off")
    cfg_interval: int | None = Field(None, ge=-1, le=1_000_000, description="-1: CFG on every token")
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="0: off")
    top_p: float | None = Field(None, gt=0, le=1, description="1: off")
    policy: str | None = Field(None, max_length=32, description="KV policy, see GET /v1/models (dense, adsa, ...)")
    kv_budget: Annotated[int, Field(ge=1, le=1_000_000)] | Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="KV slots per sequence: int tokens or float fraction of the sequence"
    )
    response_format: Literal["b64_json", "png"] | None = Field(
        None,
        description="b64_json (default) or png: raw image/png bytes (n = 1 only). "
        "Accept: image/png also selects png when n = 1",
    )
    stream: bool = Field(False, description="Server-sent events: progress, partial_image, image, done, error")
    preview_every_rows: int | None = Field(
        None,
        ge=0,
        le=1024,
        description="Streamed previews every k token rows (0: none); server default if unset",
    )
    timeout_s: float | None = Field(None, gt=0, le=86400, description="Deadline; capped at the server's")

    @model_validator(mode="after")
    def _one_condition(self) -> GenerateRequest:
        given = [k for k in ("class_label", "class_labels", "prompt") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of class_label, class_labels or prompt")
        if self.class_labels is not None and self.n is not None and self.n != len(self.class_labels):
            raise ValueError(f"n={self.n} but {len(self.class_labels)} class_labels were given")
        if self.stream and self.response_format == "png":
            raise ValueError("stream=true sends base64 images; response_format png is not streamable")
        if self.response_format == "png" and self.image_count > 1:
            raise ValueError("response_format png returns one image; use b64_json for n > 1")
        return self

    @property
    def image_count(self) -> int:
        return len(self.class_labels) if self.class_labels is not None else (self.n or 1)


class KVStats(BaseModel):
    kv_budget_tokens: int = Field(description="KV slots per sequence this image ran with")
    peak_kv_tokens: int = Field(description="Most tokens resident for one sequence/layer/head")
    evictions: int = Field(description="Slot overwrites, summed over sequences, layers and heads")
    spilled_bytes: int = Field(description="K/V bytes copied to pinned CPU memory")
    swapped_out: int = Field(description="Times the image was swapped out to CPU")
    kv_bytes: int = Field(description="KV pool bytes reserved for the image (all its sequences: two with CFG)")


class Timings(BaseModel):
    queue_s: float = Field(description="Arrival to first decode step")
    run_s: float = Field(description="First decode step to last token")


class ImageData(BaseModel):
    index: int
    seed: int
    b64_json: str | None = Field(description="Base64 PNG; null when the server runs without a VQ decoder")
    tokens: list[int] | None = Field(None, description="Image token ids, only when there is no VQ decoder")
    kv_stats: KVStats
    timings: Timings


class GenerateResponse(BaseModel):
    created: int = Field(description="Unix time")
    seed: int = Field(description="Seed of image 0 (also in the X-Seed header)")
    data: list[ImageData]

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "created": 1764212345,
                    "seed": 42,
                    "data": [
                        {
                            "index": 0,
                            "seed": 42,
                            "b64_json": "iVBORw0KGgo...",
                            "tokens": None,
                            "kv_stats": {
                                "kv_budget_tokens": 128,
                                "peak_kv_tokens": 128,
                                "evictions": 4096,
                                "spilled_bytes": 1048576,
                                "swapped_out": 0,
                                "kv_bytes": 2097152,
                            },
                            "timings": {"queue_s": 0.01, "run_s": 1.2},
                        }
                    ],
                }
            ]
        }
    )


class ModelLimits(BaseModel):
    max_images_per_request: int
    max_batch_size: int
    max_queue: int
    max_body_bytes: int
    request_timeout_s: float
    preview_every_rows: int = Field(description="Default preview interval of streamed requests")


class ClassInfo(BaseModel):
    id: int
    name: str
    emoji: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    model_type: str = Field(description="c2i (class label) or t2i (text prompt)")
    image_size: int
    num_classes: int | None = None
    classes: list[ClassInfo] | None = None
    policies: list[str]
    default_policy: str
    default_budget: int | float | None = Field(description="Default KV budget in tokens per sequence")
    seq_len: int | None = Field(None, description="Tokens a sequence holds without eviction (dense budget)")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="KV cache storage (ADSA_KV_CACHE_DTYPE): auto, the model's dtype; fp8, e4m3 K/V"
    )
    sampling_defaults: dict[str, Any]
    limits: ModelLimits


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str


# OpenAPI documentation of the error responses every route may return
def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorBody} for s in statuses}
