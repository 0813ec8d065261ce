"""A tiny Lightning training run with gradwise's callback, on CPU: run by tests/test_integrations.py in-process
(1 process) and as a script (``python lightning_train.py OUT.json OPTIONS.json``) for DDP on 2 processes, where
Lightning starts the second process by running this script again.

Every sample has 6 rows and the loss reads rows 0..3; rows 4..5 are padding, NaN when ``padding_nan``. At the
optimizer steps in ``genuine`` a row the loss reads holds a NaN, on rank ``genuine_rank`` only.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gradwise.integrations.lightning import GradwiseCallback

STEPS = 3


class Padded(Dataset):
    def __init__(self, rank: int, padding_nan: bool, genuine: tuple[int, ...], genuine_rank: int, batch: int):
        self.rank, self.padding_nan, self.genuine, self.genuine_rank, self.batch = (rank, padding_nan, genuine,
                                                                                   genuine_rank, batch)

    def __len__(self) -> int:
        return STEPS * self.batch

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1000 * self.rank + i), dtype=torch.float64)
        if self.padding_nan:
            x[4:] = float("nan")
        if i // self.batch in self.genuine and self.rank == self.genuine_rank and i % self.batch == 0:
            x[0, 0] = float("nan")
        return x


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def training_step(self, x, batch_idx):
        return self.net(x)[:, :4].pow(2).mean()  # padding rows 4..5 discarded

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(root: str, options: dict, devices: int = 1, padding_nan: bool = True, genuine: tuple[int, ...] = (),
        genuine_rank: int = 0, callback: bool = True) -> dict:
    """Fit STEPS optimizer steps; return the final parameters and what the callback saw (on this rank)."""
    cb = GradwiseCallback(**options) if callback else None
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=STEPS,
        callbacks=[cb] if cb else [], default_root_dir=root, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, logger=pl.loggers.CSVLogger(root),
        log_every_n_steps=1, use_distributed_sampler=False,  # each rank reads its own Padded(rank) whole
    )
    module = Net()
    rank = trainer.global_rank
    loader = DataLoader(Padded(rank, padding_nan, tuple(genuine), genuine_rank, 2), batch_size=2, shuffle=False)
    error = None
    try:
        trainer.fit(module, loader)
    except Exception as e:  # the "raise" policy: recorded for the test
        error = f"{type(e).__name__}: {e}"
    return {"rank": rank, "params": [p.detach().tolist() for p in module.parameters()],
            "nonfinite_steps": cb.nonfinite_steps if cb else None, "skipped_steps": cb.skipped_steps if cb else None,
            "reports": [str(p) for p in cb.reports] if cb else None, "error": error,
            "log_dir": trainer.log_dir}


if __name__ == "__main__":
    out, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(**spec)
    result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                          and "gradwise" in str(w.message)]
    Path(f"{out}.rank{result['rank']}").write_text(json.dumps(result))
    if torch.distributed.is_initialized():  # Lightning leaves the group up: gloo's threads abort a bare exit
        torch.distributed.destroy_process_group()
