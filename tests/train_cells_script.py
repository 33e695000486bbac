"""Train cells one after another in THIS process and save what they predicted: the
packing tests run it once per cell (fresh processes) and once with a whole pack (one
LLM load), and compare.

    python tests/train_cells_script.py DATA_ROOT CACHE LLM OUT.npz EPOCHS [--no-adapter-reset] CELL [CELL...]

CELL is `<subject>:<variant>:<seed>`, or `<subject>:<variant>:<seed>:fail@<epoch>` for a
cell that raises at the end of that epoch (as a crash mid-training would), after which
the pack goes on with the next cell, as `jobs.run_cells` does. For each cell OUT.npz
holds `<cell>` (test probabilities) and `<cell>:losses`; for a failed cell,
`<cell>:alive_after_next` says whether its model was still alive while the next cell
trained. `--no-adapter-reset` is the mutation check's test-only hook: the shared
LLM keeps the previous cell's LoRA weights, which the packing test must catch.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str]) -> None:
    data_root, cache, llm, out, epochs, *rest = argv
    no_reset = "--no-adapter-reset" in rest
    cells = [c for c in rest if not c.startswith("--")]
    # One thread everywhere: a reduction split over another number of threads may round
    # differently, and the test compares bits across processes.
    torch.set_num_threads(1)

    import aullm.model.au_llm as au_llm
    from aullm.constants import DATASET_AUS
    from aullm.data.clips import ClipStore
    from aullm.data.folds import loso_split
    from aullm.data.readers import read_dataset
    from aullm.model.llm import BaseLLM
    from aullm.train import CellTrainer, TrainConfig

    if no_reset:
        BaseLLM.reset_adapters = lambda self, seed: None  # type: ignore[method-assign]
    built: list[weakref.ref] = []

    class Recorded(au_llm.AULLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(weakref.ref(self))

    au_llm.AULLM = Recorded  # the trainer imports the class when a cell starts

    samples = read_dataset("casme2", data_root)
    store = ClipStore.load(samples, Path(cache))
    config = TrainConfig(epochs=int(epochs), lr=1e-3)
    trainer = CellTrainer(llm, config)
    arrays: dict[str, np.ndarray] = {}
    failed: weakref.ref | None = None
    failed_spec = ""
    for spec in cells:
        subject, variant, seed, *fail = spec.split(":")
        fail_at = int(fail[0].removeprefix("fail@")) if fail else None

        def crash(epoch: int, _loss: float, at: int | None = fail_at) -> None:
            if failed is not None and epoch == 0:
                # while the next cell trains: a crashed cell's model must be gone by now
                arrays[failed_spec + ":alive_after_next"] = np.array(failed() is not None)
            if epoch == at:
                raise RuntimeError(f"injected failure at epoch {epoch}")

        split = loso_split(samples, subject, DATASET_AUS["casme2"])
        try:
            result = trainer.run(split, store, variant, int(seed), config, on_epoch=crash)
        except RuntimeError as exc:
            if fail_at is None or "injected failure" not in str(exc):
                raise
            failed, failed_spec = built[-1], spec
            continue
        arrays[spec] = result.probs
        arrays[spec + ":losses"] = np.array(result.epoch_losses)
        failed = None
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
