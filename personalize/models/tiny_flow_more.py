"""Qwen-Image, Z-Image, HiDream-I1 and Krea 2 pipelines from their published configs at reduced depth, in code.

Each transformer keeps its published structure (personalize.models.families.<family>.published): the real
head size (128) and rotary axes, patching, MoE layout (HiDream: 4 routed experts, 2 active), GQA ratio
(Krea 2), with `layers` blocks and `heads` heads (the published width is heads x 128: 24 for Qwen-Image,
30 for Z-Image, 20 for HiDream, 48 for Krea 2; `heads=` the published count gives the real width). The
text encoders are the real architectures (Qwen2.5-VL, Qwen3, CLIP-L/G + T5 + Llama-3.1, Qwen3-VL) at
two layers and a small width that the transformer takes; Qwen-Image and Krea 2 get a small 8x
video-style VAE (AutoencoderKLQwenImage, 16 channels, the published latent mean/std), Z-Image and
HiDream the Flux VAE layout (tiny_flow). Tokenizers are byte-level BPEs built here (Qwen chat specials).

    pipe = reduced_qwen_image(layers=1, heads=2)    # tiny-qwen-image
    pipe = reduced_z_image(layers=2, heads=30)      # Z-Image's real width (3840), two blocks
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache, partial, wraps
from typing import Any

from personalize.models.families import FLOW_FAMILIES
from personalize.models.tiny_diffusion import _clip_text_config, _seeded
from personalize.models.tiny_flow import FLUX_VAE, _t5, _vae
from personalize.models.tiny_tokenizers import bytes_to_unicode, corpus_words, learn_bpe, tiny_clip_tokenizer

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_SPECIALS += ["<|image_pad|>", "<|video_pad|>"]
# Qwen-Image's system prompt: with each word one token, its template is 34 tokens as with Qwen's real vocabulary
# (the pipelines drop exactly 34), and Krea 2's suffix is 5.
TEMPLATE_WORDS = [
    "detailing",
    "color",
    "shape",
    "size",
    "texture",
    "quantity",
    "text",
    "spatial",
    "relationships",
    "objects",
    "background",
]
# Qwen-Image-Edit's system prompt (the edit pipelines drop its first 64 tokens): the pieces Qwen's vocabulary
# holds as one token each, beyond the words
EDIT_TEMPLATE = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
EDIT_PIECES = [("color",), (" ", "("), (")", ","), ("'", "s")]
CHAT_TEMPLATE = (  # Qwen's ChatML (content a string, or VL-style text parts); the generation prompt opens the
    # assistant turn (Qwen3: thinking enabled)
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=2)
def _qwen_vocab(edit: bool = False) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2-style byte-level BPE (Qwen2Tokenizer's layout): byte symbols, merges with 'Ġ' marking a space,
    then Qwen's special tokens (the last ids, as in Qwen's vocabulary). `edit`: also the edit template's."""
    symbols = bytes_to_unicode()
    vocab_list = list(symbols.values())
    space = symbols[ord(" ")]
    template = TEMPLATE_WORDS + (re.findall(r"[a-z]+", EDIT_TEMPLATE, flags=re.IGNORECASE) if edit else [])
    words = Counter(tuple(space + word) for word in corpus_words() + template)
    words.update(tuple(word) for word in ("system", "user", "assistant", "Describe"))  # after a special / newline
    if edit:
        words.update(tuple(symbols[ord(c)] for c in "".join(piece)) for piece in EDIT_PIECES)
    merges = learn_bpe(words, 4000)  # until every word is one token
    vocab_list += ["".join(pair) for pair in merges if "".join(pair) not in vocab_list]
    vocab_list += QWEN_SPECIALS
    return {token: index for index, token in enumerate(vocab_list)}, merges


def qwen_tokenizer(max_length: int = 1024, edit: bool = False) -> Any:
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab(edit)
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _seeded_builder(build: Any) -> Any:
    """tiny_diffusion's fixed seed for builders that take arguments."""

    @wraps(build)
    def run(*args: Any, **kwargs: Any) -> Any:
        bound = wraps(build)(partial(build, *args, **kwargs))
        return _seeded(bound)()

    return run


def _published(family: str, overrides: dict[str, Any]) -> dict[str, Any]:
    config = {**next(iter(FLOW_FAMILIES[family].published.values())), **overrides}
    return {key: value for key, value in config.items() if not key.startswith("_")}


def qwen_vae() -> Any:
    """AutoencoderKLQwenImage's layout (8x, 16 channels, causal 3D convolutions, published mean/std), narrow."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=16, z_dim=16, num_res_blocks=1)


def _text_config(width: int, layers: int, heads: int = 2) -> dict[str, Any]:
    return dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads)


def qwen25_vl(width: int, vocab: int, layers: int = 2) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head = width // 2
    rope = {"rope_type": "default", "mrope_section": [head // 8, 3 * head // 16, 3 * head // 16]}  # Qwen's 2:3:3
    text: dict[str, Any] = {**_text_config(width, layers), "num_key_value_heads": 2, "rope_parameters": rope}
    text["vocab_size"] = vocab
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": width}
    special = {name: vocab - len(QWEN_SPECIALS) + QWEN_SPECIALS.index(name) for name in QWEN_SPECIALS}
    text.update(bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"])
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        vocab_size=vocab,
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config)


@_seeded_builder
def _qwen_image(layers: int, heads: int, text_width: int, pipeline: str) -> Any:
    import diffusers

    config = _published(
        "qwen-image", {"num_layers": layers, "num_attention_heads": heads, "joint_attention_dim": text_width}
    )
    edit = "Edit" in pipeline  # the edit pipelines also take Qwen2-VL's processor (the encoder sees the source)
    tokenizer = qwen_tokenizer(edit=edit)
    extra = {"processor": _qwen_processor(tokenizer)} if edit else {}
    return getattr(diffusers, pipeline)(
        transformer=diffusers.QwenImageTransformer2DModel(**config),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=qwen_vae(),
        text_encoder=qwen25_vl(text_width, len(tokenizer)),
        tokenizer=tokenizer,
        **extra,
    )


def _qwen_processor(tokenizer: Any) -> Any:
    from personalize.models.vl_processor import ImageOnlyQwen2VLProcessor, image_processor_class

    return ImageOnlyQwen2VLProcessor(image_processor_class()(), tokenizer, chat_template=tokenizer.chat_template)


QWEN_SCHEDULER = dict(  # Qwen/Qwen-Image's scheduler config (resolution-dependent shift at inference)
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    shift=1.0,
    shift_terminal=0.02,
    use_dynamic_shifting=True,
    time_shift_type="exponential",
)


def reduced_qwen_image(
    layers: int = 1, heads: int = 2, text_width: int = 64, pipeline: str = "QwenImagePipeline"
) -> Any:
    """A QwenImagePipeline (or `pipeline`: QwenImageEditPipeline, QwenImageEditPlusPipeline) with Qwen-Image's
    transformer config at `layers` blocks and `heads` heads of 128."""
    return _qwen_image(layers, heads, text_width, pipeline)


@_seeded_builder
def reduced_z_image(layers: int = 1, refiner_layers: int = 1, heads: int = 2, text_width: int = 64) -> Any:
    """A ZImagePipeline with Z-Image's transformer config (heads of 128, Qwen3 captions, Flux VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    config = _published("z-image", {"n_layers": layers, "n_refiner_layers": refiner_layers, "n_heads": heads})
    config.update(n_kv_heads=heads, dim=heads * 128, cap_feat_dim=text_width)
    tokenizer = qwen_tokenizer(512)
    text = Qwen3Config(**_text_config(text_width, 2), num_key_value_heads=2, head_dim=32, vocab_size=len(tokenizer))
    return ZImagePipeline(
        transformer=ZImageTransformer2DModel(**config),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # Z-Image(-Turbo)'s: a static shift of 3
        vae=_vae(16, FLUX_VAE),
        text_encoder=Qwen3Model(text),
        tokenizer=tokenizer,
    )


def _long_clip(hidden: int, projection: int) -> Any:
    """HiDream's CLIPs take 128 tokens (the pipeline pads to min(128, 218)): 248 positions, as Long-CLIP."""
    from transformers import CLIPTextModelWithProjection

    config = _clip_text_config(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.max_position_embeddings, config.projection_dim = 248, projection
    return CLIPTextModelWithProjection(config)


@_seeded_builder
def reduced_hidream(layers: int = 1, single_layers: int = 1, heads: int = 2, text_width: int = 64) -> Any:
    """A HiDreamImagePipeline with HiDream-I1's transformer config (MoE feed-forward, four text encoders)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from personalize.models.tiny_tokenizers import tiny_llama_tokenizer

    llama_layers = 2
    blocks = layers + single_layers
    config = _published("hidream", {"num_layers": layers, "num_single_layers": single_layers})
    config.update(num_attention_heads=heads, caption_channels=[text_width, text_width], text_emb_dim=64)
    config["llama_layers"] = [min(index, llama_layers - 1) for index in range(blocks)]  # the published pattern
    tokenizer_4 = tiny_llama_tokenizer(128)
    llama = LlamaConfig(**_text_config(text_width, llama_layers), num_key_value_heads=2, vocab_size=len(tokenizer_4))
    llama.update(dict(pad_token_id=tokenizer_4.pad_token_id, bos_token_id=tokenizer_4.bos_token_id))
    text_encoder_3, tokenizer_3 = _t5(text_width, 128)
    return HiDreamImagePipeline(
        transformer=HiDreamImageTransformer2DModel(**config),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # HiDream-I1-Full's
        vae=_vae(16, FLUX_VAE),
        text_encoder=_long_clip(32, projection=24),  # pooled 24 + 40 = text_emb_dim (real: 768 + 1280 = 2048)
        tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_long_clip(40, projection=40),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        text_encoder_4=LlamaForCausalLM(llama),
        tokenizer_4=tokenizer_4,
    )


@_seeded_builder
def reduced_krea2(layers: int = 1, heads: int = 4, text_width: int = 64) -> Any:
    """A Krea2Pipeline with Krea 2's transformer config (GQA 4:1, 12-layer text fusion -> 3 taps here)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    taps = (1, 2, 3)  # Krea 2 taps every third of Qwen3-VL-4B's 36 layers (hidden_states 2, 5, ..., 35)
    config = _published("krea2", {"num_layers": layers, "num_attention_heads": heads})
    config.update(num_key_value_heads=max(heads // 4, 1), intermediate_size=heads * 128 * 8 // 3)
    config.update(text_hidden_dim=text_width, num_text_layers=len(taps), text_num_attention_heads=2)
    config.update(text_num_key_value_heads=2, text_intermediate_size=2 * text_width)
    config.update(num_layerwise_text_blocks=1, num_refiner_text_blocks=1)
    tokenizer = qwen_tokenizer()
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    text = {**_text_config(text_width, len(taps)), "num_key_value_heads": 2, "head_dim": 16, "rope_parameters": rope}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": text_width}
    encoder = Qwen3VLModel(Qwen3VLConfig(text_config={**text, "vocab_size": len(tokenizer)}, vision_config=vision))
    return Krea2Pipeline(
        transformer=Krea2Transformer2DModel(**config),
        scheduler=FlowMatchEulerDiscreteScheduler(**KREA2_SCHEDULER),
        vae=qwen_vae(),
        text_encoder=encoder,
        tokenizer=tokenizer,
        text_encoder_select_layers=taps,
    )


KREA2_SCHEDULER = dict(  # resolution-aware dynamic shifting, as Krea 2's pipeline config
    use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=6400
)


QWEN21_SCHEDULER = dict(  # resolution-dependent shift, QwenImage21Pipeline's calculate_shift defaults
    use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
)


@_seeded_builder
def reduced_qwen_image21(layers: int = 1, heads: int = 2, text_width: int = 64) -> Any:
    """A QwenImage21Pipeline: the single-stream 2.1 transformer (heads of 128) on a 16x RGBA VAE's 64 unpatched
    latent channels, a Qwen3-VL text encoder and its processor (read without torchvision)."""
    import diffusers
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from personalize.models.vl_processor import ImageOnlyQwen3VLProcessor, image_processor_class

    config = _published("qwen-image-21", {"num_layers": layers, "num_attention_heads": heads})
    tokenizer = qwen_tokenizer()
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    text = {**_text_config(text_width, 2), "num_key_value_heads": 2, "head_dim": 16, "rope_parameters": rope}
    special = {name: len(tokenizer) - len(QWEN_SPECIALS) + QWEN_SPECIALS.index(name) for name in QWEN_SPECIALS}
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": text_width}
    encoder = Qwen3VLConfig(
        text_config={**text, "vocab_size": len(tokenizer)},
        vision_config={**vision, "deepstack_visual_indexes": []},
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
    )
    # Qwen3-VL's pixel bounds: a condition picture keeps the size the VAE sees (one slot per 32 px tile)
    images = image_processor_class()(patch_size=16, merge_size=2, size={"shortest_edge": 65536, "longest_edge": 2**24})
    return diffusers.QwenImage21Pipeline(
        transformer=diffusers.QwenImage21Transformer2DModel(**{**config, "context_in_dim": text_width}),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN21_SCHEDULER),
        vae=diffusers.AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=8, num_res_blocks=1),
        text_encoder=Qwen3VLForConditionalGeneration(encoder),
        processor=ImageOnlyQwen3VLProcessor(images, tokenizer, chat_template=tokenizer.chat_template),
    )


def tiny_qwen_image21() -> Any:
    return reduced_qwen_image21()


def tiny_qwen_image() -> Any:
    return reduced_qwen_image()


def tiny_qwen_image_edit() -> Any:
    return _qwen_image(1, 2, 64, "QwenImageEditPipeline")


def tiny_qwen_image_edit_plus() -> Any:
    return _qwen_image(1, 2, 64, "QwenImageEditPlusPipeline")


def tiny_z_image() -> Any:
    return reduced_z_image()


def tiny_hidream() -> Any:
    pipe = reduced_hidream()
    # HiDream's pipeline renders at the area (default_sample_size x 8)^2 whatever size is asked (1024 px);
    # the tiny model's is 32 px like the other tiny models (an attribute: a saved folder renders 1024 px again)
    pipe.default_sample_size = 4
    return pipe


def tiny_krea2() -> Any:
    return reduced_krea2()
