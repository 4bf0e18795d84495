"""Tiny, offline FLUX-family diffusers folders for tests and the `demo` command.

Every component is the real class the diffusers pipeline expects, with a small config and seeded random weights.
Tokenizers are built here from an embedded English corpus with a deterministic BPE learner (the `tokenizers`
trainers break ties differently from run to run, which would change the written bytes), so nothing is downloaded.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import pathlib
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

FAMILIES = ("flux1", "flux2", "flux2-klein")
_PIPELINES = {"flux1": "FluxPipeline", "flux2": "Flux2Pipeline", "flux2-klein": "Flux2KleinPipeline"}

# Prompt-like English; the last lines are FLUX.2's system message, which Flux2Pipeline puts before every prompt.
_CORPUS = """\
a photo of a cat sitting on a wooden table next to a cup of coffee, soft morning light
an astronaut riding a horse on the surface of the moon, digital art, cinematic lighting
portrait of an old fisherman with a grey beard and a wool hat, oil painting, dramatic shadows
a futuristic city at night with neon signs, flying cars and rain on the streets, cyberpunk style
a bowl of fresh fruit with apples, oranges, grapes and bananas on a kitchen counter
a small red fox sleeping in the snow under a pine tree, wildlife photography, shallow depth of field
watercolor painting of a lighthouse on a rocky coast during a storm, waves crashing against the rocks
a cozy living room with a fireplace, a green sofa, bookshelves and warm yellow lamps
macro photograph of a dewdrop on a leaf, reflecting the blue sky, extremely detailed, 8k
an ancient temple hidden in the jungle, covered with vines and moss, golden hour, volumetric light
a young woman reading a book in a cafe in paris, film photography, 35mm, natural colors
a steampunk robot playing the violin on a stage, brass gears, intricate details, studio lighting
a mountain landscape with a clear lake, snowy peaks and a wooden cabin, sunrise, panoramic view
children flying colorful kites on a sunny beach, summer afternoon, high resolution photograph
a black and white photo of a busy train station in the nineteen fifties, people walking, motion blur
a cute corgi wearing sunglasses and a tiny hat, sitting in a convertible car, pop art
the text "hello world" written in glowing letters on a chalkboard in a dark classroom
isometric illustration of a tiny island with a house, palm trees and a boat, pastel colors
a dragon flying over a medieval castle, fantasy concept art, epic scale, dark clouds and lightning
close up of a chef preparing sushi in a restaurant kitchen, steam rising, sharp focus
an abstract composition of circles, triangles and squares in bright primary colors, bauhaus poster
a field of sunflowers under a blue sky with white clouds, impressionist style, thick brush strokes
a vintage bicycle leaning against a brick wall covered with ivy, street photography
a glass of red wine and a plate of cheese on a terrace overlooking the sea at sunset
an underwater scene with coral reefs, tropical fish, sea turtles and rays of light from above
a knight in shining armor standing in a misty forest, holding a sword, photorealistic render
a minimalist logo of a mountain and a river, flat vector design, white background
a busy market street in marrakech with spices, lanterns and carpets, vivid colors, travel photo
a snow globe containing a tiny village with glowing windows, christmas atmosphere, bokeh
a scientist looking through a microscope in a modern laboratory, blue and white tones
two owls perched on a branch at night under a full moon, highly detailed illustration
a hot air balloon floating above a valley of vineyards, early morning fog, aerial view
a plate of pancakes with blueberries, maple syrup and butter, food photography, top down
an electric guitar on a stage with smoke and red spotlights, concert photography
a portrait of a girl with freckles and curly hair, looking at the camera, soft window light
the skyline of new york city seen from across the river, long exposure, reflections on the water
a cat and a dog sleeping together on a blanket, warm tones, 50mm lens, f/1.8
a spaceship landing on an alien planet with purple plants and two suns in the sky, sci-fi art
a traditional japanese garden with a red bridge, a koi pond and cherry blossoms in spring
a detailed pencil sketch of a human hand holding a feather, cross hatching, paper texture
You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships,
object attribution and actions without speculation.
"""

# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------
# Qwen2's pre-tokenizer split (a GPT-4 style regex); tekken splits text much the same way.
_BYTE_LEVEL_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# Same shape as Mistral Small 3.1's template: one system prompt, then [INST] blocks whose content is a list of
# {"type": "text" | "image", ...} parts (as `Flux2Pipeline` sends them) or a plain string.
_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if messages[0]['content'] is string %}{%- set system_message = messages[0]['content'] %}"
    "{%- else %}{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for block in message['content'] %}"
    "{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}"
    "{%- else %}{{- raise_exception('Only text and image blocks are supported in message content!') }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- if message['content'] is string %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- message['content'][0]['text'] + eos_token }}{%- endif %}"
    "{%- else %}{{- raise_exception('Only user, system and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)

# Same shape as Qwen3's template, including the empty think block `enable_thinking=False` adds.
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# tekken's first control tokens, in tekken's id order ([IMG] = 10 is Mistral3's image_token_index).
_MISTRAL_SPECIALS = (
    "<unk> <s> </s> [INST] [/INST] [AVAILABLE_TOOLS] [/AVAILABLE_TOOLS] [TOOL_RESULTS] [/TOOL_RESULTS] [TOOL_CALLS] "
    "[IMG] <pad> [IMG_BREAK] [IMG_END] [PREFIX] [MIDDLE] [SUFFIX] [SYSTEM_PROMPT] [/SYSTEM_PROMPT] [TOOL_CONTENT]"
).split()


def _learn_bpe(words: Counter, num_merges: int, suffix: str = "") -> tuple[list[tuple[str, str]], Counter]:
    """Greedy BPE on `words` (pre-tokenized string -> count); returns the merges and the final pieces' counts.

    Merging goes on down to pairs seen once, so most corpus words end up whole, as in a real large vocab. Ties
    break on the pair itself, so every run learns the same merges. Pair counts are updated incrementally and
    kept in a lazy max-heap, which keeps this at a few milliseconds for the embedded corpus.
    """
    seqs = [tuple(w[:-1]) + (w[-1] + suffix,) for w in words]
    counts = list(words.values())
    pairs, where, touched = Counter(), defaultdict(set), set()

    def account(i: int, sign: int):
        for pair in zip(seqs[i], seqs[i][1:]):
            pairs[pair] += sign * counts[i]
            where[pair].add(i)
            touched.add(pair)

    for i in range(len(seqs)):
        account(i, 1)
    heap = [(-n, pair) for pair, n in pairs.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < num_merges:
        n, best = heapq.heappop(heap)
        if -n != pairs[best] or n == 0:
            continue  # stale entry: the count changed after it was pushed
        merges.append(best)
        touched.clear()
        for i in sorted(where.pop(best)):
            account(i, -1)
            out, j, syms = [], 0, seqs[i]
            while j < len(syms):
                if syms[j : j + 2] == best:
                    out.append(best[0] + best[1])
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            seqs[i] = tuple(out)
            account(i, 1)
        for pair in sorted(touched):
            if pairs[pair] > 0:
                heapq.heappush(heap, (-pairs[pair], pair))
    pieces = Counter()
    for syms, n in zip(seqs, counts):
        for s in syms:
            pieces[s] += n
    return merges, pieces


def _words(normalizer, pre_tokenizer, lines: Iterable[str]) -> Counter:
    words = Counter()
    for line in lines:
        text = normalizer.normalize_str(line) if normalizer else line
        words.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    return words


def _byte_level_bpe(num_merges: int, specials: list[str], specials_first: bool):
    """Vocab and merges of a GPT-2 style byte-level BPE (the kind Qwen2 and Mistral's tekken use)."""
    merges, _ = _learn_bpe(_words(normalizers.NFC(), _byte_level_pre_tokenizer(), _CORPUS.splitlines()), num_merges)
    tokens = sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges]
    tokens = specials + tokens if specials_first else tokens + specials
    return {t: i for i, t in enumerate(tokens)}, merges


def _byte_level_pre_tokenizer():
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_BYTE_LEVEL_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    base = CLIPTokenizer()  # empty vocab: used only for CLIP's normalizer and pre-tokenizer
    words = _words(base.backend_tokenizer.normalizer, base.backend_tokenizer.pre_tokenizer, _CORPUS.splitlines())
    merges, _ = _learn_bpe(words, 1000, suffix="</w>")
    # CLIP's id order: 256 byte symbols, the same with "</w>", merged symbols, then the two special tokens.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    # A Unigram vocab: the pieces BPE splits the corpus into, scored by log frequency. Every printable Latin-1
    # character is a piece too, so any English prompt tokenizes; other characters (emoji, CJK) become <unk>.
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])
    _, pieces = _learn_bpe(_words(None, pre, _CORPUS.splitlines()), 1000)
    for c in [*map(chr, range(33, 127)), *map(chr, range(161, 256)), "\u2581"]:
        pieces[c] += 1
    total = sum(pieces.values())
    ranked = sorted(pieces.items(), key=lambda kv: (-kv[1], kv[0]))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, round(math.log(n / total), 4)) for p, n in ranked]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _mistral_tokenizer():
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _byte_level_bpe(1000, _MISTRAL_SPECIALS, specials_first=True)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _byte_level_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _MISTRAL_SPECIALS])
    # Mistral prepends <s> when tokenizing without a template (the chat template writes it itself).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=131072, chat_template=_MISTRAL_CHAT_TEMPLATE,
    )


def _qwen3_tokenizer():
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # <think> and </think> are plain added tokens in Qwen3, not special ones.
    vocab, merges = _byte_level_bpe(1000, specials + ["<think>", "</think>"], specials_first=False)
    tok = Qwen2TokenizerFast(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        model_max_length=131072, chat_template=_QWEN3_CHAT_TEMPLATE,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials[1:]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX.1-dev's and FLUX.2's settings; both pipelines pass `mu`, which needs dynamic shifting.
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    # Two blocks: latents are 1/2 of the image; 4 latent channels -> 16 after the pipeline's 2x2 patchify.
    return AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
    )


def _flux2_transformer(joint_attention_dim: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )


def _build_flux1(seeded):
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer()
    # CLIP's pooled output (hidden 32) feeds pooled_projection_dim, T5's states (d_model 48) joint_attention_dim;
    # different widths make a swapped pair of tensors fail loudly downstream.
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    t5_config = T5Config(
        vocab_size=len(tokenizer_2), d_model=48, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return FluxPipeline(
        scheduler=_scheduler(),
        text_encoder=seeded(CLIPTextModel, clip_config),
        tokenizer=tokenizer,
        text_encoder_2=seeded(T5EncoderModel, t5_config),
        tokenizer_2=tokenizer_2,
        # in_channels 16 = 4 latent channels x the pipeline's 2x2 packing; rope axes (4, 4, 8) sum to the head dim.
        transformer=seeded(
            FluxTransformer2DModel, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 4, 8),
        ),
        vae=seeded(
            AutoencoderKL, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
            use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
        ),
    )


def _build_flux2(seeded):
    from diffusers import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tokenizer = _mistral_tokenizer()
    # 31 layers: hidden_states[30], the deepest one the pipeline stacks, must not be the last one, which
    # transformers returns after the final norm (the real model has 40 layers).
    text_config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=31, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, sliding_window=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=11,
    )
    vision_config = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
        image_size=32, patch_size=8,
    )
    config = Mistral3Config(text_config=text_config, vision_config=vision_config, image_token_index=10)
    return Flux2Pipeline(
        scheduler=_scheduler(),
        text_encoder=seeded(Mistral3ForConditionalGeneration, config),
        tokenizer=tokenizer,
        transformer=seeded(_flux2_transformer, joint_attention_dim=3 * 32, guidance_embeds=True),
        vae=seeded(_flux2_vae),
    )


def _build_flux2_klein(seeded):
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _qwen3_tokenizer()
    # 28 layers: hidden_states[27], the deepest one stacked, must not be the final-normed last one (real: 36).
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    # Like FLUX.2 [klein] 4B: step-distilled, so no guidance embedding and no CFG pass.
    return Flux2KleinPipeline(
        scheduler=_scheduler(),
        text_encoder=seeded(Qwen3ForCausalLM, config),
        tokenizer=tokenizer,
        transformer=seeded(_flux2_transformer, joint_attention_dim=3 * 24, guidance_embeds=False),
        vae=seeded(_flux2_vae),
        is_distilled=True,
    )


_BUILDERS = {"flux1": _build_flux1, "flux2": _build_flux2, "flux2-klein": _build_flux2_klein}
# transformers 5 names its tokenizers without "Fast"; the published model_index.json files use these names,
# which also resolve in transformers 4 (where the non-Fast classes would need sentencepiece/vocab files).
_TOKENIZER_CLASSES = {
    "flux1": {"tokenizer": "CLIPTokenizer", "tokenizer_2": "T5TokenizerFast"},
    "flux2": {"tokenizer": "PreTrainedTokenizerFast"},
    "flux2-klein": {"tokenizer": "Qwen2TokenizerFast"},
}


def _write(family: str, seed: int, out: pathlib.Path):
    counter = iter(range(1000))

    def seeded(build, *args, **kwargs):
        # Each component gets its own seed, so adding one never changes another's weights.
        torch.manual_seed(seed * 1000 + next(counter))
        return build(*args, **kwargs).eval()

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        pipe = _BUILDERS[family](seeded)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars for a 1 MB model
    try:
        pipe.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for file in out.rglob("*"):
        if file.is_file():
            file.chmod(0o644)  # safetensors files come out 0600; a shared model folder should be readable
    index_file = out / "model_index.json"
    index = json.loads(index_file.read_text())
    for name, cls in _TOKENIZER_CLASSES[family].items():
        index[name] = ["transformers", cls]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _is_complete(path: pathlib.Path, family: str) -> bool:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    if index.get("_class_name") != _PIPELINES[family]:
        return False
    parts = [name for name, value in index.items() if isinstance(value, list) and value[0] is not None]
    return all((path / name).is_dir() and any((path / name).iterdir()) for name in parts)


def make_tiny_model(
    path: str | os.PathLike, family: str = "flux1", *, seed: int = 0, overwrite: bool = False
) -> pathlib.Path:
    r"""
    Write a complete, small diffusers folder for a FLUX family, fully offline.

    Every component is the class the diffusers pipeline loads (for example `FluxTransformer2DModel`,
    `T5EncoderModel`, `Mistral3ForConditionalGeneration`, `Qwen3ForCausalLM`) with a tiny config and seeded random
    weights; tokenizers are trained here on an embedded English corpus. The result loads with the pipeline's plain
    `from_pretrained` and produces (noise) images in well under a second on a CPU.

    Args:
        path (`str` or `os.PathLike`):
            The folder to write. It is built in a hidden sibling folder and renamed into place, so a crash never
            leaves a half-written model here.
        family (`str`, *optional*, defaults to `"flux1"`):
            One of `FAMILIES`: `"flux1"` (`FluxPipeline`), `"flux2"` (`Flux2Pipeline`) or `"flux2-klein"`
            (`Flux2KleinPipeline`).
        seed (`int`, *optional*, defaults to 0):
            Seed of the random weights. The same seed writes the same bytes.
        overwrite (`bool`, *optional*, defaults to `False`):
            Rebuild even if `path` already holds a complete model of `family`, and replace whatever `path` holds.

    Returns:
        `pathlib.Path`: `path`, made absolute.

    Raises:
        `ValueError`: if `family` is unknown.
        `FileExistsError`: if `path` exists, is not empty and holds no complete `family` model, and `overwrite` is
            `False`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = pathlib.Path(os.path.abspath(path))
    if not overwrite and _is_complete(path, family):
        return path
    if not overwrite and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and does not hold a complete {family} model; pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex}")
    try:
        _write(family, seed, tmp)
        if path.is_dir() and not path.is_symlink():
            os.replace(path, old)  # a directory cannot be renamed over a non-empty one: move it aside first
        elif path.exists() or path.is_symlink():
            path.unlink()
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process finished the same model first: use theirs.
            if not overwrite and _is_complete(path, family):
                return path
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path
