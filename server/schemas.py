"""Request and response bodies of the HTTP API (OpenAI Images conventions plus AR extras).

Field constraints here are the first line of validation (HTTP 422 before anything reaches the
engine); what depends on the loaded model (label range, policy names, prompt vs class) is
checked in `server.service` against the engine's ModelInfo.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from adsa_core.config import SEED_END, ConfigError, check_budget

MAX_IMAGES = 16  # per request; larger jobs should be split so one client cannot fill the queue alone
MAX_ERRORS = 20  # validation problems reported one by one; beyond this a request gets one summary
MAX_SEED = SEED_END - 1 - MAX_IMAGES  # image i uses seed + i, which must stay a signed 64-bit integer

ClassLabel = Annotated[int, Field(ge=0, le=1_000_000)]


def _kv_budget(value: Any) -> Any:
    """The one budget check (config.check_budget), so the API words a bad budget as the CLI and settings do,
    and the error names the field `kv_budget` (a union of constrained types would name its branches)."""
    try:
        check_budget(value)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if isinstance(value, int) and value > 1_000_000:
        raise ValueError(f"kv budget {value} tokens is larger than any model's sequence")
    return value


KvBudget = Annotated[int | float | None, BeforeValidator(_kv_budget)]


def _refusal(message: str, param: str | None = None) -> PydanticCustomError:
    """A check across fields, worded as is; `param`: the field the error body names (errors.validation_error)."""
    return PydanticCustomError("value_error", message, {"param": param} if param else None)


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for humans")
    type: str = Field(
        description="OpenAI's category: invalid_request_error, authentication_error, not_found_error, "
        "rate_limit_error or server_error"
    )
    param: str | None = Field(description="The request field at fault, when one is (e.g. n, size, prompt)")
    code: str = Field(description="Stable machine-readable kind, e.g. invalid_request, queue_full, not_ready")


class ErrorBody(BaseModel):
    """Every error response (OpenAI's shape)."""

    error: ErrorDetail

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "n: Input should be less than or equal to 16",
                        "type": "invalid_request_error",
                        "param": "n",
                        "code": "invalid_request",
                    }
                }
            ]
        }
    )


class GenerationOptions(BaseModel):
    """What both generate routes take besides the condition: seeds, sampling, the KV cache, a deadline.
    strict: "5" is not a number and true is not 1; floats reject NaN and infinities."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(None, max_length=200, description="Served model id; optional (one model per server)")
    n: int | None = Field(None, ge=1, le=MAX_IMAGES, description="Images; default 1")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Image i uses seed + i; default random. Same seed, same bytes"
    )
    cfg_scale: float | None = Field(None, ge=0, le=100, description="Classifier-free guidance; <= 1 turns it off")
    cfg_interval: int | None = Field(None, ge=-1, le=1_000_000, description="-1: CFG on every token")
    temperature: float | None = Field(None, gt=0, le=100)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="0: off")
    top_p: float | None = Field(None, gt=0, le=1, description="1: off")
    policy: str | None = Field(None, max_length=32, description="KV policy, see GET /v1/models (dense, adsa, ...)")
    kv_budget: KvBudget = Field(
        None, description="KV slots per sequence: int tokens (>= 1) or float fraction of the sequence in (0, 1]"
    )
    timeout_s: float | None = Field(None, gt=0, le=86400, description="Deadline; capped at the server's")

    @model_validator(mode="before")
    @classmethod
    def _many_unknown_fields(cls, data: Any) -> Any:
        """One error for many unknown fields: 100,000 of them would cost seconds of event-loop time to report
        one by one (pydantic itself is fast; turning its errors into Python objects is not)."""
        if isinstance(data, dict) and len(data) > len(cls.model_fields) + MAX_ERRORS:  # so many are unknown
            unknown = [k for k in data if k not in cls.model_fields]
            names = ", ".join(repr(str(k)[:40]) for k in unknown[:MAX_ERRORS])
            raise ValueError(f"{len(unknown)} unknown fields, e.g. {names}")
        return data


_CONDITIONS = ("class_label", "class_labels", "prompt")


def _generate_schema(schema: dict[str, Any]) -> None:
    # "exactly one of" in the schema itself, so that schema-valid bodies are ones the server takes
    # (a field sent as null counts as not given, as in the validator below)
    schema["oneOf"] = [{"required": [k], "properties": {k: {"not": {"type": "null"}}}} for k in _CONDITIONS]
    schema["examples"] = [
        {"class_label": 3, "n": 2, "seed": 42, "cfg_scale": 4.0, "policy": "adsa", "kv_budget": 0.5},
        {"prompt": "a red fox in the snow", "seed": 7, "response_format": "png"},
    ]


class GenerateRequest(GenerationOptions):
    """Generate `n` images for a class label (class models) or a prompt (text models): exactly one of
    class_label, class_labels, prompt."""

    model_config = ConfigDict(json_schema_extra=_generate_schema)

    class_label: ClassLabel | None = Field(None, description="Class-conditional models: one label for all n images")
    class_labels: list[ClassLabel] | None = Field(
        None, min_length=1, max_length=MAX_IMAGES, description="One image per label (n = len(class_labels))"
    )
    prompt: str | None = Field(None, min_length=1, max_length=4000, description="Text-conditional models")
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

    @model_validator(mode="after")
    def _one_condition(self) -> GenerateRequest:
        given = [k for k in _CONDITIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise _refusal("give exactly one of class_label, class_labels or prompt")
        if self.class_labels is not None and self.n is not None and self.n != len(self.class_labels):
            raise _refusal(f"n={self.n} but {len(self.class_labels)} class_labels were given", "n")
        if self.stream and self.response_format == "png":
            raise _refusal("stream=true sends base64 images; response_format png is not streamable", "response_format")
        if self.response_format == "png" and self.image_count > 1:
            raise _refusal("response_format png returns one image; use b64_json for n > 1", "response_format")
        return self

    @property
    def image_count(self) -> int:
        return len(self.class_labels) if self.class_labels is not None else (self.n or 1)


# OpenAI's image parameters besides prompt, n, size and model, which its SDKs send as the caller gives them. This server
# makes opaque PNGs and returns them inline, and this route does not stream: each field's type takes the values that it
# honours or that change nothing here (null too); any other is refused saying what is taken. field -> what is taken
OPENAI_IMAGE_VALUES: dict[str, str] = {
    "response_format": "images come back inline only (b64_json)",
    "quality": "this server has one quality (auto or standard)",
    "output_format": "images are PNG (png)",
    "output_compression": "PNG is lossless (100; compression is for jpeg and webp)",
    "background": "images are opaque (auto or opaque)",
    "stream": "this route does not stream (false); POST /v1/generate streams (stream: true)",
    "partial_images": "this route does not stream (0); POST /v1/generate streams previews (stream: true)",
    "style": "this server has no styles (leave style out)",
    "complexity": "this server has no complexity setting (leave it out)",
    "frame_count": "images are PNG, not GIF (leave it out)",
    "frame_duration_ms": "images are PNG, not GIF (leave it out)",
    "svg": "images are PNG, not SVG (leave it out)",
}


class ImagesRequest(GenerationOptions):
    """OpenAI's `POST /v1/images/generations`. Class-conditional models read the prompt as a class name
    (GET /v1/models/{id}: `class_prompt`). This server's own options (seed, policy, kv_budget, cfg_scale,
    ...) are extra body fields (the openai SDK's `extra_body`). OpenAI's other parameters are taken with the
    values this server honours (OPENAI_IMAGE_VALUES); fields that are not OpenAI's are refused."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "emoji-demo", "prompt": "fox face", "n": 2, "size": "128x128", "response_format": "b64_json"},
                {"prompt": "golden retriever", "seed": 42, "cfg_scale": 4.0, "policy": "adsa", "kv_budget": 0.25},
            ]
        }
    )

    prompt: str = Field(min_length=1, max_length=4000, description="Text models: the caption; class models: a class")
    size: str | None = Field(
        None, max_length=32, description="WIDTHxHEIGHT: the served model's size (GET /v1/models), or auto"
    )
    response_format: Literal["b64_json"] | None = Field(
        None, description="b64_json (default); url is refused: this server returns images inline only"
    )
    quality: Literal["auto", "standard"] | None = Field(None, description="One quality; hd, high, ... are refused")
    output_format: Literal["png"] | None = Field(None, description="png (default): jpeg, webp, ... are refused")
    output_compression: Literal[100] | None = Field(None, description="100 (default): PNG is lossless")
    background: Literal["auto", "opaque"] | None = Field(None, description="Images are opaque: transparent is refused")
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted for compatibility, unused")
    stream: Literal[False] | None = Field(None, description="false (default); POST /v1/generate streams")
    partial_images: Literal[0] | None = Field(None, description="0 (default); POST /v1/generate streams previews")
    style: None = Field(None, description="Refused (OpenAI's vivid, natural): this server has no styles")
    complexity: None = Field(None, description="Refused: no such setting here")
    frame_count: None = Field(None, description="Refused: images are PNG, not GIF")
    frame_duration_ms: None = Field(None, description="Refused: images are PNG, not GIF")
    svg: None = Field(None, description="Refused: images are PNG, not SVG")
    user: str | None = Field(None, max_length=256, description="End-user id; accepted for compatibility, unused")
    safety_identifier: str | None = Field(
        None, max_length=256, description="End-user id (OpenAI's successor to user); accepted for compatibility, unused"
    )

    @field_validator(*OPENAI_IMAGE_VALUES, mode="before")
    @classmethod
    def _openai_value(cls, value: Any, info: ValidationInfo) -> Any:
        """Before the type check, so that every refused value, OpenAI's or not, says what is taken."""
        name = str(info.field_name)
        # the values its Literal type takes; by type as well: JSON's false is not 0, nor 100.0 the integer 100
        taken = [v for arg in get_args(cls.model_fields[name].annotation) if get_origin(arg) is Literal
                 for v in get_args(arg)]
        if value is None or any(type(value) is type(t) and value == t for t in taken):
            return value
        what = OPENAI_IMAGE_VALUES[name]
        shown = repr(value[:40]) if isinstance(value, str) else json.dumps(value, default=str)[:40]
        raise ValueError(f"{shown} is not supported; {what}")


class KVStats(BaseModel):
    kv_policy: str = Field(description="KV policy this image ran with (the server's default when none was asked)")
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
                                "kv_policy": "line",
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


class ImageObject(BaseModel):
    b64_json: str = Field(description="Base64 PNG")


class InputTokensDetails(BaseModel):
    text_tokens: int = Field(description="Condition tokens read from the prompt (all of them)")
    image_tokens: int = Field(0, description="Always 0: no image input")


class OutputTokensDetails(BaseModel):
    image_tokens: int = Field(description="Image tokens sampled (all of them)")
    text_tokens: int = Field(0, description="Always 0: no text output")


class ImagesUsage(BaseModel):
    """Tokens in the model's own units, summed over the n images."""

    input_tokens: int = Field(description="Condition tokens: 1 class token per image, or the prompt's T5 tokens")
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(description="Image tokens sampled: the token grid per image (24x24 for 384 px LlamaGen)")
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time")
    data: list[ImageObject]
    size: str = Field(description="WIDTHxHEIGHT of every image")
    output_format: Literal["png"] = "png"
    usage: ImagesUsage


class ModelLimits(BaseModel):
    max_images_per_request: int
    max_batch_size: int
    max_queue: int
    max_body_bytes: int
    request_timeout_s: float
    preview_every_rows: int = Field(description="Default preview interval of streamed requests")


class ClassInfo(BaseModel):
    """A class and the names a prompt may use for it; fields a model does not have are left out."""

    id: int
    name: str
    emoji: str | None = Field(None, description="The demo model's classes")
    synonyms: list[str] | None = Field(None, description="ImageNet classes: the WordNet lemmas, name first")
    wnid: str | None = Field(None, description="ImageNet classes: the WordNet id")

    @model_serializer(mode="wrap")
    def _without_nones(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ModelCard(BaseModel):
    """OpenAI's model object (id, object, created, owned_by) plus what a client needs to build requests."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the server loaded the model")
    owned_by: str = Field("adsa-serve", description="Who serves it")
    model_type: str = Field(description="c2i (class label) or t2i (text prompt)")
    image_size: int
    num_classes: int | None = None
    classes: list[ClassInfo] | None = None
    class_prompt: str | None = Field(
        None, description="Class models: how a prompt (POST /v1/images/generations) names a class"
    )
    policies: list[str]
    default_policy: str
    default_budget: int | float | None = Field(description="Default KV budget in tokens per sequence")
    min_budget: int | None = Field(
        None, description="Smallest kv_budget in tokens a sparse policy accepts with this server's prefix and local"
        " window",
    )
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
