"""PLACEHOLDER being written by the lead developer: strong-zero backward. Signatures are final."""
from __future__ import annotations

import contextlib

import torch


def grad(outputs, inputs, grad_outputs=None, *, retain_graph=None, create_graph=False, allow_unused=None):
    return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                               create_graph=create_graph, allow_unused=allow_unused)


def backward(tensors, grad_tensors=None, *, inputs=None, retain_graph=None, create_graph=False):
    return torch.autograd.backward(tensors, grad_tensors, retain_graph=retain_graph,
                                   create_graph=create_graph, inputs=inputs)


@contextlib.contextmanager
def strong_zeros():
    yield


def unruled_ops():
    return set()
