"""Train cells in THIS process and save their predictions: the packing-equivalence test
runs it once with two cells (one LLM load) and once per cell (fresh processes).

    python tests/train_cells_script.py DATA_ROOT CACHE LLM OUT.npz EPOCHS CELL [CELL...]

where CELL is `<subject>:<variant>:<seed>`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> None:
    data_root, cache, llm, out, epochs, *cells = argv
    from aullm.constants import DATASET_AUS
    from aullm.data.clips import ClipStore
    from aullm.data.folds import loso_split
    from aullm.data.readers import read_dataset
    from aullm.train import CellTrainer, TrainConfig

    samples = read_dataset("casme2", data_root)
    store = ClipStore.load(samples, Path(cache))
    config = TrainConfig(epochs=int(epochs), lr=1e-3)
    trainer = CellTrainer(llm, config)
    arrays = {}
    for spec in cells:
        subject, variant, seed = spec.split(":")
        split = loso_split(samples, subject, DATASET_AUS["casme2"])
        result = trainer.run(split, store, variant, int(seed), config)
        arrays[spec] = result.probs
        arrays[spec + ":losses"] = np.array(result.epoch_losses)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
