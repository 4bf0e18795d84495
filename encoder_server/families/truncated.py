"""Text encoders loaded only as far as the pipeline reads them, and their tokenizers.

`Flux2Pipeline` and `Flux2KleinPipeline` run their whole causal LM with `output_hidden_states=True` and keep three
hidden states: (10, 20, 30) of Mistral Small 3.1's 40 layers, (9, 18, 27) of Qwen3's 36. The layers after the last
one, the final norm and the lm_head (a vocabulary-wide projection of every token) are computed and thrown away, and
Mistral3's vision tower is loaded but never run for text-only prompts. Here the bare decoder is built with
`num_hidden_layers = max(layers)` and only the checkpoint tensors it holds are read: the rest stays on disk.
`load_text_model` does the loading for every family that reads a bare decoder (Qwen-Image's Qwen2.5-VL language
model, Z-Image's Qwen3).
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from encoder_server.errors import SourceError
from encoder_server.families.base import Encoder, OutputSpec
from shared.sources import ModelSource

logger = logging.getLogger(__name__)


class TextModelWrapper(nn.Module):
    """A module that stands in for a pipeline's `text_encoder` around `self.text_model`: diffusers reads its dtype and
    device."""

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.device


class TruncatedTextEncoder(TextModelWrapper):
    r"""
    Stands in for a FLUX.2 pipeline's `text_encoder`: the first `max(layers)` decoder layers of its language model,
    without the final norm and the lm_head.

    The diffusers functions that encode prompts (`Flux2Pipeline._get_mistral_3_small_prompt_embeds`,
    `Flux2KleinPipeline._get_qwen3_prompt_embeds`) call it as they call the full model and read
    `output.hidden_states[k]`. transformers numbers those as the full model does: `hidden_states[0]` is the embedding
    output and `hidden_states[k]` the output of decoder layer `k - 1`, so the first `max(layers)` layers give every
    index the pipeline reads, bit for bit.

    Args:
        text_model (`transformers.PreTrainedModel`):
            A bare decoder (`MistralModel`, `Qwen3Model`) holding exactly `max(layers)` layers.
        layers (`tuple[int, ...]`):
            The hidden-state indices the pipeline stacks.
    """

    def __init__(self, text_model: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        if len(text_model.layers) != max(layers):
            raise ValueError(f"text_model has {len(text_model.layers)} layers; hidden states {layers} need "
                             f"exactly {max(layers)}")
        # transformers replaces the last hidden state with the final norm's output. In the full model that is the
        # 40th layer's, which diffusers drops; here it would be the output of the last layer we keep, which diffusers
        # reads un-normed. The norm only ever fed the lm_head, so it goes.
        text_model.norm = nn.Identity()
        self.text_model = text_model
        self.layers = tuple(layers)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=True, use_cache=False):
        # Asking for the stacked indices alone lets every other hidden state be freed as soon as the next layer has
        # run, where `True` would hold all of them until the forward ends (31 times (B, L, 5120) for FLUX.2-dev).
        return self.text_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                               output_hidden_states=list(self.layers) if output_hidden_states else False)

    @classmethod
    def from_pretrained(cls, source: ModelSource, layers: tuple[int, ...], *, dtype: torch.dtype,
                        device: torch.device, key_mapping: dict[str, str] | None = None) -> TruncatedTextEncoder:
        """Load the first `max(layers)` decoder layers of `source`'s `text_encoder` folder, and nothing after them.

        `key_mapping` (regex -> replacement) maps the checkpoint's names to the bare decoder's, where transformers'
        own prefix handling does not (Mistral3's `language_model.model.`).
        """
        return cls(load_text_model(source, max(layers), dtype=dtype, device=device, key_mapping=key_mapping,
                                   reads=f"hidden states {layers}"), layers)


def text_config(source: ModelSource):
    """The language model's config in `source`'s `text_encoder` folder (the text half of a vision-language one)."""
    from transformers import AutoConfig

    kwargs = {"revision": source.revision} if source.revision else {}
    return copy.deepcopy(
        AutoConfig.from_pretrained(source.pretrained, subfolder="text_encoder", **kwargs).get_text_config())


def load_text_model(source: ModelSource, num_layers: int | None = None, *, dtype: torch.dtype, device: torch.device,
                    key_mapping: dict[str, str] | None = None, reads: str = "its output") -> nn.Module:
    """The bare decoder (`MistralModel`, `Qwen3Model`, `Qwen2_5_VLTextModel`...) of `source`'s `text_encoder` folder
    with its first `num_layers` layers (None: all), reading only the checkpoint tensors it holds: no later layer, no
    lm_head, no vision tower. `reads` says what the pipeline reads, for the log and errors."""
    from transformers import AutoModel

    kwargs = {"revision": source.revision} if source.revision else {}
    config = text_config(source)
    full_layers = config.num_hidden_layers
    num_layers = full_layers if num_layers is None else num_layers
    if num_layers > full_layers:
        raise SourceError(f"{source.source!r}'s text encoder has {full_layers} layers; the pipeline reads {reads}")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    # transformers opens the shards lazily and reads only the tensors the model holds; its load report would list
    # every other one (later layers, lm_head, vision tower) as UNEXPECTED, which here is the point, not a problem.
    with _without_load_report():
        text_model, info = AutoModel.from_pretrained(
            source.pretrained, subfolder="text_encoder", config=config, dtype=dtype,
            device_map={"": device}, key_mapping=key_mapping, output_loading_info=True, **kwargs)
    if info["missing_keys"] or info["mismatched_keys"]:
        broken = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        raise SourceError(f"{source.source!r}'s text encoder checkpoint does not hold the weights of "
                          f"{type(text_model).__name__} (missing or mismatched: {', '.join(broken[:5])}, ...)")
    logger.info("%s: loaded %d of %d decoder layers of %s (the pipeline reads %s); %d checkpoint tensors left on disk",
                source.source, num_layers, full_layers, type(text_model).__name__, reads,
                len(info["unexpected_keys"]))
    return text_model.eval()


class StackedHiddenStatesEncoder(Encoder):
    """What both FLUX.2 families share: a `TruncatedTextEncoder`, its tokenizer, and an output of the
    `hidden_states_layers` stacked per token to (B, L, len(layers) * hidden_size). Subclasses name the layers and
    call their pipeline's own encode function in `encode`."""

    hidden_states_layers: tuple[int, ...]
    # regex -> replacement from the checkpoint's tensor names to the bare decoder's (None: transformers' own)
    key_mapping: dict[str, str] | None = None

    def __init__(self, name, source, device, dtype, **options):
        super().__init__(name, source, device, dtype, **options)
        # Straight onto the device, unless quantizing: bitsandbytes quantizes as weights move from the CPU.
        self.text_encoder = self.prepare_module(TruncatedTextEncoder.from_pretrained(
            source, self.hidden_states_layers, dtype=dtype, device=torch.device("cpu") if self.quantize else device,
            key_mapping=self.key_mapping))
        self.text_model = self.text_encoder.text_model
        self.tokenizer = load_tokenizer(source)
        # The pipelines' `tokenizer_max_length`: their check_inputs set no bound, but they pad to 512, the length the
        # transformer was trained with (BFL's reference encoders too).
        self.default_max_sequence_length = self.max_sequence_length_limit = 512

    @property
    def outputs(self) -> list[OutputSpec]:
        width = len(self.hidden_states_layers) * self.text_model.config.hidden_size
        return [OutputSpec("prompt_embeds", self.text_model.dtype, (self.default_max_sequence_length, width),
                           per_token=True)]

    def fingerprint_parts(self) -> dict:
        return {**super().fingerprint_parts(), "hidden_states_layers": list(self.hidden_states_layers),
                "chat_template": self.tokenizer.chat_template, "tokenizer_class": type(self.tokenizer).__name__,
                "default_max_sequence_length": self.default_max_sequence_length,
                "max_sequence_length_limit": self.max_sequence_length_limit}


def load_tokenizer(source: ModelSource):
    """The pipeline's `tokenizer`, as the class `model_index.json` names, which is what diffusers loads.

    FLUX.2-dev names `PixtralProcessor`, whose image half needs torchvision. Where it cannot be imported the processor's
    own tokenizer is loaded from the same folder: for text-only prompts the processor renders the same chat template
    and hands the text to that tokenizer, so the token ids are the same (checked with torchvision installed). The
    fingerprint holds the class all the same, so the two never share cache entries.
    """
    import transformers

    kwargs = {"revision": source.revision} if source.revision else {}
    _library, class_name = source.read_json("model_index.json")["tokenizer"]
    try:
        return getattr(transformers, class_name).from_pretrained(source.pretrained, subfolder="tokenizer", **kwargs)
    except ImportError as e:
        if not class_name.endswith("Processor"):
            raise
        logger.warning("%s: %s cannot be loaded (%s); tokenizing with its tokenizer alone, which gives the same ids for "
                       "text prompts", source.source, class_name, str(e).strip().splitlines()[0])
        return transformers.AutoTokenizer.from_pretrained(source.pretrained, subfolder="tokenizer", **kwargs)


@contextlib.contextmanager
def _without_load_report():
    # A filter, not a level: transformers runs extra checks (and logs their findings) when its logger's level is raised.
    log = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()
