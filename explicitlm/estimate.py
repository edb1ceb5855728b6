"""How much GPU memory one training worker needs, estimated before anything is loaded.

The job prints the estimate per part and compares it with the GPU's memory when that is known
(`training.gpu_memory_gb` on the driver, the device itself on each worker); a config that cannot fit
stops there, with the number and the knob to turn, instead of running out of memory minutes later.

Per worker, for a frozen Qwen3 with memory modules in every decoder layer:
- weights: the backbone's parameters in its dtype (`model.dtype`);
- memory modules: their float32 master weights;
- optimizer: AdamW's two float32 moments, the float32 gradients and, with more than one worker,
  DDP's gradient buckets;
- activations: what autograd keeps for the backward pass at `training.batch_size` x
  `model.max_seq_len` tokens. Training runs the prompt without gradients and only the answer with
  them (`ExplicitLM.answer_forward`): the answer's tokens keep, per layer, the norms' float32 inputs,
  attention's q, k, v and output, the MLP's gate and up projections (the backbone is frozen, so its
  linear layers keep no inputs), with one layer's worth more for the backward pass; the prompt's
  tokens keep only the keys and values attention reads them by. Then the memory modules' own
  tensors (the reader's per row and question token, the fusion's per answer slot) and the loss
  positions' logits. With `training.gradient_checkpointing` the whole sequence runs with gradients,
  each layer keeps only its input, and one layer is recomputed at a time;
- bank: the memory bank's tensors and index on the device (`bank_device_bytes`);
- overhead: the CUDA context, library workspaces and allocator slack (none on a CPU).

Letters: B batch, T tokens, D hidden size, H query heads, G key/value heads, d head (or reader)
dim, L decoder layers, F fusion width, K retrieval dim, R rows read, Q question tokens, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from explicitlm.config import ModelConfig
from explicitlm.errors import UserError
from explicitlm.modules import QUESTION_TOKEN_FEATURES, ROW_FEATURES, ROW_TOKEN_FEATURES, exclusion_width

GB = 1e9
OVERHEAD_BYTES = int(1.0 * GB)  # CUDA context, cuBLAS/attention workspaces, allocator slack
LOSS_POSITIONS = 16  # answer tokens per sequence whose logits the loss computes (logits_mask)
QUESTION_TOKENS = 32  # tokens of a question, which the memory reader reads against each row
ANSWER_TOKENS = LOSS_POSITIONS + 1  # tokens of a sequence that run with gradients: its answer, from the one before


# The published shapes of Qwen3 checkpoints (their config.json), for estimates and benchmarks that
# need no download. All share the 151,936-token vocabulary; 8B unties its output layer.
QWEN3_SHAPES: dict[str, dict[str, Any]] = {
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16),
    "4B": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
    "8B": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
}


def qwen3_config(name: str, **overrides: Any):
    """A `Qwen3Config` with the published shape of Qwen3-{name} (e.g. "4B")."""
    from transformers import Qwen3Config

    shape = dict(
        vocab_size=151936,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    shape.update(QWEN3_SHAPES[name])
    shape.update(overrides)
    return Qwen3Config(**shape)


class MemoryEstimateError(UserError, ValueError):
    """The estimate exceeds the GPU's memory; the message names the number and the knob to turn."""


@dataclass
class MemoryEstimate:
    """Bytes per training worker, by part."""

    weights: int
    memory_modules: int
    optimizer: int
    activations: int
    bank: int
    overhead: int
    # What the figures were computed for, to name the knobs in a message.
    backbone_params: int
    trainable_params: int
    dtype: str
    batch_size: int
    max_seq_len: int
    gradient_checkpointing: bool
    # The activation figure with gradient checkpointing on (equal to `activations` when it is on).
    activations_checkpointed: int

    @property
    def total(self) -> int:
        return self.weights + self.memory_modules + self.optimizer + self.activations + self.bank + self.overhead

    def summary(self) -> str:
        ckpt = ", gradient checkpointing" if self.gradient_checkpointing else ""
        return (
            f"weights {self.weights / GB:.2f} GB ({self.backbone_params / 1e6:.0f}M, {self.dtype}) + memory modules "
            f"{self.memory_modules / GB:.2f} GB ({self.trainable_params / 1e6:.1f}M, float32) + optimizer "
            f"{self.optimizer / GB:.2f} GB + activations {self.activations / GB:.2f} GB (batch {self.batch_size} x "
            f"{self.max_seq_len} tokens{ckpt}) + bank {self.bank / GB:.2f} GB + overhead {self.overhead / GB:.2f} GB"
            f" = {self.total / GB:.2f} GB"
        )

    def advice(self) -> str:
        """The knob that moves the largest part the most."""
        parts = {
            "activations": self.activations,
            "weights": self.weights,
            "optimizer": self.optimizer + self.memory_modules,
            "bank": self.bank,
        }
        largest = max(parts, key=parts.get)
        if largest == "activations":
            if not self.gradient_checkpointing and self.activations_checkpointed < self.activations:
                saved = self.activations - self.activations_checkpointed
                return (
                    f"set training.gradient_checkpointing=true (activations {self.activations / GB:.2f} -> "
                    f"{self.activations_checkpointed / GB:.2f} GB, total {(self.total - saved) / GB:.2f} GB), or lower "
                    f"training.batch_size={self.batch_size} or model.max_seq_len={self.max_seq_len} (raise "
                    "training.accumulation_steps to keep the effective batch)"
                )
            return (
                f"lower training.batch_size={self.batch_size} or model.max_seq_len={self.max_seq_len} (raise "
                "training.accumulation_steps to keep the effective batch)"
            )
        if largest == "weights":
            if self.dtype == "float32":
                return f"set model.dtype=bfloat16 (weights {self.weights / GB:.2f} -> {self.weights / 2 / GB:.2f} GB)"
            return "use GPUs with more memory: the frozen backbone alone takes the most"
        if largest == "optimizer":
            return "lower model.fusion_dim, model.reader_dim or model.reader_encoder (the memory modules and their AdamW state)"
        return "lower model.knowledge_num (rows of the memory bank on each GPU)"

    def check(self, capacity_bytes: int, source: str) -> None:
        """Raise MemoryEstimateError when the estimate exceeds `capacity_bytes`."""
        if self.total > capacity_bytes:
            raise MemoryEstimateError(
                f"the memory estimate per GPU worker, {self.total / GB:.2f} GB, exceeds the {capacity_bytes / GB:.2f} GB "
                f"of {source}: {self.advice()}. Estimate: {self.summary()}"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bank_device_bytes(rows: int, knowledge_length: int, knowledge_dim: int) -> int:
    """The memory bank and its index on a worker's device (`ExplicitLM.memory_tensors`): per row, L
    token ids and L word ids (int64) and L mask bytes, a bf16 and an int8 copy of its K-dim key, and
    37 bytes of cell, order, span, scale and flags; then the two float32 sub-key sets of about
    sqrt(N) centroids each (held twice: apart and side by side). The inverted lists
    (`explicitlm.postings`) take about 13 L bytes a row: an int64 entry for each distinct word of a row
    (about half its tokens on T-REx sentences), a 24-byte table entry per distinct word of the bank
    (about one in eight tokens), and the rows' word numbers (`explicitlm.row_words`: an int32 per
    token, and each numbered word's id, number and document frequency, 20 bytes)."""
    per_row = knowledge_length * (8 + 8 + 1 + 13) + knowledge_dim * (2 + 1) + 37
    return rows * per_row + 16 * knowledge_dim * math.isqrt(max(rows - 1, 0) + 1)


def memory_module_params(hidden: int, layers: int, reader_dim: int, fusion_dim: int, reader_encoder: int = 0) -> int:
    """Trainable parameters of the memory modules in every layer (`explicitlm.modules`): memory_norm
    (D); memory_gate, the reader (question and row projections D x d, token features, two compare
    layers 3d x d, a context convolution 3 d x d, heads and the null, and the exclusion's heads and
    null; the question's encoder, D x E and E x d, where model.reader_encoder = E > 0);
    gated_memory_fusion (two SwiGLUs: reading, two D x 2F and one F x D; exclusion, the same at
    a quarter of F)."""
    D, d, F = hidden, reader_dim, fusion_dim
    reader = 2 * (D * d + d) + (QUESTION_TOKEN_FEATURES + ROW_TOKEN_FEATURES) * d + 2 * (3 * d * d + d)
    reader += 3 * d * d + d + (d + 1) + (3 * d + 3) + (ROW_FEATURES + 1) + (d + 1)
    reader += 3 * (d + 1) + (ROW_FEATURES + 1)  # the exclusion: row and question heads, null, word statistics
    reader += (D * reader_encoder + reader_encoder + reader_encoder * d + d) if reader_encoder else 0
    return layers * (D + reader + 5 * D * F + 5 * D * exclusion_width(F))


def layer_activation_bytes(
    hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, act_bytes: int
) -> int:
    """Bytes autograd keeps per token in one frozen Qwen3 decoder layer."""
    D, H, G, d, s = hidden, heads, kv_heads, head_dim, act_bytes
    norms = 2 * 4 * D + 4 * (H + G) * d  # RMSNorm keeps its float32 input: two per layer, q_norm, k_norm
    attention = s * (2 * H * d + 2 * H * d) + 4 * H  # q, k and v (repeated to H heads), output; log-sum-exp
    mlp = 3 * s * intermediate  # the gate projection, its SiLU and the up projection, for the product's backward
    return norms + attention + mlp


def fusion_activation_bytes(hidden: int, fusion_dim: int, act_bytes: int) -> int:
    """Bytes one layer's fusion keeps per answer slot (it runs at the answer's positions only): the
    gathered hidden state, memory_norm's float32 input and output; then for each SwiGLU (reading and
    exclusion) its token (float32, and normalised), the gate and up projections, their product and
    the output before its scale."""
    D, F, s = hidden, fusion_dim, act_bytes
    X = exclusion_width(F)
    return s * D + 2 * 4 * D + 2 * (2 * 4 * D + 4 * D) + s * 4 * (F + X)


def gate_activation_bytes(
    batch_size: int,
    rows: int,
    row_tokens: int,
    question_tokens: int,
    reader_dim: int,
    hidden: int,
    act_bytes: int,
    encoder: int = 0,
) -> int:
    """Bytes one layer's reader keeps: per row token and per question token against each row, its
    projections, features, alignments and comparisons (about a dozen vectors of d, in the compute
    dtype); the alignment scores and both softmaxes per (row token, question token) and the span mix
    over slots, for the reading and the exclusion (float32); per question token its state and the
    question encoder's two vectors of `encoder`."""
    B, R, L, Q, d, s = batch_size, rows, row_tokens, question_tokens, reader_dim, act_bytes
    per_row = s * (L * 14 * d + Q * 9 * d) + 4 * (3 * L * Q + 2 * 2 * (L + 1) * L)
    return B * (R * per_row + s * Q * (hidden + 2 * encoder))


def estimate_from_shapes(
    backbone_config: Any,
    *,
    backbone_params: int,
    dtype: torch.dtype,
    autocast: bool,
    batch_size: int,
    max_seq_len: int,
    knowledge_dim: int,
    reader_dim: int,
    fusion_dim: int,
    knowledge_length: int,
    bank_rows: int,
    reader_encoder: int = ModelConfig.reader_encoder,
    gradient_checkpointing: bool,
    world: int,
    overhead: int = OVERHEAD_BYTES,
    rows: int = ModelConfig.top_k,
    question_tokens: int = QUESTION_TOKENS,
) -> MemoryEstimate:
    """The estimate from a transformers config (hidden_size, intermediate_size, ...) and numbers."""
    c = backbone_config
    D, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    d = getattr(c, "head_dim", None) or D // c.num_attention_heads
    K = knowledge_dim or D
    trainable = memory_module_params(D, L, reader_dim, fusion_dim, reader_encoder)
    s = 2 if autocast or dtype == torch.bfloat16 else 4
    H = c.num_attention_heads
    layer = layer_activation_bytes(D, c.intermediate_size, H, c.num_key_value_heads, d, s)
    tokens = batch_size * max_seq_len
    answer = batch_size * min(max_seq_len, ANSWER_TOKENS)  # the tokens that run with gradients
    logits = batch_size * LOSS_POSITIONS * V * (s + 4 + 4)  # logits, their float32 copy, log-softmax
    # Memory, outside what checkpointing recomputes: the fusion at each answer slot, each layer's
    # reader, and the rows' normalised token embeddings that every layer's reader shares.
    slots = knowledge_length + 1
    memory = L * (batch_size * slots * fusion_activation_bytes(D, fusion_dim, s))
    memory += L * gate_activation_bytes(
        batch_size, rows, knowledge_length, question_tokens, reader_dim, D, s, reader_encoder
    )
    memory += 4 * batch_size * rows * knowledge_length * D  # float32; one bf16 copy under autocast: at most this
    # The prompt's keys and values as attention keeps them for the answer's backward (repeated to H heads).
    split = (L + 1) * layer * answer + L * s * 2 * H * d * (tokens - answer) + memory + logits
    # Checkpointed: each layer keeps its input; one layer at a time is recomputed, and its gradients
    # are live beside it.
    checkpointed = L * s * D * tokens + 2 * layer * tokens + memory + logits
    elem = torch.finfo(dtype).bits // 8
    return MemoryEstimate(
        weights=backbone_params * elem,
        memory_modules=4 * trainable,
        optimizer=(8 + 4 + (4 if world > 1 else 0)) * trainable,
        activations=checkpointed if gradient_checkpointing else split,
        bank=bank_device_bytes(bank_rows, knowledge_length, K),
        overhead=overhead,
        backbone_params=backbone_params,
        trainable_params=trainable,
        dtype=str(dtype).removeprefix("torch."),
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        gradient_checkpointing=gradient_checkpointing,
        activations_checkpointed=checkpointed,
    )


def count_backbone_params(backbone_config: Any) -> int:
    """Exact parameter count of the causal LM a config describes, built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(backbone_config)
    return sum(p.numel() for p in model.parameters())  # tied embeddings count once


def estimate_memory(cfg: Any, bank_rows: int, device_type: str | None = None) -> MemoryEstimate:
    """The estimate for a resolved config (`model.qwen3_model_path` names a folder) and a bank of
    `bank_rows` rows, on the workers' device type (default: cuda when `training.use_gpu`)."""
    from transformers import AutoConfig

    from explicitlm.loading import backbone_dtype

    device_type = device_type or ("cuda" if cfg.training.use_gpu else "cpu")
    backbone_config = AutoConfig.from_pretrained(cfg.model.qwen3_model_path)
    dtype = backbone_dtype(cfg.model.dtype, device_type)
    m, tc = cfg.model, cfg.training
    return estimate_from_shapes(
        backbone_config,
        backbone_params=count_backbone_params(backbone_config),
        dtype=dtype,
        autocast=device_type == "cuda",
        batch_size=tc.batch_size,
        max_seq_len=m.max_seq_len,
        knowledge_dim=m.knowledge_dim,
        reader_dim=m.reader_dim,
        reader_encoder=m.reader_encoder,
        fusion_dim=m.fusion_dim,
        knowledge_length=m.knowledge_length,
        bank_rows=bank_rows,
        gradient_checkpointing=tc.gradient_checkpointing,
        world=tc.num_workers,
        overhead=OVERHEAD_BYTES if device_type == "cuda" else 0,
        rows=m.top_k,
    )


def job_estimate(cfg: Any, bank_rows: int) -> MemoryEstimate:
    """The driver's estimate for a resolved config, printed; raises MemoryEstimateError when it
    exceeds `training.gpu_memory_gb`."""
    estimate = estimate_memory(cfg, bank_rows)
    print(f"memory: estimate per {'GPU' if cfg.training.use_gpu else 'CPU'} worker: {estimate.summary()}")
    if cfg.training.use_gpu and cfg.training.gpu_memory_gb:
        estimate.check(int(cfg.training.gpu_memory_gb * 1e9), "a worker's GPU (training.gpu_memory_gb)")
    return estimate


def check_device_memory(estimate: dict[str, Any] | MemoryEstimate, device: torch.device) -> None:
    """On a GPU worker, before loading: stop when the estimate exceeds this device's memory."""
    if isinstance(estimate, dict):
        estimate = MemoryEstimate(**estimate)
    props = torch.cuda.get_device_properties(device)
    estimate.check(props.total_memory, f"this worker's {props.name}")
