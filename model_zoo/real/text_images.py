"""Rendered text: fonts, a small sign/receipt/document text sampler, and Pillow rendering.

Fonts come from Debian packages: ``fonts-wqy-microhei`` (Chinese and Latin glyphs) and
``fonts-dejavu-core`` (Latin). They are looked up by file name in
``$ONNX_DC_FONT_DIR`` and the usual font directories; a missing font is a
:class:`~onnx_dc.errors.ModelError` naming the package to install, never a silent
fallback (a different font would give different inputs on different machines).

The text is the kind PP-OCR meets in practice: shop signs, addresses, receipts,
timetables, Latin words, prices, dates, codes. The word lists are written for this
project; every character is checked against the recognition model's dictionary by
the caller (:func:`sample_text_line` takes the allowed character set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from onnx_dc.errors import ModelError

FONT_DIR_ENV = "ONNX_DC_FONT_DIR"

CJK_FONT_FILE = "wqy-microhei.ttc"
LATIN_FONT_FILES = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
_FONT_PACKAGES = {CJK_FONT_FILE: "fonts-wqy-microhei", **{name: "fonts-dejavu-core" for name in LATIN_FONT_FILES}}
_SYSTEM_FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
    "/Library/Fonts",
    "/System/Library/Fonts",
)

_CHINESE_WORDS = (
    "中国", "北京", "上海", "广州", "深圳", "杭州", "南京", "成都", "武汉", "西安",
    "欢迎光临", "营业时间", "电话", "地址", "价格", "优惠", "特价", "新品", "出口", "入口",
    "停车场", "禁止吸烟", "请勿停车", "超市", "餐厅", "医院", "学校", "银行", "有限公司",
    "科技", "服务中心", "大学", "图书馆", "火车站", "机场", "地铁", "公交", "酒店", "咖啡",
    "面包", "水果", "蔬菜", "牛奶", "米饭", "面条", "饺子", "茶", "开放", "关闭", "会员",
    "免费", "送货上门", "时间", "日期", "合计", "数量", "单价", "金额", "发票", "收据",
    "姓名", "联系人", "手机", "邮箱", "网址", "注意安全", "小心地滑", "请排队", "谢谢",
    "你好", "今天", "明天", "天气", "多云", "温度", "文化", "历史", "人民", "城市", "道路",
    "东门", "南门", "西门", "北门", "大街", "广场", "市场", "书店", "药店", "工作日",
)
_CHINESE_PLACE_SUFFIXES = ("路", "街", "大道", "巷")
_LATIN_WORDS = (
    "open", "closed", "exit", "entrance", "station", "coffee", "bakery", "market", "hotel",
    "parking", "total", "price", "sale", "office", "street", "road", "avenue", "north",
    "south", "east", "west", "library", "school", "bank", "pharmacy", "welcome", "thank",
    "you", "please", "wait", "here", "daily", "menu", "tea", "water", "bread", "fresh",
    "fruit", "milk", "rice", "noodles", "service", "center", "city", "hall", "museum",
    "park", "garden", "airport", "terminal", "gate", "platform", "floor", "room", "model",
    "serial", "invoice", "receipt", "date", "time", "phone", "email", "order", "number",
)
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


@dataclass(frozen=True)
class FontSet:
    """Resolved font files: one CJK-capable font and several Latin ones."""

    cjk: Path
    latin: tuple[Path, ...]


@lru_cache(maxsize=1)
def find_fonts() -> FontSet:
    """Locate the fonts the text renderer needs; :class:`ModelError` names what is missing."""
    search_dirs = []
    configured = os.environ.get(FONT_DIR_ENV)
    if configured:
        search_dirs.append(Path(configured).expanduser())
    search_dirs.extend(Path(d).expanduser() for d in _SYSTEM_FONT_DIRS)
    wanted = (CJK_FONT_FILE, *LATIN_FONT_FILES)
    found: dict[str, Path] = {}
    for directory in search_dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.rglob("*")):
            if path.name in wanted and path.name not in found and path.is_file():
                found[path.name] = path
    missing = [name for name in wanted if name not in found]
    if missing:
        packages = sorted({_FONT_PACKAGES[name] for name in missing})
        raise ModelError(
            f"font file(s) {', '.join(missing)} not found; install the Debian package(s) "
            f"{' '.join(packages)} or put the files in ${FONT_DIR_ENV}"
        )
    return FontSet(cjk=found[CJK_FONT_FILE], latin=tuple(found[name] for name in LATIN_FONT_FILES))


@lru_cache(maxsize=256)
def load_font(path: Path, size_px: int) -> ImageFont.FreeTypeFont:
    """A Pillow FreeType font at ``size_px`` pixels (cached)."""
    return ImageFont.truetype(str(path), size_px)


def sample_text_line(rng: np.random.Generator, allowed_characters: frozenset[str]) -> tuple[str, bool]:
    """One line of realistic text; returns ``(text, needs_cjk_font)``.

    Characters not in ``allowed_characters`` are dropped, so the text is always
    something the recognition model's dictionary can express.
    """
    kind = int(rng.integers(0, 10))
    if kind <= 3:
        text = _chinese_line(rng)
    elif kind <= 5:
        text = _mixed_line(rng)
    else:
        text = _latin_line(rng)
    text = "".join(ch for ch in text if ch in allowed_characters).strip()
    if not text:
        text = "".join(ch for ch in "OPEN 24H" if ch in allowed_characters)
    needs_cjk = any(ord(ch) > 0x2FF for ch in text)
    return text, needs_cjk


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(0, len(words)))]


def _digits(rng: np.random.Generator, count: int) -> str:
    return "".join(str(int(d)) for d in rng.integers(0, 10, size=count))


def _chinese_line(rng: np.random.Generator) -> str:
    template = int(rng.integers(0, 5))
    if template == 0:
        return _pick(rng, _CHINESE_WORDS) + _pick(rng, _CHINESE_WORDS)
    if template == 1:
        return (
            _pick(rng, _CHINESE_WORDS[:10]) + "市" + _pick(rng, _CHINESE_WORDS[10:40])
            + _pick(rng, _CHINESE_PLACE_SUFFIXES) + str(int(rng.integers(1, 999))) + "号"
        )
    if template == 2:
        return "".join(_pick(rng, _CHINESE_WORDS) for _ in range(int(rng.integers(1, 4))))
    if template == 3:
        return f"{_pick(rng, ('合计', '单价', '金额', '价格'))}：{int(rng.integers(1, 999))}.{_digits(rng, 2)}元"
    return f"{_pick(rng, ('营业时间', '开放时间', '工作日'))} {int(rng.integers(6, 11)):02d}:00-{int(rng.integers(17, 23))}:30"


def _mixed_line(rng: np.random.Generator) -> str:
    template = int(rng.integers(0, 4))
    if template == 0:
        return f"电话：{_pick(rng, ('010', '021', '020', '0755'))}-{_digits(rng, 8)}"
    if template == 1:
        return f"{int(rng.integers(2015, 2026))}年{int(rng.integers(1, 13))}月{int(rng.integers(1, 29))}日"
    if template == 2:
        return f"{_pick(rng, _CHINESE_WORDS)} {_pick(rng, _LATIN_WORDS).upper()}"
    return f"手机 1{int(rng.integers(30, 90))}{_digits(rng, 8)}"


def _latin_line(rng: np.random.Generator) -> str:
    template = int(rng.integers(0, 7))
    if template == 0:
        words = [_pick(rng, _LATIN_WORDS) for _ in range(int(rng.integers(1, 4)))]
        style = int(rng.integers(0, 3))
        text = " ".join(words)
        return text.upper() if style == 0 else text.title() if style == 1 else text
    if template == 1:
        return f"{_pick(rng, ('TOTAL', 'Price', 'Sale', 'Tax'))} ${int(rng.integers(1, 500))}.{_digits(rng, 2)}"
    if template == 2:
        return f"{int(rng.integers(2000, 2026))}-{int(rng.integers(1, 13)):02d}-{int(rng.integers(1, 29)):02d}"
    if template == 3:
        return f"{_pick(rng, _WEEKDAYS)} {int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
    if template == 4:
        letters = "".join(chr(ord("A") + int(i)) for i in rng.integers(0, 26, size=2))
        return f"{letters}-{_digits(rng, int(rng.integers(3, 6)))}"
    if template == 5:
        return f"{int(rng.integers(1, 999))} {_pick(rng, _LATIN_WORDS).title()} {_pick(rng, ('St', 'Rd', 'Ave'))}"
    return f"{_pick(rng, _LATIN_WORDS)}@{_pick(rng, _LATIN_WORDS)}.com"


@dataclass(frozen=True)
class TextStyle:
    """How one piece of text is drawn."""

    font_path: Path
    size_px: int
    ink_rgb: tuple[int, int, int]
    paper_rgb: tuple[int, int, int]


def sample_style(rng: np.random.Generator, fonts: FontSet, needs_cjk: bool, size_range_px: tuple[int, int]) -> TextStyle:
    """Font, size and a high-contrast ink/paper colour pair (dark on light, sometimes inverted)."""
    font_path = fonts.cjk if needs_cjk else (fonts.cjk if rng.random() < 0.25 else fonts.latin[int(rng.integers(0, len(fonts.latin)))])
    size_px = int(rng.integers(size_range_px[0], size_range_px[1] + 1))
    light = tuple(int(v) for v in rng.integers(190, 256, size=3))
    dark = tuple(int(v) for v in rng.integers(0, 70, size=3))
    if rng.random() < 0.25:
        return TextStyle(font_path, size_px, ink_rgb=light, paper_rgb=dark)
    return TextStyle(font_path, size_px, ink_rgb=dark, paper_rgb=light)


def text_extent(text: str, style: TextStyle) -> tuple[int, int, int, int]:
    """Ink bounding box ``(left, top, right, bottom)`` of ``text`` drawn at the origin."""
    left, top, right, bottom = load_font(style.font_path, style.size_px).getbbox(text)
    return int(left), int(top), int(right), int(bottom)


def draw_text(image: Image.Image, text: str, style: TextStyle, x: int, y: int) -> tuple[int, int, int, int]:
    """Draw ``text`` so its ink box starts at ``(x, y)``; returns that box ``(x0, y0, x1, y1)``."""
    left, top, right, bottom = text_extent(text, style)
    ImageDraw.Draw(image).text((x - left, y - top), text, font=load_font(style.font_path, style.size_px), fill=style.ink_rgb)
    return x, y, x + right - left, y + bottom - top


def paper_background(rng: np.random.Generator, width: int, height: int, base_rgb: tuple[int, int, int]) -> np.ndarray:
    """A flat, gradient or mottled background around ``base_rgb`` (``uint8 [h, w, 3]``)."""
    base = np.asarray(base_rgb, dtype=np.float32)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        field = np.zeros((height, width, 1), np.float32)
    elif kind == 1:
        direction = rng.normal(size=2)
        direction /= np.linalg.norm(direction) + 1e-9
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (xs / max(width, 1)) * direction[0] + (ys / max(height, 1)) * direction[1]
        field = (ramp - ramp.mean())[..., None] * rng.uniform(20, 50)
    else:
        coarse = rng.normal(0, 12, size=(max(height // 32, 2), max(width // 32, 2), 1)).astype(np.float32)
        with Image.fromarray(coarse[..., 0]) as small:
            field = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), np.float32)[..., None]
    grain = rng.normal(0, rng.uniform(1, 6), size=(height, width, 1)).astype(np.float32)
    return np.clip(base + field + grain, 0, 255).astype(np.uint8)


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera-like degradation: mild blur sometimes, sensor noise always (``uint8`` in/out)."""
    with Image.fromarray(image) as picture:
        if rng.random() < 0.4:
            picture = picture.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
        pixels = np.asarray(picture, dtype=np.float32)
    pixels = pixels + rng.normal(0, rng.uniform(0.5, 4.0), size=pixels.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)
