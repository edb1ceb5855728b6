"""ExplicitLM: a frozen Hugging Face Qwen3 with trainable memory modules around each decoder layer.

Each decoder layer gets three modules, attached to the layer itself so their parameter names read
`model.layers.{i}.memory_gate...` as in the reference:
- `memory_norm`: RMSNorm of the layer's hidden states.
- `memory_gate`: retrieval. The question's words find candidate rows and score them exactly
  (`explicitlm.retrieval`, shared by every layer); each layer adds a trained correction from its
  question states and takes the top-k, weighted by a softmax over their scores, so the LM loss
  reaches the gate; a retrieval loss trains it directly when a record's uuid names its memory row.
  A layer reads its rows only when they are about the question (their coverage by the question's
  words reaches `min_match`); otherwise it adds nothing.
- `gated_memory_fusion`: a SwiGLU MLP over the hidden state and the retrieved memory whose output
  projection starts at zero: an untrained model gives exactly the backbone's logits.
The backbone's code is not copied or edited: a forward hook on each layer adds the fused memory to
the layer's output. The modules are in `explicitlm.modules`, their saved form in `explicitlm.adapter`.

Letters: B batch, T tokens, D hidden size, K retrieval dim, N bank rows, L tokens per row,
k retrieved rows, V vocabulary, M positions whose logits are computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from explicitlm.bank import MemoryBank, distinct_words
from explicitlm.config import ModelConfig
from explicitlm.index import ProductKeyIndex, lexical_vectors, take
from explicitlm.modules import GatedMemoryFusion, MemoryGate
from explicitlm.postings import Postings
from explicitlm.retrieval import Candidates, find_candidates, memory_values


@dataclass
class MemorySettings:
    """The model's memory shape and retrieval breadth; defaults are the config's (`model.*`)."""

    knowledge_length: int = ModelConfig.knowledge_length
    knowledge_dim: int = ModelConfig.knowledge_dim
    top_k: int = ModelConfig.top_k
    candidates: int = ModelConfig.candidates
    posting_rows: int = ModelConfig.posting_rows
    top_cells: int = ModelConfig.top_cells
    probe_cells: int = ModelConfig.probe_cells
    max_cell_rows: int = ModelConfig.max_cell_rows
    scan_rows: int = ModelConfig.scan_rows
    max_recent_rows: int = ModelConfig.max_recent_rows
    min_match: float = ModelConfig.min_match
    match_power: float = ModelConfig.match_power
    coverage_weight: float = ModelConfig.coverage_weight
    values_from: str = ModelConfig.values_from
    fusion_dim: int = ModelConfig.fusion_dim
    query_rank: int = ModelConfig.query_rank
    query_from: str = ModelConfig.query_from
    seed: int = 0

    @classmethod
    def from_model_config(cls, model_cfg: Any, seed: int = 0) -> MemorySettings:
        return cls(**{k: getattr(model_cfg, k) for k in cls.__dataclass_fields__ if k != "seed"}, seed=seed)


@dataclass
class MemoryRead:
    """What one layer took from memory for each sequence."""

    values: torch.Tensor  # (B, D) what the retrieved rows add to the question
    match: torch.Tensor  # (B,) the rows' coverage by the question, weighted by their retrieval weights
    used: torch.Tensor  # (B,) 1.0 where match reaches min_match, else 0.0

    def select(self, group: torch.Tensor) -> MemoryRead:
        return MemoryRead(self.values[group], self.match[group], self.used[group])


@dataclass
class _ForwardContext:
    candidates: Candidates | None
    query_states: torch.Tensor | None  # (B, T, D) when every layer's query reads the embeddings
    query_weights: torch.Tensor | None  # (B, T) IDF of the question tokens' words, 0 elsewhere
    question: torch.Tensor | None  # (B, T) the question's word ids, sorted per row
    record: bool
    reads: list[MemoryRead | None] = field(default_factory=list)  # per layer, once read
    losses: list[torch.Tensor] = field(default_factory=list)
    retrieved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class ExplicitOutput:
    logits: torch.Tensor  # (B, T, V), or (M, V) at the positions of logits_mask
    retrieval_loss: torch.Tensor | None
    retrieved: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: rows (B, k), weights (B, k)


@dataclass
class Prefix:
    """Prompts run once: their KV cache and each layer's memory values, for continuations to share."""

    cache: Any  # transformers Cache over (B, T_p)
    attention_mask: torch.Tensor  # (B, T_p), right-padded
    values: list[MemoryRead]  # per layer
    retrieved: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: rows (B, k), weights (B, k)


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    inner = getattr(backbone, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(backbone).__name__} has no .model.layers: not a Qwen3-style causal LM")
    return layers


class ExplicitLM(nn.Module):
    """A frozen causal LM plus per-layer memory modules reading an explicit memory bank.

    The bank and its index are plain tensors, not parameters or buffers: they move with the model
    (`.to`, `.cuda`; an `_apply` override), keep their own dtypes under `.half()`, and are never
    copied per layer or per step. `memory_moves` counts their moves.
    """

    def __init__(self, backbone: nn.Module, bank: MemoryBank, settings: MemorySettings, index: ProductKeyIndex):
        super().__init__()
        self.backbone = backbone
        self.bank = bank
        self.index = index
        self.settings = settings
        # Rows by the words they contain: questions find their rows by the rarest words they name.
        self.postings = Postings.build(bank.word_ids) if settings.posting_rows > 0 else None
        self.memory_moves = 0
        for p in backbone.parameters():
            p.requires_grad_(False)
        cfg = backbone.config
        D = cfg.hidden_size
        generator_state = torch.get_rng_state()
        torch.manual_seed(settings.seed)  # identical memory modules on every worker
        self._hooks = []
        for i, layer in enumerate(decoder_layers(backbone)):
            layer.memory_norm = nn.RMSNorm(D, eps=getattr(cfg, "rms_norm_eps", 1e-6))
            layer.memory_gate = MemoryGate(D, settings.knowledge_dim, settings.top_k, settings.query_rank)
            layer.gated_memory_fusion = GatedMemoryFusion(D, settings.fusion_dim)
            self._hooks.append(layer.register_forward_hook(partial(self._layer_hook, i), with_kwargs=True))
        torch.set_rng_state(generator_state)
        self._ctx: _ForwardContext | None = None
        self._apply(lambda t: t)  # bank and index to the backbone's device

    # ------------------------------------------------------------------ memory bank and index

    def _embeddings(self) -> torch.Tensor:
        return self.backbone.get_input_embeddings().weight  # (V, D), frozen

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        super()._apply(fn, recurse)
        device = self._embeddings().device
        if self.bank.device != device or self.index.device != device:
            self.bank.to(device)
            self.index.to(device)
            if self.postings is not None:
                self.postings.to(device)
            self.memory_moves += 1
        return self

    def memory_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the bank and its index, by name: where they live and what they weigh."""
        parts = [("bank", self.bank), ("bank.counts", self.bank.counts), ("index", self.index)]
        for owner, obj in parts + ([("postings", self.postings)] if self.postings is not None else []):
            for name, value in vars(obj).items():
                if isinstance(value, torch.Tensor):
                    yield f"{owner}.{name}", value

    def set_memory_row(self, uuid: str, text: str, tokenizer: Any) -> tuple[int, str | None]:
        """Replace (or add) a memory row at run time: its words, counts, key and cell refresh at once,
        in time independent of the bank's size. Returns (row, old text)."""
        i = self.bank.row_of(uuid)
        old, old_words = None, None
        if i < 0:
            i = self.bank.add_row(uuid, text, tokenizer)
        else:
            old = self.bank.texts[i]
            old_words = self.bank.set_row(i, text, tokenizer)
        raw = lexical_vectors(
            self.bank.word_ids[i : i + 1], self.bank.counts, self.settings.knowledge_dim, self.settings.seed
        )
        self.index.update_row(i, raw[0])
        if self.postings is not None:
            self.postings.add(i, self.bank.word_ids[i], old_words)
        return i, old

    # ------------------------------------------------------------------ reading memory

    def _read(self, layer: nn.Module, ctx: _ForwardContext, h_query: torch.Tensor) -> MemoryRead:
        """One layer's read: correction from its question states, top-k rows, coverage gate, values."""
        cand = ctx.candidates
        w = ctx.query_weights.unsqueeze(-1)  # (B, T, 1)
        h = layer.memory_norm(h_query.to(layer.memory_norm.weight.dtype))
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1e-6)  # (B, D)
        keys = take(self.index.keys, cand.rows)  # (B, C, K)
        cols, weights, loss = layer.memory_gate(pooled, cand.lexical, keys, cand.selectable, cand.gold)
        if loss is not None:
            ctx.losses.append(loss)
        rows = cand.rows.gather(1, cols)  # (B, k)
        match = (weights * cand.cover.gather(1, cols)).sum(1)  # (B,)
        values = memory_values(
            self.bank, self._embeddings(), rows, weights, ctx.question, self.settings.values_from == "novel"
        )
        if ctx.record:
            ctx.retrieved.append((rows.detach(), weights.detach()))
        return MemoryRead(values, match, (match >= self.settings.min_match).to(values.dtype))

    def _layer_hook(self, i: int, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ctx = self._ctx
        if ctx is None:  # the bare backbone, called on its own
            return None
        h_out = output[0] if isinstance(output, tuple) else output
        read = ctx.reads[i]
        if read is None:  # the query reads this layer's input: retrieve here, once
            read = ctx.reads[i] = self._read(layer, ctx, args[0] if args else kwargs["hidden_states"])
        fusion = layer.gated_memory_fusion(layer.memory_norm(h_out.to(layer.memory_norm.weight.dtype)), read.values)
        fused = h_out + read.used.to(h_out.dtype)[:, None, None] * fusion
        return (fused, *output[1:]) if isinstance(output, tuple) else fused

    def _context(
        self,
        input_ids: torch.Tensor,
        query_mask: torch.Tensor,
        words: torch.Tensor,
        choices_mask: torch.Tensor | None,
        target_rows: torch.Tensor | None,
        record: bool,
    ) -> _ForwardContext:
        """Everything every layer shares, computed once per forward: the candidates and, when the
        query reads the embeddings, every layer's read (so recomputing a layer never retrieves again)."""
        s = self.settings
        question = words * query_mask.bool()
        options = words * choices_mask.bool() if choices_mask is not None else torch.zeros_like(words)
        cand = find_candidates(
            self.bank,
            self.index,
            question,
            options,
            s.candidates,
            s.top_cells,
            s.probe_cells,
            s.scan_rows,
            s.match_power,
            s.coverage_weight,
            s.seed,
            target_rows if self.training else None,
            self.postings,
            s.posting_rows,
        )
        query_weights = self.bank.counts.idf(question) * (question != 0)  # (B, T)
        sorted_question, _ = distinct_words(question)
        layers = decoder_layers(self.backbone)
        ctx = _ForwardContext(cand, None, query_weights, sorted_question, record, reads=[None] * len(layers))
        if s.query_from == "embeddings":
            # The question's token embeddings (layer 0's input) keep token identity in every layer;
            # a random tiny backbone's deeper hidden states do not.
            states = self._embeddings()[input_ids]  # (B, T, D)
            ctx.reads = [self._read(layer, ctx, states) for layer in layers]
        return ctx

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_mask: torch.Tensor,
        words: torch.Tensor,
        choices_mask: torch.Tensor | None = None,
        target_rows: torch.Tensor | None = None,
        record: bool = False,
        logits_mask: torch.Tensor | None = None,
    ) -> ExplicitOutput:
        """input_ids, attention_mask (B, T); query_mask marks the question's tokens, choices_mask the
        answer options' text in the prompt, words (B, T) every token's word id (`explicitlm.words`);
        target_rows (B,) each question's own bank row, -1 when unknown (training only).

        With logits_mask (B, T), logits are computed only where it is set and come back as (M, V) in
        row-major order: the output layer over every position is most of a small model's work, and a
        loss or a score needs a few."""
        self._ctx = self._context(input_ids, query_mask, words, choices_mask, target_rows, record)
        try:
            if logits_mask is None:
                logits = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            else:
                hidden = self.backbone.model(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                ).last_hidden_state  # (B, T, D)
                logits = self.backbone.lm_head(hidden[logits_mask.bool()])  # (M, V)
            ctx = self._ctx
        finally:
            self._ctx = None
        retrieval = torch.stack(ctx.losses).mean() if ctx.losses else None
        return ExplicitOutput(logits, retrieval, ctx.retrieved)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_mask: torch.Tensor,
        words: torch.Tensor,
        choices_mask: torch.Tensor | None = None,
    ) -> Prefix:
        """Read right-padded prompts (B, T_p) once: memory retrieval, fusion and the KV cache.

        Scoring a question's options then runs only each option's own tokens (`continue_from`):
        the query reads the question, which every option shares, so nothing about memory changes."""
        ctx = self._context(input_ids, query_mask, words, choices_mask, None, record=True)
        self._ctx = ctx
        try:
            out = self.backbone.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        finally:
            self._ctx = None
        return Prefix(out.cache, attention_mask, ctx.reads, ctx.retrieved)

    @torch.no_grad()
    def continue_from(
        self,
        prefix: Prefix,
        group: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Continuations (B_c, T_c) of the prompts `group` (B_c,) picks -> logits (M, V) at logits_mask.

        Consumes the prefix's cache. Each continuation's positions follow its own prompt's length,
        so right-padded prompts need no left padding."""
        cache = prefix.cache
        cache.batch_select_indices(group)
        lengths = prefix.attention_mask.sum(1)[group]  # (B_c,)
        position_ids = lengths[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)  # (B_c, T_c)
        mask = torch.cat([prefix.attention_mask[group], attention_mask], dim=1)  # (B_c, T_p + T_c)
        self._ctx = _ForwardContext(None, None, None, None, False, reads=[v.select(group) for v in prefix.values])
        try:
            hidden = self.backbone.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
            ).last_hidden_state  # (B_c, T_c, D)
        finally:
            self._ctx = None
        return self.backbone.lm_head(hidden[logits_mask.bool()])  # (M, V)
