"""RETRO as a ``transformers`` model: ``RetroForCausalLM.from_pretrained(DIR)`` after
``python -m retro.export``.

Why a thin wrapper: the weights, forward and generation are this project's (``RETRO`` or a
RETRO-fitted ``RetroFit``), so an exported model scores exactly as the run's checkpoint does;
the wrapper adds what the Hugging Face ecosystem expects (a ``PretrainedConfig`` saved as
config.json, ``from_pretrained``, the Auto classes, a ``CausalLMOutput``). An export ships this
module and the model code it needs (retro.export.remote_code) with an ``auto_map``.

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)  # the export's own code
    model = AutoModelForCausalLM.from_pretrained(DIR)  # after this module's import (registers "retro")
    out = model.generate(ids, max_new_tokens=64, retriever=Retriever.open(DB))  # retrieval at chunk ends
    out = model.generate(ids, attention_mask=mask, do_sample=True, top_p=0.9)  # a left-padded batch, no retrieval

``generate`` is transformers' GenerationMixin (every decoding strategy, streamers, stopping
criteria) over a ``RetroGenerationCache`` (retro.hf_generation): the decoder's KV cache plus
each row's neighbours, fetched and encoded once per completed chunk at the row's own boundaries.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from retro.config import RetroConfig
from retro.hf_generation import NeighbourSource, RetroGenerationCache, generation_step
from retro.model import RETRO, Rotary

MODEL_TYPE = "retro"


class RetroHFConfig(PretrainedConfig):
    """``retro``: the RetroConfig mapping; ``decoder``: the base decoder's config mapping (with
    its ``model_type``) for a RETRO-fitted model, None for a native one."""

    model_type = MODEL_TYPE

    def __init__(self, retro: dict[str, Any] | None = None, decoder: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.retro = dict(retro or {})
        self.decoder = dict(decoder) if decoder else None
        super().__init__(**kwargs)

    def retro_config(self) -> RetroConfig:
        return RetroConfig.from_dict(self.retro)

    def get_text_config(self, *args: Any, **kwargs: Any) -> "RetroHFConfig":
        """This config itself: ``decoder`` is a plain mapping, not a sub-config transformers should
        read generation defaults or cache shapes from."""
        return self


class RetroForCausalLM(PreTrainedModel, GenerationMixin):
    """``model(input_ids, neighbours=None, labels=None) -> CausalLMOutput``; weights under ``retro.``.

    ``from_pretrained`` is transformers' own loader: ``dtype``/``torch_dtype``, ``device_map``
    (with accelerate), meta-device (low-memory) loading, one file or sharded safetensors."""

    config_class = RetroHFConfig
    base_model_prefix = "retro"
    main_input_name = "input_ids"
    # device_map="auto" places whole blocks on a device, never part of one (a RETRO-fit adds its
    # base decoder's layer names in __init__)
    _no_split_modules: list[str] = ["DecoderBlock", "EncoderLayer"]

    def __init__(self, config: RetroHFConfig) -> None:
        cfg = config.retro_config()
        # a native model's tied embedding, as transformers' loader ties it (a RETRO-fit's decoder ties its own)
        config.tie_word_embeddings = bool(cfg.tie_embeddings and not config.decoder)
        super().__init__(config)
        if config.tie_word_embeddings:
            self._tied_weights_keys = {"retro.to_logits.weight": "retro.token_emb.weight"}
        if config.decoder:
            from retro.hf_retrofit import from_decoder_config

            decoder_cfg = dict(config.decoder)
            self.retro: nn.Module = from_decoder_config(cfg, AutoConfig.for_model(**decoder_cfg))
            # post_init gathers no-split names from direct children only; the base model is a grandchild
            self._no_split_modules = [*type(self)._no_split_modules, *{
                name for m in self.retro.modules() if isinstance(m, PreTrainedModel)
                for name in (m._no_split_modules or [])}]
        else:
            self.retro = RETRO(cfg)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """What transformers' loader cannot read from the file: the rotary frequencies (a
        non-persistent buffer, left empty by its meta-device build). Weights initialise
        themselves in their constructors, and the loader overwrites every one."""
        if isinstance(module, Rotary):
            dim = module.inv_freq.numel() * 2
            base = self.retro.cfg.rope_base
            with torch.no_grad():
                module.inv_freq.copy_(1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                                      device=module.inv_freq.device) / dim)))

    @property
    def retro_config(self) -> RetroConfig:
        return self.retro.cfg

    def forward(self, input_ids: Tensor, neighbours: Tensor | None = None, labels: Tensor | None = None,
                attention_mask: Tensor | None = None, past_key_values: Any = None, use_cache: bool | None = None,
                retriever: Any = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """input_ids (b, n); neighbours (b, n // m, k, 2m) token ids (pad = missing) or None;
        labels (b, n) shifted inside, as in transformers (pad ignored).

        With ``use_cache`` or ``past_key_values`` (generation): input_ids are the tokens after
        the cache's, ``attention_mask`` (b, all tokens so far) marks left padding, and
        ``retriever`` (a ``NeighbourSource``, see generate) fetches each completed chunk's
        neighbours; the returned ``past_key_values`` is a ``RetroGenerationCache``."""
        if past_key_values is None and (not use_cache or neighbours is not None):  # scoring a whole sequence
            logits = self.retro(input_ids, neighbours)
            cache = None
        else:
            cache = past_key_values
            if not isinstance(cache, RetroGenerationCache):
                if cache is not None and cache.get_seq_length() > 0:
                    raise ValueError("past_key_values: pass the RetroGenerationCache this model returned")
                source = None
                if retriever is not None:
                    source = retriever if isinstance(retriever, NeighbourSource) else \
                        NeighbourSource(retriever, self.retro.cfg.num_neighbours, self.retro.cfg)
                cfg = self.retro.cfg
                cache = RetroGenerationCache(cfg.chunk_size, cfg.pad_id, cfg.num_neighbours, source)
            logits = generation_step(self.retro, input_ids, attention_mask, cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=self.retro.cfg.pad_id)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache)

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: Any = None,
                                      attention_mask: Tensor | None = None, retriever: Any = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """GenerationMixin's hook: the tokens the cache has not seen, the whole attention mask."""
        seen = past_key_values.retro_seen if isinstance(past_key_values, RetroGenerationCache) else 0
        return {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask,
                "past_key_values": past_key_values, "use_cache": True, "retriever": retriever}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # forward makes its own RetroGenerationCache (a DynamicCache + retrieval state)

    @torch.no_grad()
    def generate(self, inputs: Tensor | None = None, *args: Any, retriever: Any = None, k: int | None = None,
                 seed: int | None = None, stale_tokens: int = 0, **kwargs: Any) -> Any:
        """transformers' ``generate`` (greedy, sampling, top-k/p, temperature, repetition penalty,
        stopping criteria, streamers, ``num_return_sequences``, left-padded batches) with RETRO's
        retrieval at each row's chunk boundaries.

        ``retriever``: an ``index_builder.Retriever`` over a DB built with this model's tokenizer
        (``k`` neighbours per chunk, default the model's), or a function ``chunk ids -> (k, 2m)
        neighbour ids``; default ``model.retriever`` if set; None generates as the plain decoder
        (for a RETRO-fit: the untouched base model). ``seed`` seeds torch's RNG (sampling).
        ``max_new_tokens`` defaults to 64, as before.

        ``stale_tokens`` > 0 overlaps retrieval with decoding (PipeRAG): each chunk's neighbours
        are fetched in the background from the ``chunk_size`` tokens ending ``stale_tokens`` before
        its boundary (``hf_generation.stale_query``), so decoding rarely waits; 0 (default) is
        RETRO's exact query at the boundary. Beam search works: each beam keeps its own neighbours."""
        cfg = self.retro.cfg
        if retriever is None:
            retriever = getattr(self, "retriever", None)
        source = NeighbourSource(retriever, k or cfg.num_neighbours, cfg, stale_tokens) \
            if retriever is not None else None
        if seed is not None:
            torch.manual_seed(seed)
        if not {"max_new_tokens", "max_length", "generation_config"} & set(kwargs):
            kwargs["max_new_tokens"] = 64
        if kwargs.get("pad_token_id") is None and self.generation_config.pad_token_id is None:
            kwargs["pad_token_id"] = cfg.pad_id
        if source is None:
            return super().generate(inputs, *args, retriever=None, **kwargs)
        with source.running():  # the fetch thread lives only as long as this call
            return super().generate(inputs, *args, retriever=source, **kwargs)


AutoConfig.register(MODEL_TYPE, RetroHFConfig, exist_ok=True)
AutoModelForCausalLM.register(RetroHFConfig, RetroForCausalLM, exist_ok=True)
