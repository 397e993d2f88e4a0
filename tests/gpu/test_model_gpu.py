"""The model on CUDA: same results as on CPU, bf16 autocast training, torch.compile, KV cache,
and the fused attention kernels (flash / memory-efficient) actually accepting our inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retro import RETRO, RetroConfig
from retro.generate import generate

pytestmark = pytest.mark.gpu

M, K, V, PAD = 8, 2, 101, 3


def cfg(**over) -> RetroConfig:
    base = dict(vocab_size=V, pad_id=PAD, dim=64, depth=4, heads=4, dim_head=16, cca_layers=[2, 4],
                enc_dim=64, enc_depth=2, enc_heads=4, enc_dim_head=16, chunk_size=M, num_neighbours=K)
    base.update(over)
    return RetroConfig(**base)


def inputs(b: int, n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (b, n), generator=g)
    nbrs = torch.randint(0, V, (b, n // M, K, 2 * M), generator=g)
    nbrs[0, 1] = PAD
    return tokens.to(device), nbrs.to(device)


def test_cuda_matches_cpu_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = RETRO(cfg()).eval()
    tokens, nbrs = inputs(2, 5 * M + 3, "cpu")
    with torch.no_grad():
        ref = model(tokens, nbrs)
        out = model.cuda()(tokens.cuda(), nbrs.cuda()).cpu()
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_training_step_is_finite_and_close():
    torch.manual_seed(0)
    model = RETRO(cfg()).cuda()
    tokens, nbrs = inputs(4, 8 * M, "cuda")
    with torch.no_grad():
        ref = model(tokens, nbrs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens, nbrs)
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_compiled_model_matches_eager_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = RETRO(cfg()).cuda().eval()
    tokens, nbrs = inputs(2, 6 * M, "cuda")
    explanation = torch._dynamo.explain(model)(tokens, nbrs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(tokens, nbrs), model(tokens, nbrs), atol=2e-3, rtol=2e-3)


def test_incremental_equals_full_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = RETRO(cfg()).cuda().eval()
    tokens, nbrs = inputs(2, 4 * M + 5, "cuda")
    with torch.no_grad():
        full = model(tokens, nbrs)
    cache = model.new_cache(2, tokens.shape[1])
    pieces = [model.forward_incremental(tokens[:, :M + 2], cache, nbrs[:, : (M + 2) // M])]
    for i in range(M + 2, tokens.shape[1]):
        pieces.append(model.forward_incremental(tokens[:, i:i + 1], cache, nbrs[:, : (i + 1) // M]))
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)


def test_generate_on_cuda_with_a_neighbour_function():
    torch.manual_seed(0)
    model = RETRO(cfg()).cuda()

    def fn(chunk):
        return (np.arange(K * 2 * M).reshape(K, 2 * M) + sum(chunk)) % V

    out = generate(model, [1, 2, 3], max_new_tokens=3 * M, neighbour_fn=fn, temperature=0.8, top_p=0.9, seed=0)
    assert len(out.new_tokens) == 3 * M and len(out.neighbours) == (len(out.tokens) - 1) // M


def test_fused_attention_kernels_accept_our_masks():
    """The memory-efficient kernel takes the CCA / encoder boolean masks (no math fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = RETRO(cfg()).cuda()
    tokens, nbrs = inputs(2, 4 * M, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION,
                                                                    SDPBackend.EFFICIENT_ATTENTION]):
        model(tokens, nbrs).float().sum().backward()
