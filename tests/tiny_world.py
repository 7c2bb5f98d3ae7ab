"""A tiny, fully local world for tests: a GPT-2 built from GPT2Config, a byte-level BPE
tokenizer trained with `tokenizers` on generated stories, and the stories as a corpus.

Everything is saved the way the hub ships it (`save_pretrained`, tokenizer.json), so the tests
load it through the same `from_pretrained` path as the real `gpt2`.

    python tests/tiny_world.py runs/tiny-world      # what configs/tiny.yaml points at

`build_massive` makes a variant with planted massive activations, as real language models have.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

NAMES = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna", "Max", "Sue"]
ANIMALS = ["dog", "cat", "bird", "fish", "bunny", "frog", "bear", "duck"]
PLACES = ["park", "garden", "forest", "house", "school", "beach", "farm", "town"]
THINGS = ["ball", "kite", "cake", "box", "hat", "toy", "apple", "book"]
FEELINGS = ["happy", "sad", "scared", "excited", "tired", "angry", "proud", "kind"]
COLOURS = ["red", "blue", "green", "yellow", "big", "small", "shiny", "soft"]
MASSIVE_FIRST_TOKEN = {7: 100.0}
"""Residual dimension -> value planted on the first token (the tiny world's residual is ~0.3 per
dimension, so ~300x), like SmolLM2-135M's dimension 507 (~22,000 at position 0)."""
MASSIVE_EVERY_TOKEN = {19: 10.0, 42: 5.0}
"""Residual dimension -> constant written on every token by block 0's MLP (~30x and ~15x), like
SmolLM2-135M's dimensions 247 (~1,600) and 14 (~800)."""


def story(rng: random.Random) -> str:
    n, m = rng.sample(NAMES, 2)
    a, p, t, f, c = (rng.choice(x) for x in (ANIMALS, PLACES, THINGS, FEELINGS, COLOURS))
    lines = [
        f"Once upon a time, there was a little {a} named {n}.",
        f"{n} liked to play in the {p} with a {c} {t}.",
        f"One day, {n} met {m}. \"Can I play with your {t}?\" asked {m}.",
        f"{n} was {f}. {n} said, \"Yes, you can!\"",
        f"They played all day and {m} was {rng.choice(FEELINGS)} too.",
        f"At the end of the day, they went home to eat {rng.choice(THINGS)}s. The end.",
    ]
    return " ".join(lines[: rng.randint(3, len(lines))])


def write_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": story(rng)}) + "\n")


def build(out: Path, n_docs: int = 400, vocab_size: int = 512, n_layer: int = 4, n_embd: int = 64) -> Path:
    """Write model/, corpus.jsonl and corpus.txt under `out`; return `out`. Idempotent."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = Path(out)
    model_dir = out / "model"
    if (model_dir / "model.safetensors").exists() and (out / "corpus.jsonl").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_corpus(out / "corpus.jsonl", n_docs)
    texts = [json.loads(line)["text"] for line in (out / "corpus.jsonl").read_text().splitlines()]
    (out / "corpus.txt").write_text("\n\n".join(texts[:50]) + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=n_embd, n_layer=n_layer, n_head=4,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    train_briefly(model, fast, texts)
    model.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return out


def build_massive(out: Path, base: Path) -> Path:
    """The tiny world (built at `base` if needed) with massive activations planted in its model:
    `MASSIVE_FIRST_TOKEN` through the position-0 embedding, `MASSIVE_EVERY_TOKEN` through block 0's
    MLP output bias, so the residual stream from block 1 on has a few dimensions that dwarf the rest.
    Same tokenizer and corpus. Writes model/, corpus.jsonl and corpus.txt under `out`; returns `out`."""
    import shutil

    import torch
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    out, base = Path(out), build(Path(base))
    if (out / "model" / "model.safetensors").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = GPT2LMHeadModel.from_pretrained(base / "model")
    with torch.no_grad():
        for dim, value in MASSIVE_FIRST_TOKEN.items():
            model.transformer.wpe.weight[0, dim] += value
        for dim, value in MASSIVE_EVERY_TOKEN.items():
            model.transformer.h[0].mlp.c_proj.bias[dim] += value
    model.save_pretrained(out / "model")
    PreTrainedTokenizerFast.from_pretrained(base / "model").save_pretrained(out / "model")
    for name in ("corpus.jsonl", "corpus.txt"):
        shutil.copy2(base / name, out / name)
    return out


def train_briefly(model, tokenizer, texts: list[str], steps: int = 60) -> None:
    """A few steps of language modelling, so the residual stream has some structure and the
    CE-loss score of an SAE is meaningful (a random model's loss barely depends on layer 2).
    Documents follow <|endoftext|>, as in pretraining."""
    import torch

    ids = []
    for t in texts:
        ids += [tokenizer.convert_tokens_to_ids("<|endoftext|>")] + tokenizer(t)["input_ids"]
    data = torch.tensor(ids[: (len(ids) // 64) * 64]).view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (16,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-world")))
