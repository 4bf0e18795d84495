"""Tokenizers for the tiny models, built here from an embedded English corpus, so nothing is downloaded.

Each is the class the real model's folder names, with a small vocabulary. The BPE learner is deterministic (the
`tokenizers` trainers break ties differently from run to run, which would change the written bytes).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

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
# Same shape as Qwen2.5-VL's template: a default system message, and image or video blocks as vision placeholders.
_QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5-VL's special tokens, in its id order (151643...).
QWEN2_5_VL_SPECIALS = (
    "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> <|box_end|> "
    "<|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> <|video_pad|>"
).split()
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


def _byte_level_bpe(num_merges: int, specials: list[str], specials_first: bool, extra_lines: Iterable[str] = ()):
    """Vocab and merges of a GPT-2 style byte-level BPE (the kind Qwen2 and Mistral's tekken use); `extra_lines` are
    learned besides the corpus (a pipeline's fixed template, so its words are single tokens as in the real vocab)."""
    lines = [*_CORPUS.splitlines(), *extra_lines]
    merges, _ = _learn_bpe(_words(normalizers.NFC(), _byte_level_pre_tokenizer(), lines), num_merges)
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


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    base = CLIPTokenizer()  # empty vocab: used only for CLIP's normalizer and pre-tokenizer
    words = _words(base.backend_tokenizer.normalizer, base.backend_tokenizer.pre_tokenizer, _CORPUS.splitlines())
    merges, _ = _learn_bpe(words, 1000, suffix="</w>")
    # CLIP's id order: 256 byte symbols, the same with "</w>", merged symbols, then the two special tokens.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def t5_tokenizer():
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


def mistral_tokenizer():
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


def qwen3_tokenizer():
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


def qwen2_5_vl_tokenizer(template_lines: Iterable[str] = ()):
    """Qwen2.5-VL's tokenizer: Qwen2's byte-level BPE, its special and vision tokens, its chat template.
    `template_lines` (a pipeline's fixed prompt template) are learned too, so the template tokenizes into the same
    number of tokens as with the real vocabulary, where each of its words is one token."""
    from transformers import Qwen2TokenizerFast

    specials = list(QWEN2_5_VL_SPECIALS)
    # Every merge the corpus has (about 1100): the template's rarer words ("spatial") need the last of them.
    vocab, merges = _byte_level_bpe(4000, specials, specials_first=False, extra_lines=template_lines)
    tok = Qwen2TokenizerFast(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        model_max_length=131072, chat_template=_QWEN2_5_VL_CHAT_TEMPLATE,
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials[1:]])
    return tok
