"""qk_svd, ov_svd and composition_scores take text and speech encoders through the reader of attention weights,
and equal dense decompositions of the models' own projection matrices."""

import numpy as np
import pytest
import torch
import transformers

import qklib
from qklib.core import reader


def _bert():
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
    return model, [(l.attention.self.query, l.attention.self.key, l.attention.self.value, l.attention.output.dense)
                   for l in model.encoder.layer], 4


def _whisper():
    torch.manual_seed(2)
    config = transformers.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                                        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128,
                                        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    model = transformers.WhisperForConditionalGeneration(config).get_encoder().eval()
    return model, [(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.self_attn.out_proj)
                   for l in model.layers], 4


@pytest.mark.parametrize("build, family", [(_bert, "bert"), (_whisper, "whisper-encoder")])
def test_qk_and_ov_svds_of_text_and_speech_encoders_equal_dense_ones(build, family):
    model, linears, heads = build()
    assert reader.family_of(model) == family
    qk, ov = qklib.qk_svd(model), qklib.ov_svd(model)
    for layer, (q, k, v, o) in enumerate(linears):
        wq, wk, wv, wo = (m.weight.detach().double().numpy() for m in (q, k, v, o))
        r = wq.shape[0] // heads
        for head in range(heads):
            rows = slice(head * r, (head + 1) * r)
            dense_qk = np.linalg.svd(wq[rows].T @ wk[rows], compute_uv=False)[:r]
            dense_ov = np.linalg.svd(wo[:, rows] @ wv[rows], compute_uv=False)[:r]
            np.testing.assert_allclose(qk.S[layer, head].numpy(), dense_qk, rtol=1e-10)
            np.testing.assert_allclose(ov.S[layer, head].numpy(), dense_ov, rtol=1e-10)
    scores = qklib.composition_scores(model)
    assert scores["v"].shape == (len(linears), heads, len(linears), heads)


def test_folding_gamma_in_a_post_layernorm_bert_uses_the_norm_each_layer_reads():
    model, linears, heads = _bert()
    folded = qklib.qk_svd(model, fold_gamma=True)
    norms = [model.embeddings.LayerNorm] + [layer.output.LayerNorm for layer in model.encoder.layer[:-1]]
    for layer, ((q, k, _, _), norm) in enumerate(zip(linears, norms)):
        gamma = norm.weight.detach().double().numpy()
        wq, wk = q.weight.detach().double().numpy() * gamma, k.weight.detach().double().numpy() * gamma
        r = wq.shape[0] // heads
        dense = np.linalg.svd(wq[:r].T @ wk[:r], compute_uv=False)[:r]
        np.testing.assert_allclose(folded.S[layer, 0].numpy(), dense, rtol=1e-10)
