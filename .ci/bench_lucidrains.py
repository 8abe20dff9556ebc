"""Same-run cost against lucidrains' compressive-transformer-pytorch (not a dependency: a scratch venv).

python -m venv --system-site-packages /tmp/luc
/tmp/luc/bin/pip install --no-deps compressive-transformer-pytorch==0.4.0 mogrifier==0.0.5 einops==0.8.2
/tmp/luc/bin/python .ci/bench_lucidrains.py

bench.py's step and configuration (d_model 128, 2 layers, 4 heads, d_ff 512, segment = STM = 128, 64 compressed
slots of 4, batch 8, AdamW) for both, eager, interleaved: 5 rounds of 30 steps, the median of medians. Theirs
without its GRU gating and enhanced recurrence, so that both are plain pre-LayerNorm Transformer-XLs; with its
reconstruction loss, which our compressive baseline leaves out.
"""
import os
import sys

import torch
from compressive_transformer_pytorch import CompressiveTransformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402


class Lucidrains(bench.Contestant):
    """Their model through bench.py's step: it too takes (tokens, memory) and returns (logits, memory, a loss term)."""

    def __init__(self, batch=8):
        torch.manual_seed(0)
        self.model = CompressiveTransformer(num_tokens=256, dim=128, seq_len=128, depth=2, heads=4, mem_len=128,
                                            cmem_len=64, cmem_ratio=4, enhanced_recurrence=False,
                                            gru_gated_residual=False)
        self.run, self.opt, self.memory = self.model, torch.optim.AdamW(self.model.parameters(), lr=1e-3), None
        self.tokens = torch.randint(0, 256, (batch, 129), generator=torch.Generator().manual_seed(0))
        self.steps(5)  # fills its memories


def main():
    torch.set_num_threads(os.cpu_count())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    runs = {k: bench.Contestant(k, False) for k in ("xl", "compressive", "infinite")}
    runs["lucidrains compressive"] = Lucidrains()
    ms = bench.median_ms(runs, rounds=5, steps=30)
    print("| memory | eager ms per step | × xl |\n|---|---|---|")
    for k in runs:
        print(f"| {k} | {ms[k]:.1f} | {ms[k] / ms['xl']:.2f} |")


if __name__ == "__main__":
    main()
