"""One record per model family: everything the server, the node and the front door need to know about it.

A family is a set of diffusers pipelines that share their text encoders. Its record says which pipelines belong to
it, which of their components encode text (those live on the encoder server and a node never loads them), which
transformer config keys the embedding widths must equal, where the server's encoder class and the tiny test model
builder are (as `module:name` strings, imported only by the side that uses them), and the pipeline's rule for when a
call needs a negative prompt. Adding a family is its encoder file, its tiny builder file and one record here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass


def _flux1_negative(config: Mapping, negative_prompt: str | None, guidance: float | None,
                    true_cfg_scale: float | None) -> str | None:
    # FluxPipeline runs true CFG only with true_cfg_scale > 1 and a negative prompt.
    return negative_prompt if negative_prompt is not None and (true_cfg_scale or 1.0) > 1 else None


def _distilled_negative(config: Mapping, negative_prompt: str | None, guidance: float | None,
                        true_cfg_scale: float | None) -> str | None:
    if negative_prompt is not None:
        raise ValueError("pipelines take no negative prompt (guidance is distilled into the model); drop "
                         "--negative-prompt")
    return None


def _flux2_klein_negative(config: Mapping, negative_prompt: str | None, guidance: float | None,
                          true_cfg_scale: float | None) -> str | None:
    # A klein *base* model (not distilled) runs CFG whenever guidance > 1, with "" as its default negative prompt.
    distilled = config.get("is_distilled", False)
    return None if distilled or (4.0 if guidance is None else guidance) <= 1 else (negative_prompt or "")


def _guidance_above(threshold: float, default: float):
    """The rule of pipelines that run CFG whenever `guidance_scale > threshold` (`default` when not given), with ""
    as their default negative prompt: StableDiffusion3Pipeline and WanPipeline (> 1), ZImagePipeline (> 0)."""

    def rule(config: Mapping, negative_prompt: str | None, guidance: float | None,
             true_cfg_scale: float | None) -> str | None:
        return (negative_prompt or "") if (default if guidance is None else guidance) > threshold else None

    return rule


def _qwen_image_negative(config: Mapping, negative_prompt: str | None, guidance: float | None,
                         true_cfg_scale: float | None) -> str | None:
    # QwenImagePipeline runs true CFG only with a negative prompt and true_cfg_scale > 1 (its default is 4).
    return negative_prompt if negative_prompt is not None and (4.0 if true_cfg_scale is None else true_cfg_scale) > 1 \
        else None


NegativePromptRule = Callable[[Mapping, "str | None", "float | None", "float | None"], "str | None"]


@dataclass(frozen=True)
class Family:
    r"""
    The facts of one model family.

    Args:
        name (`str`): What `--family`, `make-tiny-model --family` and `ListModels` call it.
        pipelines (`tuple[str, ...]`): diffusers pipeline classes (`model_index.json`'s `_class_name`) of this family;
            the first is the text-to-image one, which the tiny model and the node use.
        text_components (`tuple[str, ...]`): components that encode text: loaded by the server, never by a node.
        embedding_widths (`Mapping[str, str]`): output name -> transformer config key its last dimension must equal.
        encoder (`str`): `module:Class` of the server's `Encoder`.
        tiny_model (`str`): `module:function` that builds the tiny test model.
        negative_prompt (`callable`): `(pipeline config, negative_prompt, guidance, true_cfg_scale)` -> the negative
            text whose embeddings the call needs, or None; raises `ValueError` for a negative prompt the pipeline
            refuses (its message follows "<family> ").
        max_reference_images (`int`): most reference images a call takes (0: none).
        default_max_sequence_length (`int`): the text tokens a request gets when it names none (the pipeline
            `__call__`'s default).
        max_sequence_length_limit (`int`): the most text tokens a request may ask for.
        media (`str`): what the pipeline makes: `"image"`, or `"video"` (frames: `WanPipeline`).
        fixed_text_shapes (`bool`): the pipeline pads every prompt to `max_sequence_length` tokens, so the text
            encoders' inputs depend only on the batch size, and CUDA graphs captured once per batch bucket serve every
            request: the server replays them by default on CUDA. False where it pads to the longest prompt.
    """

    name: str
    pipelines: tuple[str, ...]
    text_components: tuple[str, ...]
    embedding_widths: Mapping[str, str]
    encoder: str
    tiny_model: str
    negative_prompt: NegativePromptRule = _flux1_negative
    max_reference_images: int = 0
    default_max_sequence_length: int = 512
    max_sequence_length_limit: int = 512
    media: str = "image"
    fixed_text_shapes: bool = True

    @property
    def pipeline(self) -> str:
        return self.pipelines[0]


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family(
        name="flux1",
        pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlPipeline",
                   "FluxFillPipeline", "FluxKontextPipeline"),
        text_components=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        embedding_widths={"prompt_embeds": "joint_attention_dim", "pooled_prompt_embeds": "pooled_projection_dim"},
        encoder="encoder_server.families.flux1:Flux1Encoder",
        tiny_model="promptcast.tiny_models.flux1:build",
        negative_prompt=_flux1_negative,
    ),
    Family(
        name="flux2",
        pipelines=("Flux2Pipeline",),
        text_components=("text_encoder", "tokenizer"),
        embedding_widths={"prompt_embeds": "joint_attention_dim"},
        encoder="encoder_server.families.flux2:Flux2Encoder",
        tiny_model="promptcast.tiny_models.flux2:build",
        negative_prompt=_distilled_negative,
        max_reference_images=10,
    ),
    Family(
        name="flux2-klein",
        pipelines=("Flux2KleinPipeline",),
        text_components=("text_encoder", "tokenizer"),
        embedding_widths={"prompt_embeds": "joint_attention_dim"},
        encoder="encoder_server.families.flux2_klein:Flux2KleinEncoder",
        tiny_model="promptcast.tiny_models.flux2_klein:build",
        negative_prompt=_flux2_klein_negative,
        max_reference_images=10,
    ),
    Family(
        name="sd3",
        pipelines=("StableDiffusion3Pipeline",),
        text_components=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                         "tokenizer_3"),
        # prompt_embeds: both CLIPs' 77 penultimate states (zero-padded to T5's width) then T5's tokens.
        embedding_widths={"prompt_embeds": "joint_attention_dim", "pooled_prompt_embeds": "pooled_projection_dim"},
        encoder="encoder_server.families.sd3:StableDiffusion3Encoder",
        tiny_model="promptcast.tiny_models.sd3:build",
        negative_prompt=_guidance_above(1.0, default=7.0),
        default_max_sequence_length=256,
        max_sequence_length_limit=512,
    ),
    Family(
        name="qwen-image",
        pipelines=("QwenImagePipeline",),
        text_components=("text_encoder", "tokenizer"),
        embedding_widths={"prompt_embeds": "joint_attention_dim"},
        encoder="encoder_server.families.qwen_image:QwenImageEncoder",
        tiny_model="promptcast.tiny_models.qwen_image:build",
        negative_prompt=_qwen_image_negative,
        default_max_sequence_length=512,
        max_sequence_length_limit=1024,
        fixed_text_shapes=False,  # padding=True: each batch is as long as its longest prompt
    ),
    Family(
        name="z-image",
        pipelines=("ZImagePipeline",),
        text_components=("text_encoder", "tokenizer"),
        embedding_widths={"prompt_embeds": "cap_feat_dim"},
        encoder="encoder_server.families.z_image:ZImageEncoder",
        tiny_model="promptcast.tiny_models.z_image:build",
        negative_prompt=_guidance_above(0.0, default=5.0),
    ),
    Family(
        name="wan",
        pipelines=("WanPipeline",),
        text_components=("text_encoder", "tokenizer"),
        embedding_widths={"prompt_embeds": "text_dim"},
        encoder="encoder_server.families.wan:WanEncoder",
        tiny_model="promptcast.tiny_models.wan:build",
        negative_prompt=_guidance_above(1.0, default=5.0),
        media="video",
    ),
)}

PIPELINE_FAMILIES: dict[str, str] = {pipeline: f.name for f in FAMILIES.values() for pipeline in f.pipelines}


def family(name: str) -> Family:
    """The record named `name`; `ValueError` naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_pipeline(class_name: str | None) -> Family | None:
    """The family a `model_index.json` `_class_name` belongs to, or None."""
    name = PIPELINE_FAMILIES.get(class_name or "")
    return None if name is None else FAMILIES[name]
