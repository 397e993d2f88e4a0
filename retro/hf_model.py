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

import os
from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from retro.config import RetroConfig
from retro.hf_generation import NeighbourSource, RetroGenerationCache, generation_step
from retro.model import RETRO
from retro.run_layout import WEIGHTS

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
    """``model(input_ids, neighbours=None, labels=None) -> CausalLMOutput``; weights under ``retro.``."""

    config_class = RetroHFConfig
    base_model_prefix = "retro"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []

    def __init__(self, config: RetroHFConfig) -> None:
        super().__init__(config)
        cfg = config.retro_config()
        if config.decoder:
            from retro.hf_retrofit import from_decoder_config

            decoder_cfg = dict(config.decoder)
            self.retro: nn.Module = from_decoder_config(cfg, AutoConfig.for_model(**decoder_cfg))
        else:
            self.retro = RETRO(cfg)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the modules initialise themselves, and from_pretrained overwrites every weight."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        config: RetroHFConfig | None = None, dtype: torch.dtype | str | None = None,
                        **kwargs: Any) -> "RetroForCausalLM":
        """Build on the CPU, then load every weight strictly.

        Why not transformers' loader: it builds modules on the meta device, which leaves
        non-persistent buffers (the rotary frequencies, here and in a Llama decoder) as garbage
        and unties tied weights; the exported file holds every tensor under its own name.
        """
        from safetensors.torch import load_file
        from transformers.utils import cached_file

        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        name = str(pretrained_model_name_or_path)
        if not isinstance(config, RetroHFConfig):
            config = RetroHFConfig.from_pretrained(name, **hub)
        model = cls(config)
        weights = load_file(cached_file(name, WEIGHTS, **hub))
        model.load_state_dict(weights, strict=True)
        if dtype not in (None, "auto"):
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model.eval()

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
        if past_key_values is None and not use_cache:
            logits = self.retro(input_ids, neighbours)
            cache = None
        else:
            cache = past_key_values
            if not isinstance(cache, RetroGenerationCache):
                if cache is not None and cache.get_seq_length() > 0:
                    raise ValueError("past_key_values: pass the RetroGenerationCache this model returned")
                fns = None
                if retriever is not None:
                    source = retriever if isinstance(retriever, NeighbourSource) else \
                        NeighbourSource(retriever, self.retro.cfg.num_neighbours, self.retro.cfg)
                    fns = [source.row() for _ in range(input_ids.shape[0])]
                cfg = self.retro.cfg
                cache = RetroGenerationCache(cfg.chunk_size, cfg.pad_id, cfg.num_neighbours, fns)
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
                 seed: int | None = None, **kwargs: Any) -> Any:
        """transformers' ``generate`` (greedy, sampling, top-k/p, temperature, repetition penalty,
        stopping criteria, streamers, ``num_return_sequences``, left-padded batches) with RETRO's
        retrieval at each row's chunk boundaries.

        ``retriever``: an ``index_builder.Retriever`` over a DB built with this model's tokenizer
        (``k`` neighbours per chunk, default the model's), or a function ``chunk ids -> (k, 2m)
        neighbour ids``; default ``model.retriever`` if set; None generates as the plain decoder
        (for a RETRO-fit: the untouched base model). ``seed`` seeds torch's RNG (sampling).
        ``max_new_tokens`` defaults to 64, as before."""
        cfg = self.retro.cfg
        if retriever is None:
            retriever = getattr(self, "retriever", None)
        source = NeighbourSource(retriever, k or cfg.num_neighbours, cfg) if retriever is not None else None
        if seed is not None:
            torch.manual_seed(seed)
        if not {"max_new_tokens", "max_length", "generation_config"} & set(kwargs):
            kwargs["max_new_tokens"] = 64
        if kwargs.get("pad_token_id") is None and self.generation_config.pad_token_id is None:
            kwargs["pad_token_id"] = cfg.pad_id
        return super().generate(inputs, *args, retriever=source, **kwargs)


AutoConfig.register(MODEL_TYPE, RetroHFConfig, exist_ok=True)
AutoModelForCausalLM.register(RetroHFConfig, RetroForCausalLM, exist_ok=True)
