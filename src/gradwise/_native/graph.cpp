// gradwise's C++ helper for gw.watch(): what a watched backward does per step that Python can only do per
// object (a graph walk, a release of the saved tensors, a finiteness scan of the gradients), done here in one
// call each. Built on first use by torch.utils.cpp_extension (gradwise/_native/__init__.py); everything here
// has a Python twin that runs when this module is not built (the results are the same: tests/test_native.py).
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace py = pybind11;
using torch::autograd::Node;
using NodePtr = decltype(torch::autograd::Edge::function);  // (shared_ptr up to 2.12, intrusive_ptr since)

// The nodes a walk found (not leaves), held until the watch releases them or drops this object.
struct Nodes {
  std::vector<NodePtr> nodes;
};

// The autograd nodes of the tensors that need a gradient (grad_fn, or a leaf's AccumulateGrad), in order: the
// roots a backward starts from, or the nodes of its inputs.
static std::vector<NodePtr> nodes_of(const std::vector<at::Tensor>& tensors) {
  std::vector<NodePtr> nodes;
  for (const auto& t : tensors) {
    if (t.defined() && t.requires_grad()) {
      auto edge = torch::autograd::impl::gradient_edge(t);
      if (edge.function) nodes.push_back(std::move(edge.function));
    }
  }
  return nodes;
}

// One walk of the graph below `outputs` (tensors), in the Python walk's order (`_graph_parts`): its leaves
// (AccumulateGrad's variables) and its other nodes, for `release`. A tensor that needs no gradient is no root.
static py::tuple walk(const std::vector<at::Tensor>& outputs) {
  std::vector<NodePtr> stack = nodes_of(outputs);
  std::unordered_set<Node*> seen;
  py::list leaves;
  auto held = std::make_shared<Nodes>();
  while (!stack.empty()) {
    NodePtr node = std::move(stack.back());
    stack.pop_back();
    if (!seen.insert(node.get()).second) continue;
    if (auto* acc = dynamic_cast<torch::autograd::AccumulateGrad*>(node.get())) {
      leaves.append(py::cast(acc->variable));
      continue;
    }
    for (const auto& edge : node->next_edges()) {
      if (edge.function && !seen.count(edge.function.get())) stack.push_back(edge.function);
    }
    held->nodes.push_back(std::move(node));
  }
  return py::make_tuple(leaves, py::cast(held));
}

// The nodes a backward restricted to `inputs` runs (backward(inputs=), autograd.grad), as the Python twin
// `_saved_toward` finds them: those on a path from the outputs' nodes to an input's node (an input's own node
// only if another input lies below it, or always under backward(inputs=): `inputs_run`), for `release`.
static std::shared_ptr<Nodes> toward(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& inputs,
                                     bool inputs_run) {
  const std::vector<NodePtr> input_nodes = nodes_of(inputs);  // (held: a leaf's accumulator made here lives on)
  std::unordered_set<Node*> targets;
  for (const auto& node : input_nodes) targets.insert(node.get());
  std::unordered_map<Node*, bool> reaches;
  std::vector<std::pair<NodePtr, bool>> stack;  // (node, its children done): an iterative post-order
  for (auto& root : nodes_of(outputs)) stack.emplace_back(std::move(root), false);
  auto held = std::make_shared<Nodes>();
  while (!stack.empty()) {
    auto [node, children_done] = std::move(stack.back());
    stack.pop_back();
    Node* raw = node.get();
    if (children_done) {
      bool any = false;
      for (const auto& edge : raw->next_edges()) {
        Node* child = edge.function.get();
        if (!child) continue;
        auto found = reaches.find(child);
        if (targets.count(child) || (found != reaches.end() && found->second)) any = true;
      }
      reaches[raw] = any;
      // (backward(inputs=) runs a non-leaf input's own node, its gradient kept by retain_grad)
      bool ran = any || (inputs_run && targets.count(raw));
      if (ran && !dynamic_cast<torch::autograd::AccumulateGrad*>(raw)) held->nodes.push_back(node);
    } else if (!reaches.count(raw)) {
      reaches[raw] = false;  // (seen; set for real when its children are done)
      stack.emplace_back(node, true);
      for (const auto& edge : raw->next_edges()) {
        if (edge.function && !reaches.count(edge.function.get())) stack.emplace_back(edge.function, false);
      }
    }
  }
  return held;
}

// Free the saved tensors of every node the walk found, as the engine does after running a node of a graph it
// does not keep (Node::release_variables: a later backward through them raises PyTorch's own error).
static void release(Nodes& held) {
  for (auto& node : held.nodes) node->release_variables();
  held.nodes.clear();
}

// Whether no element of n has all its exponent bits set (NaN or +-Inf), read as unsigned integers of the
// float's width: one pass, no kernel launch, no temporary (the compiler vectorises the loop; on x86-64 an AVX2
// copy is chosen at load time where the CPU has it: 1.1 us against 2.1 for the SSE2 baseline on a 64 kB gradient,
// a call from Python included, 2026-12-07).
#if defined(__x86_64__) && defined(__GNUC__)
#define GRADWISE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GRADWISE_CLONES
#endif
template <typename U>
GRADWISE_CLONES static bool bits_finite(const U* p, int64_t n, U exponent) {
  U bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<U>((p[i] & exponent) == exponent);
  return bad == 0;
}

// Whether this tensor's memory can be scanned here: a CPU tensor of floats (complex as pairs) whose elements
// fill one block (non-overlapping and dense: any permutation of strides), with no dispatch of its own (Python
// subclasses with __torch_dispatch__, fake and functional tensors, functorch wrappers, ZeroTensor: not read).
static int scannable(const at::Tensor& t) {
  if (!t.defined() || t.layout() != at::kStrided || !t.device().is_cpu() || t.is_nested()) return 0;
  const auto keys = t.key_set();
  if (keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::FuncTorchBatched) ||
      keys.has(c10::DispatchKey::FuncTorchGradWrapper) || keys.has(c10::DispatchKey::Functionalize) ||
      keys.has(c10::DispatchKey::BatchedNestedTensor) || t._is_zerotensor() || !t.has_storage() ||
      !t.is_non_overlapping_and_dense())
    return 0;
  // (a storage smaller than the tensor: FSDP's freed unsharded parameters resize theirs to 0; PyTorch's own ops
  // raise on those, which the Python check then does)
  if (static_cast<int64_t>(t.storage().nbytes()) < (t.storage_offset() + t.numel()) * t.element_size()) return 0;
  switch (t.scalar_type()) {
    case at::kFloat: case at::kComplexFloat: return 32;
    case at::kDouble: case at::kComplexDouble: return 64;
    case at::kHalf: case at::kComplexHalf: return 16;
    case at::kBFloat16: return -16;
    default: return 0;
  }
}

// The gradients' check: False as soon as one scanned tensor holds a NaN/Inf; else the list of those it could
// not scan (off the CPU, sparse, integer, subclasses...), which the Python check reads.
static py::object finite_or_rest(const std::vector<at::Tensor>& tensors) {
  py::list rest;
  for (const auto& t : tensors) {
    const int kind = scannable(t);
    if (kind == 0) {
      rest.append(py::cast(t));
      continue;
    }
    const int64_t n = t.numel() * (t.is_complex() ? 2 : 1);
    if (n == 0) continue;
    const void* p = t.const_data_ptr();
    bool ok;
    switch (kind) {
      case 32: ok = bits_finite(static_cast<const uint32_t*>(p), n, uint32_t{0x7f800000u}); break;
      case 64: ok = bits_finite(static_cast<const uint64_t*>(p), n, uint64_t{0x7ff0000000000000ull}); break;
      case 16: ok = bits_finite(static_cast<const uint16_t*>(p), n, uint16_t{0x7c00u}); break;
      default: ok = bits_finite(static_cast<const uint16_t*>(p), n, uint16_t{0x7f80u}); break;
    }
    if (!ok) return py::bool_(false);
  }
  return rest;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Nodes, std::shared_ptr<Nodes>>(m, "Nodes");
  m.def("walk", &walk, "(leaves, nodes) of the graph below the output tensors");
  m.def("toward", &toward, "the nodes a backward restricted to the input tensors runs, for release", py::arg("outputs"),
        py::arg("inputs"), py::arg("inputs_run") = false);
  m.def("release", &release, "free the saved tensors of the walked nodes, as the engine does");
  m.def("finite_or_rest", &finite_or_rest, "False at a NaN/Inf, else the tensors not scanned here");
}
