"""The GPT: pre-norm transformer blocks whose feed-forward is a dense MLP or an MoE layer.

Shapes: B batch, T time, C n_embd, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from slms.config import ModelConfig
from slms.constants import IGNORE_INDEX
from slms.model.activations import activate, ffn_hidden, first_width
from slms.model.attention import CausalSelfAttention, KVCache, RMSNorm, positions
from slms.model.dropout import Dropout
from slms.model.loss import cross_entropy
from slms.model.moe import MoE
from slms.model.moe_stats import MoEStats
from slms.model.sampling import sample_next


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, then back in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# The id of <|endoftext|> in every tokenizer slms trains (the first special token), which
# begins each story of packed data (slms.data.encode puts it after every story, and prompts
# start with it): the document mask splits rows there. A tokenizer that gives it another id
# (an imported seed tokenizer appends it last) cannot train a document_mask model.
DOCUMENT_START_ID = 0


def document_starts(idx_BT: torch.Tensor, pos: torch.Tensor, prev_B: torch.Tensor | None
                    ) -> torch.Tensor:
    """(B, T) long: the position at which the document of each token begins, for tokens at
    positions `pos` ((T,) or (B, T)). A document begins at each <|endoftext|> (it is the story
    that follows it: generation prompts start with it) or, for the first, at position 0; prev_B
    is where the last cached token's document began (None: no cache, or 0)."""
    first_BT = torch.where(idx_BT == DOCUMENT_START_ID, pos, 0).cummax(dim=1).values
    return first_BT if prev_B is None else torch.maximum(first_BT, prev_B[:, None])


def document_mask(first_BT: torch.Tensor, pos: torch.Tensor, S: int) -> torch.Tensor:
    """(B, 1, T, S) bool: the query at position i (`pos`, (T,) or (B, T)) sees key j < S
    when j is in its document and j <= i (block-diagonal causal)."""
    keys_S = torch.arange(S, device=first_BT.device)
    mask_BTS = (keys_S >= first_BT[..., None]) & (keys_S <= pos[..., None])
    return mask_BTS[:, None]


def row_causal_mask(pos_BT: torch.Tensor, S: int) -> torch.Tensor:
    """(B, 1, T, S) bool: the query at position pos_BT[b, t] sees its row's keys up to it."""
    return (torch.arange(S, device=pos_BT.device) <= pos_BT[..., None])[:, None]


def pads_at_end(real_BT: torch.Tensor) -> bool:
    """Whether each row of the mask is its real positions, then pads (the padded layout)."""
    return not bool((real_BT[:, 1:] & ~real_BT[:, :-1]).any())


class Output(NamedTuple):
    logits: torch.Tensor  # (B, T, V); only the last position when targets is None and last_only
    loss: torch.Tensor | None  # mean cross entropy over targets != IGNORE_INDEX (nats/token)
    aux_loss: torch.Tensor  # weighted MoE router losses (0 for dense / in eval)


def norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.n_embd) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden(cfg.activation, cfg.mlp_ratio * cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, first_width(cfg.activation, hidden), bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.activation = cfg.activation
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, real_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.proj(activate(self.activation, self.fc(x)))
        return self.dropout(y), x.new_zeros((), dtype=torch.float32)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.ln1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = norm(cfg)
        if moe:
            assert cfg.moe is not None
            hidden = cfg.moe.expert_hidden or cfg.mlp_ratio * cfg.n_embd
            self.ffn: MLP | MoE = MoE(cfg.n_embd, cfg.moe, hidden, cfg.activation, cfg.dropout)
        else:
            self.ffn = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                real_BT: torch.Tensor | None = None, mask_B1TS: torch.Tensor | None = None,
                pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.ln1(x), cache, mask_B1TS, pos)
        y, aux = self.ffn(self.ln2(x), real_BT)
        return x + y, aux


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set (it comes from the data when training)")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # rotary positions live in attention: no position embedding then
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.positions == "learned" else None
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layer))
        self.ln_f = norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=cfg.bias and not cfg.tie_weights)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer); or start them at zero
        # (every block then starts as the identity: the speedrun's zero_init_proj).
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "ffn.proj.weight", "w2_EHD")):
                nn.init.zeros_(p) if cfg.zero_init_proj else nn.init.normal_(p, std=std)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def set_dropout(self, p: float) -> None:
        """model.dropout set to `p` in place (embedding, residual, MLP and MoE outputs; the
        attention probabilities too unless model.attn_dropout fixes theirs): a training
        setting, no parameter changes."""
        self.cfg = dataclasses.replace(self.cfg, dropout=p)
        for m in self.modules():
            if isinstance(m, Dropout):
                m.p = p
            elif isinstance(m, CausalSelfAttention) and self.cfg.attn_dropout is None:
                m.dropout = p

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def moe_block_indices(self) -> list[int]:
        """The blocks (0-based) whose feed-forward is an MoE layer, in `moe_layers` order."""
        return [i for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoE)]

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    # MoE statistics and routers' state between steps: the verbs the trainer, the checkpoint
    # code, generation and the transformers wrapper use (nothing outside model/ reaches in).

    @contextmanager
    def paused_stats(self) -> Iterator[None]:
        """No MoE statistics recorded inside (generation, evaluation during training); the
        statistics held before are kept as they were."""
        with ExitStack() as stack:
            for layer in self.moe_layers():
                stack.enter_context(layer.paused_stats())
            yield

    def pop_moe_stats(self) -> list[dict[str, Any]]:
        """Each MoE layer's statistics since the last pop or reset (`MoE.pop_stats`: plain
        numbers, one host sync), then zero them. [] for a dense model."""
        return [layer.pop_stats() for layer in self.moe_layers()]

    def reset_moe_stats(self) -> None:
        for layer in self.moe_layers():
            layer.reset_stats()

    def moe_stats_state(self) -> list[dict[str, Any]]:
        """The statistics of the unfinished log window, per MoE layer (tensors and numbers:
        for trainer.pt)."""
        return [layer.stats.state_dict() for layer in self.moe_layers()]

    def load_moe_stats_state(self, states: list[dict[str, Any]]) -> None:
        """Inverse of `moe_stats_state` (also its format from before MoEStats)."""
        for layer, state in zip(self.moe_layers(), states, strict=False):
            layer.stats = MoEStats.from_state_dict(state, layer.cfg.top_k)

    def reset_moe_state(self) -> None:
        """Zero statistics and bias-router loads, beside the weights: for a model whose saved
        tensors were loaded into a build on the meta device (transformers), where these
        unsaved ones were left."""
        for layer in self.moe_layers():
            layer.reset_stats()
            layer.router.reset_load()

    def after_optimizer_step(self, skipped: bool) -> None:
        """After each optimizer step (skipped: non-finite, not taken): the bias routers update
        their bias from the step's load, or discard the load of a skipped step. A collective
        under torch.distributed: every rank calls it with the same `skipped`."""
        for layer in self.moe_layers():
            layer.router.after_optimizer_step(skipped)

    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, last_only: bool = False,
                real_BT: torch.Tensor | None = None) -> Output:
        """Logits (and the mean loss over targets != IGNORE_INDEX when targets are given).

        real_BT (bool, optional), for rows padded at their end (the padded layout): which
        positions are real. Pads skip the MoE experts and are left out of the router losses
        and statistics; no real position attends to one, so the result at real positions is
        the same. Each row must be real positions then pads.

        With caches, each row's new tokens follow what its cache holds: rows may hold
        different numbers of tokens (a server's rows; T = 1 then, as a rule), each attending
        to its own keys only. With cfg.document_mask a token attends only to earlier tokens of
        its own document (`document_starts`), positions staying those of the row; the first
        KVCache carries where each row's current document began, so cached decoding keeps the
        mask.
        """
        B, T = idx_BT.shape
        starts = caches[0].starts(B) if caches else [0]
        S = max(starts) + T
        if S > self.cfg.block_size:
            raise ValueError(f"sequence of {S} tokens is longer than the model's context "
                             f"(block_size {self.cfg.block_size})")
        pos = positions(starts, T, idx_BT.device)  # (T,), or (B, T) for rows out of step
        x = self.wte(idx_BT)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        x = self.drop(x)
        aux = x.new_zeros((), dtype=torch.float32)
        if real_BT is not None and not pads_at_end(real_BT):
            raise ValueError("real_BT must mark each row's real positions first, then pads")
        mask = self._attention_mask(idx_BT, pos, S, caches)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and caches is None:
                x, a = checkpoint(block, x, None, real_BT, mask, pos, use_reentrant=False)
            else:
                x, a = block(x, caches[i] if caches else None, real_BT, mask, pos)
            aux = aux + a
        x = self.ln_f(x)
        if targets_BT is None:
            return Output(self._logits(x[:, -1:] if last_only else x), None, aux)
        logits = self._logits(x)
        loss = cross_entropy(logits.view(-1, logits.size(-1)), targets_BT.reshape(-1),
                             IGNORE_INDEX)
        return Output(logits, loss, aux)

    def _attention_mask(self, idx_BT: torch.Tensor, pos: torch.Tensor, S: int,
                        caches: list[KVCache] | None) -> torch.Tensor | None:
        """The attention mask of this forward over S keys (None: causal, rows in step): the
        document mask, recording where each row's current document began in the first cache;
        or each row's own keys for rows out of step."""
        if self.cfg.document_mask:
            doc_start = caches[0].doc_start if caches else None
            B = idx_BT.size(0)
            first_BT = document_starts(idx_BT, pos, None if doc_start is None
                                       else doc_start[:B])
            if doc_start is not None:
                doc_start[:B] = first_BT[:, -1]
            return document_mask(first_BT, pos, S)
        return row_causal_mask(pos, S) if pos.dim() == 2 else None

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def new_caches(self, batch: int, max_len: int) -> list[KVCache]:
        p = self.wte.weight
        dtype = p.dtype
        if torch.is_autocast_enabled(p.device.type):
            dtype = torch.get_autocast_dtype(p.device.type)
        return [KVCache(batch, self.cfg.n_head, max_len, self.cfg.head_dim, p.device, dtype)
                for _ in self.blocks]

    @torch.no_grad()
    def generate(self, idx_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float = 1.0, eos_id: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True
                 ) -> torch.Tensor:
        """Sample up to `max_new_tokens` tokens after each row of idx_BT; returns (B, T + n).

        Rows that produced `eos_id` stop (their later positions are filled with eos_id);
        generation ends when every row has stopped. temperature 0 is greedy.
        """
        new = list(self.iter_tokens(idx_BT, max_new_tokens, temperature, top_k, top_p,
                                    repetition_penalty, eos_id, generator, use_cache))
        return torch.cat([idx_BT, *(t[:, None] for t in new)], dim=1)

    @torch.no_grad()
    def iter_tokens(self, idx_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    repetition_penalty: float = 1.0, eos_id: int | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True
                    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, (B,), one step at a time (for streaming)."""
        B, T = idx_BT.shape
        if T + max_new_tokens > self.cfg.block_size:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"the context of {self.cfg.block_size} tokens; shorten one of them")
        with eval_mode(self), self.paused_stats():
            caches = self.new_caches(B, T + max_new_tokens) if use_cache else None
            seq = idx_BT
            step_input = idx_BT
            done = torch.zeros(B, dtype=torch.bool, device=idx_BT.device)
            for _ in range(max_new_tokens):
                logits = self(step_input if use_cache else seq, caches=caches,
                              last_only=True).logits
                nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p,
                                  repetition_penalty, seq, generator)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                step_input = nxt[:, None]
                yield nxt
                if eos_id is not None and bool(done.all()):
                    break
