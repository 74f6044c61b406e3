"""The transformers backend (tvm_attn.hf) on tiny random models, and SmolLM2 greedy generation when installed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is optional: pip install torch")
pytest.importorskip("transformers", reason="the transformers backend is optional: pip install tvm_attn[hf]")

import tvm_attn.hf  # noqa: E402
import tvm_attn.kernel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def _logits(model, implementation, ids, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, **kwargs).logits


def test_prefill_logits_match_sdpa_and_gqa_reads_kv_heads_as_they_are(llama, monkeypatch):
    tvm_attn.hf.register()
    seen = []
    launch = tvm_attn.kernel.Kernel.launch
    monkeypatch.setattr(tvm_attn.kernel.Kernel, "launch",
                        lambda self, q, k, v, out, **kw: seen.append((q.shape[1], k.shape[1])) or launch(self, q, k, v,
                                                                                                         out, **kw))
    ids = torch.randint(0, 96, (2, 21))
    torch.testing.assert_close(_logits(llama, "tvm_attn", ids), _logits(llama, "sdpa", ids), rtol=1e-4, atol=1e-4)
    assert seen and all(shape == (6, 2) for shape in seen)  # 6 query heads over 2 KV heads: no repeat_kv copy


def test_generate_with_the_tvm_attn_cache_matches_sdpa(llama):
    tvm_attn.hf.register()
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        llama.set_attn_implementation("sdpa")
        expected = llama.generate(ids, max_new_tokens=12, do_sample=False)
        llama.set_attn_implementation("tvm_attn")
        cache = tvm_attn.hf.Cache.for_model(llama, capacity=22)
        compiles = tvm_attn.kernel.compile_count()
        ours = llama.generate(ids, max_new_tokens=12, do_sample=False, cache=cache)
        assert tvm_attn.kernel.compile_count() - compiles <= 2  # one prefill and one decode kernel at most
        dynamic = llama.generate(ids, max_new_tokens=12, do_sample=False)  # transformers' own DynamicCache
    assert torch.equal(ours, expected) and torch.equal(dynamic, expected)
    assert cache.get_seq_length() == 21  # the last token is never fed back
    assert cache.layers[1].cache.k.shape == (1, 2, 21, 16)  # batch, KV heads, positions, head_dim


def test_chunked_prefill_through_the_cache_is_causal(llama):
    tvm_attn.hf.register()
    ids = torch.randint(0, 96, (1, 19))
    full = _logits(llama, "sdpa", ids)
    cache = tvm_attn.hf.Cache.for_model(llama, capacity=32)
    first = _logits(llama, "tvm_attn", ids[:, :11], cache=cache)
    second = _logits(llama, "tvm_attn", ids[:, 11:], cache=cache)  # 8 queries over 19 keys: masked
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-4, atol=1e-4)
    cache.crop(-5)
    assert cache.get_seq_length() == 14
    again = _logits(llama, "tvm_attn", ids[:, 14:], cache=cache)
    torch.testing.assert_close(again, full[:, 14:], rtol=1e-4, atol=1e-4)


def test_sliding_window_model_matches_sdpa():
    torch.manual_seed(1)
    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=5)).eval()
    tvm_attn.hf.register()
    ids = torch.randint(0, 96, (1, 17))
    torch.testing.assert_close(_logits(model, "tvm_attn", ids), _logits(model, "sdpa", ids), rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # decode steps: the window reaches back 5 positions through the cache
        model.set_attn_implementation("sdpa")
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)
        model.set_attn_implementation("tvm_attn")
        ours = model.generate(ids, max_new_tokens=8, do_sample=False,
                              cache=tvm_attn.hf.Cache.for_model(model, 25))
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_match_sdpa(llama, side):
    """Rows of a batch padded to one length: each row sees its own keys (its padding hidden), in the calls of rows
    that see the same keys; the logits of the real positions are torch SDPA's."""
    tvm_attn.hf.register()
    ids = torch.randint(0, 96, (4, 11))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 4), (2, 10), (3, 4)):  # rows 1 and 3 alike; row 2 has one real token
        mask[row, :pad] = 0 if side == "left" else 1
        if side == "right":
            mask[row, 11 - pad:] = 0
    ours = _logits(llama, "tvm_attn", ids, attention_mask=mask)
    expected = _logits(llama, "sdpa", ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-4, atol=1e-4)
    assert torch.isfinite(ours).all()  # padded rows too (they see no key: 0 attention output)


def test_padding_without_a_causal_mask_matches_sdpa():
    """A non-causal layer (is_causal=False) with padding: every row, padded or not, sees its row's unpadded keys,
    as torch SDPA computes the same mask."""
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 4, 7, 16), torch.randn(3, 2, 7, 16), torch.randn(3, 2, 7, 16)
    mask = torch.ones(3, 1, 7, 7, dtype=torch.bool)
    mask[1, ..., :3] = False  # left padding
    mask[2, ..., 5:] = False  # right padding
    module = torch.nn.Module()
    module.is_causal = False
    ours, _ = tvm_attn.hf.attention_forward(module, q, k, v, mask, is_causal=False)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ours, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["llama", "mistral (sliding window 5)"])
def test_padded_batch_generation_matches_sdpa_with_either_cache(llama, model_name):
    """Batched greedy generation of prompts of different lengths (left padding, as generate pads): the same tokens
    as torch SDPA's, through tvm_attn's cache and through transformers' DynamicCache."""
    tvm_attn.hf.register()
    if model_name == "llama":
        model = llama
    else:
        torch.manual_seed(1)
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=5)).eval()
    ids = torch.randint(1, 96, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :7], mask[2, :2] = 0, 0
    ids[mask == 0] = 0
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        model.set_attn_implementation("tvm_attn")
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                              cache=tvm_attn.hf.Cache.for_model(model, 22))
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, expected) and torch.equal(dynamic, expected)
    if model_name != "llama":
        right = torch.ones_like(ids)
        right[1, 9:] = 0
        with pytest.raises(ValueError, match="with a sliding window only left padding is supported"):
            _logits(model, "tvm_attn", ids, attention_mask=right)


def test_pruned_variants_under_names_of_their_own(llama):
    ids = torch.randint(0, 96, (1, 30))
    dense = _logits(llama, "sdpa", ids)
    tvm_attn.hf.register("tvm_attn_top_all", variant="topk", top_k=1000)  # keeps every key: dense
    torch.testing.assert_close(_logits(llama, "tvm_attn_top_all", ids), dense, rtol=1e-4, atol=1e-4)
    tvm_attn.hf.register("tvm_attn_top1", variant="topk", top_k=1)
    assert not torch.allclose(_logits(llama, "tvm_attn_top1", ids), dense, atol=1e-3)


def test_refusals(llama):
    with pytest.raises(ValueError, match="unknown variant 'flsh'"):
        tvm_attn.hf.register(variant="flsh")
    with pytest.raises(ValueError, match="name must be a str without 'flash'"):
        tvm_attn.hf.register("tvm_attn_flash")
    with pytest.raises(ValueError, match="variant 'mass' needs eps"):
        tvm_attn.hf.register(variant="mass")
    with pytest.raises(ValueError, match="eps must be in"):
        tvm_attn.hf.register(variant="mass", eps=2.0)
    tvm_attn.hf.register()
    ids = torch.randint(0, 96, (2, 9))
    holes = torch.ones_like(ids)
    holes[1, 4] = 0  # a hidden key between visible ones: not padding
    with pytest.raises(ValueError, match="attention_mask of batch row 1 hides keys that neither padding"):
        _logits(llama, "tvm_attn", ids, attention_mask=holes)
    llama.set_attn_implementation("tvm_attn")
    with pytest.raises(TypeError, match="requires grad.*no_grad"):
        llama(ids)  # grad mode on, weights need grad: the kernels have no backward
    attention_layers = [m for m in llama.modules() if hasattr(m, "attention_dropout")]
    for m in attention_layers:
        m.attention_dropout = 0.1
    llama.train()
    try:
        with pytest.raises(ValueError, match="dropout=0.1: tvm_attn kernels are inference-only"):
            llama(ids)
    finally:
        for m in attention_layers:
            m.attention_dropout = 0.0
        llama.eval()
    cache = tvm_attn.hf.Cache.for_model(llama, capacity=8)
    with pytest.raises(ValueError, match="cannot append 9 positions"), torch.no_grad():
        llama(ids[:1], cache=cache)


def test_smollm2_greedy_tokens_identical_to_sdpa():
    try:
        tvm_attn.hf.smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(f"the real model is not installed ({err})")
    pytest.importorskip("gguf", reason="loading the GGUF needs the gguf package: pip install tvm_attn[hf]")
    from tvm_attn import generate

    tvm_attn.hf.register()
    model, tokenizer = tvm_attn.hf.load_smollm2()
    prompts = ["The capital of France is", "Water boils at a temperature of"]  # one batch, the first padded
    ours = generate.run(model, tokenizer, prompts, 12, "tvm_attn")
    sdpa = generate.run(model, tokenizer, prompts, 12, "sdpa")
    assert ours.tokens == sdpa.tokens
    assert tokenizer.decode(ours.tokens[0]).startswith(" Paris")
    assert ours.compiles_during_decode <= 1  # the prompts' rows already took the decode kernel


def _round_trip_sdpa(module, query, key, value, attention_mask, **kwargs):
    """torch SDPA over K and V as an int8 tvm_attn cache stores them (quantized per row, dequantized)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tvm_attn import quantized_kv

    key, value = (torch.from_numpy(quantized_kv.dequantize(*quantized_kv.quantize(x.numpy()))) for x in (key, value))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def test_int8_cache_matches_sdpa_over_the_dequantized_keys(llama):
    """tvm_attn.hf.Cache(dtype="int8"): prefill logits, a padded batch and greedy generation equal torch SDPA over
    the same K and V quantized and dequantized (the int8 cache's semantics); the layers keep int8 codes."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    tvm_attn.hf.register()
    AttentionInterface.register("int8_round_trip", _round_trip_sdpa)
    AttentionMaskInterface.register("int8_round_trip", sdpa_mask)
    ids = torch.randint(1, 96, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    ids[mask == 0] = 0
    cache = tvm_attn.hf.Cache.for_model(llama, capacity=12, dtype="int8")
    ours = _logits(llama, "tvm_attn", ids, attention_mask=mask, cache=cache)
    expected = _logits(llama, "int8_round_trip", ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(ours[real], expected[real], rtol=1e-4, atol=1e-4)
    assert all(layer.cache.dtype == "int8" for layer in cache.layers)
    with torch.no_grad():
        llama.set_attn_implementation("int8_round_trip")
        want = llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        llama.set_attn_implementation("tvm_attn")
        got = llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             cache=tvm_attn.hf.Cache.for_model(llama, 20, dtype="int8"))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="dtype must be None"):
        tvm_attn.hf.Cache.for_model(llama, 20, dtype="int4")
    # another attention implementation over an int8 cache reads NaN stand-ins: NaN logits, not wrong finite ones
    assert torch.isnan(_logits(llama, "sdpa", ids[:1], cache=tvm_attn.hf.Cache.for_model(llama, 12, "int8"))).all()


def _assert_matches_eager(model, ids):
    """The backend's logits for ``ids`` are eager attention's (returned), and greedy generation through the
    tvm_attn cache gives eager's tokens."""
    tvm_attn.hf.register()
    eager = _logits(model, "eager", ids)
    torch.testing.assert_close(_logits(model, "tvm_attn", ids), eager, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)
        model.set_attn_implementation("tvm_attn")
        cache = tvm_attn.hf.Cache.for_model(model, ids.shape[1] + 8)
        ours = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache)
    assert torch.equal(ours, expected)
    assert cache.get_seq_length() == ids.shape[1] + 7  # the cache was used (the last token is never fed back)
    return eager


def test_gemma2_softcapping_matches_eager():
    """A tiny Gemma 2 (logit softcapping, sliding-window and full layers alternating) through the backend: its
    logits are eager attention's, greedy generation through the cache gives eager's tokens, and the cap matters
    here (the same weights without it give other logits)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(2)
    config = Gemma2Config(**TINY, head_dim=16, sliding_window=6, attn_logit_softcapping=0.1,
                          query_pre_attn_scalar=16, final_logit_softcapping=None)
    model = Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, 96, (1, 19))
    eager = _assert_matches_eager(model, ids)
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert (_logits(model, "tvm_attn", ids) - eager).abs().max() > 1e-3  # 10x the tolerance above


def test_gpt_oss_sinks_match_eager():
    """A tiny gpt-oss (learned attention sinks, sliding-window and full layers alternating, GQA) through the
    backend: its logits are eager attention's, greedy generation through the cache gives eager's tokens, and the
    sinks matter here (the same weights with sinks of -1e4, which hold no weight, give other logits)."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(3)
    config = GptOssConfig(**{**TINY, "num_attention_heads": 4}, head_dim=16, sliding_window=6, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(1.0, 2.0)
    ids = torch.randint(0, 96, (1, 19))
    eager = _assert_matches_eager(model, ids)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
    assert (_logits(model, "tvm_attn", ids) - eager).abs().max() > 1e-3  # 10x the tolerance above
