import pytest
import torch

from tdb_lens.attribution.nodes import Node, as_nodes

FORMS = [
    "L9.H9@-1", "L3.N1024@5", "L3.H1@5>2", "L3.H1.q@5", "L3.H1.k@0", "L3.H1.v", "L3.H1.result@2",
    "L3.H1.scores@5>2", "L3.H1.pattern@4", "L3.R@5", "L3.R.mid@5", "L3.R.post", "L3.ATTN@5", "L3.MLP",
    "E@5", "E", "P@-2", "blocks.3.hook_resid_post:F123@5", "blocks.3.hook_resid_post:ERR@5",
    "blocks.0.hook_mlp_out:F0", "L0.N0",
]


@pytest.mark.parametrize("s", FORMS)
def test_parse_round_trips(s):
    n = Node.parse(s)
    assert str(n) == s
    assert Node.parse(str(n)) == n
    assert hash(Node.parse(s)) == hash(n)


def test_constructors_match_strings():
    assert Node.head(9, 9, -1) == Node.parse("L9.H9@-1")
    assert Node.head(3, 1, 5, 2) == Node.parse("L3.H1@5>2")
    assert Node.neuron(3, 1024, 5) == Node.parse("L3.N1024@5")
    assert Node.resid(3, 5) == Node.parse("L3.R@5")
    assert Node.sae_latent("blocks.3.hook_resid_post", 123, 5) == Node.parse("blocks.3.hook_resid_post:F123@5")
    assert Node.sae_error("blocks.3.hook_resid_post", 5).hook_name == "blocks.3.hook_resid_post.hook_sae_error"
    assert Node.parse("L2.H0.z@4") == Node.head(2, 0, 4)


@pytest.mark.parametrize("bad", ["L3.X@5", "L3.N@5", "H3", "L3.N1@5>2", "E@5>1", "L3.H1.q@5>2", "", "L-1.N2",
                                 "blocks.3:FX@1", "L3.H1.nope@1"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        Node.parse(bad)


def test_validation():
    with pytest.raises(ValueError):
        Node("neuron", layer=1)
    with pytest.raises(TypeError):
        Node.neuron(1, 2, pos=1.5)
    with pytest.raises(ValueError):
        Node.head(1, 2, pos=None, key_pos=3)


def test_indexing_selects_the_right_entries():
    g = torch.Generator().manual_seed(0)
    post = torch.randn(2, 7, 11, generator=g)
    assert torch.equal(Node.neuron(0, 3, 5).select(post), post[:, 5, 3])
    assert torch.equal(Node.neuron(0, 3).select(post), post[:, :, 3])
    z = torch.randn(2, 7, 4, 5, generator=g)
    assert torch.equal(Node.head(0, 2, -1).select(z), z[:, -1, 2])
    pat = torch.randn(2, 4, 7, 7, generator=g)
    assert torch.equal(Node.head(0, 2, 5, 1).select(pat), pat[:, 2, 5, 1])
    resid = torch.randn(2, 7, 8, generator=g)
    assert torch.equal(Node.resid(0, 3).select(resid), resid[:, 3])
    assert torch.equal(Node.embed(3).select(resid[0], has_batch_dim=False), resid[0, 3])
    # assignment through the index tuple
    post2 = post.clone()
    post2[Node.neuron(0, 3, 5).act_index()] = 0
    assert (post2[:, 5, 3] == 0).all() and torch.equal(post2[:, 4], post[:, 4])


def test_cache_lookup_on_model():
    from tdb_lens.models.gpt2 import HookedGPT2

    m = HookedGPT2.from_config(n_layers=2, n_heads=4, d_model=64, d_mlp=256, d_vocab=100, n_ctx=64, seed=0)
    toks = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = m.run_with_cache(toks)
    for s in ["L1.N7@3", "L0.H2@-1", "L1.H3@4>1", "L0.R@2", "L1.R.post@0", "L0.ATTN@1", "L1.MLP@5", "E@0", "P@1",
              "L1.H0.q@2", "L1.H0.k@2", "L1.H0.v@2"]:
        n = Node.parse(s)
        assert n.hook_name in m.hook_dict
        assert torch.equal(n.value(cache), cache[n.hook_name][n.act_index()])


def test_ordering_and_helpers():
    nodes = as_nodes(["L1.MLP@0", "L0.H1@0", "E@0", "L1.R@0", "L0.N3@0"])
    ordered = [str(n) for n in sorted(nodes, key=Node.sort_key)]
    assert ordered == ["E@0", "L0.H1@0", "L0.N3@0", "L1.R@0", "L1.MLP@0"]
    assert Node.parse("L0.H1@3>2").unit == Node.head(0, 1, site="pattern")
    assert Node.parse("L0.H1@3").at(-1) == Node.parse("L0.H1@-1")
    assert Node.parse("L0.H1@3").with_site("q") == Node.parse("L0.H1.q@3")


def test_node_axes_follow_the_model_layouts():
    """Each node's declared axes are those of its hook point's layout in real models (both families),
    and indexing through the model's layout selects the same entries as the node's own axes."""
    from _attribution_models import make_model

    for family in ("gpt2", "llama"):
        m = make_model(family)
        for s in ["L1.N3@2", "L0.H1@4", "L0.H1.q@1", "L1.H1.k@3", "L1.H0.v", "L0.H2@5>1", "L1.H3.scores@4>4",
                  "L0.H0.result@2", "L1.R.mid@3", "L0.R.post", "L1.ATTN@0", "L0.MLP@6", "E@2"]:
            n = Node.parse(s)
            if n.hook_name not in m.hook_dict:
                continue  # hook_result only where the model records it
            lay = m.hook_layout(n.hook_name)
            assert lay.axes == n.axes, (family, s)
            assert lay.pos_axis == n.pos_axis and (n.unit_axis is None or lay.unit_axis == n.unit_axis)
            assert n.act_index(layout=lay) == n.act_index()
        k = Node.parse("L0.H1.k")
        assert m.hook_layout(k.hook_name).size(k.axes[k.unit_axis]) == getattr(m.cfg, "n_key_value_heads", m.cfg.n_heads)
