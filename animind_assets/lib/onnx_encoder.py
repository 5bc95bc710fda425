"""ONNX Runtime backend for Transformer text encoders on CPU (no Dagster here).

``lib.embeddings`` uses it when ``EmbeddingConfig.backend`` is ``onnx`` (or ``auto`` on CPU): the
encoder (``AutoModel`` up to ``last_hidden_state``) is exported once per model with PyTorch's ONNX
exporter, cached on disk under a key of the model folder's identity and the exporter/runtime
versions, and run by ONNX Runtime (graph optimizations on, intra-op threads set by the caller).
Pooling, truncation and normalization stay in ``lib.embeddings``, so every pooling mode and prefix
works the same on both backends. Nothing is downloaded: the export reads the local model folder.

The export is written to a temporary folder beside the cache entry and renamed into place, so a
crash or a concurrent export never leaves a half-written model behind. After loading, the caller
checks parity against the PyTorch model on padded probe batches (``PROBE_TEXTS``) and falls back to
PyTorch when the two disagree.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from animind_assets.lib.common.fingerprint import json_fingerprint

EXPORT_VERSION = 1
OPSET = 17
# models larger than this stay on PyTorch under backend=auto (export time, 2 GB protobuf limit)
AUTO_MAX_PARAM_BYTES = 1_500_000_000

# Texts of very different lengths so the probe batch is padded (catches exports that baked in a mask).
PROBE_TEXTS = [
    "A bounty hunter and his crew travel the solar system in 2071.",
    "Short.",
    "Two brothers use alchemy to try to restore their bodies after a failed ritual; a long journey "
    "across a war-torn country follows, with state alchemists, homunculi and a conspiracy that reaches "
    "the top of the military government. " * 3,
    "Slice of life comedy about a high-school club.",
]


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def default_cache_dir(data_root: str | os.PathLike | None = None) -> Path:
    """``$ANIMIND_ONNX_CACHE``, else ``<data_root>/cache/onnx`` (``data_root`` defaults to
    ``$ANIMIND_DATA_DIR``), else ``~/.cache/animind/onnx``."""
    if os.environ.get("ANIMIND_ONNX_CACHE"):
        return Path(os.environ["ANIMIND_ONNX_CACHE"])
    root = data_root or os.environ.get("ANIMIND_DATA_DIR")
    if root:
        return Path(root) / "cache" / "onnx"
    return Path.home() / ".cache" / "animind" / "onnx"


def cache_key(folder_identity: str) -> str:
    import onnxruntime
    import torch

    return json_fingerprint(
        {
            "model": folder_identity,
            "export_version": EXPORT_VERSION,
            "opset": OPSET,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        }
    )


_EXPORT_LOCK = threading.Lock()


def export_encoder(
    folder: Path,
    cache_dir: Path,
    key: str,
    trust_remote_code: bool = False,
    log=None,
) -> Path:
    """Export ``folder``'s encoder to ``cache_dir/key/model.onnx`` (reused when present)."""
    import torch
    from transformers import AutoModel

    log = log or (lambda _m: None)
    target_dir = cache_dir / key
    target = target_dir / "model.onnx"
    with _EXPORT_LOCK:
        if target.exists():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        # eager attention: traces to plain MatMul/Softmax with the padding mask as a real input
        model = AutoModel.from_pretrained(
            str(folder), attn_implementation="eager", dtype=torch.float32, trust_remote_code=trust_remote_code
        ).eval()
        accepts_tt = "token_type_ids" in inspect.signature(model.forward).parameters and bool(
            getattr(model.config, "type_vocab_size", 0)
        )

        class _Encoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                kw = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
                return self.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=True, **kw).last_hidden_state

        ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 2460, 102, 0, 0, 0, 0]])
        vocab = int(getattr(model.config, "vocab_size", 1000))
        ids = ids.clamp(max=vocab - 1)
        mask = torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]])
        args: tuple = (ids, mask)
        names = ["input_ids", "attention_mask"]
        if accepts_tt:
            args = (ids, mask, torch.zeros_like(ids))
            names.append("token_type_ids")
        dyn = {n: {0: "batch", 1: "sequence"} for n in names}
        dyn["last_hidden_state"] = {0: "batch", 1: "sequence"}
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
        try:
            import warnings

            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _Encoder(model), args, str(tmp / "model.onnx"), input_names=names,
                    output_names=["last_hidden_state"], dynamic_axes=dyn, opset_version=OPSET, dynamo=False,
                )
            (tmp / "export.json").write_text(json.dumps({"source": str(folder), "inputs": names, "opset": OPSET,
                                                         "torch": torch.__version__}, indent=2))
            try:
                os.replace(tmp, target_dir)
            except OSError:
                if not target.exists():  # not a concurrent export that won the rename
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        del model
        size = sum(p.stat().st_size for p in target_dir.iterdir())
        log(f"embeddings: exported {folder.name} to ONNX in {time.perf_counter() - t0:.1f}s "
            f"({size / 2**20:.0f} MB, cached at {target_dir})")
        return target


class OrtEncoder:
    """An ONNX Runtime session of an exported encoder; ``__call__`` is thread-safe (runs concurrently)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.path = path
        self.threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False),
                 "attention_mask": attention_mask.astype(np.int64, copy=False)}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        return self.session.run(["last_hidden_state"], feeds)[0]
