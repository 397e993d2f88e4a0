"""The RETRO-fitted model: a pretrained Hugging Face causal LM + RETRO's CCA and encoder
(paper section 4.4; InstructRetro, CEPE). Building it from a config, the database checks and
the run's files are retro.hf_decoder's; this module ships in an export (no project imports but
the model's, so ``trust_remote_code`` loads it without ``import retro``).

``RetroFit`` wraps any ``AutoModelForCausalLM`` whose decoder layers form one ``ModuleList``
(GPT-2, Llama, Mistral, Qwen2, GPT-NeoX...) and adds, after each chosen layer, RETRO's chunked
cross-attention, and a new neighbour encoder: the *same* ``ChunkedCrossAttention`` and
``Encoder`` classes as the native model (retro.model), so placement (the paper's rule, or
``cca_layers``) and causality (the m - 1 shift; generation's chunk-end retrieval) are one code
path. The encoder runs once, at the first CCA layer, on that layer's hidden states; neighbour
tokens are embedded with the decoder's own (frozen) input embeddings.

Why forward hooks: each family's layer has its own signature, masks and cache; a hook on the
layer's output (``x -> x + CCA(norm x, E)``) needs none of it, so a family works as soon as its
layers can be found. Every CCA output projection starts at zero, so before training the logits
are the base model's exactly; without neighbours the hooks do nothing: the untouched decoder.

The interface is the native model's: ``model(tokens, neighbours | None) -> logits``,
``new_cache`` / ``forward_incremental`` (the decoder's own KV cache), ``cfg``, ``token_emb``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from chunk_store.framework.errors import UserError
from retro.config import RetroConfig
from retro.model import RETRO, ChunkedCrossAttention, Encoder, RMSNorm, Rotary, init_weights

# where each family keeps its decoder layers
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's layer list (one entry per transformer block)."""
    for path in _LAYER_PATHS:
        obj: Any = decoder
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UserError(f"cannot find the decoder layers of {type(decoder).__name__} "
                    f"(looked for {', '.join(_LAYER_PATHS)})")


# --------------------------------------------------------------------------- the model


@dataclass
class RetroFitCache:
    """Generation state: the decoder's own KV cache, the first CCA layer's hidden states (the
    encoder's context once a chunk completes) and the encoded neighbours of completed chunks."""

    hidden: Tensor  # (b, max_len, dim)
    max_len: int
    past: Any = None  # the decoder's past_key_values
    length: int = 0
    encoded: list[Tensor] = field(default_factory=list)       # each (b, k*r, e)
    encoded_mask: list[Tensor] = field(default_factory=list)  # each (b, k*r)
    retrieval: bool | None = None


@dataclass
class _Call:
    """What the layer hooks need during one forward call."""

    neighbours: Tensor | None
    start: int = 0
    cache: RetroFitCache | None = None
    enc: Tensor | None = None
    enc_mask: Tensor | None = None


class RetroFit(nn.Module):
    """A pretrained causal LM (``decoder``) + CCA after ``cfg.resolved_cca_layers`` + an encoder."""

    def __init__(self, cfg: RetroConfig, decoder: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = decoder
        self.cca_layers = cfg.resolved_cca_layers
        self.first_cca = self.cca_layers[0] - 1
        layers = decoder_layers(decoder)
        if len(layers) != cfg.depth or self.cca_layers[-1] > len(layers):
            raise UserError(f"model.cca_layers {self.cca_layers} do not fit the decoder's {len(layers)} layers")
        self.rotary = Rotary(cfg.dim_head, cfg.rope_base)
        self.cca_norm = nn.ModuleDict({str(i): RMSNorm(cfg.dim, cfg.norm_eps) for i in self.cca_layers})
        self.cca = nn.ModuleDict({str(i): ChunkedCrossAttention(cfg, self.rotary) for i in self.cca_layers})
        self.enc_in = nn.Linear(cfg.dim, cfg.enc_dim, bias=False) if cfg.enc_dim != cfg.dim else nn.Identity()
        self.encoder = Encoder(cfg)
        n_emb = decoder.get_input_embeddings().num_embeddings
        eos = getattr(decoder.config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        # input ids the embedding lacks (a pad appended past the vocabulary) read this token instead
        self.n_emb, self.fill_id = n_emb, int(eos) if isinstance(eos, int) and 0 <= eos < n_emb else 0
        self._call: _Call | None = None
        for i in self.cca_layers:
            layers[i - 1].register_forward_hook(self._hook(i))
        self.reset_retrieval_parameters()

    # ------------------------------------------------------------------ setup

    def reset_retrieval_parameters(self) -> None:
        """Normal(0, init_std) for the encoder and CCA, except every CCA output projection: zero,
        so the retrofitted model starts as the base model exactly."""
        retrieval = ((name, m) for name, m in self.named_modules() if not name.startswith("decoder"))
        init_weights(retrieval, self.cfg.init_std, n_resid=2 * self.cfg.enc_depth)  # the encoder's branches
        for cca in self.cca.values():
            nn.init.zeros_(cca.attn.to_out.weight)

    @property
    def token_emb(self) -> nn.Embedding:
        return self.decoder.get_input_embeddings()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 units: each decoder layer and each encoder layer (CCA shards with the root)."""
        return [*decoder_layers(self.decoder), *self.encoder.layers]

    # ------------------------------------------------------------------ pieces

    def _safe_ids(self, ids: Tensor) -> Tensor:
        return torch.where(ids < self.n_emb, ids, torch.full_like(ids, self.fill_id))

    def _retrieval_dtype(self) -> torch.dtype:
        return self.enc_in.weight.dtype if isinstance(self.enc_in, nn.Linear) else self.encoder.norm.weight.dtype

    def _encode(self, neighbours: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """neighbours (b, l, k, r); hidden (b, l*m, dim) -> enc (b, l, k*r, e), mask (b, l, k*r)."""
        dtype = self._retrieval_dtype()
        mask = neighbours != self.cfg.pad_id
        nbr = self.enc_in(self.token_emb(self._safe_ids(neighbours)).to(dtype))
        hidden = rearrange(hidden.to(dtype), "b (l m) d -> b l m d", m=self.cfg.chunk_size)
        return self.encoder(nbr, mask, hidden), rearrange(mask, "b l k r -> b l (k r)")

    def _hook(self, layer: int):  # noqa: ANN202 (a forward hook)
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            call = self._call
            if call is None or call.neighbours is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            # generation under GenerationMixin (retro.hf_generation.RowsCall): each row's own positions
            new = call.apply(layer, hidden) if hasattr(call, "apply") else self._cca(layer, hidden, call)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def _cca(self, layer: int, x: Tensor, call: _Call) -> Tensor:
        """x + CCA(norm x) at 1-based ``layer``; encodes the neighbours at the first CCA layer."""
        m, dtype = self.cfg.chunk_size, self._retrieval_dtype()
        cca, norm = self.cca[str(layer)], self.cca_norm[str(layer)]
        assert call.neighbours is not None
        if call.cache is None:  # a whole sequence
            n = x.shape[1]
            num_chunks = n // m
            if num_chunks == 0:
                return x
            if layer - 1 == self.first_cca:
                call.enc, call.enc_mask = self._encode(call.neighbours[:, :num_chunks], x[:, :num_chunks * m])
            return x + cca(norm(x.to(dtype)), call.enc, call.enc_mask).to(x.dtype)
        cache, start = call.cache, call.start
        total = start + x.shape[1]
        if layer - 1 == self.first_cca:
            cache.hidden[:, start:total] = x.to(cache.hidden.dtype)
            done, complete = len(cache.encoded), total // m
            if complete > done:
                enc, mask = self._encode(call.neighbours[:, done:complete], cache.hidden[:, done * m:complete * m])
                cache.encoded.extend(enc.unbind(dim=1))
                cache.encoded_mask.extend(mask.unbind(dim=1))
            if cache.encoded:
                call.enc = torch.stack(cache.encoded, dim=1)
                call.enc_mask = torch.stack(cache.encoded_mask, dim=1)
        if call.enc is None:
            return x
        return x + cca.forward_positions(norm(x.to(dtype)), start, call.enc, call.enc_mask).to(x.dtype)

    # ------------------------------------------------------------------ training / scoring

    def forward(self, tokens: Tensor, neighbours: Tensor | None = None) -> Tensor:
        """tokens (b, n); neighbours (b, n // m, k, 2m) or None (the base model) -> logits."""
        RETRO._check_inputs(self, tokens, neighbours, tokens.shape[-1])  # type: ignore[arg-type]
        self._call = _Call(neighbours)
        try:
            return self.decoder(input_ids=self._safe_ids(tokens), use_cache=False).logits
        finally:
            self._call = None

    # ------------------------------------------------------------------ generation

    def new_cache(self, batch: int, max_len: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> RetroFitCache:
        param = self.token_emb.weight
        device = param.device if device is None else torch.device(device)
        hidden = torch.zeros(batch, max_len, self.cfg.dim, device=device, dtype=dtype or self._retrieval_dtype())
        return RetroFitCache(hidden=hidden, max_len=max_len)

    @torch.no_grad()
    def forward_incremental(self, tokens: Tensor, cache: RetroFitCache,
                            neighbours: Tensor | None = None) -> Tensor:
        """Logits for ``tokens`` (b, t) after the ``cache.length`` tokens already seen; equals the
        matching slice of ``forward`` (see RETRO.forward_incremental)."""
        b, t = tokens.shape
        start, total = cache.length, cache.length + t
        if total > cache.max_len:
            raise ValueError(f"cache holds {cache.max_len} tokens, asked for {total}")
        RETRO._check_inputs(self, tokens, neighbours, total)  # type: ignore[arg-type]
        retrieval = neighbours is not None
        if cache.retrieval is None:
            cache.retrieval = retrieval
        elif cache.retrieval != retrieval:
            raise ValueError("pass neighbours on every forward_incremental call of a cache, or never")
        positions = torch.arange(start, total, device=tokens.device)[None].expand(b, t)
        self._call = _Call(neighbours, start=start, cache=cache)
        try:
            out = self.decoder(input_ids=self._safe_ids(tokens), past_key_values=cache.past, use_cache=True,
                               position_ids=positions)
        finally:
            self._call = None
        cache.past = out.past_key_values
        cache.length = total
        return out.logits


# --------------------------------------------------------------------------- building


def from_decoder_config(cfg: RetroConfig, hf_config: Any) -> RetroFit:
    """RetroFit with a randomly initialised decoder of ``hf_config`` (weights loaded after)."""
    from transformers import AutoModelForCausalLM

    return RetroFit(cfg, AutoModelForCausalLM.from_config(hf_config))
