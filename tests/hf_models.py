"""Tiny Hugging Face models of every family, built by transformers itself, for the HF tests,
and `tiny_folder`, a tiny Qwen2 with a real tokenizer (`python tests/hf_models.py DIR` writes
it: README's commands run on it).

Weights are redrawn at unit scale (embeddings N(0, 1), matrices N(0, 1/fan_in), norm weights
near 1, biases N(0, 0.2)) so that logits spread over several units and greedy choices and
expert routing are far from ties; transformers' own init (std 0.02) leaves them near ties.
Gemma multiplies its embeddings by sqrt(hidden_size) and its norms by (1 + weight): there the
embeddings are N(0, 1/hidden_size) and the norm weights near 0, the same scales in effect.
Gemma's models attend eagerly (`EAGER`): its softcapping has no other attention in transformers.
"""

from __future__ import annotations

import json
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
WINDOW = 5  # mistral's and Gemma's window: shorter than the greedy test's prompts + new tokens
ALTERNATING = ["sliding_attention", "full_attention"]  # Gemma's layer kinds, two layers
EAGER = ("gemma2", "gemma3_text")
ORIGINAL = 12  # the scaled ropes' original length: the greedy test's generations cross it

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
    "qwen3": lambda: transformers.Qwen3Config(**_ROPE, head_dim=16),  # H * D != hidden_size
    # layers 0 and 2 MoE, layer 1 dense (mlp_only_layers), a window on every layer
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **{**_ROPE, "num_hidden_layers": 3},
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        use_sliding_window=True,
        sliding_window=WINDOW,
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        **_ROPE, num_experts=4, num_experts_per_tok=2, attention_bias=True
    ),
    # layer 0 full attention, layer 1 within the window (max_window_layers)
    "qwen2_sliding": lambda: transformers.Qwen2Config(
        **_ROPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    # layer 0 dense (decoder_sparse_step 2) and sliding (Qwen2-MoE's rule), layer 1 MoE, full
    "qwen2_moe_sparse": lambda: transformers.Qwen2MoeConfig(
        **_ROPE,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        decoder_sparse_step=2,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=2,
    ),
    # softcaps small enough to act on unit-scale scores and logits; a query scale of its own
    "gemma2": lambda: transformers.Gemma2Config(
        **_ROPE,
        head_dim=8,
        query_pre_attn_scalar=6,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
        sliding_window=WINDOW,
        layer_types=ALTERNATING,
    ),
    # Gemma 3's ropes: the sliding layers' base 1e4, the full layers' 1e6 linear-scaled by 8
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **_ROPE,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=WINDOW,
        layer_types=ALTERNATING,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        },
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
    # Phi-3: fused qkv_proj and gate_up_proj; rope on half of each head
    "phi3": lambda: transformers.Phi3Config(**_ROPE, partial_rotary_factor=0.5),
    # Phi-3 longrope: generation past original_max_position_embeddings switches to long_factor
    "phi3_longrope": lambda: transformers.Phi3Config(
        **_ROPE,
        original_max_position_embeddings=ORIGINAL,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 1000.0,
            "short_factor": [1.0, 1.2, 1.5, 2.0],
            "long_factor": [1.0, 3.0, 6.0, 12.0],
        },
    ),
    # llama with each of the scalings that depend on nothing or on the sequence length
    "llama_linear": lambda: transformers.LlamaConfig(
        **_ROPE, rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0}
    ),
    "llama_dynamic": lambda: transformers.LlamaConfig(
        **{**_ROPE, "max_position_embeddings": ORIGINAL},
        rope_parameters={"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0},
    ),
    "llama_yarn": lambda: transformers.LlamaConfig(
        **_ROPE,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000.0,
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 8.0,
        },
    ),
    # sliding and full layers (GptOssConfig's alternation), yarn crossed by the greedy test,
    # a SwiGLU limit that unit-scale activations reach (7.0, the default, they never do)
    "gpt_oss": lambda: transformers.GptOssConfig(
        **_ROPE,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        swiglu_limit=0.8,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
    ),
}
FAMILIES = (
    "gpt2", "llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "olmoe",
    "phi3", "gemma2", "gemma3_text", "gpt_oss",
)  # fmt: skip
LAYER_VARIANTS = ("qwen2_sliding", "qwen2_moe_sparse")  # per-layer windows and dense layers
# the rope types and partial rotary, on llama and phi3
ROPE_MODELS = ("phi3_longrope", "llama_linear", "llama_dynamic", "llama_yarn")


def rescale(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter at unit scale (see the module docstring), in place."""
    generator = torch.Generator().manual_seed(seed)
    gemma = model.config.model_type in EAGER
    conv1d = transformers.pytorch_utils.Conv1D
    fan_in_first = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, conv1d)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(noise / math.sqrt(p.shape[-1]) if gemma else noise)
            elif p.dim() == 1 and ("norm" in name or ".ln_" in name):
                p.copy_(0.1 * noise if gemma else 1 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                fan_in = p.shape[0] if name in fan_in_first else p.shape[-1]
                if p.dim() == 3:  # GPT-OSS's stacked experts: (E, in, out)
                    fan_in = p.shape[1]
                p.copy_(noise / math.sqrt(fan_in))


def build(name: str, seed: int = 0, **fields: Any) -> transformers.PreTrainedModel:
    """The tiny model `name` of CONFIGS (with `fields` changed) in eval mode, float32, weights
    at unit scale."""
    torch.manual_seed(seed)
    config = CONFIGS[name]()
    for key, value in fields.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, **attention(name))
    rescale(model, seed)
    return model.eval()


def attention(name: str) -> dict[str, str]:
    """from_config's / from_pretrained's attention choice for the model `name`."""
    return {"attn_implementation": "eager"} if name in EAGER else {}


def save(model: transformers.PreTrainedModel, directory: Path, **kwargs: Any) -> Path:
    """save_pretrained into `directory`; returns it."""
    model.save_pretrained(directory, **kwargs)
    return directory


def load(directory: Path, **kwargs: Any) -> transformers.PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained (Gemma attending eagerly), asserting no missing,
    unexpected or mismatched keys; eval mode."""
    family = json.loads((Path(directory) / "config.json").read_text())["model_type"]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, output_loading_info=True, **attention(family), **kwargs
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    return model.eval()


def hf_greedy(model: transformers.PreTrainedModel, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy continuation of one prompt alone."""
    # imported here: `python tests/hf_models.py DIR` runs without the checkout on sys.path
    from benchmarks.models import transformers_greedy

    return transformers_greedy(model, torch.tensor([prompt]), new)[0].tolist()


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
