"""MultimodalModel: composition, widths flowing between parts, splicing images into text."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import TINY_MODEL
from toolkit.errors import ChimeraError
from toolkit.model import build_model, count_params
from toolkit.module import token_losses

IMG = 99


@pytest.fixture
def model():
    return build_model(TINY_MODEL, vocab_size=100, image_token_id=IMG).eval()


def test_widths_and_tokens_flow(model):
    assert model.image_tokens == 4  # 16 px / patch 4 = 4x4 grid, 2D pooled by 2 -> 2x2
    assert model.decoder.vocab_size == 128  # padded to a multiple of 64
    x = torch.rand(3, 3, 16, 16)
    assert model.encode_images(x).shape == (3, 4, 32)


@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_splice_writes_each_image_at_its_placeholders(model, n_images):
    text = [5, 6]
    ids = list(text)
    for _ in range(n_images):
        ids += [IMG] * model.image_tokens + [7]
    input_ids = torch.tensor([ids])
    images = torch.rand(n_images, 3, 16, 16) if n_images else None
    embeds = model.embed(input_ids, images)
    plain = model.decoder.embed(input_ids)
    is_img = input_ids[0] == IMG
    assert torch.equal(embeds[0, ~is_img], plain[0, ~is_img])  # text positions untouched
    if n_images:
        feats = model.encode_images(images).reshape(-1, 32)
        assert torch.allclose(embeds[0, is_img], feats)  # images in order, token by token


def test_splice_across_samples_of_a_batch(model):
    P = model.image_tokens
    a = [1] + [IMG] * P + [2, 3]
    b = [IMG] * P + [4] + [IMG] * P
    input_ids = torch.tensor([a + [0] * (len(b) - len(a)), b])
    images = torch.rand(3, 3, 16, 16)
    embeds = model.embed(input_ids, images)
    feats = model.encode_images(images)
    assert torch.allclose(embeds[0, 1 : 1 + P], feats[0])
    assert torch.allclose(embeds[1, :P], feats[1])
    assert torch.allclose(embeds[1, P + 1 : 2 * P + 1], feats[2])


def test_placeholder_image_count_mismatch_is_a_clear_error(model):
    ids = torch.tensor([[1] + [IMG] * model.image_tokens])
    with pytest.raises(ChimeraError, match=r"4 image-token positions but 2 images x 4 tokens = 8"):
        model.embed(ids, torch.rand(2, 3, 16, 16))


def test_loss_only_on_target_tokens_and_gradients_reach_every_trainable_part(model):
    model.train()
    ids = torch.tensor([[1] + [IMG] * model.image_tokens + [5, 6, 7, 2]])  # T = 9
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]  # targets at positions 6, 7, 8: predicted by the logits at 5, 6, 7
    logits = model(ids, torch.rand(1, 3, 16, 16))
    loss_sum, n, exact = token_losses(logits, labels)
    assert int(n) == 3 and exact.shape == (1,)
    loss_sum.backward()
    for name, p in model.named_parameters():
        if p.requires_grad and "lm_head" not in name:
            assert p.grad is not None, name
    logits, loss_sum = logits.detach(), loss_sum.detach()
    # a target changes the loss: another token, or no target at all there
    other = labels.clone()
    other[0, -1] = 3
    assert not torch.allclose(token_losses(logits, other)[0], loss_sum)
    dropped = labels.clone()
    dropped[0, -1] = -100
    dropped_sum, dropped_n, _ = token_losses(logits, dropped)
    assert int(dropped_n) == 2 and dropped_sum < loss_sum
    # the first label is no target (no position predicts it), whatever it holds
    first = labels.clone()
    first[0, 0] = 7
    first_sum, first_n, _ = token_losses(logits, first)
    assert int(first_n) == 3 and torch.equal(first_sum, loss_sum)
    # logits at non-target positions (the text start and image positions, and the last one) do not count
    noisy = logits.clone()
    noisy[0, :5] += 10 * torch.randn_like(noisy[0, :5])
    noisy[0, 8] += 10 * torch.randn_like(noisy[0, 8])
    assert torch.equal(token_losses(noisy, labels)[0], loss_sum)
    noisy[0, 6] += 10 * torch.randn_like(noisy[0, 6])  # ... and at a target position they do
    assert not torch.allclose(token_losses(noisy, labels)[0], loss_sum)


def test_pool_after_connector_pools_the_connectors_output_not_its_input():
    # widths differ (encoder 32 -> decoder 48) and the connector is nonlinear (Linear, GELU, Linear), so the
    # two orders give different features; average pooling alone would commute with a linear connector
    cfg = {**TINY_MODEL, "decoder": {**TINY_MODEL["decoder"], "d_model": 48}}
    before = build_model(cfg, vocab_size=100, image_token_id=IMG).eval()
    after = build_model({**cfg, "pool_after_connector": True}, vocab_size=100, image_token_id=IMG).eval()
    after.load_state_dict(before.state_dict())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        feats = before.encoder(x)  # [2, 16, 32]
        pool_first = before.connector(before.pooler(feats))  # [2, 4, 48]
        connect_first = before.pooler(before.connector(feats))  # [2, 4, 48]
        assert pool_first.shape == connect_first.shape == (2, 4, 48)
        assert not torch.allclose(pool_first, connect_first, atol=1e-3)
        assert torch.allclose(before.encode_images(x), pool_first, atol=1e-6)
        assert torch.allclose(after.encode_images(x), connect_first, atol=1e-6)


def test_count_params_counts_tied_weights_once():
    cfg = dict(TINY_MODEL, decoder={**TINY_MODEL["decoder"], "tie_embeddings": True})
    tied = build_model(cfg, vocab_size=100, image_token_id=IMG)
    untied = build_model(TINY_MODEL, vocab_size=100, image_token_id=IMG)
    assert count_params(untied)[0] - count_params(tied)[0] == 128 * 32


def test_vocab_smaller_than_tokenizer_fails():
    cfg = dict(TINY_MODEL, decoder={**TINY_MODEL["decoder"], "vocab_size": 50})
    with pytest.raises(ChimeraError, match="vocab_size: 50 is smaller than the tokenizer's 100"):
        build_model(cfg, vocab_size=100, image_token_id=IMG)


def test_greedy_generate_with_cache_equals_recomputing_the_full_sequence(model):
    P = model.image_tokens
    prompt = torch.tensor([[1] + [IMG] * P + [5, 6], [2] + [IMG] * P + [7, 8]])
    images = torch.rand(2, 3, 16, 16)
    out = model.generate(prompt, images, max_new_tokens=5)
    assert out.shape == (2, prompt.shape[1] + 5) and torch.equal(out[:, : prompt.shape[1]], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):  # no cache: full forward over everything generated so far
            nxt = model(seq, images)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_a_token_reducing_connector_sets_the_image_tokens_and_receives_the_pooled_grid():
    """The C-Abstractor gets the grid of the tokens it receives and says its own token count."""
    cfg = {**TINY_MODEL, "connector": {"name": "c_abstractor", "num_queries": 4, "depth": 1}}
    unpooled = build_model({**cfg, "pooler": {"name": "identity"}}, vocab_size=100, image_token_id=IMG)
    assert unpooled.connector.grid == unpooled.encoder.grid == (4, 4) and unpooled.pooler.num_tokens == 16
    assert unpooled.image_tokens == unpooled.connector.num_tokens == 4
    ids = torch.tensor([[1] + [IMG] * 4 + [2]])
    assert unpooled(ids, torch.rand(1, 3, 16, 16)).shape[:2] == (1, 6)  # vocab padded to 128
    pooled = build_model(
        {**cfg, "connector": {**cfg["connector"], "num_queries": 1}}, vocab_size=100, image_token_id=IMG
    )
    assert pooled.connector.grid == pooled.pooler.out_grid == (2, 2) and pooled.image_tokens == 1
    with pytest.raises(ChimeraError, match="reduces the tokens itself"):
        build_model({**cfg, "pool_after_connector": True}, vocab_size=100, image_token_id=IMG)
