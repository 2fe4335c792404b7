"""Command-line plumbing shared by the tools (adsa-generate, adsa-fidelity): the model flags, argument types,
and the entry-point wrapper that turns every error into one line and exit status 2."""

from __future__ import annotations

import argparse
import os
import select
import sys
from collections.abc import Callable

from .config import MATMUL_DTYPE_HELP, ConfigError, parse_budget
from .loading import MATMUL_DTYPES, ModelSpec

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


class UsageError(Exception):
    """A bad command line; reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """Reports a bad command line as a UsageError (one line through `run_main`) instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _stdout_reader_gone() -> bool:
    """stdout is a pipe nobody reads any more (poll reports an error on a pipe's write end then)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no fd (a test's capture), no poll (not POSIX)
        return False


def run_main(prog: str, body: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """A tool's entry point: every error one line on stderr with status 2, never a traceback."""
    try:
        return body(argv)
    except BrokenPipeError as e:
        if _stdout_reader_gone():  # `| head` left: it had what it wanted; quiet, like any Unix tool
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error flushing at exit
            return 0
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)  # another pipe: an error like any
        return 2
    except (UsageError, ValueError, OSError) as e:  # ConfigError and CheckpointError are ValueErrors
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def int_list(text: str) -> list[int]:
    """'1,7, 3' -> [1, 7, 3] (a trailing comma is fine; '1,,3' is a label left out, and an error)."""
    items = text.replace(" ", "").removesuffix(",").split(",")
    try:
        labels = [int(t) for t in items] if text.strip(" ,") else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("no labels given")
    return labels


def budget_arg(text: str) -> int | float | None:
    """A KV budget flag: config.parse_budget, its message shown by argparse."""
    try:
        return parse_budget(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags shared by adsa-generate and adsa-fidelity; `model_spec_from_args` reads them back."""
    m = p.add_argument_group("model (no model flags: the embedded demo model)")
    arch = m.add_mutually_exclusive_group()
    arch.add_argument("--gpt-model", metavar="NAME", help="preset: GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B")
    arch.add_argument("--gpt-config", metavar="JSON", help="LlamaGen-style GPT config, file or inline JSON")
    m.add_argument("--image-size", type=int, metavar="PX", help="pixels per side (presets: default 384)")
    m.add_argument("--gpt-ckpt", metavar="PATH", help="GPT checkpoint (official format); none: random")
    m.add_argument("--vq-ckpt", metavar="PATH", help="VQ tokenizer checkpoint; needed for images")
    m.add_argument("--vq-config", metavar="JSON", help="VQ config JSON (file or inline); default VQ-16")
    m.add_argument("--num-classes", type=int, metavar="N", help="classes of a c2i model (default 1000)")
    m.add_argument("--matmul-dtype", choices=MATMUL_DTYPES, default="auto",
                   help=MATMUL_DTYPE_HELP)


def model_spec_from_args(a: argparse.Namespace) -> ModelSpec:
    """The ModelSpec of `add_model_args` flags (plus --text-encoder, --device, --dtype where the parser has them)."""
    return ModelSpec(
        gpt_model=a.gpt_model, gpt_config=a.gpt_config, gpt_ckpt=a.gpt_ckpt, vq_ckpt=a.vq_ckpt,
        vq_config=a.vq_config, image_size=a.image_size, num_classes=a.num_classes,
        text_encoder=getattr(a, "text_encoder", None), device=getattr(a, "device", "auto"),
        dtype=getattr(a, "dtype", "auto"), matmul_dtype=a.matmul_dtype,
    )
