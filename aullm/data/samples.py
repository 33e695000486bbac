"""One labelled micro-expression clip, as every later stage sees it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    """A labelled clip read from a coding sheet.

    `frame_paths` holds the onset..offset frames in temporal order, so the clip length
    is `len(frame_paths)` and index 0 is the onset. `apex` is None where the sheet has no
    usable apex (CASME II writes '/'). `aus` holds every AU the sheet codes, including
    AUs outside the dataset's evaluated list: folds pick the columns they score.
    """

    dataset: str
    subject: str
    clip: str
    onset: int
    apex: int | None
    offset: int
    aus: frozenset[int]
    frame_paths: tuple[str, ...] = field(repr=False)  # dozens of long paths would drown any log line

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.subject}/{self.clip}"

    @property
    def num_frames(self) -> int:
        return len(self.frame_paths)
