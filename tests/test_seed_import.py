"""Seed checkpoint import: a state dict with the seed's key names and shapes gives the same
logits as a reference forward written from the seed's description."""

import pytest
import torch
import torch.nn.functional as F

from slms import load
from slms.cli import main

C, NH, L, V, BS, E, K = 32, 4, 2, 40, 16, 4, 2


def seed_state_dict(moe: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {"token_embedding_table.weight": r(V, C), "position_embedding_table.weight": r(BS, C),
          "ln_f.weight": 1 + r(C), "ln_f.bias": r(C), "lm_head.weight": r(V, C),
          "lm_head.bias": r(V)}
    for i in range(L):
        b = f"blocks.{i}."
        for h in range(NH):
            for n in ("query", "key", "value"):
                sd[f"{b}sa_heads.heads.{h}.{n}.weight"] = r(C // NH, C)
            sd[f"{b}sa_heads.heads.{h}.tril"] = torch.ones(BS, BS).tril()
        sd[f"{b}sa_heads.fc.weight"], sd[f"{b}sa_heads.fc.bias"] = r(C, C), r(C)
        for ln in ("ln1", "ln2"):
            sd[f"{b}{ln}.weight"], sd[f"{b}{ln}.bias"] = 1 + r(C), r(C)
        nets = [f"{b}moe.experts.{e}.net." for e in range(E)] if moe else [f"{b}ffwd.net."]
        for net in nets:
            sd[f"{net}0.weight"], sd[f"{net}0.bias"] = r(4 * C, C), r(4 * C)
            sd[f"{net}2.weight"], sd[f"{net}2.bias"] = r(C, 4 * C), r(C)
        if moe:
            for w in ("Wg", "Wnoise"):
                sd[f"{b}moe.gating.{w}.weight"], sd[f"{b}moe.gating.{w}.bias"] = r(E, C), r(E)
    return sd


def reference_forward(sd, idx, moe: bool) -> torch.Tensor:
    """The seed's model in eval mode, written from its description."""
    T = idx.size(1)
    x = sd["token_embedding_table.weight"][idx] + sd["position_embedding_table.weight"][:T]
    hs = C // NH
    mask = torch.ones(T, T).tril() == 0
    for i in range(L):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (C,), sd[f"{b}ln1.weight"], sd[f"{b}ln1.bias"])
        outs = []
        for j in range(NH):
            q, k, v = (h @ sd[f"{b}sa_heads.heads.{j}.{n}.weight"].T
                       for n in ("query", "key", "value"))
            w = (q @ k.transpose(-2, -1)) * C ** -0.5  # n_embed, not head size
            w = w.masked_fill(mask, float("-inf")).softmax(-1)
            outs.append(w @ v)
        assert outs[0].size(-1) == hs
        x = x + torch.cat(outs, -1) @ sd[f"{b}sa_heads.fc.weight"].T + sd[f"{b}sa_heads.fc.bias"]
        h = F.layer_norm(x, (C,), sd[f"{b}ln2.weight"], sd[f"{b}ln2.bias"])

        def ffn(net, z):
            z = F.relu(z @ sd[f"{net}0.weight"].T + sd[f"{net}0.bias"])
            return z @ sd[f"{net}2.weight"].T + sd[f"{net}2.bias"]

        if not moe:
            x = x + ffn(f"{b}ffwd.net.", h)
            continue
        logits = h @ sd[f"{b}moe.gating.Wg.weight"].T + sd[f"{b}moe.gating.Wg.bias"]
        top, idx_k = logits.topk(K, dim=-1)
        sparse = torch.full_like(logits, float("-inf")).scatter(-1, idx_k, top)
        gate = sparse.softmax(-1)  # softmax over the top-k logits only
        y = torch.zeros_like(h)
        for e in range(E):
            y = y + gate[..., e:e + 1] * ffn(f"{b}moe.experts.{e}.net.", h)
        x = x + y
    x = F.layer_norm(x, (C,), sd["ln_f.weight"], sd["ln_f.bias"])
    return x @ sd["lm_head.weight"].T + sd["lm_head.bias"]


def seed_tokenizer_json(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<|unknown|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=[
        "<|unknown|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat . a dog ran"] * 50, trainer=trainer)
    assert tok.get_vocab_size() <= V
    while tok.get_vocab_size() < V:  # pad the vocab to the model's size, as the seed's 2048
        tok.add_tokens([f"pad{tok.get_vocab_size()}"])
    tok.save(str(path))


@pytest.mark.parametrize("moe", [True, False])
def test_imported_seed_model_equals_reference(moe, tmp_path):
    sd = seed_state_dict(moe)
    hp = {"vocab_size": V, "block_size": BS, "n_embed": C, "n_heads": NH, "n_layers": L,
          "dropout": 0.1, "n_experts": E, "top_k": K}
    torch.save({"model": sd, "hyperparameters": hp}, tmp_path / "seed.pt")
    seed_tokenizer_json(tmp_path / "tok.json")
    assert main(["import-seed", str(tmp_path / "seed.pt"), "--tokenizer",
                 str(tmp_path / "tok.json"), "--out", str(tmp_path / "ck")]) == 0
    model, tok = load(tmp_path / "ck")
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx).logits
    ref = reference_forward(sd, idx, moe)
    torch.testing.assert_close(ours[..., :V], ref, rtol=1e-4, atol=1e-4)
    assert (ours[..., V] < -1e8).all()  # the added <|endoftext|> is never produced
    # the seed's tokenizer as it is: whitespace pieces, decoded without a decoder
    from tokenizers import Tokenizer as HF

    seed_tok = HF.from_file(str(tmp_path / "tok.json"))
    ids = seed_tok.encode("the cat sat").ids
    assert tok.encode("the cat sat") == ids
    assert tok.decode(ids) == seed_tok.decode(ids, skip_special_tokens=False)
    # prompts start with their first word, as the seed's did: no <|endoftext|> before them
    assert tok.prompt_prefix == [] and tok.encode_prompt("the cat sat") == ids
    from slms.infer.generate import Sampling, generate_text, prompt_ids

    with pytest.raises(ValueError, match="give a prompt"):
        prompt_ids(tok, "", BS, 4)
    assert isinstance(generate_text(model, tok, "the cat", Sampling(4, temperature=0)), str)


def test_not_a_seed_checkpoint_is_a_clear_error(tmp_path, capsys):
    torch.save({"weights": {}}, tmp_path / "x.pt")
    assert main(["import-seed", str(tmp_path / "x.pt"), "--tokenizer", "t.json",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a seed checkpoint" in capsys.readouterr().err
