"""Tiny Hugging Face models of the six families, built by transformers itself, for the HF tests,
and `tiny_folder`, a tiny Qwen2 with a real tokenizer (`python tests/hf_models.py DIR` writes
it: README's commands run on it).

Weights are redrawn at unit scale (embeddings N(0, 1), matrices N(0, 1/fan_in), norm weights
near 1, biases N(0, 0.2)) so that logits spread over several units and greedy choices and
expert routing are far from ties; transformers' own init (std 0.02) leaves them near ties.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers

VOCAB = 96
NO_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
_ROPE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    **NO_TOKENS,
)
WINDOW = 5  # mistral's window: shorter than the greedy test's prompts + new tokens

CONFIGS: dict[str, Any] = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, **NO_TOKENS
    ),
    "llama": lambda: transformers.LlamaConfig(**_ROPE),
    "mistral": lambda: transformers.MistralConfig(**_ROPE, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(**_ROPE),
    "mixtral": lambda: transformers.MixtralConfig(
        **_ROPE, num_local_experts=4, num_experts_per_tok=2
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_ROPE,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
    ),
    # every llama option on: llama3 rope scaling, attention and MLP biases, tied embeddings
    "llama_options": lambda: transformers.LlamaConfig(
        **{**_ROPE, "num_key_value_heads": 1},
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}
FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe")


def rescale(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter at unit scale (see the module docstring), in place."""
    generator = torch.Generator().manual_seed(seed)
    conv1d = transformers.pytorch_utils.Conv1D
    fan_in_first = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, conv1d)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(noise)
            elif p.dim() == 1 and ("norm" in name or ".ln_" in name):
                p.copy_(1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                fan_in = p.shape[0] if name in fan_in_first else p.shape[-1]
                p.copy_(noise / math.sqrt(fan_in))


def build(name: str, seed: int = 0, **fields: Any) -> transformers.PreTrainedModel:
    """The tiny model `name` of CONFIGS (with `fields` changed) in eval mode, float32, weights
    at unit scale."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    for key, value in fields.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config)
    rescale(model, seed)
    return model.eval()


def save(model: transformers.PreTrainedModel, directory: Path, **kwargs: Any) -> Path:
    """save_pretrained into `directory`; returns it."""
    model.save_pretrained(directory, **kwargs)
    return directory


def load(directory: Path, **kwargs: Any) -> transformers.PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained, asserting no missing, unexpected or mismatched
    keys; eval mode."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, output_loading_info=True, **kwargs
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    return model.eval()


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy continuation of one prompt alone."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


TEXT = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
EOS = "<|endoftext|>"


def tiny_folder(directory: Path, vocab: int = 384, max_positions: int = 128) -> Path:
    """A Hugging Face folder as a user downloads it: a tiny Qwen2 (transformers' own init,
    seeded) with a byte-level BPE tokenizer.json of `vocab` tokens trained on the bundled text,
    tokenizer_config.json and generation_config.json (eos `<|endoftext|>`). Returns it."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([str(TEXT)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    eos = tokenizer.token_to_id(EOS)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return Path(directory)


if __name__ == "__main__":
    transformers.utils.logging.disable_progress_bar()
    print(tiny_folder(Path(sys.argv[1])))
