"""Facts about the datasets and the model that every module shares (DESIGN.md §4-§5)."""

from __future__ import annotations

# Action Units evaluated on each dataset, in the order of the paper's tables.
DATASET_AUS: dict[str, tuple[int, ...]] = {
    "casme2": (1, 2, 4, 7, 12, 14, 15, 17),
    "samm": (2, 4, 7, 12),
    "4dme": (1, 2, 4, 6, 7, 12, 17, 45),
}
DATASETS: tuple[str, ...] = tuple(DATASET_AUS)

# Cross-domain evaluation uses the AUs both datasets annotate.
CROSS_DOMAIN_AUS: tuple[int, ...] = (2, 4, 7, 12)

# Ablation variants (Table 3) plus the no-LLM baseline row.
VARIANTS: tuple[str, ...] = ("all", "f_high", "f_mid", "efp_linear", "prompt_learning", "no_llm")
VARIANTS_WITHOUT_LLM: frozenset[str] = frozenset({"no_llm"})

TOKEN_POSITIONS: tuple[str, ...] = ("prepend", "append")

# Cells one training loop may train together (resources.concurrent_cells): beyond this, a
# step's batch (K x 256 clips) stops fitting one GPU for a 1.5B LLM (docs/concurrent.md).
# Here, not in the sweep schema, because the task's `auto` choice is capped by it too.
MAX_CONCURRENT_CELLS = 64
# `concurrent_cells: auto`: the task picks K (1 on a CPU; on a GPU, from one cell's measured
# memory and the free memory), so the sweep file needs no K per cluster.
CONCURRENT_AUTO = "auto"

NUM_FRAMES = 6  # T
FRAME_SIZE = 64  # H = W
PAPER_PROMPT = "Analyze the facial features to classify action units:"

# `aullm-grid data synth` leaves this file at a synthetic dataset's root, so that the
# tables can say their numbers come from synthetic data and compare nothing with the paper.
SYNTHETIC_MARKER = "aullm_synthetic.json"


def is_synthetic_dataset(root: str) -> bool:
    from pathlib import Path

    return (Path(root) / SYNTHETIC_MARKER).is_file()
