"""The text encoder: a loaded Sentence-Transformers model, its backend (PyTorch or ONNX Runtime) and
the public ``embed_texts`` / ``get_embedder`` entry points (no Dagster here).

``embed_texts(texts, cfg, log=None) -> float32 (len(texts), dim)``, row ``i`` for ``texts[i]``; the
model is loaded once per process (``get_embedder``, at most two cached); empty/None texts raise
``EmbeddingError`` (filter them first); finiteness is checked by ``incremental.build_embeddings``.

Paths: the usual Transformer[+Pooling][+Normalize] layout runs "direct" (``AutoModel`` forward +
``pooling.pool`` under ``torch.inference_mode``; batches from ``batching.direct_batches``); other
layouts (Dense heads, chat templates, ...) go through the Sentence-Transformers modules. Results
match ``SentenceTransformer.encode`` (cosine > 1 - 1e-4; in practice ~1e-7).

Backend: on CPU, ``backend='auto'`` runs the encoder in ONNX Runtime (``onnx_backend``: exported once
per model folder, fused by ONNX Runtime's transformer optimizer unless ``onnx_optimize=False``, each
fp32 graph checked against PyTorch on padded probe batches before first use); it falls back to
PyTorch, logging why, when onnxruntime is missing, the model is not a plain Transformer+Pooling
stack, it has over 1.5 GB of weights, or the export fails or disagrees. ``backend='onnx'`` raises
instead of falling back; ``'torch'`` never exports. CUDA always uses PyTorch. fp32 vectors of either
backend agree to cosine ~1e-6, so the backend is not part of the model fingerprint.

int8 (``quantize='int8'``, CPU only): the dynamic-quantized graph runs behind a quality gate: the
first call per process and model embeds a seeded sample of its texts (plus ``PROBE_TEXTS``) with both
the fp32 and the int8 graph and raises ``QuantizationGateError`` unless the mean cosine is >=
``INT8_GATE_MIN_COSINE`` (0.995) and every sampled text is >= ``INT8_GATE_FLOOR_COSINE``. It never
falls back to fp32 (the rows would carry the int8 fingerprint).

Threads: on CPU ``cpu_workers`` inference threads (auto: ``min(torch threads, 4)``) each run whole
batches with ``torch threads // workers`` intra-op threads (PyTorch and ONNX Runtime alike); the last
window of a run ends in ``2 * workers`` smaller batches (``direct_batches(tail_split=...)``) so the
workers finish together.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from animind_assets.lib.common.progress import LogFn, Progress
from animind_assets.lib.embeddings import onnx_backend
from animind_assets.lib.embeddings.batching import direct_batches, module_batches
from animind_assets.lib.embeddings.config import (
    INT8_GATE_FLOOR_COSINE,
    INT8_GATE_MIN_COSINE,
    INT8_GATE_SAMPLE,
    ST_POOLING,
    EmbeddingConfig,
    EmbeddingError,
    QuantizationGateError,
)
from animind_assets.lib.embeddings.model_loading import (
    dtype_name,
    folder_identity,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)
from animind_assets.lib.embeddings.pipeline import run_pipeline
from animind_assets.lib.embeddings.pooling import pool


class TextEmbedder:
    """A loaded model plus the batching pipeline. Obtain with ``get_embedder(cfg)`` (cached)."""

    guided_tail = True  # last window ends in 2 * workers smaller batches (False only to measure the path without it)

    def __init__(self, folder: Path, device, dtype, cfg: EmbeddingConfig, log: LogFn | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.folder = folder
        self.device = device
        self.dtype = dtype
        self.log = log or (lambda _m: None)
        t0 = time.perf_counter()
        model_kwargs: dict[str, Any] = {"dtype": dtype}
        if cfg.attn_implementation:
            model_kwargs["attn_implementation"] = cfg.attn_implementation
        self.st = SentenceTransformer(
            str(folder),
            device=str(device),
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=True,
            model_kwargs=model_kwargs,
        )
        self.st.eval()
        modules = list(self.st)
        names = [type(m).__name__ for m in modules]
        first = modules[0]
        self.tokenizer = getattr(first, "tokenizer", None)
        self.model_max_length = getattr(self.st, "max_seq_length", None)
        self.st_pooling: str | None = None
        self.include_prompt = True
        for m in modules:
            if type(m).__name__ == "Pooling":
                mode = m.pooling_mode if isinstance(m.pooling_mode, str) else "+".join(m.pooling_mode)
                self.st_pooling = mode
                self.include_prompt = bool(getattr(m, "include_prompt", True))
        modality = getattr(first, "modality_config", {}) or {}
        text_cfg = modality.get("text", {}) if isinstance(modality, dict) else {}
        fast_ok = (
            names[0] == "Transformer"
            and set(names[1:]) <= {"Pooling", "Normalize"}
            and getattr(first, "transformer_task", "feature-extraction") == "feature-extraction"
            and text_cfg.get("method", "forward") == "forward"
            and text_cfg.get("method_output_name", "last_hidden_state") in ("last_hidden_state", ("last_hidden_state",), ["last_hidden_state"])
            and self.tokenizer is not None
            and (self.st_pooling is None or self.st_pooling in ST_POOLING)
        )
        self.mode = "direct" if fast_ok else "modules"
        self.auto_model = first.auto_model if fast_ok else None
        get_dim = getattr(self.st, "get_embedding_dimension", None) or getattr(self.st, "get_sentence_embedding_dimension")
        self.hidden_size = int(get_dim() or 0) or None
        self.modules_desc = " -> ".join(names)
        self.trust_remote_code = cfg.trust_remote_code
        self._ort: dict[tuple, Any] = {}  # (graph path, threads) -> OrtEncoder
        self._onnx_parity_done: dict[Path, str | None] = {}  # fp32 graph -> parity error (None = agrees)
        self._onnx_variant: dict[tuple, tuple[Path, Path | None]] = {}  # (cache dir, optimize, quantize) -> (fp32, int8)
        self._onnx_unusable: str | None = None  # why backend=auto fell back to PyTorch
        self._int8_gates: dict[Path, dict] = {}  # int8 graph -> gate figures (this process)
        self.last_backend = ""
        self.last_graph = ""  # file name of the ONNX graph of the last run ("" = PyTorch)
        self.last_int8_gate: dict = {}
        self.load_seconds = time.perf_counter() - t0
        self.log(
            f"embeddings: loaded {folder.name} ({self.modules_desc}) on {device} as {dtype_name(dtype)} "
            f"in {self.load_seconds:.1f}s; path={self.mode}, max_seq_length={self.model_max_length}, "
            f"pooling={self.st_pooling or 'mean (no Pooling module)'}"
        )

    # ------------------------------------------------------------------ settings per call
    def pooling_for(self, cfg: EmbeddingConfig) -> str:
        """Pooling mode used for ``cfg`` (``auto`` = the model's Sentence-Transformers pooling, else mean)."""
        if cfg.pooling != "auto":
            return cfg.pooling
        return ST_POOLING.get(self.st_pooling or "mean", self.st_pooling or "mean")

    def max_length_for(self, cfg: EmbeddingConfig) -> int:
        """Token truncation length: ``cfg.max_length``, else the model's ``max_seq_length`` (<= 8192)."""
        if cfg.max_length:
            return int(cfg.max_length)
        if self.model_max_length:
            return int(self.model_max_length)
        tml = getattr(self.tokenizer, "model_max_length", None) or 512
        return int(min(tml, 8192))

    def output_dim(self, cfg: EmbeddingConfig) -> int:
        """Vector width for ``cfg`` (``truncate_dim`` if set; raises if larger than the model's)."""
        d = self.hidden_size or 0
        if cfg.truncate_dim:
            if d and cfg.truncate_dim > d:
                raise EmbeddingError(f"truncate_dim={cfg.truncate_dim} exceeds the model's dimension {d}")
            return int(cfg.truncate_dim)
        return d

    def batch_token_budget(self, cfg: EmbeddingConfig) -> int | None:
        """Max padded tokens per batch: ``cfg.max_batch_tokens``; auto (0) = 8192 on CPU (bounds activation
        memory of long batches, ~0.3 GB per worker for MiniLM), no cap on CUDA; negative = no cap."""
        if cfg.max_batch_tokens > 0:
            return int(cfg.max_batch_tokens)
        if cfg.max_batch_tokens == 0 and self.device.type == "cpu":
            return 8192
        return None

    def workers_for(self, cfg: EmbeddingConfig) -> tuple[int, int]:
        """``(inference threads, intra-op threads each)`` for ``cfg`` on this device."""
        import torch

        if self.device.type != "cpu":
            return 1, torch.get_num_threads()
        total = max(1, torch.get_num_threads())
        workers = cfg.cpu_workers or min(total, 4)
        workers = max(1, min(workers, total))
        return workers, max(1, total // workers)


    # ------------------------------------------------------------------ backend
    def _onnx_blocker(self) -> str | None:
        """Why this model cannot run on ONNX Runtime here (None = it can)."""
        if self.device.type != "cpu":
            return f"the ONNX backend runs on CPU (device is {self.device}); use backend 'torch' on CUDA"
        if self.mode != "direct":
            return f"the ONNX backend needs a Transformer[+Pooling][+Normalize] model; {self.folder.name} has {self.modules_desc}"
        if not onnx_backend.available():
            return "onnxruntime is not installed (pip install onnxruntime)"
        return None

    def backend_for(self, cfg: EmbeddingConfig, threads: int = 1, log: LogFn | None = None) -> tuple[str, Any]:
        """Resolve ``cfg.backend`` -> ``("torch", None)`` or ``("onnx", OrtEncoder)``.

        ``onnx`` exports the encoder once (cached on disk), fuses it (``onnx_optimize``), checks the fp32
        graph against PyTorch on padded probe batches and, for ``quantize='int8'``, quantizes it; ``auto``
        does the same on CPU and falls back to PyTorch (logging why) when anything is missing or
        disagrees; ``onnx`` raises instead. ``quantize='int8'`` never falls back: it raises
        ``EmbeddingError`` when the ONNX backend cannot run."""
        log = log or self.log
        if cfg.backend == "torch":
            return "torch", None
        explicit = cfg.backend == "onnx" or cfg.quantize != "none"
        what = "backend 'onnx'" if cfg.backend == "onnx" else f"quantize={cfg.quantize!r}"
        blocker = self._onnx_blocker()
        if blocker is None and not explicit:
            if self._onnx_unusable:
                return "torch", None
            n_bytes = sum(p.numel() * p.element_size() for p in self.auto_model.parameters())
            if n_bytes > onnx_backend.AUTO_MAX_PARAM_BYTES:
                blocker = f"model has {n_bytes / 1e9:.1f} GB of weights (auto uses ONNX up to {onnx_backend.AUTO_MAX_PARAM_BYTES / 1e9:.1f} GB)"
        if blocker is not None:
            if explicit:
                raise EmbeddingError(f"{what}: {blocker}")
            if cfg.backend == "auto" and self.device.type == "cpu" and self._onnx_unusable != blocker:
                self._onnx_unusable = blocker
                log(f"embeddings: using PyTorch ({blocker})")
            return "torch", None
        try:
            fp32, int8 = self._onnx_graphs(cfg, threads, log)
            return "onnx", self._session(int8 if cfg.quantize == "int8" else fp32, threads)
        except Exception as exc:
            if explicit:
                raise
            self._onnx_unusable = f"ONNX export/load failed: {type(exc).__name__}: {exc}"
            log(f"embeddings: using PyTorch ({self._onnx_unusable})")
            return "torch", None

    def _session(self, path: Path, threads: int):
        enc = self._ort.get((path, threads))
        if enc is None:
            enc = self._ort[(path, threads)] = onnx_backend.OrtEncoder(path, threads)
        return enc

    def _onnx_graphs(self, cfg: EmbeddingConfig, threads: int, log: LogFn) -> tuple[Path, Path | None]:
        """``(fp32 graph checked against PyTorch, int8 graph or None)`` for ``cfg`` (built/cached on disk)."""
        cache_dir = Path(cfg.onnx_cache_dir) if cfg.onnx_cache_dir else onnx_backend.default_cache_dir()
        vkey = (str(cache_dir), cfg.onnx_optimize, cfg.quantize)
        if vkey in self._onnx_variant:
            return self._onnx_variant[vkey]
        key = onnx_backend.cache_key(folder_identity(self.folder))
        raw = onnx_backend.export_encoder(self.folder, cache_dir, key, self.trust_remote_code, log)
        fp32 = raw
        if cfg.onnx_optimize:
            why_not = onnx_backend.optimize_blocker(self.folder)
            if why_not is not None:
                log(f"embeddings: ONNX graph left unfused ({why_not})")
            else:
                try:
                    fused = onnx_backend.optimize_encoder(raw, self.folder, log)
                    err = self._parity(fused, threads)
                    if err is None:
                        fp32 = fused
                    else:
                        log(f"embeddings: fused ONNX graph disagrees with PyTorch ({err}); using the unfused export")
                except Exception as exc:  # the unfused export still works
                    log(f"embeddings: ONNX transformer optimizer failed ({type(exc).__name__}: {exc}); using the unfused export")
        if fp32 == raw:
            err = self._parity(raw, threads)
            if err is not None:
                raise EmbeddingError(f"ONNX export {raw} disagrees with PyTorch: {err}")
        log(f"embeddings: ONNX Runtime backend ready ({fp32.parent.name}/{fp32.name}, parity with PyTorch checked)")
        int8 = onnx_backend.quantize_encoder(fp32, log) if cfg.quantize == "int8" else None
        self._onnx_variant[vkey] = (fp32, int8)
        return fp32, int8

    def _parity(self, path: Path, threads: int, tol: float = 1e-4) -> str | None:
        """Compare an fp32 graph with the PyTorch model on one padded probe batch built exactly as the
        pipeline builds them (pad id, padding side); the error text, or None when min cosine >= 1 - tol."""
        import torch

        if path in self._onnx_parity_done:
            return self._onnx_parity_done[path]
        enc = self._session(path, threads)
        probe = onnx_backend.PROBE_TEXTS
        _, feats = next(direct_batches(self.tokenizer, probe, 0, max_length=min(self.max_length_for(EmbeddingConfig()), 256),
                                       batch_size=len(probe), token_budget=None))
        ids, mask = feats["input_ids"], feats["attention_mask"]
        with torch.inference_mode():
            ref = pool(self.auto_model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state.float(), mask, "mean")
        got = pool(torch.from_numpy(enc(ids.numpy(), mask.numpy())), mask, "mean")
        cos = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
        err = None
        if not bool(torch.isfinite(got).all()) or float(cos.min()) < 1 - tol:
            err = f"min cosine {float(cos.min()):.6f} on the probe batch (tolerance {tol})"
        self._onnx_parity_done[path] = err
        return err

    # ------------------------------------------------------------------ consumer side
    def _prefix_tokens(self, cfg: EmbeddingConfig) -> int:
        if not cfg.prefix or self.include_prompt or self.pooling_for(cfg) != "mean":
            return 0
        ids = self.tokenizer(cfg.prefix, add_special_tokens=True)["input_ids"]
        n = len(ids)
        if n and ids[-1] in set(getattr(self.tokenizer, "all_special_ids", [])):
            n -= 1
        return n

    def _forward(self, feats: dict, cfg: EmbeddingConfig, pooling: str, skip_first: int, ort_encoder=None):
        import torch

        nb = self.device.type == "cuda"
        if ort_encoder is not None:
            mask = feats["attention_mask"]
            hidden = torch.from_numpy(ort_encoder(feats["input_ids"].numpy(), mask.numpy()))
            vec = pool(hidden, mask, pooling, skip_first)
        elif self.mode == "direct":
            ids = feats["input_ids"].to(self.device, non_blocking=nb)
            mask = feats["attention_mask"].to(self.device, non_blocking=nb)
            hidden = self.auto_model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
            vec = pool(hidden, mask, pooling, skip_first)
        else:
            moved = {k: (v.to(self.device, non_blocking=nb) if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}
            vec = self.st.forward(moved)["sentence_embedding"].float()
        if cfg.truncate_dim:
            vec = vec[:, : cfg.truncate_dim]
        if cfg.normalize:
            vec = torch.nn.functional.normalize(vec, p=2, dim=-1)
        return vec.float()

    def embed(
        self, texts: Sequence[str], cfg: EmbeddingConfig, progress: Progress | None = None, log: LogFn | None = None
    ) -> np.ndarray:
        """``texts`` -> ``float32 (len(texts), output_dim(cfg))`` (texts must be non-empty strings)."""
        import torch

        cfg.validate()
        n = len(texts)
        pooling = self.pooling_for(cfg)
        if self.mode == "modules" and cfg.pooling != "auto" and pooling != ST_POOLING.get(self.st_pooling or "", None):
            raise EmbeddingError(
                f"pooling={cfg.pooling!r} override needs a Transformer+Pooling model; {self.folder.name} has "
                f"modules {self.modules_desc} (use pooling='auto')"
            )
        if self.mode == "modules":
            self.st.max_seq_length = self.max_length_for(cfg)
        dim = self.output_dim(cfg)
        if n == 0:
            return np.zeros((0, dim), dtype=np.float32)
        workers, threads = self.workers_for(cfg)
        backend, ort_encoder = self.backend_for(cfg, threads, log)
        self.last_backend = backend
        self.last_graph = ort_encoder.path.name if ort_encoder is not None else ""
        self.last_int8_gate = {}
        if cfg.quantize == "int8":
            self.last_int8_gate = self._int8_gate(texts, cfg, ort_encoder, threads, log or self.log)
        prev_threads = torch.get_num_threads()
        if self.device.type == "cpu" and workers > 1:
            torch.set_num_threads(threads)
        try:
            return self._run(texts, cfg, pooling, workers, ort_encoder, progress)
        finally:
            if torch.get_num_threads() != prev_threads:
                torch.set_num_threads(prev_threads)

    def _run(self, texts: Sequence[str], cfg: EmbeddingConfig, pooling: str, workers: int, ort_encoder, progress) -> np.ndarray:
        skip_first = self._prefix_tokens(cfg) if self.mode == "direct" else 0
        pin = self.device.type == "cuda"
        if self.mode == "direct":
            max_len, budget = self.max_length_for(cfg), self.batch_token_budget(cfg)

            def batches(start: int, stop: int):  # the last window ends in smaller batches (tail_split) so workers finish together
                return direct_batches(self.tokenizer, texts[start:stop], start, max_length=max_len, batch_size=cfg.batch_size,
                                      token_budget=budget, prefix=cfg.prefix, pin_memory=pin,
                                      tail_split=workers if self.guided_tail and stop >= len(texts) else 1)
        else:

            def batches(start: int, stop: int):
                return module_batches(self.st, texts[start:stop], start, batch_size=cfg.batch_size, prefix=cfg.prefix, pin_memory=pin)

        return run_pipeline(
            len(texts), batches, lambda feats: self._forward(feats, cfg, pooling, skip_first, ort_encoder),
            workers=workers, window=max(cfg.batch_size, cfg.sort_window), first_window=max(8 * cfg.batch_size, 1024),
            prefetch_batches=cfg.prefetch_batches, progress=progress,
        )

    def _int8_gate(self, texts: Sequence[str], cfg: EmbeddingConfig, int8_encoder, threads: int, log: LogFn) -> dict:
        """Quality gate of the int8 graph (see module docstring); figures cached per graph and process.
        Raises ``QuantizationGateError`` when it fails."""
        gate = self._int8_gates.get(int8_encoder.path)
        if gate is None:
            rng = np.random.default_rng(0)
            pick = rng.choice(len(texts), size=min(INT8_GATE_SAMPLE, len(texts)), replace=False)
            sample = [texts[int(i)] for i in sorted(pick)] + list(onnx_backend.PROBE_TEXTS)
            fp32_path, _ = self._onnx_graphs(cfg, threads, log)
            workers, _ = self.workers_for(cfg)
            pooling = self.pooling_for(cfg)
            ref = self._run(sample, cfg, pooling, workers, self._session(fp32_path, threads), None)
            got = self._run(sample, cfg, pooling, workers, int8_encoder, None)
            cos = (ref * got).sum(1) / np.clip(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12, None)
            gate = {"texts": len(sample), "min_cosine": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5),
                    "threshold_mean": INT8_GATE_MIN_COSINE, "threshold_min": INT8_GATE_FLOOR_COSINE,
                    "passed": bool(cos.mean() >= INT8_GATE_MIN_COSINE and cos.min() >= INT8_GATE_FLOOR_COSINE)}
            self._int8_gates[int8_encoder.path] = gate
            log(f"embeddings: int8 quality gate on {gate['texts']} seeded texts: cosine to fp32 mean {gate['mean_cosine']:.5f} "
                f"(>= {INT8_GATE_MIN_COSINE}), min {gate['min_cosine']:.5f} (>= {INT8_GATE_FLOOR_COSINE}): "
                f"{'passed' if gate['passed'] else 'FAILED'}")
        if not gate["passed"]:
            raise QuantizationGateError(
                f"quantize='int8': {int8_encoder.path.name} fails the quality gate on {gate['texts']} seeded texts: "
                f"cosine to fp32 mean {gate['mean_cosine']:.5f} (needs >= {INT8_GATE_MIN_COSINE}), min {gate['min_cosine']:.5f} "
                f"(needs >= {INT8_GATE_FLOOR_COSINE}); use quantize='none' for this model",
                gate["min_cosine"], gate["texts"],
            )
        return gate


_EMBEDDERS: dict[tuple, TextEmbedder] = {}
_EMBEDDERS_LOCK = threading.Lock()
_MAX_CACHED = 2


def get_embedder(cfg: EmbeddingConfig, log: LogFn | None = None) -> TextEmbedder:
    """Load (or reuse) the model for ``cfg``; at most two models stay cached per process."""
    cfg.validate()
    folder = resolve_model_path(cfg.model, cfg.revision)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    key = (str(folder), folder_identity(folder), str(device), str(dtype), cfg.attn_implementation, cfg.trust_remote_code)
    with _EMBEDDERS_LOCK:
        emb = _EMBEDDERS.get(key)
        if emb is None:
            emb = TextEmbedder(folder, device, dtype, cfg, log)
            while len(_EMBEDDERS) >= _MAX_CACHED:
                _EMBEDDERS.pop(next(iter(_EMBEDDERS)))
            _EMBEDDERS[key] = emb
        elif log is not None:
            log(f"embeddings: reusing loaded {folder.name} on {device} ({dtype_name(dtype)})")
    return emb


def clear_cache() -> None:
    """Forget every loaded model (the next call loads again)."""
    with _EMBEDDERS_LOCK:
        _EMBEDDERS.clear()


def embed_texts(
    texts: Sequence[str],
    cfg: EmbeddingConfig | None = None,
    log: LogFn | None = None,
    progress_label: str = "embed",
) -> np.ndarray:
    """Embed ``texts`` -> ``float32 (len(texts), dim)``; row i is ``texts[i]`` (see module docstring).
    Raises ``EmbeddingError`` for empty/None texts or bad settings, ``QuantizationGateError`` when the
    int8 graph fails its gate."""
    cfg = cfg or EmbeddingConfig()
    cfg.validate()
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if t is None or not str(t).strip()]
    if bad:
        raise EmbeddingError(f"embed_texts: {len(bad)} empty/None text(s) at positions {bad[:10]}; filter them first")
    emb = get_embedder(cfg, log)
    progress = Progress(progress_label, total=len(texts), unit="texts", log=log, every_s=5.0) if log else None
    return emb.embed(texts, cfg, progress, log)
