"""``FinetuneConfig`` (every knob of the semantic-ID LM fine-tune) and the embedded base model's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field


from animind_assets.lib.semantic_ids.tokens import sid_tokens_used as sid_tokens_used

LogFn = Callable[[str], None]
EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WARM_START_MODES = ("rqvae", "projection", "centroid", "mean", "none")
ROW_SAMPLING_MODES = ("passes", "replacement")  # FinetuneConfig.row_sampling (training_data.phase_rows)
DISTILL_TEMPERATURE_FITS = ("train", "validation")  # FinetuneConfig.distill_temperature_fit (finetune.run_finetune)


def add_row_sampling_flag(parser) -> None:
    """``--row-sampling`` (``FinetuneConfig.row_sampling``) on an ``argparse`` parser of an LM benchmark command."""
    parser.add_argument("--row-sampling", default="passes", choices=list(ROW_SAMPLING_MODES),
                        help="training rows: 'passes' (each task's rows in seeded random passes, none repeats before its "
                             "pool is used up) or 'replacement' (drawn with replacement: every run before 3 Dec 2026, the "
                             "measurements in docs/ included); FinetuneConfig.row_sampling")


def add_distill_temperature_flags(parser, default: float, teacher: str) -> None:
    """``--distill-temperature`` (default ``default``) and ``--distill-temperature-fit`` (``FinetuneConfig.
    distill_temperature`` / ``distill_temperature_fit``) on an ``argparse`` parser of an LM benchmark command;
    ``teacher`` names the teacher's scores in the help text."""
    parser.add_argument("--distill-temperature", type=float, default=default,
                        help=f"softmax temperature of {teacher} (0 = fitted by the teacher's NLL, on the rows "
                             "--distill-temperature-fit names)")
    parser.add_argument("--distill-temperature-fit", default="train", choices=list(DISTILL_TEMPERATURE_FITS),
                        help="with --distill-temperature 0: fit it on task-B training sequences (in-sample) or on the "
                             "held-out item of each validation user (FinetuneConfig.distill_temperature_fit)")


def task_weights_from_text(text: str, flag: str = "--phase2-weights") -> dict[str, float]:
    """``"0.1,0.8,0.1"`` -> ``{"A": 0.1, "B": 0.8, "C": 0.1}``: the task shares of a phase (``phase1_weights`` /
    ``phase2_weights``) as the benchmark commands take them. ValueError naming ``flag`` unless the text is exactly three
    comma-separated non-negative numbers with a positive sum (a shorter list used to drop the missing tasks silently)."""
    parts = [x.strip() for x in str(text).split(",")]
    try:
        values = [float(x) for x in parts]
    except ValueError:
        values = []
    if len(values) != 3 or len(parts) != 3 or min(values) < 0 or sum(values) <= 0:
        raise ValueError(f"{flag} {text!r}: three comma-separated shares of the tasks A,B,C (>= 0, not all 0), e.g. 0.1,0.8,0.1")
    return dict(zip("ABC", values))


def task_weight_flags_error(phase1: str, phase2: str) -> str | None:
    """The message of ``task_weights_from_text`` for the first bad one of ``--phase1-weights`` / ``--phase2-weights``
    (None when both are good): what a command's argument parser reports."""
    for flag, text in (("--phase1-weights", phase1), ("--phase2-weights", phase2)):
        try:
            task_weights_from_text(text, flag)
        except ValueError as exc:
            return str(exc)
    return None


def noop_log(_: str) -> None:
    return None


# ---------------------------------------------------------------------------------------- config
def blocks_after_pruning(keep_layers: int, base_blocks: int | None) -> int | None:
    """Decoder blocks a fine-tune runs on (``FinetuneConfig.keep_layers`` applied as ``base_model.prune_layers``
    does): ``keep_layers`` when it prunes (``0 < keep_layers < base_blocks``, or any ``keep_layers > 0`` when
    ``base_blocks`` is None = unknown), else ``base_blocks`` (None when unknown)."""
    if keep_layers > 0 and (base_blocks is None or keep_layers < base_blocks):
        return keep_layers
    return base_blocks


@dataclass
class FinetuneConfig:
    base_model: str = EMBEDDED_MODEL  # embedded GGUF | HF model id | local folder
    gguf_file: str = ""  # GGUF file inside a local folder / repo (the embedded model sets its own)
    revision: str = ""
    method: str = "auto"  # "auto" (full below lora_above_params, else LoRA) | "full" | "lora"
    lora_above_params: float = 1.0e9
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    train_layers: int = 0  # full method: 0 = every block; N = only the top N blocks + embeddings/head
    keep_layers: int = 0  # layer pruning (lib/llm/base_model.prune_layers; Gromov et al. 2024): 0 = every block of the base model; N = keep its first N-1 blocks and the last one (faster training and decoding; English suffers); train_layers counts the kept blocks
    phase1_max_steps: int = 16
    phase2_max_steps: int = 32
    phase1_weights: dict[str, float] = field(default_factory=lambda: {"A": 0.8, "B": 0.1, "C": 0.1})
    phase2_weights: dict[str, float] = field(default_factory=lambda: {"A": 0.2, "B": 0.6, "C": 0.2})
    phase1_lr: float = 1e-3
    phase2_lr: float = 1e-3
    warmup_frac: float = 0.05
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_length: int = 192
    general_mix_file: str = ""  # local JSONL of {"prompt","completion"} or {"messages"} rows
    general_mix_ratio: float = 0.0  # share of each phase's examples drawn from that file
    # English retention without downloads: the base model's own greedy answers to the shipped general
    # prompts (lib/llm/replay_prompts.py), generated before training, mixed into both phases at this share
    replay_ratio: float = 0.0
    replay_prompts: int = 0  # shipped prompts used (0 = all)
    replay_max_new_tokens: int = 96
    train_base_token_rows: bool = True  # False: the base vocabulary's rows of the embedding/head get no gradient (only the new ID-token rows learn; keeps English closer to the base model; with the top train_layers blocks trained the new rows are their own parameter, lib/llm/new_token_rows.py)
    base_token_rows_lr_mult: float = 1.0  # both phases: learning-rate multiplier of the base vocabulary's rows of the embedding/head (e.g. 0.1: they move slowly; 0 ~ frozen; ignored when train_base_token_rows is false)
    phase1_new_rows_lr_mult: float = 1.0  # phase 1: learning-rate multiplier of the new token rows (SID + special)
    phase2_new_rows_lr_mult: float = 1.0  # phase 2: the same for the recommendation phase (the ID rows are its output classes)
    phase1_templates: list[str] = field(default_factory=list)  # phase 1 task-A templates ([] = all in the dataset)
    phase1_items: int = 0  # phase 1 task-A rows only for a seeded subset of N items (0 = every item)
    linking_eval_items: int = 30  # ID <-> title accuracy after each phase on items seen in phase 1 (0 = off)
    warm_start: str = "rqvae"  # "rqvae" (falls back to centroid without codebooks) | "projection" (codebooks, geometry kept; collaborative IDs) | "centroid" | "mean" | "none"
    ridge_alpha: float = 1.0
    use_chat_template: bool = True
    fast_loss: bool = True  # LM head only at completion positions
    group_by_length: bool = True  # batches of similar length (less padding); False = plain random order
    row_sampling: str = "passes"  # "passes": each task's rows are drawn in seeded random passes (no row repeats before its task's pool is used up; the Trainer keeps that order, length-grouped within windows of 50 batches); "replacement": drawn with replacement and shuffled by the Trainer (before 3 Dec 2026: a run stopped by the time budget after k rows of a pool of N had seen only ~N(1-exp(-k/N)) distinct ones)
    num_threads: int = 2
    seed: int = 42
    save_steps: int = 0  # 0 = one checkpoint at the end of each phase
    resume: bool = True
    keep_checkpoints: bool = False  # False: delete the phase checkpoints once the run succeeded
    eval_examples: int = 16  # validation rows per task for the per-phase validation loss
    english_ppl: bool = True
    ppl_max_tokens: int = 256
    save_dtype: str = "float32"  # "float32" | "bfloat16"
    bf16: bool = False  # autocast bf16 during training (GPU / AMX-BF16 CPUs; slower than float32 without AMX, logged as a warning)
    bf16_frozen_weights: bool = True  # with bf16: frozen linear layers held in bfloat16 while training (the same products as autocast's per-step cast, without re-casting them every step)
    frozen_blocks_no_grad: bool = True  # top-train_layers fine-tune: the frozen blocks below the trained ones run under torch.no_grad while a phase trains (no gradient can reach them: the same updates, less autograd bookkeeping; lib/llm/block_speed.py); false = autograd's normal mode, as before 3 Dec 2026
    compile_blocks: bool = False  # torch.compile(dynamic=True) each decoder block while a phase trains (TorchInductor fuses the elementwise ops between the matrix products; the first steps pay ~0.5-1.5 min of compilation inside max_train_seconds; needs a C++ compiler on CPU; lib/llm/block_speed.py)
    id_input_rows: bool = False  # top-train_layers fine-tune: each new ID token also gets an input-side row (zero at the start, trained) added to the hidden state entering the first trained block, since the detached embedding lets the ID rows learn only as output classes (lib/llm/id_input_rows.py; saved as id_input_rows.safetensors in the model folder); needs frozen blocks below the trained ones (0 < train_layers < the block count, keep_layers when pruning) and the full method
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower (TRL's SFTConfig turns it on by default; with frozen lower blocks it also makes the backward pass run through them)
    distill_weight: float = 0.0  # knowledge distillation (lib/llm/distill.py): at each ID token of an item that follows another item in a completion (task B, "sequence" form) the target becomes (1 - w) one-hot + w x the teacher's next-item softmax turned into that level's code distribution; needs a teacher (run_finetune(teacher=...); beauty_finetuned_model uses sasrec_model, the anime finetuned_model EASE on the training users' lists); 0 = off
    distill_temperature: float = 1.0  # softmax temperature of the teacher's item logits (0 = fitted: the value minimising the teacher's NLL of the next item, on the rows distill_temperature_fit names; needed for teachers whose scores are not log-probabilities, e.g. EASE)
    distill_temperature_fit: str = "train"  # with distill_temperature 0, where the temperature is fitted: "train" = every next item of up to 300 task-B training sequences (in-sample: the teacher was trained on them, so an overfitted teacher looks sharp and the temperature comes out low); "validation" = the held-out task-B validation rows (one per validation user, only the held-out item: in no training position of the teacher or the student, though a teacher early-stopped on validation was selected with it; grid 0.001..10 in steps of ~1.1x): temperature scaling on held-out data, Guo et al. ICML 2017
    sid_softmax: bool = False  # at answer positions whose target is a semantic-ID token, the softmax runs over the ID tokens only (the vocabulary of the trie-constrained decoder, which then scores them the same way; other positions keep the full vocabulary). Measured on Beauty: ~5 % faster steps, no better ranking, English perplexity much worse (the ID rows are no longer pushed below the base tokens); unconstrained generation then rarely writes IDs; mean_token_accuracy and the validation loss are then ID-only, not comparable with runs without it
    max_train_seconds: float = 0.0  # wall-clock budget of the training steps of both phases together, from the first step (0 = none; the validation loss / linking accuracy after a phase do not count: the deadline moves on by their time); training stops at the first step past it, a later phase is skipped (stop_reason in the metadata)
    lr_decay_frac: float = 0.0  # warmup-stable-decay over wall-clock time (Hu et al. 2024, MiniCPM; Hägele et al. 2024): the learning rate falls linearly to 0 over the last fraction of max_train_seconds, on top of lr_scheduler (use 'constant_with_warmup'); needs max_train_seconds > 0; 0 = off

    def validate(self) -> FinetuneConfig:
        if self.method not in ("auto", "full", "lora"):
            raise ValueError(f"method must be auto|full|lora, got {self.method!r}")
        if self.warm_start not in WARM_START_MODES:
            raise ValueError(f"warm_start must be one of {'|'.join(WARM_START_MODES)}, got {self.warm_start!r}")
        for name in ("phase1_weights", "phase2_weights"):
            w = getattr(self, name)
            bad = set(w) - {"A", "B", "C"}
            if bad or any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
                raise ValueError(f"{name} must map tasks A/B/C to weights >= 0 (not all 0), got {w}")
        if not 0 <= self.general_mix_ratio < 1:
            raise ValueError("general_mix_ratio must be in [0, 1)")
        if not 0 <= self.replay_ratio < 1 or self.replay_ratio + self.general_mix_ratio >= 1:
            raise ValueError("replay_ratio must be in [0, 1) and replay_ratio + general_mix_ratio < 1")
        if self.phase1_new_rows_lr_mult <= 0 or self.phase2_new_rows_lr_mult <= 0:
            raise ValueError("phase1_new_rows_lr_mult and phase2_new_rows_lr_mult must be > 0")
        if self.id_input_rows and (self.train_layers <= 0 or self.method == "lora"):
            raise ValueError("id_input_rows needs the top-train_layers fine-tune (train_layers > 0, method full or auto): with "
                             "every block trained the input rows get their gradient already")
        if self.keep_layers < 0 or self.train_layers < 0:
            raise ValueError(f"keep_layers ({self.keep_layers}) and train_layers ({self.train_layers}) must be >= 0")
        kept = blocks_after_pruning(self.keep_layers, None)  # the base's block count is not known here
        if self.id_input_rows and kept is not None and self.train_layers >= kept:
            raise ValueError(f"id_input_rows needs frozen blocks below the trained ones: train_layers "
                             f"({self.train_layers}) must be below keep_layers ({self.keep_layers})")
        if self.base_token_rows_lr_mult < 0:
            raise ValueError("base_token_rows_lr_mult must be >= 0")
        if self.general_mix_ratio > 0 and not self.general_mix_file:
            raise ValueError("general_mix_ratio > 0 needs general_mix_file (a local JSONL file)")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ValueError("save_dtype must be float32 or bfloat16")
        if not 0.0 <= self.distill_weight <= 1.0 or self.distill_temperature < 0:
            raise ValueError(f"distill_weight must be in [0, 1] and distill_temperature >= 0 (0 = fitted), got {self.distill_weight}, "
                             f"{self.distill_temperature}")
        if self.distill_temperature_fit not in DISTILL_TEMPERATURE_FITS:
            raise ValueError(f"distill_temperature_fit must be train|validation, got {self.distill_temperature_fit!r}")
        if self.distill_weight > 0 and self.distill_temperature_fit == "validation" and self.distill_temperature != 0:
            raise ValueError(f"distill_temperature_fit 'validation' fits the temperature: set distill_temperature 0 (got "
                             f"{self.distill_temperature}), or distill_temperature_fit 'train' to keep {self.distill_temperature}")
        if self.distill_weight > 0 and not self.fast_loss:
            raise ValueError("distill_weight > 0 needs the completion-only loss (fast_loss = True)")
        if self.sid_softmax and not self.fast_loss:
            raise ValueError("sid_softmax needs the completion-only loss (fast_loss = True)")
        if self.max_train_seconds < 0:
            raise ValueError("max_train_seconds must be >= 0")
        if not 0.0 <= self.lr_decay_frac <= 1.0:
            raise ValueError(f"lr_decay_frac must be in [0, 1], got {self.lr_decay_frac}")
        if self.lr_decay_frac > 0 and self.max_train_seconds <= 0:
            raise ValueError("lr_decay_frac > 0 decays over the wall-clock budget: set max_train_seconds > 0")
        if self.lr_decay_frac > 0 and self.lr_scheduler in ("reduce_lr_on_plateau", "greedy"):
            raise ValueError(f"lr_decay_frac multiplies a LambdaLR schedule's rate; lr_scheduler {self.lr_scheduler!r} is not one")
        if self.row_sampling not in ROW_SAMPLING_MODES:
            raise ValueError(f"row_sampling must be one of {'|'.join(ROW_SAMPLING_MODES)}, got {self.row_sampling!r}")
        if self.phase1_max_steps < 0 or self.phase2_max_steps < 0:
            raise ValueError("max_steps must be >= 0")
        return self

    def fingerprint_dict(self) -> dict:
        d = asdict(self)
        if self.distill_temperature_fit == "train":  # the default, as before the field existed: same fingerprint
            d.pop("distill_temperature_fit")
        if not self.id_input_rows:  # the default, as before the field existed: same fingerprint
            d.pop("id_input_rows")
        for k in ("resume", "keep_checkpoints", "num_threads", "english_ppl", "ppl_max_tokens", "save_dtype", "eval_examples",
                  "linking_eval_items", "max_train_seconds"):
            d.pop(k, None)
        return d
