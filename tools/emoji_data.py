"""Render the Noto Color Emoji font into the demo model's training set.

Needs the Debian packages `fonts-noto-color-emoji` (the images) and `unicode-data`
(`emoji-test.txt`: the list of RGI emoji and their CLDR short names):

    apt-get install -y fonts-noto-color-emoji unicode-data
    python3 tools/emoji_data.py --out .device-carry/emoji.npz --classes adsa_core/assets/demo/classes.json

Every fully-qualified, non-component emoji of emoji-test.txt that the font draws as one
glyph is rendered in colour (FreeType size 109, the font's only bitmap strike), composited
on white, centred on its visible pixels in a 136 x 136 square and resized to 128 x 128 RGB.

Classes (one per base emoji):
- skin tones: U+1F3FB..U+1F3FF (and variation selectors) are removed from the sequence; what
  remains is the class, and every toned variant becomes one more image of that class. Six
  emoji spell their mixed-tone forms as ZWJ sequences of two people or hands (handshake,
  kiss, couple with heart, three "holding hands"): those fold into the single code point;
- variation selectors: only fully-qualified sequences (emoji presentation, U+FE0F) are
  used, so an emoji and its text-presentation form are one class (and "✌️" and "✌🏻",
  which Unicode spells without U+FE0F, are one class);
- everything else (gender, hair style, family make-up, flags, keycaps) is its own class,
  as in Unicode: "man running" and "woman running" are different emoji.
Names: `unicodedata.name` in lower case for single code points; the CLDR short name of
emoji-test.txt for sequences (and for code points newer than Python's Unicode tables).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import subprocess
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_SIZE = 109  # the only bitmap strike of Noto Color Emoji (glyphs are 136 x 128 px)
CANVAS = 136  # square the glyph is centred in before resizing
IMAGE_SIZE = 128
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
VARIATION_SELECTORS = {0xFE0E, 0xFE0F}
# Toned forms whose untoned emoji is another (single) code point: Unicode writes the mixed-tone
# versions of these as ZWJ sequences of the two people / hands.
TONED_ALIASES: dict[tuple[int, ...], tuple[int, ...]] = {
    (0x1FAF1, 0x200D, 0x1FAF2): (0x1F91D,),  # handshake
    (0x1F469, 0x200D, 0x1F91D, 0x200D, 0x1F469): (0x1F46D,),  # women holding hands
    (0x1F469, 0x200D, 0x1F91D, 0x200D, 0x1F468): (0x1F46B,),  # woman and man holding hands
    (0x1F468, 0x200D, 0x1F91D, 0x200D, 0x1F468): (0x1F46C,),  # men holding hands
    (0x1F9D1, 0x200D, 0x2764, 0x200D, 0x1F48B, 0x200D, 0x1F9D1): (0x1F48F,),  # kiss
    (0x1F9D1, 0x200D, 0x2764, 0x200D, 0x1F9D1): (0x1F491,),  # couple with heart
}


@dataclass(frozen=True)
class Emoji:
    """One line of emoji-test.txt."""

    codepoints: tuple[int, ...]
    name: str  # CLDR short name
    group: str

    @property
    def text(self) -> str:
        return "".join(chr(c) for c in self.codepoints)


def read_emoji_test(path: str = EMOJI_TEST) -> list[Emoji]:
    """Fully-qualified emoji in file order (Unicode's order), components excluded."""
    out: list[Emoji] = []
    group = ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if not line or line.startswith("#") or ";" not in line:
            continue
        code_part, rest = line.split(";", 1)
        status, comment = rest.split("#", 1)
        if status.strip() != "fully-qualified" or group == "Component":
            continue
        # comment: " 😀 E1.0 grinning face"
        name = comment.strip().split(" ", 2)[2]
        out.append(Emoji(tuple(int(c, 16) for c in code_part.split()), name, group))
    return out


def base_key(codepoints: tuple[int, ...]) -> tuple[int, ...]:
    """The class of an emoji: the sequence without skin-tone modifiers and variation selectors."""
    key = tuple(c for c in codepoints if c not in SKIN_TONES and c not in VARIATION_SELECTORS)
    return TONED_ALIASES.get(key, key)


def class_name(e: Emoji) -> str:
    cps = [c for c in e.codepoints if c not in VARIATION_SELECTORS]
    if len(cps) == 1:
        try:
            return unicodedata.name(chr(cps[0])).lower()
        except ValueError:  # newer than this Python's Unicode tables
            pass
    return e.name.lower()


def render(font: ImageFont.FreeTypeFont, text: str) -> Image.Image | None:
    """The emoji in colour on white, centred on its visible pixels, IMAGE_SIZE square; None if the
    font does not draw it as a single glyph."""
    if abs(font.getlength(text) - font.getlength("\U0001F600")) > 1:
        return None  # not shaped into one glyph: the font lacks this sequence
    layer = Image.new("RGBA", (2 * CANVAS, 2 * CANVAS), (255, 255, 255, 0))
    ImageDraw.Draw(layer).text((CANVAS // 2, CANVAS // 2), text, font=font, embedded_color=True)
    bbox = layer.getchannel("A").getbbox()
    if bbox is None:
        return None
    glyph = layer.crop(bbox)
    w, h = glyph.size
    if max(w, h) > CANVAS:  # never expected for this font; shrink rather than clip
        s = CANVAS / max(w, h)
        glyph = glyph.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
        w, h = glyph.size
    square = Image.new("RGBA", (CANVAS, CANVAS), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((CANVAS - w) // 2, (CANVAS - h) // 2))
    return square.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def font_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "fonts-noto-color-emoji"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(font_path: str = FONT_PATH, emoji_test: str = EMOJI_TEST, limit: int | None = None) -> dict:
    """images (N, 128, 128, 3) uint8, labels (N,) int16, classes [{id, name, emoji}], stats."""
    font = ImageFont.truetype(font_path, FONT_SIZE)
    emojis = read_emoji_test(emoji_test)
    # The untoned emoji of each class names it (and is its "emoji").
    untoned = [e for e in emojis if not SKIN_TONES & set(e.codepoints)]
    by_key = {base_key(e.codepoints): e for e in untoned}
    if len(by_key) != len(untoned):
        raise ValueError("two untoned emoji fold into one class: check base_key")
    class_of: dict[tuple[int, ...], int] = {}
    classes: list[dict] = []
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[str] = []
    for e in emojis:
        key = base_key(e.codepoints)
        img = render(font, e.text)
        if img is None:
            skipped.append(e.name)
            continue
        if key not in class_of:
            if limit is not None and len(classes) >= limit:
                continue
            base = by_key.get(key)
            if base is None:
                raise ValueError(f"no untoned emoji for {e.name!r}: add it to TONED_ALIASES")
            class_of[key] = len(classes)
            classes.append({"id": len(classes), "name": class_name(base), "emoji": base.text})
        images.append(np.asarray(img, dtype=np.uint8))
        labels.append(class_of[key])
    stats = {
        "font": Path(font_path).name, "font_version": font_version(), "emoji_listed": len(emojis),
        "images": len(images), "classes": len(classes), "skipped": skipped,
    }
    return {"images": np.stack(images), "labels": np.asarray(labels, dtype=np.int16), "classes": classes,
            "stats": stats}


def save(data: dict, out: Path, preset: int = 6) -> None:
    """An .npz whose pixels are one xz stream: 22 MiB for the full set against 34 MiB for
    np.savez_compressed (neighbouring skin-tone variants share most bytes, and xz's window
    spans several images where zlib's 32 KiB does not)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    images = np.ascontiguousarray(data["images"], dtype=np.uint8)
    packed = np.frombuffer(lzma.compress(images.tobytes(), preset=preset), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, images_xz=packed, shape=np.asarray(images.shape, dtype=np.int64), labels=data["labels"],
             classes=np.asarray(json.dumps(data["classes"], ensure_ascii=False)),
             stats=np.asarray(json.dumps(data["stats"], ensure_ascii=False)))
    out.write_bytes(buf.getvalue())


def load(path: str | Path) -> dict:
    """The saved data set: images (N, H, W, 3) uint8, labels (N,) int64, classes, stats."""
    z = np.load(path)
    shape = tuple(int(n) for n in z["shape"])
    images = np.frombuffer(lzma.decompress(z["images_xz"].tobytes()), dtype=np.uint8).reshape(shape)
    return {"images": images, "labels": z["labels"].astype(np.int64),
            "classes": json.loads(str(z["classes"])), "stats": json.loads(str(z["stats"]))}


PROBE_EMOJI = ["😀", "🐶", "🍕", "🚗", "🌈", "⚽", "🎸", "🇯🇵"]


def write_probe(path: Path, emojis: list[str] = PROBE_EMOJI, font_path: str = FONT_PATH) -> None:
    """A strip of training renders (128 px each, left to right) for tests on machines without the font;
    the emoji are listed in the PNG's "emoji" text chunk."""
    font = ImageFont.truetype(font_path, FONT_SIZE)
    strip = Image.new("RGB", (IMAGE_SIZE * len(emojis), IMAGE_SIZE), "white")
    for i, e in enumerate(emojis):
        img = render(font, e)
        if img is None:
            raise ValueError(f"the font does not draw {e!r}")
        strip.paste(img, (IMAGE_SIZE * i, 0))
    info = PngImagePlugin.PngInfo()
    info.add_text("emoji", json.dumps(emojis, ensure_ascii=False))
    strip.save(path, pnginfo=info, optimize=True)


def write_classes(classes: list[dict], path: Path) -> None:
    """classes.json: a list in class-id order, one {"id", "name", "emoji"} object a line."""
    lines = ",\n".join(json.dumps(c, ensure_ascii=False) for c in classes)
    path.write_text("[\n" + lines + "\n]\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".device-carry/emoji.npz"))
    ap.add_argument("--classes", type=Path, default=None, help="also write classes.json here")
    ap.add_argument("--font", default=FONT_PATH)
    ap.add_argument("--emoji-test", default=EMOJI_TEST)
    ap.add_argument("--limit", type=int, default=None, help="only the first N classes (for tests)")
    ap.add_argument("--preview", type=Path, default=None, help="write a PNG grid of 64 images")
    ap.add_argument("--preview-start", type=int, default=0, help="first image of the preview grid")
    ap.add_argument("--probe", type=Path, default=None, help="write a strip of test renders (PNG) here")
    ap.add_argument("--xz-preset", type=int, default=6, help="xz level (0 is fast, for tests)")
    args = ap.parse_args()
    if args.probe is not None:
        write_probe(args.probe, font_path=args.font)
    data = build(args.font, args.emoji_test, args.limit)
    save(data, args.out, args.xz_preset)
    if args.classes is not None:
        args.classes.parent.mkdir(parents=True, exist_ok=True)
        write_classes(data["classes"], args.classes)
    if args.preview is not None:
        imgs = data["images"][args.preview_start:args.preview_start + 64]
        imgs = np.concatenate([imgs, np.full((64 - len(imgs), *imgs.shape[1:]), 255, np.uint8)])
        grid = imgs.reshape(8, 8, IMAGE_SIZE, IMAGE_SIZE, 3).transpose(0, 2, 1, 3, 4)
        Image.fromarray(grid.reshape(8 * IMAGE_SIZE, 8 * IMAGE_SIZE, 3)).save(args.preview)
    s = data["stats"]
    print(f"{s['images']} images, {s['classes']} classes from {s['emoji_listed']} listed emoji "
          f"({len(s['skipped'])} not drawn by the font); font {s['font']} {s['font_version']}; "
          f"{args.out} {args.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
