"""Tiny GPT-2 models built from a config (no hub, no downloads): an untrained one that merge-method, YAML and I/O
tests share, and a word-level one that has memorised a few facts."""

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

FACTS = [
    "red is a color", "blue is a color", "two is a number", "seven is a number",
    "dog is an animal", "cat is an animal", "paris is a city", "rome is a city",
]  # fmt: skip


def build_tiny_gpt2(folder, n_layer=3, seed=0):
    """An untrained tiny GPT-2 (3 blocks of width 16, vocabulary 24, 8 positions) saved as a Hugging Face folder."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, n_positions=8, vocab_size=24, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 8}\n')
    return model


def build_tiny_lm(folder, steps=300, seed=0):
    words = sorted({w for f in FACTS for w in f.split()})
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16, vocab_size=len(vocab),
                     bos_token_id=2, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    ids = [tok(f + " </s>")["input_ids"] for f in FACTS]
    batch = torch.tensor(ids)  # all facts have the same length
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok
