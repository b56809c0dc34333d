"""Z-Image components against diffusers / transformers at tiny random configs (CPU, float32).

One tiny ``ZImagePipeline`` is built with diffusers' and transformers' classes and saved with ``save_pretrained``;
our strict loaders read that folder. Each parity check is paired with a check that a changed input moves the output
by far more than the tolerance.
"""

import pytest
import torch

from z_image_reference import SEED_PROMPT, rel_max, tiny_diffusers_pipeline, tiny_diffusers_vae

from lightx2v.errors import CheckpointError
from lightx2v.models.z_image.arch import ZImageDiTConfig, ZImageSchedulerConfig, ZImageVAEConfig
from lightx2v.models.z_image.checkpoint import load_dit, load_text_encoder, load_vae
from lightx2v.models.z_image.scheduler import ZImageScheduler

TOL = 1e-4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("z-image-modules")
    pipe = tiny_diffusers_pipeline(folder / "tok")
    pipe.save_pretrained(folder / "model")
    return folder / "model", pipe


@pytest.fixture(scope="module")
def dit(saved):
    return load_dit(saved[0])


def _ref_dit(ref, x, t, caps):
    """diffusers' forward on a batch: x [B, C, H, W], caps list of [L, D] -> [B, C, H, W]."""
    out = ref([xi[:, None] for xi in x], t, list(caps), return_dict=False)[0]
    return torch.stack([o[:, 0] for o in out])


# ---- DiT -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("latent_hw,cap_len,batch", [
    ((10, 18), 13, 1),  # 45 image tokens and 13 caption tokens: both runs padded to 64 / 32 with pad tokens
    ((16, 16), 32, 1),  # 64 and 32: no padding
    ((12, 8), 40, 2),  # a batch of two (same caption length)
])
def test_dit_matches_diffusers(saved, dit, latent_hw, cap_len, batch):
    ref = saved[1].transformer
    g = torch.Generator().manual_seed(cap_len)
    x = torch.randn(batch, 16, *latent_hw, generator=g)
    caps = torch.randn(batch, cap_len, 32, generator=g)
    t = torch.rand(batch, generator=g)
    with torch.inference_mode():
        want = _ref_dit(ref, x, t, caps)
        got = dit(x, t, caps)
        assert got.shape == want.shape == x.shape
        assert rel_max(got, want) <= TOL
        # can fail: the caption and the timestep both move the output far beyond the tolerance
        other_cap = dit(x, t, torch.randn(batch, cap_len, 32, generator=g))
        other_t = dit(x, (t + 0.3) % 1, caps)
    assert rel_max(other_cap, want) > 100 * TOL
    assert rel_max(other_t, want) > 100 * TOL


def test_dit_bf16_follows_diffusers_casts(saved):
    """In bfloat16 both models round at the same places: ours vs diffusers is far closer than either vs float32."""
    import copy

    ref32 = saved[1].transformer
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    ours16 = load_dit(saved[0], dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x, cap, t = torch.randn(1, 16, 10, 18, generator=g), torch.randn(1, 21, 32, generator=g), torch.tensor([0.4])
    with torch.inference_mode():
        truth = _ref_dit(ref32, x, t, cap)
        want = _ref_dit(ref16, x.bfloat16(), t, cap.bfloat16())
        got = ours16(x.bfloat16(), t, cap.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_max(got, want) < 0.25 * rel_max(want, truth)


# ---- VAE -----------------------------------------------------------------------------------------------------

def test_vae_decode_and_encode_match_diffusers(saved):
    ref = saved[1].vae
    vae = load_vae(saved[0])
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, 6, 10, generator=g)
    img = torch.rand(1, 3, 48, 80, generator=g) * 2 - 1
    with torch.inference_mode():
        want_dec = ref.decode(z).sample
        got_dec = vae.decode_raw(z)
        want_post = ref.encode(img).latent_dist
        got_mean, got_logvar = vae.encode_moments(img)
        # the pipeline's normalisation: the DiT's latents are (z - shift) * scale
        lat = (z - 0.1159) * 0.3611
        got_norm = vae.decode(lat)
        got_enc = vae.encode(img)
        sample = vae.encode(img, torch.Generator().manual_seed(3), sample=True)
        want_sample = want_post.sample(torch.Generator().manual_seed(3))
        other = vae.decode_raw(z + 0.5 * torch.randn(z.shape, generator=g))
    assert got_dec.shape == (1, 3, 48, 80)
    assert rel_max(got_dec, want_dec) <= TOL
    assert rel_max(got_mean, want_post.mean) <= TOL
    assert rel_max(got_logvar, want_post.logvar) <= TOL
    assert rel_max(got_norm, want_dec) <= TOL
    assert rel_max(got_enc, (want_post.mean - 0.1159) * 0.3611) <= TOL
    assert rel_max(sample, (want_sample - 0.1159) * 0.3611) <= TOL
    assert rel_max(other, want_dec) > 100 * TOL


def test_vae_with_quant_convs_matches_diffusers(tmp_path):
    """AutoencoderKL's default has 1x1 quant convs around the latent (Z-Image's release turns them off)."""
    ref = tiny_diffusers_vae(seed=9, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=False)
    ref.save_pretrained(tmp_path / "vae")
    (tmp_path / "transformer").mkdir()
    vae = load_vae(tmp_path)
    assert vae.quant_conv is not None and not vae.decoder.mid_block.attentions
    g = torch.Generator().manual_seed(2)
    z, img = torch.randn(1, 16, 4, 6, generator=g), torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    with torch.inference_mode():
        assert rel_max(vae.decode_raw(z), ref.decode(z).sample) <= TOL
        assert rel_max(vae.encode_moments(img)[0], ref.encode(img).latent_dist.mean) <= TOL


# ---- text encoder --------------------------------------------------------------------------------------------

def test_text_encoder_matches_pipeline_encode_prompt(saved):
    folder, pipe = saved
    te = load_text_encoder(folder)
    # the model we run stops before the last layer: one layer fewer than the checkpoint's, no final norm
    assert len(te.model.layers) == pipe.text_encoder.config.num_hidden_layers - 1
    with torch.inference_mode():
        for prompt in (SEED_PROMPT, "", "a cat"):
            want = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0][0]
            got = te.encode(prompt)
            assert got.shape == want.shape
            assert rel_max(got, want) <= TOL
        assert te.encode("a cat").shape != te.encode(SEED_PROMPT).shape  # one row per token of the prompt
        short = pipe.encode_prompt(SEED_PROMPT, device="cpu", do_classifier_free_guidance=False,
                                   max_sequence_length=20)[0][0]
        assert rel_max(te.encode(SEED_PROMPT, 20), short) <= TOL and short.shape[0] == 20
        a, b = te.encode("a red cat"), te.encode("a red dog")
    assert a.shape == b.shape and rel_max(a, b) > 100 * TOL


def test_seed_prompt_goes_through_template_and_tokenizer(saved):
    """The seed's prompt (emoji, quotes, Chinese, symbols) is templated and tokenized losslessly."""
    te = load_text_encoder(saved[0])
    text = te.template(SEED_PROMPT)
    assert text == f"<|im_start|>user\n{SEED_PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    ids, mask = te.tokenize(SEED_PROMPT)
    assert ids.shape == mask.shape == (1, 512)
    n = int(mask.sum())
    assert 0 < n < 512 and mask[0, :n].all() and not mask[0, n:].any()  # right padding
    assert te.tokenizer.decode(ids[0, :n]) == text
    with torch.inference_mode():
        feats = te.encode(SEED_PROMPT)
    assert feats.shape == (n, 32) and torch.isfinite(feats).all()


def test_text_encoder_reads_a_causal_lm_save(saved, tmp_path):
    """A ``Qwen3ForCausalLM`` save (``model.`` prefix, ``lm_head``) gives the same features; a tensor of the unused
    last layer still has to be there (the checkpoint is checked whole)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = saved[0]
    shutil.copytree(folder / "tokenizer", tmp_path / "tokenizer")
    (tmp_path / "transformer").mkdir()
    te_dir = tmp_path / "text_encoder"
    te_dir.mkdir()
    shutil.copy(folder / "text_encoder" / "config.json", te_dir / "config.json")
    sd = load_file(str(folder / "text_encoder" / "model.safetensors"))
    causal = {"model." + k: v for k, v in sd.items()}
    causal["lm_head.weight"] = sd["embed_tokens.weight"].clone()
    save_file(causal, str(te_dir / "model.safetensors"))
    with torch.inference_mode():
        want = load_text_encoder(folder).encode("a cat")
        assert torch.equal(load_text_encoder(tmp_path).encode("a cat"), want)
    del causal["model.layers.2.mlp.up_proj.weight"]
    causal["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(causal, str(te_dir / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(tmp_path)
    assert "model.layers.2.mlp.up_proj.weight" in str(e.value) and "model.layers.0.extra.weight" in str(e.value)


# ---- scheduler -----------------------------------------------------------------------------------------------

def _diffusers_schedule(n, seq_len, **kw):
    import diffusers
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kw)
    c = ref.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    ref.set_timesteps(sigmas=torch.linspace(1.0, 1 / n, n).tolist(), mu=mu)  # as ZImagePipeline calls it
    return ref


@pytest.mark.parametrize("kw", [
    dict(shift=3.0),  # Z-Image-Turbo
    dict(shift=6.0),
    dict(use_dynamic_shifting=True),
    dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.3, max_shift=2.0),
])
def test_scheduler_matches_diffusers_bit_for_bit(kw):
    cfg = ZImageSchedulerConfig.from_diffusers_config(kw)
    g = torch.Generator().manual_seed(0)
    for n, seq_len in ((9, 1508), (1, 256), (4, 6000)):
        ref = _diffusers_schedule(n, seq_len, **kw)
        ours = ZImageScheduler(cfg)
        ours.set_timesteps(n, image_seq_len=seq_len)
        assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
        x = x_ref = torch.randn(1, 16, 4, 4, generator=g)
        for t in ref.timesteps:
            v = torch.randn(x.shape, generator=g)
            x, x_ref = ours.step(v, x), ref.step(v, t, x_ref, return_dict=False)[0]
        assert torch.equal(x, x_ref)
    # can fail: another shift gives another schedule
    other = ZImageScheduler(cfg, shift=cfg.shift + 1.0)
    other.set_timesteps(9, image_seq_len=1508)
    assert not torch.allclose(other.sigmas, _diffusers_schedule(9, 1508, **kw).sigmas)


def test_sample_shift_replaces_the_checkpoint_shift():
    ours = ZImageScheduler(ZImageSchedulerConfig(shift=3.0, use_dynamic_shifting=True), shift=5.0)
    ours.set_timesteps(9)
    assert torch.equal(ours.sigmas, _diffusers_schedule(9, 0, shift=5.0).sigmas)


# ---- configs -------------------------------------------------------------------------------------------------

def test_configs_read_the_release_keys_and_reject_what_we_do_not_implement(saved):
    pipe = saved[1]
    assert ZImageDiTConfig.from_diffusers_config(dict(pipe.transformer.config)).dim == 64
    assert ZImageVAEConfig.from_diffusers_config(dict(pipe.vae.config)).scale_factor == 8
    assert ZImageSchedulerConfig.from_diffusers_config(dict(pipe.scheduler.config)).shift == 3.0
    bad = [
        (ZImageDiTConfig, {**pipe.transformer.config, "siglip_feat_dim": 1152}, "siglip_feat_dim"),
        (ZImageDiTConfig, {**pipe.transformer.config, "n_layer": 3}, "n_layer"),
        (ZImageDiTConfig, {**pipe.transformer.config, "axes_dims": [8, 8, 8]}, "axes_dims"),
        (ZImageVAEConfig, {**pipe.vae.config, "latents_mean": [0.0] * 16}, "latents_mean"),
        (ZImageVAEConfig, {**pipe.vae.config, "up_block_types": ["AttnUpDecoderBlock2D"] * 4}, "up_block_types"),
        (ZImageSchedulerConfig, {**pipe.scheduler.config, "use_karras_sigmas": True}, "use_karras_sigmas"),
        (ZImageSchedulerConfig, {**pipe.scheduler.config, "stochastic_sampling": True}, "stochastic_sampling"),
    ]
    for cls, d, word in bad:
        with pytest.raises(CheckpointError, match=word):
            cls.from_diffusers_config(dict(d))
