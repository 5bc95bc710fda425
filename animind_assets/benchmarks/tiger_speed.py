"""Training speed of TIGER's encoder-decoder in float32 and with bf16 autocast (``TigerConfig.bf16``), side by side.

    python -m animind_assets.benchmarks.tiger_speed                         # presets cpu and paper, 20 steps, 2 threads
    python -m animind_assets.benchmarks.tiger_speed --presets paper --steps 40 --threads 1

Each preset's model (``benchmarks.tiger_beauty.PRESETS``, built by ``lib.retrieval.tiger.build_model``) trains the
**same seeded synthetic batches** once per dtype, one after the other in this process, so the ratio is comparable;
absolute figures depend on the machine's load (``uptime`` printed before and after). A batch is shaped like
TIGER's Beauty rows: ``--batch-size`` users, an encoder input of ``--history`` items x 4 ID tokens, a decoder
target of 4 ID tokens + EOS, vocabulary 4 x 256 codes + specials. A step is ``lib.retrieval.tiger.train_step``
(forward, backward, grad clip 1.0, AdamW), the step ``train_tiger`` runs. ``--warmup`` steps per variant are run
first and not timed.

bf16 autocast is fast on CPUs with AMX-BF16 (the line ``cpu:`` shows the extensions) or on CUDA; on a CPU
with AVX512-BF16 only, the LM fine-tune measured 0.61x float32 (docs/benchmarks/2026-11-30-llm-speed.md,
addendum 3); this command measures the same for TIGER.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "uptime unavailable"


def time_steps(preset: dict, bf16: bool, *, steps: int, warmup: int, batch_size: int, history: int,
               device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """Seconds per TIGER training step of one preset and dtype on seeded synthetic batches.

    Returns ``{"steps_per_s", "examples_per_s", "seconds"}`` (float; ``seconds`` = wall time of the ``steps``
    timed steps, the ``warmup`` steps before them excluded). Raises ``ValueError`` when ``steps < 1``."""
    import torch

    from animind_assets.lib.retrieval.tiger import TigerConfig, build_model, train_step

    if steps < 1:
        raise ValueError(f"steps={steps}: time at least one step")

    class _Codec:  # build_model reads only the vocabulary size
        vocab_size = 4 * 256 + 4

    cfg = TigerConfig(**preset, bf16=bf16, device=device)
    model = build_model(_Codec(), cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    enc_len, dec_len = 4 * history, 5
    batches = [
        {
            "input_ids": torch.randint(4, _Codec.vocab_size, (batch_size, enc_len), generator=gen),
            "attention_mask": torch.ones(batch_size, enc_len, dtype=torch.long),
            "labels": torch.randint(4, _Codec.vocab_size, (batch_size, dec_len), generator=gen),
        }
        for _ in range(4)
    ]
    dev = torch.device(device)

    def step(i: int) -> None:
        train_step(model, {k: v.to(dev) for k, v in batches[i % len(batches)].items()}, opt, dev, bf16, cfg.grad_clip)

    for i in range(warmup):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"steps_per_s": steps / seconds, "examples_per_s": steps * batch_size / seconds, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="cpu,paper", help="comma-separated names of benchmarks.tiger_beauty.PRESETS")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per preset and dtype")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--history", type=int, default=20, help="items per encoder input (4 ID tokens each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)

    import torch

    from animind_assets.benchmarks.tiger_beauty import PRESETS
    from animind_assets.lib.common.device import cpu_info

    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        ap.error(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    torch.set_num_threads(args.threads)
    info = cpu_info()
    print(f"cpu: {info['model']}; extensions: {', '.join(info['extensions']) or '-'}; torch {torch.__version__}, "
          f"{args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, device {args.device}")
    print(f"load before: {_uptime()}")
    print(f"\n| preset | dtype | steps/s | examples/s | vs float32 |\n|---|---|---|---|---|")
    for name in names:
        base = None
        for bf16 in (False, True):
            r = time_steps(PRESETS[name], bf16, steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                           history=args.history, device=args.device)
            base = base or r["steps_per_s"]
            print(f"| {name} | {'bf16 autocast' if bf16 else 'float32'} | {r['steps_per_s']:.2f} | "
                  f"{r['examples_per_s']:.0f} | {r['steps_per_s'] / base:.2f}x |", flush=True)
    print(f"\nload after: {_uptime()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
