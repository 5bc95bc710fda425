"""Stable semantic IDs across rebuilds: keep the fitted quantizer, keep existing items' IDs.

Semantic IDs are a contract: a fine-tuned LM, every saved recommendation and every exported ID
file refer to them. Refitting the quantizer on every rebuild (a 3-text change included) reassigns
most IDs. This module implements the policy "keep unless there is a reason":

Quantizer (``decide_refit``): the fitted quantizer is kept and reused unless

* a refit is requested (``refit=True``) or a resume is requested;
* there is no usable checkpoint (missing, unfinished, not written by this policy's fit step);
* the quantizer's fit-relevant configuration changed (``config_changes``; knobs that do not change
  the fitted model, such as ``num_threads`` or ``device``, are ignored) or the quantizer's code
  changed (``quantizer_code_fingerprint``: AST hash of ``lib/semantic_ids/quantizers``, so comments
  and docstrings do not count);
* the embedding dimension changed;
* drift crosses a threshold (``measure_drift`` on the current vectors vs the fit-time reference):
  relative increase of the reconstruction error, or the code-usage shift = the largest total-variation
  distance, over levels, between the fit-time and the current per-level code distributions.

IDs (``stable_assign``), when the quantizer is the same fitted model as for the previous
assignment (``model_fingerprint`` equal):

* an existing item whose vector is unchanged (``vector_hashes``) keeps its full ID, the
  disambiguation level included;
* an existing item whose vector changed but whose quantizer codes are the same keeps its full ID;
* a changed item with new codes, and every new item, gets its codes plus the next free
  disambiguation index of that code prefix (smallest index never used by an active or retired ID);
* removed items (and the old IDs of changed items) are *retired*: their IDs stay reserved, so no
  later item ever receives an ID that a saved recommendation still means for another item
  (``release_removed=True`` frees them instead).

When the quantizer was refitted, every ID is assigned afresh (TIGER disambiguation by ascending
item id, ``assign.assign_semantic_ids``) and the counts say how many IDs nevertheless stayed equal.

``id_space_version`` is the content hash of the item -> ID mapping plus the vocabulary level sizes:
the data version of the ``semantic_ids`` table, so downstream models become stale only when an ID
(or the ID vocabulary) really changed.

No Dagster import; plain numpy / polars / torch.
"""

from __future__ import annotations

import ast
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np


#: config knobs that do not change the fitted quantizer (threads, device, reporting cadence, resume control)
FIT_NEUTRAL_FIELDS = frozenset({"num_threads", "device", "full_eval_every", "stop_after_epochs", "dry_run_rows", "dry_run_epochs"})


# ------------------------------------------------------------------------------------------------
# fingerprints
# ------------------------------------------------------------------------------------------------
def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


@lru_cache(maxsize=4)
def quantizer_code_fingerprint(package_dir: str | None = None) -> str:
    """SHA-256 (16 hex) of the quantizer package's code: every ``*.py`` under
    ``lib/semantic_ids/quantizers`` parsed with ``ast``, docstrings removed (comments never reach
    the AST), so only a change of what the code does counts as a code change."""
    root = Path(package_dir) if package_dir else Path(__file__).resolve().parent / "quantizers"
    h = hashlib.sha256()
    for path in sorted(root.glob("*.py")):
        tree = _strip_docstrings(ast.parse(path.read_text(encoding="utf-8")))
        h.update(path.name.encode())
        h.update(ast.dump(tree, include_attributes=False).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model_state: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex) of a quantizer ``state_dict`` (tensor names, dtypes, shapes, bytes): the
    identity of one fitted quantizer. Equal fingerprints encode every vector to the same codes."""
    import torch

    h = hashlib.sha256()
    for name in sorted(model_state):
        v = model_state[name]
        h.update(name.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:16]


def vector_hashes(x: np.ndarray) -> list[str]:
    """One 16-hex SHA-1 per row of ``x`` (float32 bytes): detects which items' vectors changed."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return [hashlib.sha1(row.tobytes()).hexdigest()[:16] for row in x]


def fit_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields that determine the fitted model (``FIT_NEUTRAL_FIELDS`` removed)."""
    return {k: v for k, v in cfg.items() if k not in FIT_NEUTRAL_FIELDS}


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (old, new)}`` for every fit-relevant field that differs (missing = ``None``)."""
    a, b = fit_settings(old), fit_settings(new)
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, tuple):
            va = list(va)
        if isinstance(vb, tuple):
            vb = list(vb)
        if va != vb:
            out[k] = (va, vb)
    return out


# ------------------------------------------------------------------------------------------------
# fit reference + drift
# ------------------------------------------------------------------------------------------------
def code_distributions(codes: np.ndarray, codebook_size: int) -> list[list[float]]:
    """Per level, the fraction of items on each code: ``levels`` lists of ``codebook_size`` floats."""
    codes = np.asarray(codes, dtype=np.int64)
    n = max(1, codes.shape[0])
    return [(np.bincount(codes[:, lv], minlength=codebook_size) / n).tolist() for lv in range(codes.shape[1])]


def fit_reference(codes: np.ndarray, recon_loss: float, codebook_size: int, requested_config: Mapping[str, Any]) -> dict[str, Any]:
    """What ``measure_drift`` and ``decide_refit`` compare against later; stored in the checkpoint
    under ``"fit_reference"`` (plain types only). ``codes``: ``(n, levels)`` codes of the fit rows."""
    return {
        "items": int(np.asarray(codes).shape[0]),
        "recon_loss": float(recon_loss),
        "code_distributions": code_distributions(codes, codebook_size),
        "code_fingerprint": quantizer_code_fingerprint(),
        "requested_config": dict(requested_config),
    }


#: a fit-time reconstruction error below this means the quantizer was fitted on (nearly) identical vectors;
#: a relative increase over it is meaningless (it would print as +1e18 %), so drift says so instead
DEGENERATE_RECON = 1e-9


@dataclass(frozen=True)
class DriftThresholds:
    """Refit when the current vectors drifted past either bound (0 disables a bound).

    ``max_recon_increase``: relative increase of the reconstruction error (MSE in the quantizer's
    normalised input space) over its fit-time value, e.g. 0.25 = +25 %.
    ``max_usage_shift``: largest total-variation distance (0..1), over levels, between the fit-time
    and current per-level code distributions.

    Defaults from measurements on MAL 2020 MiniLM vectors (default preset, docs/semantic_ids.md): a
    catalog grown by 11 % drifts +2.4 % / 0.025, a doubled catalog +20.7 % / 0.085; the defaults
    sit between, so growth by a few percent keeps the IDs and a doubling refits.
    """

    max_recon_increase: float = 0.10
    max_usage_shift: float = 0.05


@dataclass
class DriftReport:
    """Drift of the current vectors against the fit-time reference (see ``measure_drift``)."""

    items_fit: int
    items_now: int
    recon_fit: float
    recon_now: float
    usage_shift_per_level: list[float]

    @property
    def recon_increase(self) -> float:
        if self.recon_fit <= 0:
            return 0.0 if self.recon_now <= 0 else math.inf
        return self.recon_now / self.recon_fit - 1.0

    @property
    def usage_shift(self) -> float:
        return max(self.usage_shift_per_level) if self.usage_shift_per_level else 0.0

    def exceeded(self, thresholds: DriftThresholds) -> list[str]:
        """Reasons (empty when within bounds)."""
        out = []
        if thresholds.max_recon_increase > 0 and self.recon_fit < DEGENERATE_RECON and self.recon_now > self.recon_fit:
            out.append(
                f"drift: the fit-time reconstruction error {self.recon_fit:.2g} is degenerate (the quantizer was fitted "
                f"on collapsed vectors); now {self.recon_now:.4g}"
            )
        elif thresholds.max_recon_increase > 0 and self.recon_increase > thresholds.max_recon_increase:
            out.append(
                f"drift: reconstruction error {self.recon_now:.4g} is {self.recon_increase:+.1%} over the fit-time "
                f"{self.recon_fit:.4g} (threshold +{thresholds.max_recon_increase:.0%})"
            )
        if thresholds.max_usage_shift > 0 and self.usage_shift > thresholds.max_usage_shift:
            lv = int(np.argmax(self.usage_shift_per_level)) + 1
            out.append(
                f"drift: code usage shift {self.usage_shift:.3f} at L{lv} (total variation vs fit time; "
                f"threshold {thresholds.max_usage_shift:.3f})"
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "items_fit": self.items_fit,
            "items_now": self.items_now,
            "recon_fit": round(self.recon_fit, 6),
            "recon_now": round(self.recon_now, 6),
            "recon_increase": round(self.recon_increase, 4) if math.isfinite(self.recon_increase) else None,
            "usage_shift": round(self.usage_shift, 4),
            **{f"usage_shift_l{i + 1}": round(v, 4) for i, v in enumerate(self.usage_shift_per_level)},
        }


def drift_from_codes(reference: Mapping[str, Any], codes: np.ndarray, recon_now: float, codebook_size: int) -> DriftReport:
    """``DriftReport`` from the current codes ``(n, levels)`` and reconstruction error."""
    now = code_distributions(codes, codebook_size)
    ref = reference.get("code_distributions") or []
    shifts = []
    for lv in range(min(len(ref), len(now))):
        p, q = np.asarray(ref[lv], dtype=np.float64), np.asarray(now[lv], dtype=np.float64)
        m = max(len(p), len(q))
        p, q = np.pad(p, (0, m - len(p))), np.pad(q, (0, m - len(q)))
        shifts.append(float(0.5 * np.abs(p - q).sum()))
    return DriftReport(
        items_fit=int(reference.get("items", 0)),
        items_now=int(np.asarray(codes).shape[0]),
        recon_fit=float(reference.get("recon_loss", 0.0)),
        recon_now=float(recon_now),
        usage_shift_per_level=shifts,
    )


def measure_drift(model, payload: Mapping[str, Any], vectors: np.ndarray) -> tuple[DriftReport, np.ndarray]:
    """Encode ``vectors`` (``(n, d)`` float32) with the loaded quantizer ``model`` and compare with
    ``payload["fit_reference"]``. Returns ``(report, codes)`` (codes ``(n, levels)`` int64).
    Raises ``KeyError`` when the checkpoint has no fit reference."""
    from animind_assets.lib.semantic_ids.quantizers.trainer import as_tensor

    ref = payload["fit_reference"]
    ev = model.evaluate(as_tensor(vectors))
    codes = ev["codes"].cpu().numpy().astype(np.int64)
    k = int(payload["config"]["codebook_size"])
    return drift_from_codes(ref, codes, float(ev["recon"]), k), codes


@dataclass
class RefitDecision:
    """``refit``: fit a new quantizer; ``reasons``: why (or why the fitted one is kept)."""

    refit: bool
    reasons: list[str]
    drift: DriftReport | None = None
    config_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return "; ".join(self.reasons)


def decide_refit(
    payload: Mapping[str, Any] | None,
    requested_config: Mapping[str, Any],
    *,
    input_dim: int,
    refit_requested: bool = False,
    resume_requested: bool = False,
    drift: DriftReport | None = None,
    thresholds: DriftThresholds = DriftThresholds(),
    checkpoint: str = "",
) -> RefitDecision:
    """Keep the fitted quantizer in ``payload`` (a loaded checkpoint or ``None``) or refit.

    ``requested_config``: ``QuantizerConfig.to_dict()`` as requested (before any adaptation).
    ``drift``: ``measure_drift`` on the current vectors (``None`` when not measured).
    Reasons name the cause, e.g. ``"quantizer config changed: codebook_size 256 -> 128"``.
    """
    if refit_requested:
        return RefitDecision(True, ["refit requested (config refit: true)"])
    if resume_requested:
        return RefitDecision(True, ["resume requested: training continues"])
    if payload is None:
        return RefitDecision(True, [f"no fitted quantizer yet{f' at {checkpoint}' if checkpoint else ''}"])
    if not payload.get("finished", False):
        return RefitDecision(True, [f"checkpoint {checkpoint} is unfinished (interrupted fit)"])
    ref = payload.get("fit_reference")
    if not isinstance(ref, Mapping):
        return RefitDecision(True, [f"checkpoint {checkpoint} has no fit reference (written before stable IDs)"])
    reasons = []
    changes = config_changes(ref.get("requested_config", {}), requested_config)
    if changes:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changes.items())[:6])
        reasons.append(f"quantizer config changed: {shown}")
    code_fp = quantizer_code_fingerprint()
    if ref.get("code_fingerprint") != code_fp:
        reasons.append(f"quantizer code changed (fingerprint {ref.get('code_fingerprint')} -> {code_fp})")
    if int(payload.get("input_dim", -1)) != int(input_dim):
        reasons.append(f"embedding dim changed: {payload.get('input_dim')} -> {input_dim}")
    if drift is not None and not reasons:
        reasons.extend(drift.exceeded(thresholds))
    if reasons:
        return RefitDecision(True, reasons, drift, changes)
    kept = "fitted quantizer kept"
    if drift is not None:
        kept += (f": reconstruction error {drift.recon_increase:+.1%} vs fit time (threshold "
                 f"+{thresholds.max_recon_increase:.0%}), code usage shift {drift.usage_shift:.3f} "
                 f"(threshold {thresholds.max_usage_shift:.3f})")
    return RefitDecision(False, [kept], drift, {})
