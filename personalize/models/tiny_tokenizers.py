"""Small tokenizers built in code, so that tests and the offline demo never download one.

The CLIP tokenizer is a real byte-level BPE (same pre-tokenizer and special tokens as
openai/clip-vit-large-patch14) with a 1000-entry vocabulary learned from a short built-in
corpus; the T5 tokenizer is a Unigram model over the same words; the Llama tokenizer is a
byte-fallback BPE with a chat template. All are deterministic: the same code gives the same
vocabulary on every machine.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

# Words a prompt in our tests or demo is likely to use; anything else still tokenizes
# (byte-level fallback), just into more pieces.
CORPUS = """
a an the of in on at with and or to for by from is are was be this that photo picture image
painting drawing render sketch portrait close up closeup shot style art artwork high quality
detailed sharp blurry cat cats dog dogs kitten puppy person man woman face toy car house tree
sky grass beach mountain city street forest snow water river sea sunset night day light dark
red green blue yellow black white orange purple pink brown gray grey gold silver
sitting standing lying running looking wearing holding sleeping playing
small big large tiny cute beautiful old young new good bad best
sks ohwx zwx token trigger class subject instance regularization prior
question answer user assistant system what who where when why how yes no hello hi
one two three four five six seven eight nine ten zero
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def learn_bpe(words: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair)."""
    words = Counter(words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def corpus_words() -> list[str]:
    return CORPUS.split()


@lru_cache(maxsize=4)
def clip_vocab_and_merges(vocab_size: int = 1000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-layout vocabulary: 256 byte symbols, the same with `</w>`, merges, then specials."""
    byte_symbols = list(bytes_to_unicode().values())
    vocab_list = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    num_merges = vocab_size - len(vocab_list) - len(specials)
    words = Counter(tuple(word[:-1]) + (word[-1] + "</w>",) for word in corpus_words())
    merges = learn_bpe(words, num_merges)
    vocab_list += ["".join(pair) for pair in merges]
    # Pad with unused symbols when the corpus runs out of merges, so the size is exact.
    vocab_list += [f"<|unused{i}|>" for i in range(vocab_size - len(vocab_list) - len(specials))]
    vocab_list += specials
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return vocab, merges


def tiny_clip_tokenizer(vocab_size: int = 1000, max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(vocab_size)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 77):
    """Unigram pieces: specials, the word-start marker, single characters, then corpus words."""
    from transformers import T5Tokenizer

    characters = sorted({char for word in corpus_words() for char in word} | set("0123456789.,!?'-"))
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(char, -5.0) for char in characters]
    pieces += [("▁" + word, -3.0) for word in dict.fromkeys(corpus_words())]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


# A Llama-style template that marks assistant turns with {% generation %}, so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` yields the loss mask.
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@lru_cache(maxsize=2)
def llama_vocab_and_merges(num_merges: int = 200) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """SentencePiece-style BPE: specials, 256 byte-fallback tokens, characters, merges."""
    vocab_list = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    characters = sorted({char for word in corpus_words() for char in word})
    vocab_list += ["▁"] + [char for char in characters if char not in vocab_list]
    words = Counter(("▁",) + tuple(word) for word in corpus_words())
    merges = learn_bpe(words, num_merges)
    vocab_list += ["".join(pair) for pair in merges if "".join(pair) not in vocab_list]
    return {token: index for index, token in enumerate(vocab_list)}, merges


def tiny_llama_tokenizer(max_length: int = 512):
    from transformers import LlamaTokenizer

    vocab, merges = llama_vocab_and_merges()
    tokenizer = LlamaTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<image>"], "pad_token": "<pad>"}
    )
    tokenizer.chat_template = LLAMA_CHAT_TEMPLATE
    return tokenizer
