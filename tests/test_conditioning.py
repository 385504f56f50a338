"""The one condition builder (pipeline and SeeSR training) and the one TGSR text builder."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_text_encoder, tiny_tokenizer
from tiny_dape import tiny_dape

from seesr.conditioning import build_condition, compose_prompt, encode_prompt


@pytest.fixture(scope="module")
def parts():
    return tiny_tokenizer(), tiny_text_encoder(), tiny_dape()


def control(batch: int = 2, size: int = 48) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_pipeline_and_training_build_the_condition_with_the_same_function():
    import pipelines.pipeline_seesr
    import seesr.training.controlnet

    assert pipelines.pipeline_seesr.build_condition is build_condition
    assert seesr.training.controlnet.build_condition is build_condition


def test_pipeline_form_composes_dape_tags_and_stacks_the_guidance_batch(parts):
    tokenizer, text_encoder, dape = parts
    image = control()
    cond, texts = build_condition(
        image,
        ["a dog", "a cat"],
        tokenizer,
        text_encoder,
        dape=dape,
        added_prompt="clean",
        negative_prompts=["x", "y"],
    )
    tags = dape.tags(dape.preprocess(image))
    assert texts == [compose_prompt(t, p, "clean") for t, p in zip(tags, ["a dog", "a cat"], strict=True)]
    expected = encode_prompt(tokenizer, text_encoder, ["x", "y", *texts])
    assert torch.equal(cond.prompt_embeds, expected)  # [negatives; prompts]
    assert torch.equal(cond.control_image, image)  # one copy for both halves
    assert torch.equal(cond.image_embeds, dape(dape.preprocess(image), output_logits=False).image_embeds)


def test_training_form_encodes_the_prompts_as_given_and_resizes_bicubically(parts):
    tokenizer, text_encoder, dape = parts
    image = control()
    cond, texts = build_condition(image, ["dog, grass", ""], tokenizer, text_encoder, dape=dape, dape_resize="bicubic")
    assert texts == ["dog, grass", ""]
    assert torch.equal(cond.prompt_embeds, encode_prompt(tokenizer, text_encoder, texts))
    bicubic = dape(dape.preprocess(image, mode="bicubic"), output_logits=False).image_embeds
    assert torch.equal(cond.image_embeds, bicubic)
    assert not torch.equal(bicubic, dape(dape.preprocess(image), output_logits=False).image_embeds)


def test_given_tokens_replace_dape_and_dtype_applies(parts):
    tokenizer, text_encoder, dape = parts
    tokens = torch.randn(1, 5, 16)
    cond, texts = build_condition(
        control(), ["a", "b"], tokenizer, text_encoder, added_prompt="", image_embeds=tokens, dtype=torch.float16
    )
    assert texts == ["a,", "b,"]  # no DAPE: no tags
    assert cond.image_embeds.shape == (2, 5, 16) and torch.equal(cond.image_embeds[1], tokens[0].half())
    assert {cond.prompt_embeds.dtype, cond.control_image.dtype, cond.image_embeds.dtype} == {torch.float16}
    repeated = cond.repeat_interleave(3)
    assert repeated.prompt_embeds.shape[0] == 6 and torch.equal(repeated.control_image[2], cond.control_image[0])


def test_tgsr_text_features_round_trip_through_items(tmp_path):
    from tgsr_tiny import tiny_bert_tokenizer
    from tgsr_tiny import tiny_text_encoder as tiny_bert

    import pipelines.pipeline_tgsr
    import seesr.training.tgsr
    from seesr.models.tgsr import TextFeatures, encode_text

    assert pipelines.pipeline_tgsr.encode_text is encode_text and seesr.training.tgsr.encode_text is encode_text
    features = encode_text(tiny_bert(), tiny_bert_tokenizer(tmp_path), ["a red bird on the branch", "a cat", ""])
    assert isinstance(features, TextFeatures) and features.token_mask.dtype == torch.bool
    items = [features.item(i) for i in range(3)]
    assert [item.token_embeds.shape[1] for item in items] == [int(m.sum()) for m in features.token_mask]
    stacked = TextFeatures.stack(items)
    assert torch.equal(stacked.token_mask, features.token_mask) and torch.equal(stacked.pooled, features.pooled)
    mask = features.token_mask[..., None]
    assert torch.equal(stacked.token_embeds * mask, features.token_embeds * mask)
    assert set(features.model_kwargs()) == {"encoder_hidden_states", "pooled_text_embeds", "encoder_attention_mask"}
