"""RETRO as a ``transformers`` model: ``RetroForCausalLM.from_pretrained(DIR)`` after
``python -m retro.export``.

Why a thin wrapper: the weights, forward and generation are this project's (``RETRO`` or a
RETRO-fitted ``RetroFit``), so an exported model scores exactly as the run's checkpoint does;
the wrapper adds what the Hugging Face ecosystem expects (a ``PretrainedConfig`` saved as
config.json, ``from_pretrained``, the Auto classes, a ``CausalLMOutput``).

    import retro.hf_model  # registers model_type "retro" with AutoConfig / AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(DIR)
    out = model.generate(ids, max_new_tokens=64, retriever=Retriever.open(DB))  # retrieval at chunk ends
    out = model.generate(ids, max_new_tokens=64)                                 # the decoder alone

``generate`` is the project's sampler (KV cache, neighbours fetched and encoded once per
completed chunk), not transformers' GenerationMixin, whose caches know nothing of CCA.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from retro.config import RetroConfig
from retro.metrics import lm_loss
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


class RetroForCausalLM(PreTrainedModel):
    """``model(input_ids, neighbours=None, labels=None) -> CausalLMOutput``; weights under ``retro.``."""

    config_class = RetroHFConfig
    base_model_prefix = "retro"
    main_input_name = "input_ids"
    _no_split_modules: list[str] = []

    def __init__(self, config: RetroHFConfig) -> None:
        super().__init__(config)
        cfg = config.retro_config()
        if config.decoder:
            from retro.hf_decoder import from_decoder_config

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
                **kwargs: Any) -> CausalLMOutput:
        """input_ids (b, n); neighbours (b, n // m, k, 2m) token ids (pad = missing) or None;
        labels (b, n) shifted inside, as in transformers (pad ignored)."""
        logits = self.retro(input_ids, neighbours)
        loss = None
        if labels is not None:
            loss = lm_loss(logits[:, :-1], labels[:, 1:], self.retro.cfg.pad_id)
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, *, max_new_tokens: int = 64, retriever: Any = None,
                 k: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 seed: int | None = None, **_: Any) -> Tensor:
        """Prompt ids (b, n) -> prompt + generated ids (b, n + new), right-padded with pad_id.

        With ``retriever`` (``index_builder.Retriever.open(DB)``, a DB built with this model's
        tokenizer) every completed chunk is retrieved for and encoded once; without it the
        model generates as its plain decoder (for a RETRO-fit: the untouched base model)."""
        from retro.dataset import check_compatible
        from retro.generate import RetrieverNeighbours, generate

        cfg = self.retro.cfg
        if retriever is not None:
            check_compatible(retriever.store, cfg)
        eos = eos_token_id if eos_token_id is not None else getattr(self.config, "eos_token_id", None)
        rows = []
        for row in input_ids.tolist():
            fetch = RetrieverNeighbours(retriever, k or cfg.num_neighbours) if retriever is not None else None
            res = generate(self.retro, row, max_new_tokens=max_new_tokens, neighbour_fn=fetch,
                           temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                           eos_id=eos, seed=seed)
            rows.append(res.tokens)
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), cfg.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
        return out.to(input_ids.device)


AutoConfig.register(MODEL_TYPE, RetroHFConfig, exist_ok=True)
AutoModelForCausalLM.register(RetroHFConfig, RetroForCausalLM, exist_ok=True)
