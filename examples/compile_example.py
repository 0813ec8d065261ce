"""gradwise and torch.compile: strong zeros reach inside compiled backwards (docs/compile.md).

    python examples/compile_example.py
"""

import warnings

import torch
import torch._functorch.config

import gradwise as gw

warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit's, on inductor's first import
# A backward that AOTAutograd loads from its on-disk cache (any run after the first) keeps no graph gradwise can
# compile its strong-zero version from: it would take the op-by-op path. Off, every run takes the fast path.
torch._functorch.config.enable_autograd_cache = False
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
x = torch.cat([torch.randn(4, 4), torch.full((2, 4), float("nan"))])  # 2 NaN padding rows


@torch.compile(fullgraph=True)
def loss_fn(x):
    return model(x)[:4].square().mean()  # the loss never reads the padding


loss_fn(x).backward()  # plain PyTorch, compiled
print("plain torch.compile, weight grad finite:", bool(model[0].weight.grad.isfinite().all()))

model.zero_grad()
with gw.strong_zeros():  # the same compiled function: no recompilation of the forward
    loss_fn(x).backward()
print("inside gw.strong_zeros, weight grad finite:", bool(model[0].weight.grad.isfinite().all()))
print(gw.compile_stats())

model.zero_grad()
compiled_model = torch.compile(model)  # only the model compiled: the slice is eager code
with gw.strong_zeros():
    compiled_model(x)[:4].square().mean().backward()
print("compiled model, eager slice, weight grad finite:", bool(model[0].weight.grad.isfinite().all()))
print("backward runs:", gw.compile_stats())
