"""Input-side rows of the new semantic-ID tokens, added to the residual stream at the first trained decoder block.

In the top-``train_layers`` fine-tune (``finetune._apply_method``) the input embedding's output is detached, so the
rows of the new ID tokens learn only as **output classes** of the tied LM head: a history's IDs reach the trained
blocks as whatever the frozen blocks below make of those output vectors. :class:`IdInputRows` gives each new token an
input-side vector of its own, ``rows[t - n_base]`` (N, d) float32, zero at the start (the model is unchanged until it
trains), that is added to the hidden state entering decoder block ``layer`` at every position holding that token:

    h_layer[b, p] += rows[input_ids[b, p] - n_base]    for input_ids[b, p] >= n_base (base tokens: + 0)

so the trained blocks read the history's IDs through a learned input representation while the frozen blocks and the
base vocabulary are untouched (English text never holds an ID token: its forward pass is the same). The rows train
with the phase's optimizer (registered as the parameter ``PARAM_ATTR`` of the input embedding while a phase trains,
:meth:`IdInputRows.training`) and are saved beside the model as ``FILE`` (safetensors, no pickle); the model folder's
``animind_llm.json`` names them under ``INFO_KEY`` and ``lib/llm/infer.load_sid_model`` attaches them again.

It works as three forward hooks: one on the whole model clears the token ids of the previous call, one on the input
embedding records the ``input_ids`` it is called with (with a KV cache: only the new tokens, as the hidden state
entering the block), one on block ``layer`` adds the rows. A forward call with ``inputs_embeds`` (no embedding
lookup) adds nothing. This module never imports Dagster.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from animind_assets.lib.llm.base_model import decoder_layers

INFO_KEY = "id_input_rows"  # animind_llm.json: {"file", "layer", "n_base", "rows", "dim"}
FILE = "id_input_rows.safetensors"  # the (N, d) tensor "rows" of a model folder
PARAM_ATTR = "animind_id_input_rows"  # the parameter's name on the input embedding while a phase trains
ATTACHED_ATTR = "_animind_id_input_rows"  # the IdInputRows object on the model


class IdInputRows:
    """Input-side rows (N, d) for the vocabulary ids ``n_base..V-1`` of ``model``, added to the hidden state that
    enters decoder block ``layer`` (0-based; the first trained block of a top-``train_layers`` fine-tune).

    ``rows``: a saved (N, d) tensor to start from (e.g. :func:`load_rows`), else zeros. The hooks are registered on
    construction (:meth:`remove` takes them away). Raises ValueError when the model has no decoder block list,
    ``layer`` is out of range, ``n_base`` is not in [1, V) or ``rows`` has another shape than (V - n_base, d)."""

    def __init__(self, model, n_base: int, layer: int, rows: torch.Tensor | None = None):
        layers = decoder_layers(model)
        if layers is None:
            raise ValueError("id_input_rows: the model exposes no decoder block list (<base_model_prefix>.layers)")
        if not 0 <= layer < len(layers):
            raise ValueError(f"id_input_rows: layer must be in [0, {len(layers)}), got {layer}")
        self.emb = model.get_input_embeddings()
        v, d = self.emb.weight.shape
        if not 0 < n_base < v:
            raise ValueError(f"id_input_rows: n_base must be in [1, {v}) (rows of the embedding), got {n_base}")
        self.n_base, self.layer = int(n_base), int(layer)
        if rows is None:
            rows = torch.zeros(v - n_base, d, dtype=torch.float32, device=self.emb.weight.device)
        if tuple(rows.shape) != (v - n_base, d):
            raise ValueError(f"id_input_rows: rows of shape {tuple(rows.shape)}, the model has {v - n_base} new tokens "
                             f"of width {d}")
        self.rows = torch.nn.Parameter(rows.detach().clone(), requires_grad=True)
        self._ids: torch.Tensor | None = None
        self._handles = [
            model.register_forward_pre_hook(self._clear),
            self.emb.register_forward_pre_hook(self._record),
            layers[self.layer].register_forward_pre_hook(self._add, with_kwargs=True),
        ]
        setattr(model, ATTACHED_ATTR, self)

    @property
    def n_new(self) -> int:
        return int(self.rows.shape[0])

    def _clear(self, _module, _args):
        self._ids = None

    def _record(self, _module, args):
        self._ids = args[0] if args else None

    def _add(self, _module, args, kwargs):
        ids = self._ids
        hs = args[0] if args else kwargs.get("hidden_states")
        if ids is None or hs is None or tuple(ids.shape) != tuple(hs.shape[:2]):
            return None
        new = ids >= self.n_base
        idx = (ids - self.n_base).clamp(min=0)
        delta = self.rows[idx] * new.unsqueeze(-1).to(self.rows.dtype)
        hs = hs + delta.to(hs.dtype)
        if args:
            return (hs, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hs}

    @contextlib.contextmanager
    def training(self):
        """Context manager: the rows are the input embedding's parameter ``PARAM_ATTR`` while a phase trains (the
        Trainer's optimizer, gradient clipping and checkpoints see them); removed on exit."""
        self.emb.register_parameter(PARAM_ATTR, self.rows)
        try:
            yield self
        finally:
            self.emb._parameters.pop(PARAM_ATTR, None)

    def info(self) -> dict:
        """The ``animind_llm.json`` entry (``INFO_KEY``) describing the saved rows."""
        return {"file": FILE, "layer": self.layer, "n_base": self.n_base, "rows": self.n_new,
                "dim": int(self.rows.shape[1])}

    def norms(self) -> dict[str, float]:
        """Mean and max L2 norm of the rows (floats), and the mean norm of the new tokens' tied embedding rows, for
        the run's metadata."""
        with torch.no_grad():
            r = self.rows.float().norm(dim=1)
            e = self.emb.weight[self.n_base :].float().norm(dim=1)
        return {"id_input_rows_norm_mean": float(r.mean()), "id_input_rows_norm_max": float(r.max()),
                "id_embedding_rows_norm_mean": float(e.mean())}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the rows as ``folder/FILE`` (safetensors, float32). Returns the path."""
        from safetensors.torch import save_file

        path = Path(folder) / FILE
        save_file({"rows": self.rows.detach().float().cpu().contiguous()}, str(path))
        return path

    def remove(self) -> None:
        """Take the hooks off the model (the rows stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def attached(model) -> IdInputRows | None:
    """The :class:`IdInputRows` attached to ``model`` (or to the model a PEFT wrapper holds), else None."""
    return getattr(model, ATTACHED_ATTR, None)


ENTRY_FIELDS = ("layer", "n_base", "rows", "dim")  # the INFO_KEY entry's required fields (plus optional "file")


def saved_entry(folder: str | os.PathLike, info: dict) -> dict | None:
    """The ``INFO_KEY`` entry of a model folder's ``animind_llm.json`` (``info``, already parsed), checked; None for a
    folder trained without input-side rows (no entry, and ``config.id_input_rows`` false or absent, as in folders
    from before the field). Raises ValueError naming the folder's ``animind_llm.json`` when the config says
    ``id_input_rows`` but no entry lists the rows (loading without them would change every logit silently), or when
    the entry is not a dict with integer fields ``layer``, ``n_base``, ``rows`` and ``dim``."""
    where = Path(folder) / "animind_llm.json"
    entry = info.get(INFO_KEY)
    if entry is None:
        if (info.get("config") or {}).get(INFO_KEY) is True:
            raise ValueError(f"{where}: config.{INFO_KEY} is true but there is no {INFO_KEY!r} entry naming the saved "
                             "rows: the folder is incomplete (copy it again from the run that trained it)")
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: {INFO_KEY!r} must be an object {{file, {', '.join(ENTRY_FIELDS)}}}, got {entry!r}")
    missing = [k for k in ENTRY_FIELDS if not isinstance(entry.get(k), int) or isinstance(entry.get(k), bool)]
    if missing:
        raise ValueError(f"{where}: {INFO_KEY!r} entry lacks integer field(s) {', '.join(missing)}: got {entry!r}")
    name = entry.get("file", FILE)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"{where}: {INFO_KEY!r} entry's file must be a file name inside the folder, got {name!r}")
    return entry


def check_saved(folder: str | os.PathLike, entry: dict) -> None:
    """Check a folder's saved rows without loading the model: the file as :func:`load_rows`, and the entry against
    the folder's ``config.json`` (``n_base + rows`` = ``vocab_size``, ``0 <= layer < num_hidden_layers``). Raises
    FileNotFoundError / ValueError naming the file that disagrees."""
    load_rows(folder, entry)
    conf_path = Path(folder) / "config.json"
    if not conf_path.is_file():
        return
    conf = json.loads(conf_path.read_text(encoding="utf-8"))
    vocab, blocks = conf.get("vocab_size"), conf.get("num_hidden_layers")
    if isinstance(vocab, int) and entry["n_base"] + entry["rows"] != vocab:
        raise ValueError(f"{Path(folder) / 'animind_llm.json'}: {INFO_KEY} n_base {entry['n_base']} + rows "
                         f"{entry['rows']} != vocab_size {vocab} of {conf_path}")
    if isinstance(blocks, int) and not 0 <= entry["layer"] < blocks:
        raise ValueError(f"{Path(folder) / 'animind_llm.json'}: {INFO_KEY} layer {entry['layer']} is not a block of "
                         f"{conf_path} ({blocks} blocks)")


def load_rows(folder: str | os.PathLike, entry: dict) -> torch.Tensor:
    """The (N, d) float32 rows of a model folder's ``INFO_KEY`` entry (checked by :func:`saved_entry`; safetensors:
    no code runs on load). Raises FileNotFoundError naming the file when it is missing, ValueError naming it when it
    is not a readable safetensors file, holds no ``rows`` tensor, or its shape is not the entry's."""
    from safetensors.torch import load_file

    path = Path(folder) / entry.get("file", FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: animind_llm.json lists {INFO_KEY} but the file is missing")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (header, truncation) without the path
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if "rows" not in tensors:
        raise ValueError(f"{path}: no tensor 'rows' (found {sorted(tensors)})")
    rows = tensors["rows"]
    want = (int(entry["rows"]), int(entry["dim"]))
    if tuple(rows.shape) != want:
        raise ValueError(f"{path}: rows of shape {tuple(rows.shape)}, animind_llm.json says {want}")
    return rows


def attach_saved(model, folder: str | os.PathLike, entry: dict) -> IdInputRows:
    """Attach a model folder's saved rows to the loaded ``model`` (inference: the rows in the model's dtype, no
    gradient). Raises as :func:`load_rows` and :class:`IdInputRows`."""
    w = model.get_input_embeddings().weight
    rows = load_rows(folder, entry).to(device=w.device, dtype=w.dtype)
    try:
        att = IdInputRows(model, int(entry["n_base"]), int(entry["layer"]), rows)
    except ValueError as exc:  # the entry does not fit the loaded model: name the folder's file
        raise ValueError(f"{Path(folder) / 'animind_llm.json'}: {exc}") from exc
    att.rows.requires_grad_(False)
    return att
