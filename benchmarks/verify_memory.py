"""Peak memory of `surgery verify A --against B`: about one model, not two.

Builds a Llama-shaped float32 checkpoint of about --mb megabytes (with the tiny builtin's tokenizer),
grows it with grow_mlp (so A and B differ in size), then measures, each in a fresh process with
/usr/bin/time -v: loading and evaluating one model alone (the floor), and `surgery verify`
comparing the two.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mb(cmd: list[str]) -> float:
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=True)
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    import torch
    import transformers

    work = Path(tempfile.mkdtemp(prefix="surgery-verify-mem-"))
    hidden, inter = 1024, 2816
    per_layer = (4 * hidden * hidden + 3 * hidden * inter) * 4 / 1e6
    layers = max(1, round(args.mb / per_layer))
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=16, num_key_value_heads=16, vocab_size=512)
    model = transformers.LlamaForCausalLM(cfg)
    src = work / "a"
    model.save_pretrained(src)
    del model
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ROOT / "surgery" / "assets" / "tiny-llama" / f, src / f)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e6
    (work / "r.yaml").write_text(f"name: m\nsource: {src}\nops:\n  - op: grow_mlp\n    intermediate_size: x1.25\n")
    subprocess.run([sys.executable, "-m", "surgery", "run", str(work / "r.yaml"), "--output", str(work / "b"), "--no-verify"],
                   check=True, capture_output=True)
    size_b = sum(f.stat().st_size for f in (work / "b").glob("*.safetensors")) / 1e6
    one = peak_rss_mb([sys.executable, "-c",
                       "import sys, torch; from pathlib import Path; from surgery.verify import load_output, tokenize, evaluate_model;"
                       f"ids = tokenize(Path('{src}'), 'builtin:python-license', {args.tokens});"
                       f"evaluate_model(load_output(Path('{work / 'b'}'), torch.float32, torch.device('cpu')), ids)"])
    two = peak_rss_mb([sys.executable, "-m", "surgery", "verify", str(work / "b"), "--against", str(src),
                       "--max-tokens", str(args.tokens)])
    print(f"| checkpoints | {size:.0f} MB and {size_b:.0f} MB (float32, {layers} layers) |")
    print(f"| one model loaded and evaluated (the larger) | {one:.0f} MB peak RSS |")
    print(f"| `surgery verify` of the two | {two:.0f} MB peak RSS |")
    print(f"| both models held at once would need at least | {size + size_b:.0f} MB of weights |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
