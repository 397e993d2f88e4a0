"""RetroForCausalLM.generate through transformers' GenerationMixin: greedy equals this project's
own sampler (retro.generate) token for token, alone and in a left-padded batch, retrieving at each
row's own chunk boundaries; without a retriever a RETRO-fit equals its base decoder's generate;
seeded sampling repeats; streamers, stopping criteria and num_return_sequences work."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from retro.generate import generate as own_sampler
from tests.fixtures.retro_hf import M, FakeNeighbours, left_pad, tiny_retro_hf

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [2, 9], [12, 13, 14, 15], [20]]
NEW = 3 * M + 2


def _own(model, prompt, retrieval: bool, pad_id: int):
    fn = FakeNeighbours(pad_id) if retrieval else None
    res = own_sampler(model.retro, prompt, max_new_tokens=NEW, neighbour_fn=fn, temperature=0.0)
    return res.new_tokens, fn


@pytest.mark.parametrize("family", ["native", "gpt2", "llama"])
def test_greedy_equals_own_sampler_alone_and_left_padded(family: str) -> None:
    pad = 3 if family == "native" else 40
    model = tiny_retro_hf(family, pad_id=pad)
    expected, calls = [], []
    for p in PROMPTS:
        toks, fn = _own(model, p, True, pad)
        expected.append(toks)
        calls.append(fn.calls)
        one = FakeNeighbours(pad)
        out = model.generate(torch.tensor([p]), retriever=one, max_new_tokens=NEW)
        assert out[0, len(p):].tolist() == toks
        assert one.calls == fn.calls  # the same chunks, once each
    # retrieval changes the output (else this test could not tell a wrong chunk boundary)
    assert any(_own(model, p, False, pad)[0] != e for p, e in zip(PROMPTS, expected))
    ids, mask = left_pad(PROMPTS, pad)
    batch_fn = FakeNeighbours(pad)
    out = model.generate(ids, attention_mask=mask, retriever=batch_fn, max_new_tokens=NEW)
    width = ids.shape[1]
    for i, toks in enumerate(expected):
        assert out[i, width:].tolist() == toks, f"row {i}"
    assert sorted(batch_fn.calls) == sorted(c for row in calls for c in row)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_without_retriever_a_retrofit_is_its_base_decoder(family: str) -> None:
    model = tiny_retro_hf(family, pad_id=40, eos_id=1)
    ids, mask = left_pad(PROMPTS, 40)
    base = model.retro.decoder.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                        pad_token_id=40, eos_token_id=1)
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(ours, base)
    assert len({tuple(r) for r in base[:, ids.shape[1]:].tolist()}) > 1


def test_native_without_retriever_equals_own_sampler() -> None:
    model = tiny_retro_hf("native")
    ids, mask = left_pad(PROMPTS, 3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    for i, p in enumerate(PROMPTS):
        assert out[i, ids.shape[1]:].tolist() == _own(model, p, False, 3)[0]


def test_seeded_sampling_repeats_and_num_return_sequences() -> None:
    model = tiny_retro_hf("native")
    kw = dict(retriever=FakeNeighbours(3), max_new_tokens=NEW, do_sample=True, top_k=8, top_p=0.9,
              temperature=1.5, repetition_penalty=1.3, num_return_sequences=3)
    a = model.generate(torch.tensor([PROMPTS[0]]), seed=7, **kw)
    b = model.generate(torch.tensor([PROMPTS[0]]), seed=7, **kw)
    c = model.generate(torch.tensor([PROMPTS[0]]), seed=8, **kw)
    assert a.shape == (3, len(PROMPTS[0]) + NEW)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) > 1  # the three samples differ


class _Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


class _StopAfter(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_streamer_gets_every_token_and_stopping_criteria_stop() -> None:
    model = tiny_retro_hf("native")
    prompt = PROMPTS[0]
    streamer = _Collect()
    out = model.generate(torch.tensor([prompt]), retriever=FakeNeighbours(3), max_new_tokens=NEW, streamer=streamer)
    assert streamer.ended and streamer.chunks[0] == prompt
    assert [t for c in streamer.chunks[1:] for t in c] == out[0, len(prompt):].tolist()
    stopped = model.generate(torch.tensor([prompt]), retriever=FakeNeighbours(3), max_new_tokens=NEW,
                             stopping_criteria=StoppingCriteriaList([_StopAfter(len(prompt) + 5)]))
    assert stopped.shape[1] == len(prompt) + 5 and torch.equal(stopped[0], out[0, :len(prompt) + 5])


def test_eos_ends_a_row_and_right_padding_is_refused() -> None:
    model = tiny_retro_hf("native")
    first = model.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=NEW)[0, len(PROMPTS[1]):].tolist()
    eos = first[3]
    out = model.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=NEW, eos_token_id=eos)
    assert out[0, len(PROMPTS[1]):].tolist() == first[:first.index(eos) + 1]
    ids, mask = left_pad(PROMPTS[:2], 3)
    with pytest.raises(ValueError, match="left"):
        model.generate(ids, attention_mask=mask.flip(1), max_new_tokens=2)


def test_a_retriever_set_on_the_model_is_used_and_neighbours_score_whole_sequences() -> None:
    model = tiny_retro_hf("native")
    ids = torch.tensor([PROMPTS[0]])
    passed = model.generate(ids, retriever=FakeNeighbours(3), max_new_tokens=NEW)
    model.retriever = FakeNeighbours(3)
    assert torch.equal(model.generate(ids, max_new_tokens=NEW), passed)
    assert len(model.retriever.calls) == (passed.shape[1] - 1) // M
    nbrs = torch.stack([torch.as_tensor(FakeNeighbours(3)(passed[0, u * M:(u + 1) * M].tolist()))
                        for u in range(passed.shape[1] // M)])[None]
    with torch.no_grad():  # scoring with neighbours, even with use_cache=True, is the full forward
        scored = model(passed, neighbours=nbrs, use_cache=True).logits
        assert torch.equal(scored, model.retro(passed, nbrs))
    assert scored[0, len(PROMPTS[0]) - 1:-1].argmax(-1).tolist() == passed[0, len(PROMPTS[0]):].tolist()


def test_text_generation_pipeline_passes_the_retriever_through() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(41)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w3", unk_token="w0", padding_side="left")
    model = tiny_retro_hf("native").float()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    texts = [" ".join(f"w{t}" for t in p) for p in PROMPTS[:2]]
    got = pipe(texts, max_new_tokens=NEW, do_sample=False, retriever=FakeNeighbours(3), batch_size=2,
               return_tensors=True)
    for p, out in zip(PROMPTS[:2], got):
        want = model.generate(torch.tensor([p]), retriever=FakeNeighbours(3), max_new_tokens=NEW)[0].tolist()
        ids = out[0]["generated_token_ids"]  # a batched row keeps its left padding
        assert ids[len(ids) - len(want):] == want and set(ids[:len(ids) - len(want)]) <= {3}
