"""ExplicitLM: a frozen Hugging Face Qwen3 with trainable memory modules around each decoder layer.

Each decoder layer gets three modules, attached to the layer itself so their parameter names read
`model.layers.{i}.memory_gate...` as in the reference:
- `memory_norm`: RMSNorm of the layer's hidden states.
- `memory_gate`: the reader. The question's words find candidate rows (`explicitlm.retrieval`,
  shared by every layer); the reader aligns the question's tokens with each row's, and decides which
  row answers, whether any does (a learned null competes in the same softmax), and where in the row
  the answer stands; its exclusion picks a row whose span the answer is not (another fact about the
  subject). A reading loss trains it directly when a record's uuid names its memory row, an
  exclusion loss from the rows that name a wrong option; the LM and option losses reach both
  through the values.
- `gated_memory_fusion`: at each position of the answer, a SwiGLU over the hidden state and the
  memory token that position should produce (the answer span read out of the rows, slot by slot),
  and a narrower one over the excluded span's token, whose output projections start at zero: an
  untrained model gives exactly the backbone's logits.
The backbone's code is not copied or edited: a forward hook on each layer adds the fused memory to
the layer's output at the answer's positions. The modules are in `explicitlm.modules`, their saved
form in `explicitlm.adapter`.

A sequence says which answer slot each position predicts (`slots`, -1 for none): the position
before the answer's first token predicts slot 0, its last token predicts the end of turn. Prompts,
options and generated tokens all follow that rule, so the memory is read once per question and each
position takes its slot.

Letters: B batch, T tokens, D hidden size, N bank rows, L tokens per row, R rows read, S answer
slots, V vocabulary, M positions whose logits are computed, f the fusion width (f_x the exclusion's).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from explicitlm.bank import MemoryBank
from explicitlm.config import ModelConfig
from explicitlm.index import ProductKeyIndex, lexical_vectors
from explicitlm.modules import GatedMemoryFusion, MemoryGate, exclusion_loss, reading_loss
from explicitlm.postings import Postings
from explicitlm.retrieval import (
    Candidates,
    RowTokens,
    answer_positions,
    answer_span,
    find_candidates,
    row_tokens,
    span_values,
)


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
    reader_dim: int = ModelConfig.reader_dim
    reader_encoder: int = ModelConfig.reader_encoder
    fusion_dim: int = ModelConfig.fusion_dim
    query_from: str = ModelConfig.query_from
    min_trust: float = ModelConfig.min_trust
    exclusion: bool = ModelConfig.exclusion
    seed: int = 0

    @classmethod
    def from_model_config(cls, model_cfg: Any, seed: int = 0) -> MemorySettings:
        return cls(**{k: getattr(model_cfg, k) for k in cls.__dataclass_fields__ if k != "seed"}, seed=seed)

    @property
    def slots(self) -> int:
        """Answer slots memory can fill: a whole row, then the end of turn."""
        return self.knowledge_length + 1


@dataclass
class MemoryRead:
    """What one layer took from memory for each question."""

    # The fusion's input from memory (`GatedMemoryFusion.memory_terms`) for each answer slot, the same
    # at every position that predicts it: (B, S, 2f) of the token it should produce.
    values: torch.Tensor
    trust: torch.Tensor  # (B,) the reading weight on rows rather than on "none": 1 - P(null)
    rows: torch.Tensor  # (B, R) the rows read
    weights: torch.Tensor  # (B, R) their reading weights (summing to trust)
    # None where the exclusion writes nothing (answering with model.exclusion false):
    excluded: torch.Tensor | None  # (B, S, 2f_x) of the token the answer is read not to be
    x_mass: torch.Tensor | None  # (B, S) the exclusion's weight behind it (0 past the excluded span)


@dataclass
class _ForwardContext:
    candidates: Candidates | None
    tokens: RowTokens | None
    row_states: torch.Tensor | None  # (B, R, L, D) the rows' token embeddings, RMS-normalised (autocast dtype under it)
    query_index: torch.Tensor | None  # (B, Q) the question's positions, -1 padded
    end_state: torch.Tensor | None  # (D,) the end-of-turn token's embedding, normalised like the rows'
    record: bool
    reads: list[MemoryRead | None] = field(default_factory=list)  # per layer, once read
    group: torch.Tensor | None = None  # (B,) the question whose reading each sequence takes; None: its own
    answer: tuple[torch.Tensor, ...] | None = None  # (B, W) positions memory writes to, whether, their slots
    span: torch.Tensor | None = None  # (B, 2) the answer's span in its own row, training only
    q_keep: torch.Tensor | None = None  # (B, Q) the question tokens the readers see (word dropout, training only)
    named: torch.Tensor | None = None  # (B, R) rows naming a wrong option and not the right one, training only
    ruled_out: torch.Tensor | None = None  # (B, 1 + K) the option tokens a named row holds (-1 elsewhere)
    losses: list[torch.Tensor] = field(default_factory=list)  # per layer: the reading loss
    x_losses: list[torch.Tensor] = field(default_factory=list)  # per layer: the exclusion loss
    # A prompt pass that only notes each layer's input, for readers of layer inputs to read after it.
    inputs: list[torch.Tensor] | None = None


@dataclass
class ExplicitOutput:
    logits: torch.Tensor  # (B, T, V), or (B, A, V) at the positions of logits_index
    retrieval_loss: torch.Tensor | None  # the reading loss, mean over layers (training with target rows)
    reads: list[MemoryRead]  # per layer
    exclusion_loss: torch.Tensor | None = None  # mean over layers (training with option tokens)
    # (B, 1 + K) training with option tokens: those a row the reader sees names as what the answer is
    # not (`named_rows`), -1 elsewhere
    ruled_out: torch.Tensor | None = None


@dataclass
class Prefix:
    """Prompts run once: their KV cache and each layer's reading, for continuations to share."""

    cache: Any  # transformers Cache over (B, T_p)
    attention_mask: torch.Tensor  # (B, T_p), right-padded
    reads: list[MemoryRead]  # per layer
    hidden: torch.Tensor  # (B, T_p, D) the last layer's output, for the prompts' own next tokens


def _output(ctx: _ForwardContext, logits: torch.Tensor) -> ExplicitOutput:
    """A forward pass's output: its logits, every layer's reading and the mean of each loss over layers."""
    retrieval, exclusion = (torch.stack(x).mean() if x else None for x in (ctx.losses, ctx.x_losses))
    return ExplicitOutput(logits, retrieval, [r for r in ctx.reads if r is not None], exclusion, ctx.ruled_out)


def option_rows(ids: torch.Tensor, mask: torch.Tensor, option_tokens: torch.Tensor) -> torch.Tensor:
    """ids, mask (B, R, L) rows' tokens; option_tokens (B, 1 + K) the right option's first token, then
    the wrong ones' (-1 padded) -> (B, R, 1 + K): the row holds that option's first token."""
    has = (ids[..., None] == option_tokens[:, None, None, :]) & mask[..., None]  # (B, R, L, 1 + K)
    return has.any(2) & (option_tokens[:, None, :] >= 0)


def named_rows(has: torch.Tensor) -> torch.Tensor:
    """`option_rows` (B, R, 1 + K) -> (B, R): the row holds a wrong option's first token and not the
    right one's. Such a row names what the answer is not: what the exclusion learns to pick."""
    return has[..., 1:].any(-1) & ~has[..., 0]


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
    copied per layer or per step. `memory_moves` counts their moves. `end_token_id` is the token that
    ends an answer (the chat template's end of turn). With `memory_off` set, `prefill` and
    `continue_from` run the bare backbone (no reading, no fusion): the baseline serving compares with.
    """

    def __init__(
        self,
        backbone: nn.Module,
        bank: MemoryBank,
        settings: MemorySettings,
        index: ProductKeyIndex,
        end_token_id: int,
    ):
        super().__init__()
        self.backbone = backbone
        self.bank = bank
        self.index = index
        self.settings = settings
        self.end_token_id = end_token_id
        # Rows by the words they contain: questions find their rows by the rarest words they name.
        self.postings = Postings.build(bank.word_ids) if settings.posting_rows > 0 else None
        self.memory_moves = 0
        self.memory_off = False
        # Training only: the share of a question's tokens kept from every layer's reader (their states;
        # the word features still count them), drawn anew each pass (training.word_dropout).
        self.word_dropout = 0.0
        # Where the masks come from: a seed set before each forward (the training loop's: a function of
        # the run's seed, the worker, the step and the micro-batch, so a resumed run draws the same masks on
        # any device), or None for the default generator.
        self.dropout_seed: int | None = None
        # Training only: the weight of the null against every row but the question's own in the
        # reading loss (`reading_loss`'s others_null; the trainer sets it from training.others_null).
        self.others_null = 0.0
        for p in backbone.parameters():
            p.requires_grad_(False)
        cfg = backbone.config
        D = cfg.hidden_size
        generator_state = torch.get_rng_state()
        torch.manual_seed(settings.seed)  # identical memory modules on every worker
        self._hooks = []
        for i, layer in enumerate(decoder_layers(backbone)):
            layer.memory_norm = nn.RMSNorm(D, eps=getattr(cfg, "rms_norm_eps", 1e-6))
            layer.memory_gate = MemoryGate(D, settings.reader_dim, settings.reader_encoder)
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

    def hold_for_answers(self, dtype: torch.dtype) -> ExplicitLM:
        """Hold the readers' and fusions' weights in `dtype`, the dtype a server computes its answers in
        under autocast, so that no batch casts them again. Answers are the same: under autocast every
        product casts its float32 weights to that dtype anyway (without autocast the modules compute in
        `dtype`). Only for a model that answers: training keeps float32 master weights."""
        for layer in decoder_layers(self.backbone):
            layer.memory_gate.to(dtype)
            layer.gated_memory_fusion.to(dtype)
        return self

    def memory_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the bank and its index, by name: where they live and what they weigh."""
        for owner, obj in (("bank", self.bank), ("bank.counts", self.bank.counts), ("index", self.index)):
            for name, value in vars(obj).items():
                if isinstance(value, torch.Tensor):
                    yield f"{owner}.{name}", value
        if self.postings is not None:
            for name, value in self.postings.tensors().items():
                yield f"postings.{name}", value

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

    def candidates(
        self, question: torch.Tensor, target_rows: torch.Tensor | None = None, hide: torch.Tensor | None = None
    ) -> Candidates:
        """The rows every layer's reader reads for questions (B, T) of word ids (`find_candidates`
        with this model's bank, index, lists and settings)."""
        s = self.settings
        return find_candidates(
            self.bank,
            self.index,
            question,
            s.candidates,
            s.top_k,
            s.top_cells,
            s.probe_cells,
            s.scan_rows,
            s.seed,
            target_rows,
            hide,
            self.postings,
            s.posting_rows,
        )

    def _read(self, layer: nn.Module, ctx: _ForwardContext, q_states: torch.Tensor) -> MemoryRead:
        """One layer's reading: the reader's choice among null and the rows, and the answer's slots."""
        cand, tok = ctx.candidates, ctx.tokens
        at = ctx.query_index.clamp(min=0)[..., None].expand(-1, -1, q_states.shape[-1])  # (B, Q, D)
        q = layer.memory_norm(q_states.gather(1, at).to(layer.memory_norm.weight.dtype))
        q_mask = ctx.query_index >= 0
        if ctx.q_keep is not None:
            q_mask = q_mask & ctx.q_keep
        q_mask = q_mask.float()
        reading = layer.memory_gate(
            q, q_mask, tok.q_feats, ctx.row_states, tok.mask, tok.feats, cand.lexical, cand.valid
        )
        if cand.target is not None and self.training:
            ctx.losses.append(reading_loss(reading, cand.target, ctx.span, self.others_null))
            if ctx.named is not None:
                ctx.x_losses.append(exclusion_loss(reading, ctx.named))
        p = torch.softmax(reading.scores, 1)  # (B, 1 + R)
        weights = p[:, 1:]  # (B, R)
        if not self.training and self.settings.min_trust > 0:  # a reader that doubts writes nothing
            weights = weights * (weights.sum(1, keepdim=True) >= self.settings.min_trust).to(weights.dtype)
        readings = [(weights, ctx.end_state)]
        if self.training or self.settings.exclusion:
            readings.append((torch.softmax(reading.exclusion, 1)[:, 1:], None))  # (B, R)
        spans = span_values(ctx.row_states, reading.start, reading.end, self.settings.slots, readings)
        values = spans[0][0]
        excluded, x_mass = spans[1] if len(spans) > 1 else (None, None)
        values, excluded = layer.gated_memory_fusion.memory_terms(values, excluded)
        return MemoryRead(values, weights.sum(1), cand.rows, weights, excluded, x_mass)

    def _layer_hook(self, i: int, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ctx = self._ctx
        if ctx is None:  # the bare backbone, called on its own
            return None
        h_in = args[0] if args else kwargs["hidden_states"]
        if ctx.inputs is not None:
            ctx.inputs.append(h_in)
        if ctx.answer is None:  # a prompt with no answer slot in it
            return None
        h_out = output[0] if isinstance(output, tuple) else output
        read = ctx.reads[i]
        if read is None:  # the query reads this layer's input: read here, once
            read = ctx.reads[i] = self._read(layer, ctx, h_in)
        pos, has, slot = ctx.answer  # (B, W) each
        D = h_out.shape[-1]
        # A sequence no longer than the answer (an option's continuation, a generated token) writes at
        # every position: W = T and pos is 0..T-1, so no gather or scatter is needed.
        every = pos.shape[1] == h_out.shape[1]
        at = None if every else pos[..., None].expand(-1, -1, D)  # (B, W, D)
        h = h_out if every else h_out.gather(1, at)  # (B, W, D) the hidden states that predict an answer slot
        # Each sequence's question's reading (its prompt's, `ctx.group`), at the slot each position predicts.
        own = ctx.group if ctx.group is not None else torch.arange(h.shape[0], device=h.device)  # (B,)
        at_slot = (own[:, None] * read.values.shape[1] + slot).flatten()  # (B W,) into (question, slot) pairs
        memory = read.values.flatten(0, 1).index_select(0, at_slot)  # (B W, 2f) the token each should write
        excluded = None if read.excluded is None else read.excluded.flatten(0, 1).index_select(0, at_slot)
        normed = layer.memory_norm(h.flatten(0, 1).to(layer.memory_norm.weight.dtype))  # (B W, D)
        up, down = layer.gated_memory_fusion(normed, memory, excluded)
        delta = up * (read.trust[own][:, None] * has).flatten().to(up.dtype)[:, None]  # (B W, D)
        if down is not None:
            x_mass = read.x_mass.flatten().index_select(0, at_slot)  # (B W,)
            delta = torch.addcmul(delta, down, (x_mass * has.flatten()).to(down.dtype)[:, None])
        delta = delta.view_as(h).to(h_out.dtype)
        fused = h_out + delta if every else h_out.scatter_add(1, at, delta)
        return (fused, *output[1:]) if isinstance(output, tuple) else fused

    def _context(
        self,
        input_ids: torch.Tensor,
        query_index: torch.Tensor,
        words: torch.Tensor,
        slots: torch.Tensor | None,
        target_rows: torch.Tensor | None,
        hide: torch.Tensor | None,
        record: bool,
        answer_ids: torch.Tensor | None = None,
        option_tokens: torch.Tensor | None = None,
        hide_others: torch.Tensor | None = None,
    ) -> _ForwardContext:
        """Everything every layer shares, computed once per forward: the candidates, their tokens and
        features and, when the query reads the embeddings, every layer's reading (so recomputing a
        layer never reads again). slots, and answer_ids for the answer's span in training, are those
        of the sequence the hooks will see (input_ids' own by default)."""
        s = self.settings
        asked = query_index >= 0
        question = words.gather(1, query_index.clamp(min=0)) * asked  # (B, Q) word ids of the question's tokens
        training = self.training and target_rows is not None
        cand = self.candidates(question, target_rows if training else None, hide if training else None)
        tokens = row_tokens(self.bank, cand.rows, question)
        # One fixed norm for every layer's reader: each layer's memory_norm would keep its own float32
        # copy of (B, R, L, D) for the backward pass.
        emb = self._embeddings()
        row_states, end_state = (
            F.rms_norm(t.float(), (emb.shape[1],), eps=1e-6) for t in (emb[tokens.ids], emb[self.end_token_id])
        )
        if torch.is_autocast_enabled(emb.device.type):  # every reader and span read would cast them: once here
            row_states = row_states.to(torch.get_autocast_dtype(emb.device.type))
        layers = decoder_layers(self.backbone)
        ctx = _ForwardContext(cand, tokens, row_states, query_index, end_state, record, reads=[None] * len(layers))
        if training and self.word_dropout > 0:
            seeded = self.dropout_seed is not None
            draw = torch.Generator(query_index.device).manual_seed(self.dropout_seed) if seeded else None
            ctx.q_keep = torch.rand(query_index.shape, device=query_index.device, generator=draw) >= self.word_dropout
        if slots is not None:
            ctx.answer = answer_positions(slots, s.slots)
            if cand.target is not None:
                row_ids = self.bank.token_ids.index_select(0, target_rows.clamp(min=0))  # (B, L)
                ctx.span = answer_span(row_ids, input_ids if answer_ids is None else answer_ids, slots, s.slots)
        if training and option_tokens is not None:
            has = option_rows(tokens.ids, tokens.mask, option_tokens)
            named = named_rows(has) & cand.valid
            named &= cand.rows != target_rows[:, None]
            if hide_others is not None:  # those questions' other facts kept from the reader: nothing to rule out
                gone = named & hide_others[:, None]
                ctx.candidates = replace(cand, valid=cand.valid & ~gone)
                named &= ~gone
            ctx.named = named
            ctx.ruled_out = option_tokens.masked_fill(~(has & named[..., None]).any(1), -1)
        if s.query_from == "embeddings":
            # The question's token embeddings (layer 0's input) keep token identity in every layer;
            # a random tiny backbone's deeper hidden states do not.
            states = self._embeddings()[input_ids]  # (B, T, D)
            ctx.reads = [self._read(layer, ctx, states) for layer in layers]
        return ctx

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
        words: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        target_rows: torch.Tensor | None = None,
        hide: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        prompt: dict[str, torch.Tensor] | None = None,
        answer: dict[str, torch.Tensor] | None = None,
        option_tokens: torch.Tensor | None = None,
        hide_others: torch.Tensor | None = None,
    ) -> ExplicitOutput:
        """input_ids, attention_mask (B, T); query_index (B, Q) the question's positions (-1 padded),
        words (B, T) every token's word id (`explicitlm.words`), slots (B, T) the answer slot each position predicts
        (-1: none); in training, target_rows (B,) each question's own bank row (-1 unknown) and hide
        (B,) the questions whose own row is kept from the reader, and option_tokens (B, 1 + K) the first
        token of the right option then of each wrong one (-1 padded; `named_rows`), which teach the
        exclusion; hide_others (B,) the questions whose named rows (other facts about the subject) are
        kept from the reader.

        With logits_index (B, A) (positions, -1 padded), logits are computed only there and come back as
        (B, A, V): the output layer over every position is most of a small model's work, and a loss or
        a score needs a few. Given prompt and answer (collated batches) instead, the training pass of
        `answer_forward` (through forward, so that DDP sees it)."""
        if prompt is not None:
            return self.answer_forward(prompt, answer, target_rows, hide, option_tokens, hide_others)
        self._ctx = self._context(
            input_ids,
            query_index,
            words,
            slots,
            target_rows,
            hide,
            record=False,
            option_tokens=option_tokens,
            hide_others=hide_others,
        )
        ctx = self._ctx
        try:
            hidden = self.backbone.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state  # (B, T, D)
            logits = self._logits(hidden, logits_index)
        finally:
            self._ctx = None
        return _output(ctx, logits)

    def answer_forward(
        self,
        prompt: dict[str, torch.Tensor],
        answer: dict[str, torch.Tensor],
        target_rows: torch.Tensor | None = None,
        hide: torch.Tensor | None = None,
        option_tokens: torch.Tensor | None = None,
        hide_others: torch.Tensor | None = None,
    ) -> ExplicitOutput:
        """Training's forward pass in two parts (`explicitlm.data.split_prompt`): the prompt (B, T_p)
        without gradients into a KV cache, since memory writes only at the answer and nothing trainable
        touches the prompt; then the answer (B, T_a) from the cache, with them. The same logits as
        `forward` on the whole sequences, at answer["loss_index"] (B, A), for a fraction of the
        backward pass and of the activations kept. Each is a collated batch (`explicitlm.data.collate`)."""
        ctx = self._context(
            prompt["input_ids"],
            prompt["query_index"],
            prompt["words"],
            answer["slots"],
            target_rows,
            hide,
            record=False,
            answer_ids=answer["input_ids"],
            option_tokens=option_tokens,
            hide_others=hide_others,
        )
        positions, ctx.answer = ctx.answer, None
        if ctx.reads[0] is None:  # readers of layer inputs read the prompt's, with gradients, after it
            ctx.inputs = []
        self._ctx = ctx
        try:
            with torch.no_grad():
                cache = self.backbone.model(
                    input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], use_cache=True
                ).cache
            if ctx.inputs is not None:
                ctx.reads = [self._read(layer, ctx, h) for layer, h in zip(decoder_layers(self.backbone), ctx.inputs)]
                ctx.inputs = None
            ctx.answer = positions
            hidden = self._continue(cache, prompt["attention_mask"], answer["input_ids"], answer["attention_mask"])
            logits = self._logits(hidden, answer["loss_index"])
        finally:
            self._ctx = None
        return _output(ctx, logits)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_index: torch.Tensor,
        words: torch.Tensor,
        slots: torch.Tensor | None = None,
    ) -> Prefix:
        """Read right-padded prompts (B, T_p) once: memory, and the KV cache.

        Continuations (`continue_from`: each option of a question, or each generated token) then run
        only their own tokens: the reader reads the question, which they all share. `slots` (B, T_p)
        marks prompt positions that already predict an answer slot (the last one of a generation
        prompt predicts slot 0)."""
        if self.memory_off:
            out = self.backbone.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
            return Prefix(out.cache, attention_mask, [], out.last_hidden_state)
        if slots is None and self.settings.query_from != "embeddings":  # each layer reads its input: run every hook
            slots = torch.full_like(input_ids, -1)
        ctx = self._ctx = self._context(input_ids, query_index, words, slots, None, None, record=True)
        try:
            out = self.backbone.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        finally:
            self._ctx = None
        return Prefix(out.cache, attention_mask, ctx.reads, out.last_hidden_state)

    @torch.no_grad()
    def continue_from(
        self,
        prefix: Prefix,
        group: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slots: torch.Tensor,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Continuations (B_c, T_c) of the prompts `group` (B_c,) picks (None: each prompt's one
        continuation) -> logits (B_c, A, V) at logits_index (every position when None: (B_c, T_c, V)).

        Consumes the prefix's cache, which then holds the continuations too (generation calls this
        once per token). Each continuation's positions follow its own prompt's length, so right-padded
        prompts need no left padding."""
        cache, past = prefix.cache, prefix.attention_mask
        if group is not None:  # None: each prompt continues once, in order (no device sync to find out)
            cache.batch_select_indices(group)
            past = past[group]
        if not prefix.reads:  # memory_off: the bare backbone
            return self._logits(self._continue(cache, past, input_ids, attention_mask), logits_index)
        # The readings stay one per question: each continuation's hooks take its question's by `group`.
        self._ctx = _ForwardContext(None, None, None, None, None, False, reads=prefix.reads, group=group)
        self._ctx.answer = answer_positions(slots, self.settings.slots)
        try:
            hidden = self._continue(cache, past, input_ids, attention_mask)
        finally:
            self._ctx = None
        return self._logits(hidden, logits_index)

    def _continue(
        self, cache: Any, past_mask: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Continuations (B, T_c) of right-padded prompts in `cache` (attention mask past_mask
        (B, T_p)) -> the last layer's output (B, T_c, D), the hooks' context already set. Each
        continuation's positions follow its own prompt's length, so no left padding is needed."""
        lengths = past_mask.sum(1)  # (B,)
        position_ids = lengths[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)  # (B, T_c)
        mask = torch.cat([past_mask, attention_mask], dim=1)  # (B, T_p + T_c)
        return self.backbone.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
        ).last_hidden_state

    def _logits(self, hidden: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """hidden (B, T, D) -> logits (B, T, V), or (B, A, V) at index (B, A) (-1: any position)."""
        if index is None:
            return self.backbone.lm_head(hidden)
        at = index.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1])
        return self.backbone.lm_head(hidden.gather(1, at))
