#!/usr/bin/env python3
"""Train the small byte-level BPE test tokenizer used by fila-data's tests.

There is no network here to fetch Llama-3's tokenizer, so we train a ~800-token BPE with Llama-3's
pre-tokenizer split rule on a built-in English text, add Llama-3's chat special tokens and `<image>`,
and save `tokenizer.json` plus (text -> ids) pairs that a Rust test re-encodes with the `tokenizers`
crate to prove both libraries agree.

    python scripts/data_make_tokenizer.py   # writes crates/fila-data/tests/fixtures/tokenizer*.json
"""
import json
import pathlib

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = pathlib.Path(__file__).resolve().parent.parent / "crates/fila-data/tests/fixtures"

# Llama-3's split rule (tiktoken cl100k style), as in Meta-Llama-3's tokenizer.json.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<image>",
]
CORPUS = """
The quick brown fox jumps over the lazy dog. A picture shows a cat sitting on a red sofa next to
a window. What is in the image? The image shows two people walking along a beach at sunset, with
waves rolling in and birds flying overhead. Describe the scene in detail. There is a small boat
on the water and a lighthouse in the distance. How many apples are on the table? There are three
green apples and one red apple on a wooden table. The sign says "Open 24 hours". What colour is
the car? The car is blue, parked near a tree in front of a white house. A man is riding a bicycle
down the street while a woman walks her dog. The chart shows sales rising from 120 to 480 between
2019 and 2023. Please read the text in the photo: it says 'Welcome to the museum of modern art'.
The kitchen has a stove, a fridge, and a sink; the walls are painted yellow. Children are playing
football in the park, and the sky is clear and bright. Is there a person in the picture? Yes, a
young girl wearing a hat is holding a balloon. The document is a receipt dated 12/05/2021 with a
total of $45.99. The mountain is covered in snow and the trees below are green.
""" * 4

CASES = [
    "Hello world!",
    "What is in the image?",
    "The image shows two people walking along a beach at sunset.",
    "  leading spaces and\nnew lines\n\n",
    "Numbers 1234567 and 3.14159, dates 12/05/2021.",
    "It's what they'll say; we've done it, I'm sure you'd agree.",
    "unicode: café naïve Ωmega 東京",
    "user",
    "assistant",
]


def main() -> None:
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_special_tokens(SPECIAL)
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in CASES]
    specials = {s: tok.token_to_id(s) for s in SPECIAL}
    (OUT / "tokenizer_cases.json").write_text(json.dumps({"special": specials, "cases": cases}, indent=1))
    print("vocab", tok.get_vocab_size(), "specials", specials)


if __name__ == "__main__":
    main()
