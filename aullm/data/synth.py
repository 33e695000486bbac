"""Synthetic CASME II / SAMM / 4DME copies in the official on-disk layouts.

The real datasets are licensed, so tests, CI and the CPU demo run on these. They are
written exactly as the distributions are (a real .xlsx coding sheet with the official
column names and their quirks, one JPEG folder per clip, frames numbered onset..offset),
so `read_dataset` and `ClipStore` are exercised for real and nothing downstream knows
the difference.

The pictures: each subject gets a face-like grayscale image (an ellipse face with its
own shading, skin texture, brows, eyes, nose, nasolabial folds, mouth, chin crease,
each placed with per-subject jitter) at 128x128 (the readers resize to 64x64). A clip
is that face with subtle, AU-localised motion rising from the onset to the apex and
decaying towards the offset: every coded AU displaces its own facial region by about
two pixels (e.g. AU12 lifts and pulls the lip corners outward, AU4 lowers the brows and
draws them together) or, for AU45 and the like, changes its intensity (the eye closes).
Nuisances that a model must ignore: a slow global head drift, brightness flicker and
sensor noise. Labels follow realistic imbalance and co-occurrence (AU4 frequent, AU1
with AU2, AU4 with AU7; AU15/AU17 rare), and some rows code only AUs outside the
dataset's evaluated list (all-negative samples), as in the real sheets.

Deterministic for a seed. A CASME II-sized set (26 subjects, 255 clips, ~6k frames)
takes a few seconds on one core.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from aullm.constants import SYNTHETIC_MARKER
from aullm.errors import UserInputError

SIZE = 128  # synthetic frames are SIZE x SIZE; readers resize to 64 x 64

# Where each rendered AU moves the nominal face, as (y0, y1, x0, x1) fractions of the
# frame. Per-subject jitter stays well inside these boxes: tests and users can use them
# to check that the motion is where the label says.
AU_REGIONS: dict[int, tuple[float, float, float, float]] = {
    1: (0.22, 0.45, 0.25, 0.75),
    2: (0.22, 0.45, 0.15, 0.85),
    4: (0.22, 0.45, 0.25, 0.75),
    5: (0.32, 0.50, 0.20, 0.80),
    6: (0.38, 0.66, 0.15, 0.85),
    7: (0.38, 0.52, 0.20, 0.80),
    9: (0.45, 0.62, 0.35, 0.65),
    10: (0.62, 0.78, 0.32, 0.68),
    12: (0.64, 0.86, 0.25, 0.75),
    14: (0.64, 0.86, 0.25, 0.75),
    15: (0.64, 0.86, 0.25, 0.75),
    17: (0.76, 0.96, 0.30, 0.70),
    20: (0.64, 0.86, 0.20, 0.80),
    24: (0.66, 0.84, 0.30, 0.70),
    25: (0.66, 0.84, 0.30, 0.70),
    43: (0.35, 0.50, 0.20, 0.80),
    45: (0.35, 0.50, 0.20, 0.80),
}
RENDERED_AUS: frozenset[int] = frozenset(AU_REGIONS)

# Intensity letters A (trace) .. E (maximum) scale the motion.
_LETTER_GAIN = {"A": 0.6, "B": 0.8, "C": 1.0, "D": 1.2, "E": 1.4}
# AUs a coder may mark as one-sided (L/R prefix).
_LATERAL = frozenset({2, 4, 6, 7, 10, 12, 14, 15, 20})
# Plausible second choices for SAMM's 'X or Y' codings.
_ALTERNATIVE = {12: 14, 14: 12, 4: 7, 7: 6, 2: 1, 1: 2, 10: 9, 15: 17, 17: 15, 24: 17, 6: 7}


# ---------------------------------------------------------------- what the sheets say


@dataclass(frozen=True)
class _Token:
    """One '+'-piece of an AU string with its decorations."""

    au: int
    side: str = ""  # 'L' / 'R' (the subject's left / right), '' for both
    letter: str = ""  # intensity A-E
    alt: int | None = None  # SAMM: 'R12 or 14'
    k: bool = False  # 4DME: '4(k)'

    @property
    def plain(self) -> bool:
        return not (self.side or self.letter or self.alt is not None or self.k)

    def text(self) -> str:
        out = f"{self.side}{self.au}{self.letter}" + ("(k)" if self.k else "")
        return out + (f" or {self.alt}" if self.alt is not None else "")


@dataclass(frozen=True)
class _Pattern:
    weight: float
    emotion: str
    aus: tuple[int, ...]


@dataclass(frozen=True)
class _Plan:
    """How a layout's synthetic copy is sized, named and labelled."""

    subjects: int
    clips: int  # for the default number of subjects
    frames: tuple[int, int]  # clip length range, inclusive
    onsets: tuple[int, int]
    patterns: tuple[_Pattern, ...]
    side_p: float
    letter_p: float
    or_p: float
    k_p: float
    apex_slash_p: float
    forced: tuple[tuple[_Token, ...], ...]  # the first clips' AU strings: every quirk appears at any size
    rgb: bool = False


_CASME2 = _Plan(
    subjects=26,
    clips=255,
    frames=(10, 36),
    onsets=(20, 300),
    patterns=(
        _Pattern(14, "disgust", (4,)),
        _Pattern(10, "disgust", (4, 7)),
        _Pattern(5, "disgust", (4, 10)),
        _Pattern(3, "disgust", (4, 7, 10)),
        _Pattern(2, "disgust", (4, 9)),
        _Pattern(6, "happiness", (12,)),
        _Pattern(4, "happiness", (6, 12)),
        _Pattern(8, "surprise", (1, 2)),
        _Pattern(2, "surprise", (1,)),
        _Pattern(1, "surprise", (2,)),
        _Pattern(4, "repression", (14,)),
        _Pattern(2, "repression", (15,)),
        _Pattern(3, "repression", (17,)),
        _Pattern(2, "repression", (15, 17)),
        _Pattern(1, "repression", (14, 17)),
        _Pattern(6, "others", (4,)),
        _Pattern(2, "others", (1, 2, 4)),
        _Pattern(3, "others", (7,)),
        _Pattern(1, "others", (4, 15)),
        _Pattern(1, "others", (25,)),  # no evaluated AU: an all-negative sample
        _Pattern(1, "others", (24,)),
        _Pattern(1, "fear", (1, 2, 4)),
        _Pattern(1, "sadness", (1, 4, 15)),
    ),
    side_p=0.12,
    letter_p=0.05,
    or_p=0.0,
    k_p=0.0,
    apex_slash_p=0.03,
    forced=(
        (_Token(1), _Token(2), _Token(4, side="R")),
        (_Token(4), _Token(10, side="L")),
        (_Token(14, side="R", letter="A"),),
        (_Token(4),),
    ),
    rgb=True,  # CASME II frames are colour JPEGs: the readers' grayscale conversion gets exercised
)

_SAMM = _Plan(
    subjects=32,
    clips=159,
    frames=(10, 30),
    onsets=(800, 12000),
    patterns=(
        _Pattern(6, "Happiness", (12,)),
        _Pattern(3, "Happiness", (6, 12)),
        _Pattern(5, "Anger", (4,)),
        _Pattern(4, "Anger", (4, 7)),
        _Pattern(6, "Other", (7,)),
        _Pattern(3, "Surprise", (1, 2)),
        _Pattern(2, "Surprise", (2,)),
        _Pattern(3, "Contempt", (14,)),
        _Pattern(2, "Other", (24,)),
        _Pattern(1, "Disgust", (10,)),
        _Pattern(1, "Disgust", (9, 4)),
        _Pattern(1, "Sadness", (15, 17)),
        _Pattern(1, "Fear", (5, 20)),
        _Pattern(1, "Other", (45,)),
    ),
    side_p=0.35,
    letter_p=0.45,
    or_p=0.03,
    k_p=0.0,
    apex_slash_p=0.0,
    forced=(
        (_Token(12, side="R", alt=14),),
        (_Token(4), _Token(7, letter="B")),
        (_Token(14, side="R", letter="A"), _Token(2, side="L")),
        (_Token(12),),
    ),
)

_4DME = _Plan(
    subjects=41,
    clips=267,
    frames=(10, 30),
    onsets=(1, 400),
    patterns=(
        _Pattern(6, "Negative", (4,)),
        _Pattern(5, "Negative", (4, 7)),
        _Pattern(4, "Surprise", (1, 2)),
        _Pattern(4, "Positive", (12,)),
        _Pattern(3, "Positive", (6, 12)),
        _Pattern(3, "Others", (45,)),
        _Pattern(2, "Repression", (17,)),
        _Pattern(1, "Surprise", (1, 2, 45)),
        _Pattern(2, "Negative", (4, 45)),
        _Pattern(2, "Others", (7,)),
        _Pattern(2, "Repression", (14,)),  # no evaluated AU
        _Pattern(1, "Others", (25,)),
        _Pattern(1, "Positive", (6,)),
    ),
    side_p=0.1,
    letter_p=0.0,
    or_p=0.0,
    k_p=0.15,
    apex_slash_p=0.0,
    forced=(
        (_Token(4, k=True), _Token(7)),
        (_Token(12, side="L"), _Token(6)),
        (_Token(45),),
    ),
)

_PLANS: dict[str, _Plan] = {"casme2": _CASME2, "samm": _SAMM, "4dme": _4DME}


@dataclass
class _Clip:
    subject: int  # index 0..subjects-1
    name: str
    tokens: tuple[_Token, ...]
    emotion: str
    onset: int
    length: int
    apex_index: int  # 0-based inside the clip
    apex_slash: bool = False
    seed: tuple[int, ...] = field(default_factory=tuple)

    @property
    def offset(self) -> int:
        return self.onset + self.length - 1

    @property
    def apex(self) -> int:
        return self.onset + self.apex_index

    def au_string(self) -> str:
        return "+".join(t.text() for t in self.tokens)


def _decorate(aus: Sequence[int], plan: _Plan, rng: np.random.Generator) -> tuple[_Token, ...]:
    tokens = []
    for au in aus:
        side = str(rng.choice(["L", "R"])) if au in _LATERAL and rng.random() < plan.side_p else ""
        letter = str(rng.choice(list("ABCDE"), p=[0.3, 0.3, 0.2, 0.15, 0.05])) if rng.random() < plan.letter_p else ""
        k = rng.random() < plan.k_p
        tokens.append(_Token(au, side=side, letter=letter, k=k))
    if plan.or_p and rng.random() < plan.or_p:
        i = int(rng.integers(len(tokens)))
        alt = _ALTERNATIVE.get(tokens[i].au)
        if alt is not None and alt not in aus:
            tokens[i] = _Token(tokens[i].au, tokens[i].side, tokens[i].letter, alt=alt)
    return tuple(tokens)


def _clip_counts(plan: _Plan, subjects: int, per_subject: int | None, rng: np.random.Generator) -> list[int]:
    if per_subject is not None:
        return [per_subject] * subjects
    total = max(subjects, round(plan.clips * subjects / plan.subjects))
    # Uneven like the real sets (a few subjects contribute many clips); everyone at least one.
    shares = rng.dirichlet(np.full(subjects, 2.0))
    return [1 + int(c) for c in rng.multinomial(total - subjects, shares)]


def _clip_name(layout: str, subject_id: str, j: int, rng: np.random.Generator, used: set[str]) -> str:
    for attempt in range(1000):
        if layout == "casme2":
            suffix = str(rng.choice(["", "f", "f", "c"]))
            name = f"EP{int(rng.integers(1, 20)):02d}_{int(rng.integers(1, 10)):02d}{suffix}"
            if attempt >= 100:  # a subject with hundreds of clips: leave the real naming scheme
                name = f"EP{20 + j:02d}_01"
        elif layout == "samm":
            name = f"{subject_id}_{int(rng.integers(1, 8))}_{j + 1}"
        else:
            name = f"{subject_id}_{j + 1:02d}"
        if name not in used:
            used.add(name)
            return name
    raise AssertionError(f"no unique clip name for {subject_id} clip {j}")  # unreachable: j makes names unique


def _subject_id(layout: str, s: int) -> str:
    """The frame subfolder name of subject index s."""
    return {"casme2": f"sub{s + 1:02d}", "samm": f"{s + 6:03d}", "4dme": f"S{s + 1}"}[layout]


def _plan_clips(layout: str, plan: _Plan, subjects: int, per_subject: int | None, seed: int) -> list[_Clip]:
    rng = np.random.default_rng([seed, 1])
    counts = _clip_counts(plan, subjects, per_subject, rng)
    weights = np.array([p.weight for p in plan.patterns], dtype=float)
    weights /= weights.sum()
    clips: list[_Clip] = []
    for s, count in enumerate(counts):
        used: set[str] = set()
        for j in range(count):
            pattern = plan.patterns[int(rng.choice(len(plan.patterns), p=weights))]
            forced_index = len(clips)
            if forced_index < len(plan.forced):
                tokens = plan.forced[forced_index]
                emotion = _emotion_for(plan, tuple(t.au for t in tokens))
            else:
                tokens = _decorate(pattern.aus, plan, rng)
                emotion = pattern.emotion
            length = int(rng.integers(plan.frames[0], plan.frames[1] + 1))
            apex_index = int(np.clip(round(length * rng.uniform(0.3, 0.6)), 1, length - 2))
            clips.append(
                _Clip(
                    subject=s,
                    name=_clip_name(layout, _subject_id(layout, s), j, rng, used),
                    tokens=tokens,
                    emotion=emotion,
                    onset=int(rng.integers(plan.onsets[0], plan.onsets[1] + 1)),
                    length=length,
                    apex_index=apex_index,
                    apex_slash=(forced_index == 0 and plan.apex_slash_p > 0) or rng.random() < plan.apex_slash_p,
                    seed=(seed, 2, s, j),
                )
            )
    return clips


def _emotion_for(plan: _Plan, aus: tuple[int, ...]) -> str:
    for pattern in plan.patterns:
        if set(pattern.aus) <= set(aus):
            return pattern.emotion
    return plan.patterns[-1].emotion


# ---------------------------------------------------------------- the pictures

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _gauss(cy: float, cx: float, sigma: float) -> np.ndarray:
    out: np.ndarray = np.exp(-((_YY - cy) ** 2 + (_XX - cx) ** 2) / (2 * sigma * sigma)).astype(np.float32)
    return out


def _stroke(points: np.ndarray, sigma: float) -> np.ndarray:
    """Soft line through densely sampled (y, x) points, peak 1."""
    d2 = np.full((SIZE, SIZE), np.inf, dtype=np.float32)
    for y, x in points:
        np.minimum(d2, (_YY - y) ** 2 + (_XX - x) ** 2, out=d2)
    out: np.ndarray = np.exp(-d2 / (2 * sigma * sigma))
    return out


def _curve(p0: tuple[float, float], p1: tuple[float, float], p2: tuple[float, float], n: int = 24) -> np.ndarray:
    """Quadratic Bezier from p0 to p2 pulled towards p1, as (n, 2) (y, x) points."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    a, b, c = (np.array(p, dtype=np.float32) for p in (p0, p1, p2))
    return (1 - t) ** 2 * a + 2 * (1 - t) * t * b + t * t * c


def _smooth_noise(rng: np.random.Generator, cells: int, amplitude: float) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32) * amplitude


@dataclass
class _Face:
    """One subject: the neutral face and, per (AU, side), how that AU changes it."""

    base: np.ndarray  # float32 (SIZE, SIZE)
    landmarks: dict[str, float]
    closed_eyes: dict[str, np.ndarray]  # side -> additive change that closes that eye
    fields: dict[tuple[int, str], tuple[np.ndarray | None, np.ndarray | None]] = field(default_factory=dict)

    def effect(self, au: int, side: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(displacement (2, H, W) in pixels at full intensity or None, additive intensity or None)."""
        key = (au, side)
        if key not in self.fields:
            self.fields[key] = _au_effect(self, au, side)
        return self.fields[key]


def _render_face(rng: np.random.Generator) -> _Face:
    def j(scale: float) -> float:  # per-subject jitter of a landmark
        return float(rng.normal(0.0, scale))

    L = {
        "cx": 64 + j(1.5),
        "cy": 66 + j(1.5),
        "fw": 42 + j(2),
        "fh": 54 + j(2),
        "eye_y": 54 + j(1.5),
        "eye_dx": 18 + j(1.2),
    }
    L["brow_y"] = L["eye_y"] - 11 + j(1.0)
    L["brow_in"] = 7 + j(0.8)
    L["brow_out"] = 28 + j(1.2)
    L["nose_y"] = 78 + j(1.5)
    L["mouth_y"] = 95 + j(1.5)
    L["mouth_w"] = 15 + j(1.2)
    L["chin_y"] = L["mouth_y"] + 15 + j(1.0)
    L["cheek_y"] = L["eye_y"] + 13 + j(1.0)
    L["cheek_dx"] = 22 + j(1.0)
    cx, cy = L["cx"], L["cy"]

    background = rng.uniform(60, 110) + rng.uniform(-15, 15) * (_XX / SIZE - 0.5)
    skin = rng.uniform(140, 195)
    light = rng.uniform(-0.15, 0.15)
    r = np.sqrt(((_XX - cx) / L["fw"]) ** 2 + ((_YY - cy) / L["fh"]) ** 2)
    face_mask = 1.0 / (1.0 + np.exp((r - 1.0) * L["fw"] / 1.5))
    shading = skin * (1 + light * (_XX - cx) / L["fw"]) - 25 * r**2
    # Skin texture: what makes cheek and chin motion visible at all on smooth skin.
    texture = _smooth_noise(rng, 12, 5.0) + _smooth_noise(rng, 40, 4.0)
    img = background * (1 - face_mask) + (shading + texture) * face_mask
    hair = (_YY < cy - L["fh"] * 0.72 + 4 * np.sin(_XX / 9 + rng.uniform(0, 6))) * face_mask
    img = img * (1 - hair) + rng.uniform(25, 60) * hair

    brow_depth = rng.uniform(60, 100)
    for sgn in (-1, 1):
        inner = (L["brow_y"] + 1, cx + sgn * L["brow_in"])
        middle = (L["brow_y"] - 3, cx + sgn * (L["brow_in"] + L["brow_out"]) / 2)
        outer = (L["brow_y"] + 1.5, cx + sgn * L["brow_out"])
        img -= brow_depth * _stroke(_curve(inner, middle, outer), 1.7)
    closed_eyes: dict[str, np.ndarray] = {}
    for side, sgn in (("R", -1), ("L", 1)):  # the subject's right eye is on the image's left
        ex, ey = cx + sgn * L["eye_dx"], L["eye_y"]
        before = img.copy()
        eye = np.clip(1.2 - np.sqrt(((_XX - ex) / 7.5) ** 2 + ((_YY - ey) / 3.6) ** 2), 0, 1).clip(0, 0.2) * 5
        img = img * (1 - eye) + (skin + 35) * eye
        img -= 110 * _gauss(ey, ex, 2.2) * eye
        img -= 70 * _stroke(_curve((ey, ex - 8), (ey - 6, ex), (ey, ex + 8)), 1.0)
        img -= 45 * _stroke(_curve((ey + 0.5, ex - 7), (ey + 4.5, ex), (ey + 0.5, ex + 7)), 0.9)
        # The same eye closed: lid skin over the eye and one lash line.
        closed = before - 60 * _stroke(_curve((ey, ex - 8), (ey + 1.5, ex), (ey, ex + 8)), 1.0)
        closed_eyes[side] = (closed - img).astype(np.float32)
        img -= 14 * _stroke(
            _curve(
                (L["nose_y"] - 1, cx + sgn * 9),
                (L["nose_y"] + 8, cx + sgn * 15),
                (L["mouth_y"] - 1, cx + sgn * (L["mouth_w"] + 3)),
            ),
            1.6,
        )
        img -= 55 * _gauss(L["nose_y"], cx + sgn * 5, 1.7)
        img -= 10 * _stroke(
            _curve((ey + 3, cx + sgn * 6), (L["nose_y"] - 10, cx + sgn * 7), (L["nose_y"] - 3, cx + sgn * 8)), 1.5
        )
    my, mw = L["mouth_y"], L["mouth_w"]
    smile = rng.uniform(-1.5, 1.5)
    lips = np.clip(1.0 - np.sqrt(((_XX - cx) / mw) ** 2 + ((_YY - my) / 5.0) ** 2), 0, 0.25) * 4
    img -= 28 * lips
    img -= 75 * _stroke(_curve((my + smile, cx - mw), (my + 2, cx), (my + smile, cx + mw)), 1.1)
    img -= 14 * _stroke(_curve((L["chin_y"] - 6, cx - 8), (L["chin_y"] - 3, cx), (L["chin_y"] - 6, cx + 8)), 1.4)
    return _Face(base=img.astype(np.float32), landmarks=L, closed_eyes=closed_eyes)


def _au_effect(face: _Face, au: int, side: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """What AU `au` does to one side of this face at full intensity (amplitudes at 128 px)."""
    L = face.landmarks
    sgn = 1.0 if side == "L" else -1.0  # subject's left = image right
    cx = L["cx"]
    bumps: list[tuple[float, float, float, float, float]] = []  # (y, x, sigma, dy, dx)
    intensity: np.ndarray | None = None
    if au == 1:  # inner brow raiser
        bumps.append((L["brow_y"], cx + sgn * (L["brow_in"] + 2), 5.0, -2.5, 0.0))
    elif au == 2:  # outer brow raiser
        bumps.append((L["brow_y"], cx + sgn * (L["brow_out"] - 3), 6.0, -2.5, 0.0))
    elif au == 4:  # brow lowerer: down and drawn together
        bumps.append((L["brow_y"] + 1, cx + sgn * (L["brow_in"] + 4), 6.5, 2.0, -sgn * 1.8))
    elif au == 5:  # upper lid raiser
        bumps.append((L["eye_y"] - 4, cx + sgn * L["eye_dx"], 3.5, -1.5, 0.0))
    elif au == 6:  # cheek raiser, with crow's-feet
        bumps.append((L["cheek_y"], cx + sgn * L["cheek_dx"], 7.0, -2.4, 0.0))
        bumps.append((L["eye_y"] + 4, cx + sgn * (L["eye_dx"] + 5), 4.0, -1.0, 0.0))
        intensity = -14 * _gauss(L["eye_y"] + 1, cx + sgn * (L["eye_dx"] + 10), 2.0)
    elif au == 7:  # lid tightener: lower lid up
        bumps.append((L["eye_y"] + 3, cx + sgn * L["eye_dx"], 4.0, -2.2, 0.0))
    elif au == 9:  # nose wrinkler
        bumps.append((L["nose_y"] - 8, cx + sgn * 6, 5.0, -2.0, 0.0))
    elif au == 10:  # upper lip raiser
        bumps.append((L["mouth_y"] - 5, cx + sgn * 7, 5.0, -2.4, 0.0))
    elif au == 12:  # lip corner puller: up and out
        bumps.append((L["mouth_y"], cx + sgn * L["mouth_w"], 6.0, -3.0, sgn * 2.0))
    elif au == 14:  # dimpler: corners in, dimple shadow
        bumps.append((L["mouth_y"], cx + sgn * L["mouth_w"], 5.0, -1.0, -sgn * 2.6))
        intensity = -50 * _gauss(L["mouth_y"] - 1, cx + sgn * (L["mouth_w"] + 3), 2.5)
    elif au == 15:  # lip corner depressor
        bumps.append((L["mouth_y"] + 1, cx + sgn * L["mouth_w"], 6.0, 3.0, 0.0))
    elif au == 17:  # chin raiser
        bumps.append((L["chin_y"] - 4, cx + sgn * 6, 8.0, -2.8, 0.0))
    elif au == 20:  # lip stretcher
        bumps.append((L["mouth_y"], cx + sgn * L["mouth_w"], 5.0, 0.0, sgn * 2.0))
    elif au == 24:  # lip pressor
        bumps.append((L["mouth_y"] - 3, cx + sgn * 7, 4.0, 1.2, 0.0))
        bumps.append((L["mouth_y"] + 3, cx + sgn * 7, 4.0, -1.2, 0.0))
    elif au == 25:  # lips part
        intensity = -40 * _stroke(
            _curve((L["mouth_y"], cx), (L["mouth_y"] + 1, cx + sgn * 6), (L["mouth_y"], cx + sgn * (L["mouth_w"] - 3))),
            1.2,
        )
    elif au in (43, 45):  # eyes closed / blink
        intensity = face.closed_eyes[side]
    if not bumps:
        return None, intensity
    displacement = np.zeros((2, SIZE, SIZE), dtype=np.float32)
    for y, x, sigma, dy, dx in bumps:
        g = _gauss(y, x, sigma)
        displacement[0] += dy * g
        displacement[1] += dx * g
    return displacement, intensity


def _warp(images: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Move each frame's content by (dy, dx) per pixel: out(p) = image(p - d(p)), bilinear.

    All arrays are (n, SIZE, SIZE); the whole clip is warped in one vectorised pass, in
    place where possible (this is the generator's hot loop).
    """
    n = images.shape[0]
    fy = _YY - dy
    fx = _XX - dx
    np.clip(fy, 0, SIZE - 1.001, out=fy)
    np.clip(fx, 0, SIZE - 1.001, out=fx)
    y0 = np.floor(fy)
    x0 = np.floor(fx)
    fy -= y0  # float32 throughout: float minus intp would silently upcast to float64
    fx -= x0
    y0 *= SIZE
    y0 += x0
    i = y0.astype(np.intp)
    i += (np.arange(n, dtype=np.intp) * SIZE * SIZE)[:, None, None]
    flat = images.ravel()
    # Shifted views instead of shifted index arrays: saves three index additions.
    top, right = flat[i], flat[1:][i]
    bottom, corner = flat[SIZE:][i], flat[SIZE + 1 :][i]
    right -= top
    right *= fx
    top += right
    corner -= bottom
    corner *= fx
    bottom += corner
    bottom -= top
    bottom *= fy
    top += bottom
    out: np.ndarray = top
    return out


def _envelope(length: int, apex_index: int) -> np.ndarray:
    """0 at onset, 1 at apex, back down to a small residue at offset."""
    k = np.arange(length, dtype=np.float64)
    rise = np.sin(0.5 * math.pi * np.minimum(k / apex_index, 1.0)) ** 2
    tail = max(length - 1 - apex_index, 1)
    fall = 0.1 + 0.9 * np.cos(0.5 * math.pi * np.clip((k - apex_index) / tail, 0.0, 1.0)) ** 2
    return np.where(k <= apex_index, rise, fall)


def _render_clip(face: _Face, clip: _Clip) -> np.ndarray:
    """The clip's frames, uint8 (n, SIZE, SIZE)."""
    rng = np.random.default_rng(list(clip.seed))
    weights: list[float] = []
    displacements: list[np.ndarray] = []
    intensity_weights: list[float] = []
    intensities: list[np.ndarray] = []
    for token in clip.tokens:
        # An 'or' coding: the face did one movement; the coder could not tell which. Render the first.
        gain = _LETTER_GAIN.get(token.letter) or float(rng.uniform(0.75, 1.25))
        for side in ("L", "R"):
            weight = gain * (0.2 if token.side and token.side != side else 1.0)
            displacement, intensity = face.effect(token.au, side)
            if displacement is not None:
                weights.append(weight)
                displacements.append(displacement)
            if intensity is not None:
                intensity_weights.append(weight)
                intensities.append(intensity)
    n = clip.length
    envelope = _envelope(n, clip.apex_index).astype(np.float32)
    t = np.linspace(0.0, 1.0, n, dtype=np.float32)
    drift = rng.normal(0.0, 0.25, size=2).astype(np.float32)
    jitter = rng.normal(0.0, 0.05, size=(2, n)).astype(np.float32)
    dy = np.broadcast_to((drift[0] * t + jitter[0])[:, None, None], (n, SIZE, SIZE)).copy()
    dx = np.broadcast_to((drift[1] * t + jitter[1])[:, None, None], (n, SIZE, SIZE)).copy()
    # Plain broadcasting, not a matrix product: BLAS would spin threads for these small sizes.
    for weight, displacement in zip(weights, displacements, strict=True):
        w = (weight * envelope)[:, None, None]
        dy += w * displacement[0]
        dx += w * displacement[1]
    images = np.broadcast_to(face.base, (n, SIZE, SIZE)).copy()
    for weight, intensity in zip(intensity_weights, intensities, strict=True):
        images += (weight * envelope)[:, None, None] * intensity
    frames = _warp(images, dy, dx)
    frames += rng.normal(0.0, 1.0, size=n).astype(np.float32)[:, None, None]  # brightness flicker
    # Sensor noise, uniform with sd 1.5 (uniform draws cost a third of normal ones).
    noise = rng.random((n, SIZE, SIZE), dtype=np.float32)
    noise -= 0.5
    noise *= 1.5 * math.sqrt(12.0)
    frames += noise
    frames += 0.5
    return np.clip(frames, 0, 255, out=frames).astype(np.uint8)


# ---------------------------------------------------------------- writing the layout


def _frame_name(layout: str, subject_id: str, number: int) -> str:
    if layout == "casme2":
        return f"img{number}.jpg"
    if layout == "samm":
        return f"{subject_id}_{number:05d}.jpg"
    return f"{number}.jpg"


_FRAMES_DIR = {"casme2": "CASME2_RAW_selected", "samm": "SAMM", "4dme": "4DME"}
_SHEET_NAME = {
    "casme2": "CASME2-coding-20140508.xlsx",
    "samm": "SAMM_Micro_FACS_Codes_v2.xlsx",
    "4dme": "4DME_Labelling_Micro_release.xlsx",
}


# A warm tint for the colour (CASME II) frames, applied as per-channel lookup tables.
_RED_LUT = [min(255, round(v * 1.04)) for v in range(256)]
_BLUE_LUT = [round(v * 0.94) for v in range(256)]


def _save_frames(path: Path, layout: str, subject_id: str, clip: _Clip, frames: np.ndarray, rgb: bool) -> None:
    path.mkdir(parents=True)
    for k, frame in enumerate(frames):
        image = Image.fromarray(frame, mode="L")
        if rgb:
            image = Image.merge("RGB", (image.point(_RED_LUT), image, image.point(_BLUE_LUT)))
        image.save(path / _frame_name(layout, subject_id, clip.onset + k), format="JPEG", quality=92)


def _au_cell(clip: _Clip) -> str | int:
    # Excel stores a lone AU number typed into a cell as a number, not text.
    if len(clip.tokens) == 1 and clip.tokens[0].plain:
        return clip.tokens[0].au
    return clip.au_string()


def _write_sheet(layout: str, path: Path, clips: list[_Clip], rng: np.random.Generator) -> None:
    from openpyxl import Workbook  # local: openpyxl costs ~0.2 s to import

    workbook = Workbook()
    sheet = workbook.active
    if layout == "casme2":
        sheet.title = "Sheet1"
        sheet.append(
            ["Subject", "Filename", "OnsetFrame", "ApexFrame", "OffsetFrame", "Action Units", "Estimated Emotion"]
        )
        for i, clip in enumerate(clips):
            # The real sheet mixes number cells (1) and text cells ('01') for the subject.
            subject: int | str = f"{clip.subject + 1:02d}" if i == 0 or rng.random() < 0.2 else clip.subject + 1
            apex: int | str = "/" if clip.apex_slash else clip.apex
            sheet.append([subject, clip.name, clip.onset, apex, clip.offset, _au_cell(clip), clip.emotion])
    elif layout == "samm":
        sheet.title = "FACS_Movement_Only"
        preamble = [
            ["SAMM: Spontaneous Micro-Facial Movement Dataset (synthetic copy)"],
            ["Micro-movement FACS codes, version 2"],
            [],
            ["Each row is one micro-movement. Frame numbers refer to the image files of the clip folder."],
            ["AU codes: L/R = left/right side only, A-E = intensity, 'X or Y' = coder unsure between X and Y."],
            [],
            ["Inducement Code: the stimulus video shown to the participant."],
            ["Duration: Offset Frame - Onset Frame + 1."],
            [],
            ["Generated by aullm.data.synth for tests; not real data."],
            [],
        ]
        for row in preamble:
            sheet.append(row)
        sheet.append(
            [
                "Subject",
                "Filename",
                "Inducement Code",
                "Onset Frame",
                "Apex Frame",
                "Offset Frame",
                "Duration",
                "Type",
                "Action Units",
                "Notes",
                "Estimated Emotion",
            ]
        )
        for i, clip in enumerate(clips):
            subject = f"{clip.subject + 6:03d}" if i == 1 or rng.random() < 0.15 else clip.subject + 6
            inducement = int(clip.name.split("_")[1])
            notes = "Coder unsure" if any(t.alt is not None for t in clip.tokens) else None
            sheet.append(
                [
                    subject,
                    clip.name,
                    inducement,
                    clip.onset,
                    clip.apex,
                    clip.offset,
                    clip.length,
                    "Micro - 1/2",
                    _au_cell(clip),
                    notes,
                    clip.emotion,
                ]
            )
    else:
        sheet.title = "micro"
        sheet.append(["sub_ID", "fold_name", "Emotion", "Onset", "Apex", "Offset", "AUs"])
        for clip in clips:
            sheet.append(
                [
                    _subject_id(layout, clip.subject),
                    clip.name,
                    clip.emotion,
                    clip.onset,
                    clip.apex,
                    clip.offset,
                    _au_cell(clip),
                ]
            )
    tmp = path.with_name(f".{path.name}.tmp")
    workbook.save(tmp)
    os.replace(tmp, path)


def write_synthetic(
    layout: str,
    out: str | os.PathLike[str],
    *,
    subjects: int | None = None,
    seed: int = 0,
    clips_per_subject: int | None = None,
) -> Path:
    """Write a synthetic copy of `layout` ('casme2', 'samm', '4dme') into the folder `out`.

    Defaults match the real sizes (CASME II 26 subjects / 255 clips, SAMM 32 / 159,
    4DME 41 / 267); `subjects` shrinks it (clips scale along), `clips_per_subject`
    fixes the count per subject. `out` must be missing or empty. Returns `out`, the
    dataset root to pass to `read_dataset(layout, out)`.
    """
    plan = _PLANS.get(layout)
    if plan is None:
        raise UserInputError(f"unknown dataset layout {layout!r}; allowed: {', '.join(_PLANS)}")
    n_subjects = plan.subjects if subjects is None else subjects
    if n_subjects < 1:
        raise UserInputError(f"synthetic {layout}: subjects={subjects} must be at least 1")
    if clips_per_subject is not None and clips_per_subject < 1:
        raise UserInputError(f"synthetic {layout}: clips_per_subject={clips_per_subject} must be at least 1")
    root = Path(out).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserInputError(f"synthetic {layout}: output folder {str(root)!r} exists and is not empty")
    root.mkdir(parents=True, exist_ok=True)

    clips = _plan_clips(layout, plan, n_subjects, clips_per_subject, seed)
    faces: dict[int, _Face] = {}
    frames_root = root / _FRAMES_DIR[layout]
    for clip in clips:
        if clip.subject not in faces:
            faces[clip.subject] = _render_face(np.random.default_rng([seed, 3, clip.subject]))
        subject_id = _subject_id(layout, clip.subject)
        frames = _render_clip(faces[clip.subject], clip)
        _save_frames(frames_root / subject_id / clip.name, layout, subject_id, clip, frames, plan.rgb)
    _write_sheet(layout, root / _SHEET_NAME[layout], clips, np.random.default_rng([seed, 4]))
    # says "synthetic" to the collector, which then compares nothing with the paper
    (root / SYNTHETIC_MARKER).write_text(
        json.dumps({"synthetic": True, "layout": layout, "subjects": n_subjects, "seed": seed}) + "\n"
    )
    return root
