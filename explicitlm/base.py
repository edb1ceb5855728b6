"""A tiny Qwen3 the project builds itself: a byte-level BPE tokenizer trained locally and a
random-init `Qwen3ForCausalLM`, saved with `save_pretrained` so that the same
`from_pretrained(folder)` path loads it and a real Qwen3 checkpoint alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, the format of Qwen's own template, without the tool and think machinery.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_texts() -> Iterator[str]:
    """The sample world's questions, options and sentences: the tokenizer's training text."""
    from explicitlm.world import geography_facts, make_questions, sentence

    facts = geography_facts()
    for f in facts:
        yield sentence(f)
    for t in make_questions(facts, seed=0):
        yield t["question"]
        yield t["options"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192):
    """Byte-level BPE (GPT-2/Qwen style) trained on `texts`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen3_config(vocab_size: int, hidden_size: int = 256, num_layers: int = 4, **overrides):
    """A Qwen3 small enough to train memory modules on 2 CPU cores; embeddings tied to the output."""
    from transformers import Qwen3Config

    heads = max(hidden_size // 64, 1)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def make_base(
    output: str | Path,
    texts: Iterable[str] | None = None,
    seed: int = 0,
    vocab_size: int = 8192,
    hidden_size: int = 256,
    num_layers: int = 4,
) -> Path:
    """Build tokenizer + random Qwen3 into `output`; the same seed and text give the same files."""
    from transformers import Qwen3ForCausalLM

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(default_texts() if texts is None else texts, vocab_size)
    config = tiny_qwen3_config(
        len(tokenizer),
        hidden_size,
        num_layers,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output


def is_base_folder(path: str | Path) -> bool:
    return (Path(path) / "config.json").exists() and (Path(path) / "tokenizer_config.json").exists()


def pretrain(folder: str | Path, texts: Iterable[str], steps: int, seed: int = 0, block: int = 64, batch: int = 32):
    """Train the whole base in `folder` as a causal LM on `texts` for `steps` AdamW steps (blocks of
    `block` tokens, each text closed by the end-of-text token), saved back in place; returns the mean
    loss of the last 50 steps. A random base's states carry only which token they are; a pretrained
    Qwen3's carry what the words mean, which is what a memory reader reads a wording it never saw by."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = Qwen3ForCausalLM.from_pretrained(folder)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids = [t for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"] for t in [*ids, end]]
    if len(ids) < block:
        raise ValueError(f"pretraining needs at least one block of {block} tokens; the texts make {len(ids)}")
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    batch = min(batch, len(blocks))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps, pct_start=0.05)
    model.train()
    order, at, losses = torch.randperm(len(blocks), generator=generator), 0, []
    for _ in range(steps):
        if at + batch > len(blocks):  # a pass is done: the next in a new order
            order, at = torch.randperm(len(blocks), generator=generator), 0
        x = blocks[order[at : at + batch]]
        at += batch
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(folder)
    return sum(losses[-50:]) / len(losses[-50:])
