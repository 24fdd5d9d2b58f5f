"""Peak memory of reading a Hugging Face checkpoint: `parity.from_hf` should need about one
copy of the weights (issue 13), since it reads one tensor at a time into the model.

Builds once, with transformers, a float32 Llama-shaped checkpoint of about 420 MB (vocabulary
32000, width 768, 8 layers, untied head). Then, for each path, a fresh subprocess imports
everything, resets the kernel's peak-RSS counter (/proc/self/clear_refs), converts, and prints
the growth of peak RSS (VmHWM) over the RSS before converting, next to the checkpoint's size:

    python -m benchmarks.hf_memory [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
from pathlib import Path
import parity
from parity.cli import main

def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

path, out = sys.argv[1], sys.argv[2]
before = kib("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
kept = None
if out == "torch":
    kept = parity.from_hf(path)
elif out == "jax":
    kept = parity.from_hf(path, "jax")
else:
    assert main(["convert", path, out]) == 0
print(json.dumps({"before_kib": before, "peak_kib": kib("VmHWM")}))
"""


def build(directory: Path) -> int:
    """Save the benchmark checkpoint into `directory` (once); returns its weight bytes."""
    weights = directory / "model.safetensors"
    if not weights.exists():
        import torch
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=12,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        )
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return weights.stat().st_size


def measure(directory: Path, target: str) -> dict:
    """Peak RSS growth of one conversion in a fresh subprocess."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(directory), target],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(result.stdout.splitlines()[-1])


def run(directory: Path) -> None:
    size = build(directory)
    print(f"checkpoint: {size / 1e6:.0f} MB of float32 weights in {directory}")
    with tempfile.TemporaryDirectory() as out:
        targets = {
            "from_hf(dir) -> torch_block": "torch",
            "from_hf(dir, 'jax') -> jax_block": "jax",
            "python -m parity convert dir out.safetensors": str(Path(out) / "ours.safetensors"),
        }
        for name, target in targets.items():
            m = measure(directory, target)
            growth = (m["peak_kib"] - m["before_kib"]) * 1024
            print(
                f"{name:46} peak RSS growth {growth / 1e6:7.0f} MB = {growth / size:.2f} x "
                f"the checkpoint (RSS after imports {m['before_kib'] / 1024:.0f} MiB)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where to keep the checkpoint (default: temp)")
    args = parser.parse_args()
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        run(args.dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp))
