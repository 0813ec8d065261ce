"""A tiny Hugging Face Trainer run with gradwise's callback, on CPU: run by tests/test_integrations.py in-process
(1 process) and under torchrun (``torchrun --nproc_per_node=2 hf_train.py OUT SPEC.json``) on 2 processes.

Every sample has 6 rows and the loss reads rows 0..3; rows 4..5 are padding, NaN when ``padding_nan``. At the
optimizer steps in ``genuine`` a row the loss reads holds a NaN, on rank ``genuine_rank`` only.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from gradwise.integrations.transformers import GradwiseCallback

STEPS = 3


class Padded(Dataset):
    def __init__(self, rank: int, padding_nan: bool, genuine: tuple[int, ...], genuine_rank: int, batch: int):
        self.rank, self.padding_nan, self.genuine, self.genuine_rank, self.batch = (rank, padding_nan, genuine,
                                                                                   genuine_rank, batch)

    def __len__(self) -> int:
        return STEPS * self.batch

    def __getitem__(self, i: int) -> dict:
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1000 * self.rank + i))
        if self.padding_nan:
            x[4:] = float("nan")
        if i // self.batch in self.genuine and self.rank == self.genuine_rank and i % self.batch == 0:
            x[0, 0] = float("nan")
        return {"x": x}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return {"loss": self.net(x)[:, :4].pow(2).mean()}  # padding rows 4..5 discarded


class _PerRankTrainer(Trainer):
    """Each rank reads its own Padded(rank) whole, in order (no distributed sampler), like the Lightning run."""

    def get_train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_dataset, batch_size=self.args.per_device_train_batch_size)


def run(root: str, options: dict, padding_nan: bool = True, genuine: tuple[int, ...] = (), genuine_rank: int = 0,
        callback: bool = True) -> dict:
    rank = int(os.environ.get("RANK", "0"))
    cb = GradwiseCallback(**options) if callback else None
    args = TrainingArguments(output_dir=root, max_steps=STEPS, per_device_train_batch_size=2, learning_rate=0.1,
                             lr_scheduler_type="constant", optim="sgd", max_grad_norm=0.0, use_cpu=True,
                             report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                             dataloader_num_workers=0, remove_unused_columns=False, seed=0)
    model = Net()
    trainer = _PerRankTrainer(model=model, args=args, train_dataset=Padded(rank, padding_nan, tuple(genuine),
                                                                           genuine_rank, 2),
                              callbacks=[cb] if cb else [])
    error = None
    try:
        trainer.train()
    except Exception as e:  # the "raise" policy: recorded for the test
        error = f"{type(e).__name__}: {e}"
    return {"rank": rank, "params": [p.detach().tolist() for p in model.parameters()],
            "nonfinite_steps": cb.nonfinite_steps if cb else None, "skipped_steps": cb.skipped_steps if cb else None,
            "reports": [str(p) for p in cb.reports] if cb else None, "error": error,
            "world": int(os.environ.get("WORLD_SIZE", "1")),
            "distributed": torch.distributed.is_initialized()}


if __name__ == "__main__":
    out, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(**spec)
    result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                          and "gradwise" in str(w.message)]
    Path(f"{out}.rank{result['rank']}").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
