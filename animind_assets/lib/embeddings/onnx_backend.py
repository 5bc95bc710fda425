"""ONNX Runtime backend for Transformer text encoders on CPU: export, graph optimization, int8
quantization and the inference session (no Dagster here).

``encoder.TextEmbedder`` uses it when ``EmbeddingConfig.backend`` is ``onnx`` (or ``auto`` on CPU):

1. **Export** (``export_encoder``): the encoder (``AutoModel`` up to ``last_hidden_state``) is exported
   once per model with PyTorch's ONNX exporter (eager attention, so the padding mask stays a real
   input), cached under ``<cache_dir>/<cache_key>/model.onnx``; the key covers the model folder's
   identity and the exporter/runtime versions. Nothing is downloaded: the export reads the local folder.
2. **Transformer fusions** (``optimize_encoder``, ``EmbeddingConfig.onnx_optimize``): ONNX Runtime's
   offline transformer optimizer (``onnxruntime.transformers.optimizer``, ``model_type='bert'``) fuses
   the embedding + LayerNorm, each self-attention block (one ``Attention`` op), bias + GELU and
   residual + LayerNorm (``SkipLayerNormalization``) -> ``model.opt.onnx``. Applied to encoder
   families whose graphs these fusions know (``OPTIMIZABLE_MODEL_TYPES``); others run unfused.
3. **int8** (``quantize_encoder``, ``EmbeddingConfig.quantize='int8'``): ONNX Runtime dynamic
   quantization (``onnxruntime.quantization.quantize_dynamic``: int8 weights, activations quantized
   per batch at run time; Jacob et al. 2018, "Quantization and Training of Neural Networks for
   Efficient Integer-Arithmetic-Only Inference") of the (fused) graph -> ``model[.opt].int8-<recipe id>.onnx``.
   Its vectors differ from fp32 (cosine ~0.99+), so the caller gates them against fp32 and the
   setting is part of the model fingerprint.

Pooling, truncation and normalization stay in ``encoder``/``pooling``, so every pooling mode and
prefix works the same on both backends. Every file is written to a temporary name beside its final
place and renamed into place, so a crash or a concurrent export never leaves a half-written model.
After loading, the caller checks each fp32 variant against the PyTorch model on padded probe batches
(``PROBE_TEXTS``) and falls back (fused -> unfused -> PyTorch) when they disagree.
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
OPTIMIZE_VERSION = 1  # bump when the optimizer / quantizer settings below change
OPSET = 17
# models larger than this stay on PyTorch under backend=auto (export time, 2 GB protobuf limit)
AUTO_MAX_PARAM_BYTES = 1_500_000_000
# Hugging Face ``model_type`` values whose exported graphs ONNX Runtime's 'bert' fusions match
OPTIMIZABLE_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra"})

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
    """Cache entry name (16 hex chars) of a model folder's export under these tool versions."""
    import onnxruntime
    import torch

    return json_fingerprint(
        {
            "model": folder_identity,
            "export_version": EXPORT_VERSION,
            "optimize_version": OPTIMIZE_VERSION,
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
    """Export ``folder``'s encoder to ``cache_dir/key/model.onnx`` (reused when present) -> its path.
    Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model takes them), int64
    (batch, sequence); output ``last_hidden_state`` float32 (batch, sequence, hidden)."""
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


# int8 recipe (chosen on MiniLM-L6 / AMD EPYC AVX2 by cosine to fp32 on 128 seeded MAL texts, see
# docs/embeddings.md): uint8 weights per output channel (U8U8 avoids the int16 saturation of the U8S8
# AVX2 kernel without VNNI: mean cosine 0.9969 vs 0.9960 for int8 weights); the fused Attention and
# MatMul ops are quantized except the feed-forward down-projection (the MatMul fed by GELU), whose
# inputs carry large outliers that per-tensor dynamic activation quantization loses (quantizing it
# too: mean 0.9938); embeddings and LayerNorms stay fp32.
INT8_WEIGHT_TYPE = "QUInt8"
INT8_PER_CHANNEL = True
INT8_OP_TYPES = ("Attention", "MatMul")
_GELU_OPS = {"Gelu", "BiasGelu", "FastGelu", "QuickGelu"}


def int8_recipe_id() -> str:
    """8 hex chars naming the int8 recipe above (in the int8 file name and the model fingerprint)."""
    return json_fingerprint({"weights": INT8_WEIGHT_TYPE, "per_channel": INT8_PER_CHANNEL, "ops": list(INT8_OP_TYPES),
                             "keep_fp32": "ffn_down"})[:8]


def optimize_blocker(folder: Path) -> str | None:
    """Why ONNX Runtime's 'bert' transformer fusions do not apply to this model (None = they do)."""
    try:
        conf = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"config.json unreadable: {exc}"
    mtype = conf.get("model_type")
    if mtype not in OPTIMIZABLE_MODEL_TYPES:
        return f"model_type {mtype!r} is not one of the encoder families {sorted(OPTIMIZABLE_MODEL_TYPES)}"
    if not conf.get("num_attention_heads") or not conf.get("hidden_size"):
        return "config.json lacks num_attention_heads / hidden_size"
    return None


def _write_atomic(target: Path, write) -> None:
    """``write(tmp_path)`` then rename onto ``target`` (no half-written file is ever at ``target``)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def optimize_encoder(raw: Path, folder: Path, log=None) -> Path:
    """Fuse ``raw`` (an ``export_encoder`` graph) with ONNX Runtime's transformer optimizer -> path of
    ``model.opt.onnx`` beside it (reused when present). Fusions: EmbedLayerNormalization, Attention
    (raw 2-D padding mask, so left and right padding both work), BiasGelu, SkipLayerNormalization.
    ``opt_level=0``: only these portable fusions are saved; ONNX Runtime applies its hardware-specific
    ones when the session is created. Raises when the optimizer fails or fuses no attention block."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    log = log or (lambda _m: None)
    target = raw.with_name("model.opt.onnx")
    with _EXPORT_LOCK:
        if target.exists():
            return target
        conf = json.loads((Path(folder) / "config.json").read_text())
        t0 = time.perf_counter()
        options = FusionOptions("bert")
        options.use_raw_attention_mask(True)
        import logging

        quiet = logging.getLogger("onnxruntime.transformers")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            model = optimize_model(str(raw), model_type="bert", num_heads=int(conf["num_attention_heads"]),
                                   hidden_size=int(conf["hidden_size"]), opt_level=0, optimization_options=options,
                                   use_gpu=False)
        finally:
            quiet.setLevel(level)
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        if not fused.get("Attention") and not fused.get("MultiHeadAttention"):
            raise RuntimeError(f"the optimizer fused no attention block ({fused or 'nothing fused'})")
        _write_atomic(target, lambda tmp: model.save_model_to_file(str(tmp)))
        log(f"embeddings: fused the ONNX graph in {time.perf_counter() - t0:.1f}s ({fused})")
        return target


def quantize_encoder(fp32: Path, log=None) -> Path:
    """Dynamic int8 quantization of an fp32 graph (``onnxruntime.quantization.quantize_dynamic``, recipe
    above) -> path of ``<stem>.int8-<recipe hash>.onnx`` beside it (reused when present)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log = log or (lambda _m: None)
    target = fp32.with_name(f"{fp32.stem}.int8-{int8_recipe_id()}.onnx")
    with _EXPORT_LOCK:
        if target.exists():
            return target
        t0 = time.perf_counter()
        graph = onnx.load(str(fp32), load_external_data=False).graph
        producers = {out: node.op_type for node in graph.node for out in node.output}
        ffn_down = [n.name for n in graph.node if n.op_type == "MatMul" and producers.get(n.input[0]) in _GELU_OPS]
        import logging

        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "please consider pre-processing" warning
        try:
            _write_atomic(target, lambda tmp: quantize_dynamic(
                str(fp32), str(tmp), weight_type=getattr(QuantType, INT8_WEIGHT_TYPE), per_channel=INT8_PER_CHANNEL,
                op_types_to_quantize=list(INT8_OP_TYPES), nodes_to_exclude=ffn_down,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            ))
        finally:
            quiet.setLevel(level)
        log(f"embeddings: quantized {fp32.name} to int8 in {time.perf_counter() - t0:.1f}s "
            f"({target.stat().st_size / 2**20:.0f} MB; {len(ffn_down)} feed-forward down-projections kept fp32)")
        return target


class OrtEncoder:
    """An ONNX Runtime CPU session of an exported encoder with ``threads`` intra-op threads (no spin-wait
    with one thread); ``__call__(input_ids, attention_mask)`` (int (B, T)) -> float32 (B, T, H)
    ``last_hidden_state``; thread-safe (several workers may run it concurrently)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads <= 1:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
