"""Two speed-ups of a top-``train_layers`` fine-tune's decoder blocks, active only while a phase trains.

* :class:`FrozenBlocksNoGrad`: the frozen blocks *below* the lowest trained one run under ``torch.no_grad``.
  With the embedding output detached (``finetune._apply_method``), no gradient can reach them anyway, so the
  products and the updates are the same; what goes is autograd's per-op bookkeeping for tensors that never need it
  (on a 2-thread AMX CPU, SmolLM2-135M with its top 2 of 30 blocks trained, batch 8 x 20-64 tokens, bf16 autocast:
  1.59 -> 1.83 steps/s in a throwaway probe, 3 Dec 2026).
* :class:`CompiledBlocks`: every decoder block's forward is compiled with ``torch.compile(dynamic=True)``
  (TorchInductor; fuses the norms, rotary embeddings, SiLU-gating and residual adds between the matrix products).
  The first steps pay the compilation (~70 s on 2 CPU threads for SmolLM2's 30 blocks the first time; TorchInductor
  caches it in /tmp/torchinductor_<user>); it counts in
  ``max_train_seconds``. Needs a C++ compiler for Inductor's CPU backend.

Neither changes what is trained or saved: on exit each block's forward is the plain one again (the validation
loss, linking accuracy, perplexity and saving run uncompiled, with autograd's normal mode).
"""

from __future__ import annotations

import os
import shutil

import torch

from animind_assets.lib.llm.base_model import decoder_layers

NO_GRAD_ATTR = "_animind_no_grad_forward"


def _trains(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


class FrozenBlocksNoGrad:
    """Context manager: the leading run of decoder blocks without a trainable parameter runs under ``torch.no_grad``
    (an instance-level ``forward`` wrapper, removed on exit).

    ``detached_input`` must be True: the input embedding's output is detached, so no gradient flows into the blocks
    below the trained ones (``finetune._apply_method`` with ``train_layers``). Otherwise (every block trains, LoRA,
    or gradients into the input embedding) nothing is wrapped. ``.blocks``: the number of blocks wrapped (int).
    Blocks above the lowest trained block are never wrapped, frozen or not (a gradient passes through them)."""

    def __init__(self, model, detached_input: bool):
        layers = decoder_layers(model)
        self.modules: list[torch.nn.Module] = []
        if detached_input and layers is not None:
            for layer in layers:
                if _trains(layer):
                    break
                self.modules.append(layer)

    @property
    def blocks(self) -> int:
        return len(self.modules)

    def __enter__(self):
        for m in self.modules:
            plain = m.forward
            wrapped = torch.no_grad()(plain)
            setattr(m, NO_GRAD_ATTR, True)
            m.forward = wrapped
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            if getattr(m, NO_GRAD_ATTR, False):
                del m.forward  # the class's forward again
                delattr(m, NO_GRAD_ATTR)
        return False


def cxx_compiler() -> str | None:
    """The C++ compiler TorchInductor's CPU backend would call (``$CXX``, else ``g++``/``clang++`` on PATH), or None."""
    for name in (os.environ.get("CXX", ""), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return name
    return None


class CompiledBlocks:
    """Context manager: each decoder block of ``model`` is compiled (``nn.Module.compile(dynamic=True)``; rows of
    any length and batch share one graph) while a phase trains; on exit the compiled wrapper is dropped.

    Raises RuntimeError on entry when the model has no decoder block list, or (``device == "cpu"``) when no C++
    compiler is found for Inductor. ``.blocks``: the number of blocks compiled (int)."""

    def __init__(self, model, device: str = "cpu"):
        layers = decoder_layers(model)
        if layers is None:
            raise RuntimeError("compile_blocks: the model exposes no decoder block list (<base_model_prefix>.layers)")
        self.modules = list(layers)
        self.device = device

    @property
    def blocks(self) -> int:
        return len(self.modules)

    def __enter__(self):
        if self.device == "cpu" and cxx_compiler() is None:
            raise RuntimeError("compile_blocks needs a C++ compiler for TorchInductor's CPU backend (g++ or clang++ on "
                               "PATH, or $CXX); install one or set compile_blocks: false")
        for m in self.modules:
            m.compile(dynamic=True)
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            m._compiled_call_impl = None
        return False
