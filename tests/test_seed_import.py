"""Seed checkpoint import against the seed's own architecture.

The reference below mirrors the seed's model code (moe_nano_gpt_model.py and nano_gpt_model.py
of the repository whose README is seed/README.md; that README shows only the component trees and
the loading snippet, not the code): the same module and attribute names, hence the same state-dict
keys and shapes (per-head AttentionHead modules with their `tril` buffers, `sa_heads.fc`,
`moe.gating.Wg` / `Wnoise`, `experts.N.net.0` / `net.2`), and the forward written the seed's way
(masked_fill with the tril mask, scores scaled by n_embed^-0.5, softmax over the top-k logits
scattered into -inf, a boolean-mask loop over the experts). Checkpoints are saved as the seed's
training script saves them: torch.save of a dict with the optimizer and OneCycleLR states.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slms import load
from slms.cli import main

C, NH, L, V, BS, E, K = 32, 4, 2, 40, 16, 4, 2
DROPOUT = 0.1


class AttentionHead(nn.Module):
    def __init__(self, n_embed: int, head_size: int, block_size: int):
        super().__init__()
        self.key = nn.Linear(n_embed, head_size, bias=False)
        self.query = nn.Linear(n_embed, head_size, bias=False)
        self.value = nn.Linear(n_embed, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, C = x.shape[1:]
        wei = self.query(x) @ self.key(x).transpose(-2, -1) * C**-0.5  # n_embed, not head size
        wei = F.softmax(wei.masked_fill(self.tril[:T, :T] == 0, float("-inf")), dim=-1)
        return self.dropout(wei) @ self.value(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, n_embed: int, n_heads: int, block_size: int):
        super().__init__()
        hs = n_embed // n_heads
        self.heads = nn.ModuleList([AttentionHead(n_embed, hs, block_size) for _ in range(n_heads)])
        self.fc = nn.Linear(hs * n_heads, n_embed)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc(torch.cat([h(x) for h in self.heads], dim=-1)))


class FeedForward(nn.Module):  # the seed's Expert is the same module
    def __init__(self, n_embed: int, n_hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embed, n_hidden), nn.ReLU(),
                                 nn.Linear(n_hidden, n_embed), nn.Dropout(DROPOUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class NoisyTopKGating(nn.Module):
    def __init__(self, n_embed: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.Wg = nn.Linear(n_embed, n_experts)
        self.Wnoise = nn.Linear(n_embed, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = self.Wnoise(x)
        h = self.Wg(x) + torch.randn_like(noise) * F.softplus(noise)  # in eval mode too
        vals, idxs = torch.topk(h, self.top_k, dim=-1)
        return F.softmax(torch.full_like(h, float("-inf")).scatter(-1, idxs, vals), dim=-1)


class MoE(nn.Module):
    def __init__(self, n_embed: int, n_experts: int, n_hidden: int, top_k: int):
        super().__init__()
        self.gating = NoisyTopKGating(n_embed, n_experts, top_k)
        self.experts = nn.ModuleList([FeedForward(n_embed, n_hidden) for _ in range(n_experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gating(x)  # (B, T, n_experts), zero outside the top-k
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            mask = scores[:, :, i] > 0
            if mask.any():
                out[mask] += expert(x[mask]) * scores[:, :, i][mask].view(-1, 1)
        return out


class Block(nn.Module):
    def __init__(self, moe: bool):
        super().__init__()
        self.sa_heads = MultiHeadAttention(C, NH, BS)
        if moe:
            self.moe = MoE(C, E, 4 * C, K)
        else:
            self.ffwd = FeedForward(C, 4 * C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa_heads(self.ln1(x))
        ffn = self.moe if hasattr(self, "moe") else self.ffwd
        return x + ffn(self.ln2(x))


class SeedGPT(nn.Module):
    """The seed's NanoGPT (moe=False) and NanoGPTMoE (moe=True)."""

    def __init__(self, moe: bool):
        super().__init__()
        self.token_embedding_table = nn.Embedding(V, C)
        self.position_embedding_table = nn.Embedding(BS, C)
        self.blocks = nn.Sequential(*[Block(moe) for _ in range(L)])
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = idx.size(1)
        x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(T))
        logits = self.lm_head(self.ln_f(self.blocks(x)))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, V), targets.view(-1))
        return logits, loss


HP = {"n_epochs": 20, "vocab_size": V, "batch_size": 2, "block_size": BS, "learning_rate": 4e-2,
      "n_embed": C, "n_heads": NH, "n_layers": L, "dropout": DROPOUT, "n_experts": E, "top_k": K,
      "use_4bit": True}  # the seed's script keeps training settings here too


def trained_seed(moe: bool) -> SeedGPT:
    """A seed model with random weights (LayerNorms included, so a swapped or dropped one
    shows), after one step of the seed's training loop (AdamW, OneCycleLR)."""
    torch.manual_seed(0)
    model = SeedGPT(moe)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (name.endswith(("ln1.weight", "ln2.weight",
                                                                "ln_f.weight"))))
    model.opt = torch.optim.AdamW(model.parameters(), lr=HP["learning_rate"])
    model.sched = torch.optim.lr_scheduler.OneCycleLR(model.opt, max_lr=HP["learning_rate"],
                                                      total_steps=10)
    batch = torch.randint(0, V, (2, BS))
    _, loss = model(batch, torch.roll(batch, -1, 1))
    model.opt.zero_grad()
    loss.backward()
    model.opt.step()
    model.sched.step()
    return model.eval()


def save_like_the_seed(model: SeedGPT, path: Path) -> None:
    torch.save({"epoch": 0, "model": model.state_dict(), "optimizer": model.opt.state_dict(),
                "scheduler": model.sched.state_dict(), "hyperparameters": HP,
                "val_loss": torch.tensor(2.5), "train_loss": 2.6}, path)


def seed_logits(model: SeedGPT, idx: torch.Tensor, monkeypatch: pytest.MonkeyPatch
                ) -> torch.Tensor:
    """The seed's eval forward with its gate noise at zero: the deterministic part, which the
    import keeps (slms adds router noise in training only; the seed's eval logits vary from
    call to call)."""
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(torch, "randn_like", torch.zeros_like)
        return model(idx)[0]


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


def import_and_compare(seed: SeedGPT, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`slms import-seed` of tmp_path/seed.pt; the imported logits equal the seed's."""
    seed_tokenizer_json(tmp_path / "tok.json")
    assert main(["import-seed", str(tmp_path / "seed.pt"), "--tokenizer",
                 str(tmp_path / "tok.json"), "--out", str(tmp_path / "ck")]) == 0
    model, tok = load(tmp_path / "ck")
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(idx).logits
    torch.testing.assert_close(ours[..., :V], seed_logits(seed, idx, monkeypatch),
                               rtol=1e-5, atol=1e-5)
    assert (ours[..., V] < -1e8).all()  # the added <|endoftext|> is never produced
    return model, tok


@pytest.mark.parametrize("moe", [True, False])
def test_imported_seed_model_equals_the_seeds_forward(moe, tmp_path, monkeypatch):
    seed = trained_seed(moe)
    save_like_the_seed(seed, tmp_path / "seed.pt")
    model, tok = import_and_compare(seed, tmp_path, monkeypatch)
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


def test_seed_checkpoint_with_torch_before_2_4_scheduler_state(tmp_path, monkeypatch):
    """torch < 2.4 saved OneCycleLR's state with a bound method (pytorch/pytorch#123775), which
    the weights-only loader refuses; the seed's checkpoints hold that state."""
    seed = trained_seed(moe=True)
    seed.sched.anneal_func = seed.sched._annealing_cos  # the attribute torch < 2.4 kept
    del seed.sched._anneal_func_type
    save_like_the_seed(seed, tmp_path / "seed.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "seed.pt", weights_only=True)
    import_and_compare(seed, tmp_path, monkeypatch)


@pytest.mark.slow
def test_pruned_seed_checkpoint(tmp_path, monkeypatch):
    """The seed's test script loads checkpoints pruned by torch.nn.utils.prune (weight_orig and
    weight_mask keys): the import folds them into the weights."""
    import torch.nn.utils.prune as prune

    seed = trained_seed(moe=True)
    linears = [(m, "weight") for m in seed.modules() if isinstance(m, nn.Linear)]
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=0.3)
    assert any(k.endswith("weight_mask") for k in seed.state_dict())
    save_like_the_seed(seed, tmp_path / "seed.pt")
    import_and_compare(seed, tmp_path, monkeypatch)


def touch(path: str) -> None:
    Path(path).touch()


class Trap:
    """Pickles as a call of touch(path): code that must never run on loading."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return touch, (self.path,)


def test_foreign_code_in_a_seed_checkpoint_never_runs(tmp_path, monkeypatch):
    seed = trained_seed(moe=False)
    marker = tmp_path / "ran"
    torch.save({"model": seed.state_dict(), "hyperparameters": HP, "extra": Trap(marker)},
               tmp_path / "seed.pt")
    import_and_compare(seed, tmp_path, monkeypatch)
    assert not marker.exists()
    torch.save({"model": {"w": Trap(marker)}, "hyperparameters": HP}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="must be a state dict of tensors"):
        from slms.seed_import import load_seed

        load_seed(tmp_path / "bad.pt")
    assert not marker.exists()


def test_not_a_seed_checkpoint_is_a_clear_error(tmp_path, capsys):
    torch.save({"weights": {}}, tmp_path / "x.pt")
    assert main(["import-seed", str(tmp_path / "x.pt"), "--tokenizer", "t.json",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a seed checkpoint" in capsys.readouterr().err
