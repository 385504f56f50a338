"""The SeeSR control branch: RCA UNet and ControlNet."""

import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from tiny import (
    randomize,
    released_keys,
    tiny_controlnet,
    tiny_unet,
    tiny_unet_config,
    unet_inputs,
    write_released_folder,
)

from seesr import SeeSRControlNetModel, SeeSRUNet2DConditionModel
from seesr.models.rca import RCA_MODULE_NAME


def stock_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("use_image_cross_attention", "image_cross_attention_dim")}


def stock_copy(model, stock_class):
    stock = stock_class.from_config(stock_config(dict(model.config))).eval()
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(f".{RCA_MODULE_NAME}." in k for k in unexpected)
    return stock


@pytest.fixture(scope="module")
def unet():
    return randomize(tiny_unet(), seed=0)


@pytest.fixture(scope="module")
def controlnet(unet):
    return randomize(tiny_controlnet(unet), seed=1)


def test_rca_module_count_and_keys_match_release(unet, controlnet):
    assert {k: tuple(v.shape) for k, v in unet.state_dict().items()} == released_keys("unet")
    assert {k: tuple(v.shape) for k, v in controlnet.state_dict().items()} == released_keys("controlnet")
    assert len(unet.rca_modules) == 3 and len(controlnet.rca_modules) == 2


@torch.no_grad()
def test_unet_without_image_tokens_equals_stock(unet):
    inputs = unet_inputs()
    inputs.pop("image_encoder_hidden_states")
    stock = stock_copy(unet, UNet2DConditionModel)
    assert torch.equal(unet(**inputs).sample, stock(**inputs).sample)
    plain = tiny_unet(use_image_cross_attention=False)
    plain.load_state_dict(stock.state_dict())
    assert torch.equal(plain(**inputs).sample, stock(**inputs).sample)


@torch.no_grad()
def test_controlnet_without_image_tokens_equals_stock(controlnet):
    inputs = unet_inputs()
    inputs.pop("image_encoder_hidden_states")
    cond = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    stock = stock_copy(controlnet, ControlNetModel)
    ours = controlnet(**inputs, controlnet_cond=cond, conditioning_scale=0.7)
    ref = stock(**inputs, controlnet_cond=cond, conditioning_scale=0.7)
    for a, b in zip(ours.down_block_res_samples, ref.down_block_res_samples, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ours.mid_block_res_sample, ref.mid_block_res_sample)


@torch.no_grad()
def test_image_tokens_change_output_and_residuals_feed_unet(unet, controlnet):
    inputs = unet_inputs()
    cond = torch.rand(2, 3, 128, 128)
    with_rca = unet(**inputs).sample
    without = unet(**{k: v for k, v in inputs.items() if k != "image_encoder_hidden_states"}).sample
    assert (with_rca - without).abs().max() > 1e-4
    down, mid = controlnet(**inputs, controlnet_cond=cond, return_dict=False)
    assert len(down) == 6 and mid.shape == (2, 64, 8, 8)
    out = unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert out.shape == inputs["sample"].shape and not torch.allclose(out, with_rca)


@torch.no_grad()
def test_forward_order_matches_spec(unet):
    """Down: resnet -> TCA -> RCA per layer; mid: resnet0, then TCA, RCA, resnet per j (seesr-reference 3)."""
    generator = torch.Generator().manual_seed(0)
    text, image = torch.randn(2, 7, 32, generator=generator), torch.randn(2, 9, 512, generator=generator)
    temb = torch.randn(2, 128, generator=generator)
    kwargs = {"image_encoder_hidden_states": image}

    def tca_rca(block, j, h):
        h = block.attentions[j](h, text, return_dict=False)[0]
        return block.image_attentions[j](h, image, return_dict=False)[0]

    down = unet.down_blocks[0]
    h = torch.randn(2, 32, 8, 8, generator=generator)
    expected, states = h, []
    for j, resnet in enumerate(down.resnets):
        expected = tca_rca(down, j, resnet(expected, temb))
        states.append(expected)
    expected = down.downsamplers[0](expected)
    out, out_states = down(h, temb, encoder_hidden_states=text, cross_attention_kwargs=kwargs)
    assert torch.equal(out, expected) and torch.equal(out_states[1], states[1])

    mid = unet.mid_block
    h = torch.randn(2, 64, 4, 4, generator=generator)
    expected = mid.resnets[0](h, temb)
    for j, resnet in enumerate(mid.resnets[1:]):
        expected = resnet(tca_rca(mid, j, expected), temb)
    assert torch.equal(mid(h, temb, encoder_hidden_states=text, cross_attention_kwargs=kwargs), expected)

    up = unet.up_blocks[1]
    h = torch.randn(2, 64, 4, 4, generator=generator)
    skips = tuple(torch.randn(2, 32, 4, 4, generator=generator) for _ in range(3))
    expected, remaining = h, skips
    for j, resnet in enumerate(up.resnets):
        expected = torch.cat([expected, remaining[-1]], dim=1)
        remaining = remaining[:-1]
        expected = tca_rca(up, j, resnet(expected, temb))
    out = up(h, skips, temb, encoder_hidden_states=text, cross_attention_kwargs=kwargs)
    assert torch.equal(out, expected)


def test_caller_cross_attention_kwargs_not_mutated(unet):
    kwargs = {}
    inputs = unet_inputs()
    with torch.no_grad():
        unet(**inputs, cross_attention_kwargs=kwargs)
    assert kwargs == {}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_released_layout_loads_exactly(tmp_path, fmt):
    for model, cls in (("unet", SeeSRUNet2DConditionModel), ("controlnet", SeeSRControlNetModel)):
        state = write_released_folder(tmp_path / model, model, fmt=fmt)
        loaded = cls.from_pretrained(tmp_path / model)
        assert loaded.config.use_image_cross_attention and loaded.config.image_cross_attention_dim == 512
        loaded_state = loaded.state_dict()
        assert loaded_state.keys() == state.keys()
        assert all(torch.equal(loaded_state[k], v) for k, v in state.items())


def test_missing_rca_tensor_is_an_error_naming_it(tmp_path):
    missing = "up_blocks.1.image_attentions.2.transformer_blocks.0.attn2.to_k.weight"
    write_released_folder(tmp_path / "unet", "unet", drop=missing)
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        SeeSRUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    missing = "mid_block.image_attentions.0.proj_out.weight"
    write_released_folder(tmp_path / "controlnet", "controlnet", drop=missing)
    with pytest.raises(ValueError, match="missing keys: mid_block"):
        SeeSRControlNetModel.from_pretrained(tmp_path / "controlnet")


def test_unexpected_key_is_an_error(tmp_path):
    folder = tmp_path / "unet"
    state = write_released_folder(folder, "unet")
    state["down_blocks.0.image_attentions.7.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys: down_blocks.0.image_attentions.7"):
        SeeSRUNet2DConditionModel.from_pretrained(folder)


@torch.no_grad()
def test_save_load_round_trip(tmp_path, unet, controlnet):
    inputs = unet_inputs()
    cond = torch.rand(2, 3, 128, 128)
    unet.save_pretrained(tmp_path / "unet")
    controlnet.save_pretrained(tmp_path / "controlnet")
    unet2 = SeeSRUNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    controlnet2 = SeeSRControlNetModel.from_pretrained(tmp_path / "controlnet").eval()
    assert torch.equal(unet2(**inputs).sample, unet(**inputs).sample)
    a = controlnet2(**inputs, controlnet_cond=cond, return_dict=False)
    b = controlnet(**inputs, controlnet_cond=cond, return_dict=False)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "SeeSRUNet2DConditionModel"


def test_from_sd_unet_copies_sd_weights_and_zero_init_is_identity(tmp_path):
    stock = randomize(UNet2DConditionModel.from_config(stock_config(tiny_unet_config())), seed=4).eval()
    stock.save_pretrained(tmp_path / "sd" / "unet")
    model = SeeSRUNet2DConditionModel.from_sd_unet(tmp_path / "sd").eval()
    for key, value in stock.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    assert model.config.use_image_cross_attention
    inputs = unet_inputs()
    with torch.no_grad():
        reference = stock(**{k: v for k, v in inputs.items() if k != "image_encoder_hidden_states"}).sample
        assert not torch.allclose(model(**inputs).sample, reference)
        zeroed = SeeSRUNet2DConditionModel.from_sd_unet(stock, zero_init_rca=True).eval()
        assert torch.allclose(zeroed(**inputs).sample, reference, atol=1e-6)
    with pytest.raises(ValueError, match="use from_sd_unet"):
        SeeSRUNet2DConditionModel.from_pretrained(tmp_path / "sd" / "unet")
    controlnet = SeeSRControlNetModel.from_unet(model)
    for key, value in controlnet.state_dict().items():
        if key.startswith(("down_blocks", "mid_block", "conv_in", "time_embedding")):
            assert torch.equal(value, model.state_dict()[key]), key


def test_gradients_reach_every_rca_parameter_and_only_trainable_change():
    unet = randomize(tiny_unet(), seed=2)
    controlnet = randomize(tiny_controlnet(unet), seed=3)
    unet.train(), controlnet.train()
    unet.requires_grad_(False)
    for name, module in unet.named_modules():
        if name.endswith(RCA_MODULE_NAME):
            module.requires_grad_(True)
    before_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    before_cn = {k: v.clone() for k, v in controlnet.state_dict().items()}
    params = [p for p in list(controlnet.parameters()) + list(unet.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    inputs = unet_inputs()
    down, mid = controlnet(**inputs, controlnet_cond=torch.rand(2, 3, 128, 128), return_dict=False)
    pred = unet(**inputs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    torch.nn.functional.mse_loss(pred, torch.randn_like(pred)).backward()
    for name, param in list(unet.named_parameters()) + list(controlnet.named_parameters()):
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    optimizer.step()
    for key, value in unet.state_dict().items():
        changed = not torch.equal(value, before_unet[key])
        assert changed == (f".{RCA_MODULE_NAME}." in key), key
    assert all(not torch.equal(v, before_cn[k]) for k, v in controlnet.state_dict().items())


def test_gradient_checkpointing_gives_same_gradients():
    losses = []
    grads = []
    for checkpointing in (False, True):
        unet = randomize(tiny_unet(), seed=5).train()
        if checkpointing:
            unet.enable_gradient_checkpointing()
        pred = unet(**unet_inputs()).sample
        loss = pred.square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(unet.down_blocks[0].image_attentions[0].proj_out.weight.grad.clone())
    assert torch.allclose(losses[0], losses[1]) and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype, unet):
    model = tiny_unet().to(dtype)
    model.load_state_dict(unet.state_dict())
    inputs = unet_inputs()
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    inputs["image_encoder_hidden_states"] = inputs["image_encoder_hidden_states"].float()  # cast inside forward
    with torch.no_grad():
        out = model(**inputs).sample
        ref = unet(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_image_tokens_without_rca_is_an_error():
    model = tiny_unet(use_image_cross_attention=False)
    with pytest.raises(ValueError, match="no RCA"):
        model(**unet_inputs())
