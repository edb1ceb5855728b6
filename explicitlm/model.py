"""ExplicitLM: a frozen Hugging Face Qwen3 with trainable memory modules around each decoder layer.

Each decoder layer gets three modules, attached to the layer itself so their parameter names read
`model.layers.{i}.memory_gate...` as in the reference:
- `memory_norm`: RMSNorm of the layer's hidden states.
- `memory_gate`: product-key retrieval. The query is the mean of the layer's normalised input over
  the question tokens only (never answer tokens), so training and inference retrieve the same rows.
  Candidates are weighted by a softmax over their scores, so the LM loss reaches the gate; a
  retrieval loss trains it directly when a record's uuid names its memory row.
- `gated_memory_fusion`: a SwiGLU MLP over the hidden state and the retrieved memory whose output
  projection starts at zero: an untrained model gives exactly the backbone's logits.
The backbone's code is not copied or edited: a forward hook on each layer adds the fused memory to
the layer's output. The modules are in `explicitlm.modules`, their saved form in `explicitlm.adapter`.

Letters: B batch, T tokens, D hidden size, K retrieval dim, N bank rows, L tokens per row,
k retrieved rows, V vocabulary, M positions whose logits are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from explicitlm.bank import MemoryBank
from explicitlm.config import ModelConfig
from explicitlm.index import ProductKeyIndex, inverse_document_frequency, n_sub_keys, row_vectors
from explicitlm.modules import GatedMemoryFusion, MemoryGate, key_projection


@dataclass
class MemorySettings:
    """The model's memory shape and retrieval breadth; defaults are the config's (`model.*`)."""

    knowledge_length: int = ModelConfig.knowledge_length
    knowledge_dim: int = ModelConfig.knowledge_dim
    top_k: int = ModelConfig.top_k
    top_cells: int = ModelConfig.top_cells
    probe_cells: int = ModelConfig.probe_cells
    max_cell_rows: int = ModelConfig.max_cell_rows
    scan_rows: int = ModelConfig.scan_rows
    min_match: float = ModelConfig.min_match
    fusion_dim: int = ModelConfig.fusion_dim
    query_rank: int = ModelConfig.query_rank
    query_from: str = ModelConfig.query_from
    seed: int = 0

    @classmethod
    def from_model_config(cls, model_cfg: Any, seed: int = 0) -> MemorySettings:
        return cls(**{k: getattr(model_cfg, k) for k in cls.__dataclass_fields__ if k != "seed"}, seed=seed)


@dataclass
class _ForwardContext:
    query_weights: torch.Tensor | None
    query_states: torch.Tensor | None
    question_ids: torch.Tensor | None  # (B, T) ids of question tokens, -1 elsewhere
    target_rows: torch.Tensor | None
    record: bool
    values: list[MemoryRead] | None = None  # per layer: read, not retrieved (a continuation)
    losses: list[torch.Tensor] = field(default_factory=list)
    retrieved: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    kept: list[MemoryRead] = field(default_factory=list)  # per layer, when kept
    keep: bool = False


@dataclass
class MemoryRead:
    """What one layer took from memory for each sequence."""

    values: torch.Tensor  # (B, D) what the retrieved rows add to the question
    match: torch.Tensor  # (B,) share of the question's words the rows contain
    used: torch.Tensor  # (B,) 1.0 where match reaches min_match, else 0.0

    def select(self, group: torch.Tensor) -> MemoryRead:
        return MemoryRead(self.values[group], self.match[group], self.used[group])


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA and on CPUs whose matrix units do bf16 natively (there it runs
    several times faster than float32), else float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return (
            torch.bfloat16 if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        )
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    inner = getattr(backbone, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(backbone).__name__} has no .model.layers: not a Qwen3-style causal LM")
    return layers


class ExplicitLM(nn.Module):
    """A frozen causal LM plus per-layer memory modules reading an explicit memory bank."""

    def __init__(
        self,
        backbone: nn.Module,
        bank: MemoryBank,
        settings: MemorySettings,
        index_state: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        if settings.knowledge_dim == 0:
            settings = replace(settings, knowledge_dim=backbone.config.hidden_size)
        self.backbone = backbone
        self.bank = bank
        self.settings = settings
        for p in backbone.parameters():
            p.requires_grad_(False)
        cfg = backbone.config
        D = cfg.hidden_size
        if index_state is None:
            proj = key_projection(D, settings.knowledge_dim, settings.seed)
            idf = inverse_document_frequency(bank.token_ids, bank.mask, self._embeddings().shape[0])
            key_mean = None
        else:
            proj, idf, key_mean = index_state["key_projection"], index_state["idf"], index_state["key_mean"]
        self.register_buffer("key_projection", proj.float(), persistent=False)  # (K, D)
        # Tokens weigh by their inverse document frequency in the bank, in keys, queries and
        # memory values alike: the subject and object, not "The ... of ... is", tell rows apart.
        self.register_buffer("idf", idf.float(), persistent=False)  # (V,)
        # Keys are centred: the words every sentence shares (templates, "the", "of") would
        # otherwise dominate the cosine and crowd most rows into a few cells.
        raw_keys = self._row_keys(bank.token_ids, bank.mask)  # (N, K)
        self.register_buffer("key_mean", raw_keys.mean(0) if key_mean is None else key_mean.float(), persistent=False)
        self.index = self._build_index(raw_keys, index_state)
        generator_state = torch.get_rng_state()
        torch.manual_seed(settings.seed)  # identical memory modules on every worker
        self._hooks = []
        for i, layer in enumerate(decoder_layers(backbone)):
            layer.memory_norm = nn.RMSNorm(D, eps=getattr(cfg, "rms_norm_eps", 1e-6))
            layer.memory_gate = MemoryGate(
                D,
                proj,
                settings.top_cells,
                settings.probe_cells,
                settings.top_k,
                settings.query_rank,
                settings.scan_rows,
            )
            layer.gated_memory_fusion = GatedMemoryFusion(D, settings.fusion_dim)
            self._hooks.append(layer.register_forward_hook(partial(self._layer_hook, i), with_kwargs=True))
        torch.set_rng_state(generator_state)
        self._ctx: _ForwardContext | None = None

    # ------------------------------------------------------------------ memory bank and index

    def _embeddings(self) -> torch.Tensor:
        return self.backbone.get_input_embeddings().weight  # (V, D), frozen

    @torch.no_grad()
    def _row_keys(self, token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Uncentred keys (N, K): the projected mean token embedding of each row."""
        # mean(P e) == P mean(e): project the vocabulary once, then pool, so (N, D) is never built.
        table = self._embeddings().float() @ self.key_projection.to(self._embeddings().device).T  # (V, K)
        return row_vectors(token_ids.to(table.device), mask.to(table.device), table, self.idf)  # (N, K)

    def _build_index(self, raw_keys: torch.Tensor, index_state: dict[str, torch.Tensor] | None) -> ProductKeyIndex:
        keys = raw_keys - self.key_mean
        if index_state is None:
            n_sub = n_sub_keys(len(self.bank))
            return ProductKeyIndex(keys, n_sub, self.settings.max_cell_rows, seed=self.settings.seed)
        return ProductKeyIndex(
            keys,
            index_state["sub1"].shape[0],
            self.settings.max_cell_rows,
            seed=self.settings.seed,
            centroids=(index_state["sub1"], index_state["sub2"]),
        )

    def index_state(self) -> dict[str, torch.Tensor]:
        """What, besides the modules, a saved adapter needs to rebuild the same index on any bank."""
        return {
            "key_projection": self.key_projection.cpu(),
            "idf": self.idf.cpu(),
            "key_mean": self.key_mean.cpu(),
            "sub1": self.index.sub1.cpu(),
            "sub2": self.index.sub2.cpu(),
        }

    def set_memory_row(self, uuid: str, text: str, tokenizer: Any) -> tuple[int, str | None]:
        """Replace (or add) a memory row at run time; keys and cells refresh, no reload. Returns (row, old text)."""
        i = self.bank.row_of(uuid)
        old = None
        if i < 0:
            i = self.bank.add_row(uuid, text, tokenizer)
        else:
            old = self.bank.texts[i]
            self.bank.set_row(i, text, tokenizer)
        key = self._row_keys(self.bank.token_ids[i : i + 1], self.bank.mask[i : i + 1])[0] - self.key_mean
        self.index.update_row(i, key.to(self.index.keys.device))
        return i, old

    def memory_values(self, rows: torch.Tensor, weights: torch.Tensor, question_ids: torch.Tensor) -> MemoryRead:
        """What the retrieved rows add to the question: rows, weights (B, k), question_ids (B, T).

        Each row is the IDF-weighted mean embedding of its tokens that the question does not
        already contain: the subject and the shared wording are in the prompt anyway, so the
        answer's tokens carry the memory instead of a twelfth of it.

        The match is the IDF-weighted share of the question's words that the rows contain. The
        question's own sentence contains its subject and most of its wording; a row about another
        subject ("Jean Vautrin" for "Jean Rotrou") lacks the rarest words. Below `min_match` the
        layer reads nothing, so an absent fact is not guessed from its neighbours.
        """
        E = self._embeddings()
        ids = self.bank.token_ids.to(E.device)[rows]  # (B, k, L)
        mask = self.bank.mask.to(E.device)[rows]  # (B, k, L)
        same = ids[..., None] == question_ids[:, None, None, :]  # (B, k, L, T)
        in_question = same.any(-1)  # (B, k, L)
        novel = mask & ~in_question
        keep = torch.where(novel.any(-1, keepdim=True), novel, mask)  # a row with nothing new keeps all
        B, k, L = ids.shape
        vec = row_vectors(ids.reshape(B * k, L), keep.reshape(B * k, L), E, self.idf).reshape(B, k, -1)  # (B, k, D)
        values = (weights.unsqueeze(-1).to(vec.dtype) * vec).sum(1)  # (B, D)
        in_row = (same & mask[..., None]).any(2)  # (B, k, T): question token t appears in row
        w = self.idf[question_ids.clamp(min=0)] * (question_ids >= 0)  # (B, T), padding and prompt weigh 0
        share = (in_row * w[:, None]).sum(-1) / w.sum(-1, keepdim=True).clamp(min=1e-6)  # (B, k)
        match = (weights.float() * share).sum(1)  # (B,)
        used = (match >= self.settings.min_match).to(values.dtype)
        return MemoryRead(values, match, used)

    # ------------------------------------------------------------------ forward

    def _layer_hook(self, i: int, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ctx = self._ctx
        if ctx is None:  # the bare backbone, called on its own
            return None
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        if ctx.values is not None:  # a continuation of prompts already read: same rows, same values
            read = ctx.values[i]
        else:
            h_query = ctx.query_states if ctx.query_states is not None else h_in
            rows, weights, loss = layer.memory_gate(
                layer.memory_norm(h_query), ctx.query_weights, self.index, ctx.target_rows
            )
            if loss is not None:
                ctx.losses.append(loss)
            read = self.memory_values(rows, weights, ctx.question_ids)
            if ctx.record:
                ctx.retrieved.append((rows.detach(), weights.detach()))
            if ctx.keep:
                ctx.kept.append(read)
        fused = h_out + read.used[:, None, None] * layer.gated_memory_fusion(layer.memory_norm(h_out), read.values)
        return (fused, *output[1:]) if isinstance(output, tuple) else fused

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_mask: torch.Tensor,
        target_rows: torch.Tensor | None = None,
        record: bool = False,
        question_mask: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
    ) -> ExplicitOutput:
        """input_ids, attention_mask, query_mask (B, T); target_rows (B,) bank rows, -1 when unknown.

        query_mask marks the prompt tokens the query reads; question_mask (default: query_mask)
        the tokens whose words memory values leave out. With logits_mask (B, T), logits are
        computed only where it is set and come back as (M, V) in row-major order: the output layer
        over every position is most of a small model's work, and a loss or a score needs a few."""
        self._ctx = self._context(input_ids, query_mask, question_mask, target_rows, record)
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

    def _context(
        self,
        input_ids: torch.Tensor,
        query_mask: torch.Tensor,
        question_mask: torch.Tensor | None,
        target_rows: torch.Tensor | None,
        record: bool,
    ) -> _ForwardContext:
        query_weights = query_mask * self.idf[input_ids]  # (B, T)
        # The question's token embeddings (layer 0's input) keep token identity in every layer;
        # a random tiny backbone's deeper hidden states do not (see the README's measurements).
        query_states = self._embeddings()[input_ids] if self.settings.query_from == "embeddings" else None
        said = query_mask if question_mask is None else question_mask
        question_ids = torch.where(said.bool(), input_ids, torch.full_like(input_ids, -1))
        return _ForwardContext(query_weights, query_states, question_ids, target_rows, record)

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_mask: torch.Tensor,
        question_mask: torch.Tensor | None = None,
    ) -> Prefix:
        """Read right-padded prompts (B, T_p) once: memory retrieval, fusion and the KV cache.

        Scoring a question's options then runs only each option's own tokens (`continue_from`):
        the query reads the question, which every option shares, so nothing about memory changes."""
        ctx = self._context(input_ids, query_mask, question_mask, None, record=True)
        ctx.keep = True
        self._ctx = ctx
        try:
            out = self.backbone.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        finally:
            self._ctx = None
        return Prefix(out.cache, attention_mask, ctx.kept, ctx.retrieved)

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
        self._ctx = _ForwardContext(None, None, None, None, False, values=[v.select(group) for v in prefix.values])
        try:
            hidden = self.backbone.model(
                input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
            ).last_hidden_state  # (B_c, T_c, D)
        finally:
            self._ctx = None
        return self.backbone.lm_head(hidden[logits_mask.bool()])  # (M, V)

    def to(self, *args, **kwargs):  # noqa: D102 - the index holds plain tensors, move them too
        super().to(*args, **kwargs)
        device = self.key_projection.device
        self.index.to(device)
        return self
