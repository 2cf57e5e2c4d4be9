"""SAE files: SAELens folders both ways against the installed ``sae_lens`` package, OpenAI
sparse_autoencoder state dicts against a reference written from OpenAI's published formula, the hub
path offline, and clear errors for corrupt or mismatched files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import sae_lens
import torch

from tdb_lens.sae import SAE, SAEConfig, load_sae, save_sae
from tdb_lens.sae.errors import SAEFormatError, SAEHubError

warnings.filterwarnings("ignore", module="sae_lens")


def randomize_(module, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            p = getattr(module, n)
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if n != "threshold" else 0.1) + (0.2 if n == "threshold" else 0))


SAELENS_CASES = {
    "standard": lambda: sae_lens.StandardSAEConfig(d_in=16, d_sae=48),
    "topk": lambda: sae_lens.TopKSAEConfig(d_in=16, d_sae=48, k=6),
    "topk-rescaled": lambda: sae_lens.TopKSAEConfig(d_in=16, d_sae=48, k=6, rescale_acts_by_decoder_norm=True),
    "jumprelu": lambda: sae_lens.JumpReLUSAEConfig(d_in=16, d_sae=48),
    "standard-layernorm": lambda: sae_lens.StandardSAEConfig(d_in=16, d_sae=48, normalize_activations="layer_norm"),
    "topk-no-bdec-in": lambda: sae_lens.TopKSAEConfig(d_in=16, d_sae=48, k=6, apply_b_dec_to_input=False),
}


def saelens_sae(name):
    cfg = SAELENS_CASES[name]()
    s = sae_lens.SAE.from_dict(cfg.to_dict())
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if name == "jumprelu" else [])
    randomize_(s, names, seed=len(name))
    return s


@pytest.mark.parametrize("name", list(SAELENS_CASES))
def test_saelens_folder_loads_with_the_same_latents(tmp_path, name):
    ref = saelens_sae(name)
    ref.save_model(tmp_path)
    ours = load_sae(tmp_path)
    x = torch.randn(32, 16) * 2
    with torch.no_grad():
        ref_acts = ref.encode(x)
        ref_out = ref.decode(ref_acts)
        acts, recons = ours.encode_decode(x)
    assert (acts - ref_acts).abs().max() < 1e-5
    assert (recons - ref_out).abs().max() < 1e-5
    assert (acts != 0).any()


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_our_folder_loads_in_saelens_with_the_same_latents(tmp_path, arch):
    torch.manual_seed(0)
    ours = SAE(SAEConfig(d_in=16, d_sae=48, architecture=arch, k=6 if arch == "topk" else None,
                         hook_name="blocks.3.hook_resid_post", model_name="smollm2-135m"))
    randomize_(ours, ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if arch == "jumprelu" else []))
    save_sae(ours, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(32, 16)
    with torch.no_grad():
        assert (theirs.encode(x) - ours.encode(x)).abs().max() < 1e-5
        assert (theirs.decode(theirs.encode(x)) - ours.reconstruct(x)).abs().max() < 1e-5
    again = load_sae(tmp_path / "sae")
    assert again.cfg == ours.cfg


def test_pre_v6_saelens_config(tmp_path):
    ref = saelens_sae("topk")
    ref.save_model(tmp_path)
    old = {"d_in": 16, "d_sae": 48, "hook_point": "blocks.2.hook_resid_pre", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 6}, "normalize_activations": False, "dtype": "torch.float32",
           "model_name": "gpt2-small", "apply_b_dec_to_input": True}
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    ours = load_sae(tmp_path)
    assert ours.cfg.architecture == "topk" and ours.cfg.k == 6 and ours.cfg.hook_name == "blocks.2.hook_resid_pre"
    x = torch.randn(8, 16)
    with torch.no_grad():
        assert (ours.encode(x) - ref.encode(x)).abs().max() < 1e-5


# ------------------------------------------------------------------------------------- OpenAI


def openai_reference(sd, x):
    """OpenAI's Autoencoder, from its docstring: latents = act(encoder(x - pre_bias) + latent_bias),
    recons = decoder(latents) + pre_bias; TopK models layer-normalise x first and undo it after."""
    topk = sd.get("activation") == "TopK"
    if topk:
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(-1, keepdim=True)
        x = xc / (std + 1e-5)
    pre = torch.nn.functional.linear(x - sd["pre_bias"], sd["encoder.weight"], sd["latent_bias"])
    if topk:
        k = sd["activation_state_dict"]["k"]
        v, i = pre.topk(k, dim=-1)
        lat = torch.zeros_like(pre).scatter(-1, i, v.relu())
    else:
        lat = pre.relu()
    rec = torch.nn.functional.linear(lat, sd["decoder.weight"]) + sd["pre_bias"]
    if topk:
        rec = rec * std + mu
    return lat, rec


def openai_state_dict(activation="TopK", k=5, d=16, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {
        "pre_bias": torch.randn(d, generator=g) * 0.1,
        "encoder.weight": torch.randn(n, d, generator=g) * 0.3,
        "latent_bias": torch.randn(n, generator=g) * 0.1,
        "decoder.weight": torch.randn(d, n, generator=g) * 0.3,
        "stats_last_nonzero": torch.randint(0, 100, (n,), generator=g),
        "latents_activation_frequency": torch.ones(n),
        "latents_mean_square": torch.zeros(n),
        "activation": activation,
    }
    if activation == "TopK":
        sd["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    return sd


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_openai_state_dict_matches_reference(tmp_path, activation):
    sd = openai_state_dict(activation)
    torch.save(sd, tmp_path / "ae.pt")
    sae = load_sae(tmp_path / "ae.pt", hook_name="blocks.6.hook_resid_post")
    assert sae.cfg.architecture == ("topk" if activation == "TopK" else "standard")
    assert sae.cfg.hook_name == "blocks.6.hook_resid_post"
    x = torch.randn(20, 16) * 3 + 1
    lat, rec = openai_reference(sd, x)
    acts, recons = sae.encode_decode(x)
    assert (acts - lat).abs().max() < 1e-5 and (recons - rec).abs().max() < 1e-5
    # and back out: the written file is what the reference reads
    save_sae(sae, tmp_path / "out.pt", format="openai")
    sd2 = torch.load(tmp_path / "out.pt", weights_only=True)
    lat2, rec2 = openai_reference(sd2, x)
    assert (lat2 - lat).abs().max() < 1e-6 and (rec2 - rec).abs().max() < 1e-5


def test_openai_file_with_pickled_code_is_refused(tmp_path):
    sd = openai_state_dict()
    sd["activation"] = torch.nn.ReLU()  # an object: needs unpickling code
    torch.save(sd, tmp_path / "evil.pt")
    with pytest.raises(SAEFormatError, match="refused"):
        load_sae(tmp_path / "evil.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, on the plain pickle
def test_legacy_pickles_are_refused_for_the_right_reason(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled",))

    # torch.save's legacy (non-zip) format with an object inside; and a plain pickle of one
    torch.save({"encoder.weight": torch.zeros(2, 2), "x": Payload()}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump({"x": Payload()}, f)
    for name in ("legacy.pt", "plain.pt"):
        with pytest.raises(SAEFormatError, match=r"refused: a legacy \(non-zip\) pickle that needs to unpickle") as e:
            load_sae(tmp_path / name)
        assert "zip archive" not in str(e.value)
    with pytest.raises(SAEFormatError, match="Unsupported global"):
        load_sae(tmp_path / "legacy.pt")
    # a legacy file holding tensors only is a state dict like any other
    torch.save(openai_state_dict(), tmp_path / "legacy_ok.pt", _use_new_zipfile_serialization=False)
    assert load_sae(tmp_path / "legacy_ok.pt").cfg.d_sae == openai_state_dict()["encoder.weight"].shape[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=4))
    save_sae(sae, tmp_path / "folder")
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "folder" / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    tensors["b_dec"][3] = bad
    save_file(tensors, str(weights))
    with pytest.raises(SAEFormatError, match="tensor 'b_dec' holds 1 non-finite"):
        load_sae(tmp_path / "folder")  # SAELens folder
    with pytest.raises(SAEFormatError, match="tensor 'b_dec' holds 1 non-finite"):
        load_sae(weights)  # the safetensors file itself
    sd = openai_state_dict()
    sd["decoder.weight"][0, 0] = bad
    torch.save(sd, tmp_path / "openai.pt")
    with pytest.raises(SAEFormatError, match="tensor 'decoder.weight' holds 1 non-finite"):
        load_sae(tmp_path / "openai.pt")  # OpenAI state dict: the file's own name for the tensor


def test_openai_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(SAEFormatError, match="not a readable torch state dict"):
        load_sae(tmp_path / "junk.pt")
    sd = openai_state_dict()
    del sd["pre_bias"]
    torch.save(sd, tmp_path / "nobias.pt")
    with pytest.raises(SAEFormatError, match="pre_bias"):
        load_sae(tmp_path / "nobias.pt")
    sd = openai_state_dict()
    sd["decoder.weight"] = sd["decoder.weight"][:, :-1]
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(SAEFormatError, match="W_dec has shape"):
        load_sae(tmp_path / "shape.pt")
    torch.save({"W_enc": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(SAEFormatError, match="encoder.weight"):
        load_sae(tmp_path / "other.pt")
    jump = SAE(SAEConfig(d_in=4, d_sae=8, architecture="jumprelu"))
    with pytest.raises(SAEFormatError, match="OpenAI's Autoencoder holds"):
        save_sae(jump, tmp_path / "j.pt", format="openai")


# ---------------------------------------------------------------------------- corrupt folders


def test_corrupt_and_mismatched_folders(tmp_path):
    good = SAE(SAEConfig(d_in=8, d_sae=16))
    save_sae(good, tmp_path / "ok")
    # truncated weights
    bad = tmp_path / "trunc"
    save_sae(good, bad)
    data = (bad / "sae_weights.safetensors").read_bytes()
    (bad / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SAEFormatError, match="not a readable safetensors"):
        load_sae(bad)
    # config and weights disagree
    cfg = json.loads((tmp_path / "ok" / "cfg.json").read_text())
    cfg["d_sae"] = 32
    (tmp_path / "ok" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match=r"W_enc has shape \(8, 16\).*\(8, 32\)"):
        load_sae(tmp_path / "ok")
    # broken JSON, unsupported architecture, missing files
    (tmp_path / "ok" / "cfg.json").write_text("{ nope")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        load_sae(tmp_path / "ok")
    cfg["d_sae"], cfg["architecture"] = 16, "gated"
    (tmp_path / "ok" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEFormatError, match="'gated' is not supported"):
        load_sae(tmp_path / "ok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEFormatError):
        load_sae(tmp_path / "empty")
    with pytest.raises(SAEFormatError, match="no such file"):
        load_sae(tmp_path / "missing")


def test_center_sae_cannot_be_written_for_saelens(tmp_path):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, normalize_activations="center"))
    with pytest.raises(SAEFormatError, match="center"):
        save_sae(sae, tmp_path / "c")
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------------------- hub


def test_hub_offline_gives_a_clear_error(tmp_path):
    code = ("from tdb_lens.sae import load_sae\n"
            "from tdb_lens.sae.errors import SAEHubError\n"
            "try:\n    load_sae('gpt2-small-res-jb', 'blocks.8.hook_resid_pre')\n"
            "except SAEHubError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR cannot fetch jbloom/GPT2-Small-SAEs-Reformatted/blocks.8.hook_resid_pre/cfg.json" in out.stdout, out.stderr
    assert "HF_HUB_OFFLINE is set" in out.stdout


def test_hub_unknown_release_and_id():
    from tdb_lens.sae.hub import from_pretrained

    with pytest.raises(SAEHubError, match="gpt2-small-res-jb"):
        from_pretrained("gpt2-small-res-jbb", "blocks.8.hook_resid_pre")
    with pytest.raises(SAEHubError, match="blocks.8.hook_resid_pre"):
        from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pree")


def test_hub_gpt2_res_jb_is_centred(tmp_path, monkeypatch):
    """With the download replaced by local files, the release's caveat is applied: inputs are centred."""
    from tdb_lens.sae import hub

    folder = tmp_path / "blocks.8.hook_resid_pre"
    ref = saelens_sae("standard")
    ref.save_model(folder)

    monkeypatch.setattr(hub, "_download", lambda repo, filename, force: str(tmp_path / filename))
    sae = hub.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert sae.cfg.normalize_activations == "center"
    assert sae.cfg.metadata["model_from_pretrained_kwargs"] == {"center_writing_weights": True}
    x = torch.randn(10, 16) + 5.0  # an uncentred residual
    xc = x - x.mean(-1, keepdim=True)
    with torch.no_grad():
        assert (sae.encode(x) - ref.encode(xc)).abs().max() < 1e-5
        assert (sae.encode(xc) - ref.encode(xc)).abs().max() < 1e-5  # already centred: no change
