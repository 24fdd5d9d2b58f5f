"""The original project's five README examples, run end to end: `python examples.py`."""

import torch

from torch_block import KVCache, MixtureOfExperts, TransformerBlock

D_MODEL, N_HEADS, D_FF = 64, 8, 256


def standard_block() -> None:
    print("1. Standard transformer block")
    block = TransformerBlock(d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, dropout=0.1).eval()
    x = torch.randn(2, 10, D_MODEL)  # (batch, seq_len, d_model)
    output, cache, aux_loss = block(x)
    print(f"   input {tuple(x.shape)} -> output {tuple(output.shape)}")
    print(f"   cache={cache}, aux_loss={aux_loss}  (no cache given, dense block)")


def moe_block_with_aux_loss() -> None:
    print("2. Mixture-of-Experts block with the load-balancing loss")
    block = TransformerBlock(
        d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, use_moe=True, num_experts=4, top_k_experts=2
    )
    block.train()
    x = torch.randn(2, 10, D_MODEL)
    output, _, aux_loss = block(x, return_aux_loss=True)
    moe: MixtureOfExperts = block.feed_forward
    print(f"   output {tuple(output.shape)}; aux loss {aux_loss.item():.4f} (1.0 = balanced)")
    print(f"   assignments per expert: {moe.expert_counts.tolist()}")


def kv_cache_step_by_step() -> None:
    print("3. KV cache, step by step")
    block = TransformerBlock(d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF).eval()
    cache: KVCache = block.create_kv_cache(max_batch_size=1, max_seq_len=16)
    prompt = torch.randn(1, 5, D_MODEL)
    _, cache, _ = block(prompt, kv_cache=cache, use_cache=True)
    print(f"   prefill 5 tokens  -> cache position {cache.cache_position}")
    for step in range(3):
        token = torch.randn(1, 1, D_MODEL)
        output, cache, _ = block(token, kv_cache=cache, use_cache=True)
        print(f"   decode token {step + 1}    -> cache position {cache.cache_position}")
    print(f"   keys cached so far: {tuple(cache.get()[0].shape)}  (batch, heads, seq, head_dim)")


def moe_with_cache() -> None:
    print("4. MoE block with a KV cache")
    block = TransformerBlock(
        d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, use_moe=True, num_experts=4, top_k_experts=2
    ).eval()
    cache = block.create_kv_cache(max_batch_size=2, max_seq_len=16)
    x = torch.randn(2, 6, D_MODEL)
    full, _, _ = block(x)  # the whole sequence at once, causal
    _, cache, aux = block(x[:, :4], kv_cache=cache, use_cache=True, return_aux_loss=True)
    print(f"   prefill 4 tokens -> cache position {cache.cache_position}, aux {aux.item():.4f}")
    last = None
    for t in (4, 5):
        last, cache, _ = block(x[:, t : t + 1], kv_cache=cache, use_cache=True)
        print(f"   decode 1 token   -> cache position {cache.cache_position}")
    diff = (last - full[:, -1:]).abs().max().item()
    print(f"   last decoded output vs full forward: max abs difference {diff:.1e}")


def explicit_causal_mask() -> None:
    print("5. An explicit causal mask (torch.tril) with causal=False")
    causal_block = TransformerBlock(d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF).eval()
    masked_block = TransformerBlock(d_model=D_MODEL, n_heads=N_HEADS, d_ff=D_FF, causal=False)
    masked_block.load_state_dict(causal_block.state_dict())
    masked_block.eval()
    seq_len = 8
    x = torch.randn(2, seq_len, D_MODEL)
    mask = torch.tril(torch.ones(seq_len, seq_len))  # 1 = may attend; broadcasts to (B, H, T, T)
    out_mask, _, _ = masked_block(x, mask=mask)
    out_causal, _, _ = causal_block(x)
    diff = (out_mask - out_causal).abs().max().item()
    print(f"   tril mask vs default causal block: max abs difference {diff:.1e}")


if __name__ == "__main__":
    torch.manual_seed(0)
    with torch.no_grad():
        standard_block()
        moe_block_with_aux_loss()
        kv_cache_step_by_step()
        moe_with_cache()
        explicit_causal_mask()
