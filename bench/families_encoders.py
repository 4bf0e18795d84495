"""SD3.5, Qwen-Image, Z-Image and Wan: the server's encode path against diffusers' own, and what a node saves.

Per family, at real shapes with random weights built directly on the GPU (no files; tokenizers are the tiny test
models', only token counts matter for speed):

1. encoder: prompts/s of `Pipeline.encode_prompt` as diffusers runs it (its whole text encoders: Qwen2.5-VL with its
   vision tower and lm_head, Qwen3 with its last layer) in a loop at batch 1, against the promptcast encoder's
   `encode` (what the server's batcher calls) at batch 1 and at batch 16 in the same run; the weights each path holds;
   whether the two agree bit for bit. Text encoders: SD3.5-large's CLIP-L + CLIP-G + T5-XXL, Qwen2.5-VL-7B, Qwen3-4B,
   umT5-XXL.
2. node: peak GPU memory of one 1024x1024 image (Wan: 17 frames of 480x832) with CFG, the plain pipeline with its
   text encoders on the card against the node (transformer + VAE, embeddings given), 2 steps. Transformers:
   SD3.5-large (8 B), Qwen-Image (20 B), Z-Image (6 B), Wan 2.1 1.3B (the size meant for consumer cards).

    python bench/families_encoders.py                         # CUDA, bf16; sized for under 4 minutes on an H200
    python bench/families_encoders.py --tiny                  # tiny models on CPU, smoke test (seconds)
    python bench/families_encoders.py --families qwen-image --skip-node
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from denoiser_node import PROMPTS, peak, reset_peak  # noqa: E402 - the sibling benchmark's, run from bench/

FAMILIES = ("sd3", "qwen-image", "z-image", "wan")
LENGTHS = {"sd3": 256, "qwen-image": 512, "z-image": 512, "wan": 512}  # each pipeline __call__'s default


def prompts(n: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]}, take {i}" for i in range(n)]


def gib(n_bytes):
    return None if n_bytes is None else round(n_bytes / 2**30, 3)


def param_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def built_on(device, dtype):
    """Modules created here get their parameters on `device` in `dtype` from the start (no fp32 copy on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def real_components(family: str, tokenizers: dict, device, dtype) -> dict:
    """The pipeline's components at real shapes, random weights, on `device`."""
    import diffusers
    import transformers as tf

    ids = tokenizers["tokenizer"]
    with built_on(device, dtype):
        if family == "sd3":  # stabilityai/stable-diffusion-3.5-large
            def clip(width, layers, heads, act, tok):
                return tf.CLIPTextModelWithProjection._from_config(tf.CLIPTextConfig(
                    vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                    num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=width,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                    dtype=dtype)
            out = {"text_encoder": clip(768, 12, 12, "quick_gelu", ids),
                   "text_encoder_2": clip(1280, 32, 20, "gelu", tokenizers["tokenizer_2"]),
                   "text_encoder_3": tf.T5EncoderModel._from_config(tf.T5Config(
                       vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=False), dtype=dtype),
                   "transformer": diffusers.SD3Transformer2DModel(
                       sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                       num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                       pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm"),
                   "vae": flux_vae(diffusers, shift_factor=0.0609, scaling_factor=1.5305)}
        elif family == "qwen-image":  # Qwen/Qwen-Image: Qwen2.5-VL-7B-Instruct
            vision = {t: ids.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                                 "<|vision_end|>")}
            config = tf.Qwen2_5_VLConfig(
                text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                                 rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
                vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
                image_token_id=vision["<|image_pad|>"], video_token_id=vision["<|video_pad|>"],
                vision_start_token_id=vision["<|vision_start|>"], vision_end_token_id=vision["<|vision_end|>"])
            out = {"text_encoder": tf.Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype),
                   "transformer": diffusers.QwenImageTransformer2DModel(),  # its defaults are Qwen-Image's
                   "vae": diffusers.AutoencoderKLQwenImage()}
        elif family == "z-image":  # Tongyi-MAI/Z-Image-Turbo: Qwen3-4B
            out = {"text_encoder": tf.Qwen3Model._from_config(tf.Qwen3Config(
                       vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True), dtype=dtype),
                   "transformer": diffusers.ZImageTransformer2DModel(),  # its defaults are Z-Image's
                   "vae": flux_vae(diffusers, shift_factor=0.1159, scaling_factor=0.3611)}
        else:  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers: umT5-XXL
            out = {"text_encoder": tf.UMT5EncoderModel._from_config(tf.UMT5Config(
                       vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       feed_forward_proj="gated-gelu", is_encoder_decoder=False), dtype=dtype),
                   "transformer": diffusers.WanTransformer3DModel(num_attention_heads=12, ffn_dim=8960,
                                                                  num_layers=30),
                   "vae": diffusers.AutoencoderKLWan()}
    for name, module in out.items():
        module.eval().requires_grad_(False)
        if not name.startswith("text_encoder"):  # transformers' `_from_config` already placed its dtypes
            keep_in_fp32(module.to(dtype))
    # Schedulers hold float tables of their own: built outside the bf16 default.
    out["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULERS[family])
    return {**out, **tokenizers}


SCHEDULERS = {  # each model's scheduler settings
    "sd3": dict(shift=3.0),
    "qwen-image": dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                       max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"),
    "z-image": dict(shift=3.0),
    "wan": dict(shift=5.0),
}


def keep_in_fp32(module) -> None:
    """What diffusers' `from_pretrained(dtype=...)` does: the modules a model names stay in float32."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    for name, sub in module.named_modules():
        if keep and any(k in name.split(".") for k in keep):
            sub.float()


def tokenizers_of(folder: pathlib.Path) -> dict:
    """The tokenizers of a model folder, each as the class its `model_index.json` names."""
    import transformers

    index = json.loads((folder / "model_index.json").read_text())
    return {name: getattr(transformers, spec[1]).from_pretrained(folder, subfolder=name)
            for name, spec in index.items() if name.startswith("tokenizer") and spec[0]}


def flux_vae(diffusers, **scaling):
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
        use_quant_conv=False, use_post_quant_conv=False, **scaling)


def diffusers_encode(family, pipe, device, length):
    """`encode_prompt` of one prompt as the pipeline's own __call__ runs it (negatives aside); its row."""
    def encode(prompt):
        if family == "sd3":
            out = pipe.encode_prompt([prompt], None, None, device=device, do_classifier_free_guidance=False,
                                     max_sequence_length=length)
            return {"prompt_embeds": out[0][0], "pooled_prompt_embeds": out[2][0]}
        if family == "qwen-image":
            return {"prompt_embeds": pipe.encode_prompt([prompt], device=device, max_sequence_length=length)[0][0]}
        return {"prompt_embeds": pipe.encode_prompt([prompt], device=device, do_classifier_free_guidance=False,
                                                    max_sequence_length=length)[0][0]}
    return encode


def promptcast_encoder(family, components, device, dtype):
    """The server's encoder class of `family` around the modules in memory (after the diffusers path ran: Qwen-Image
    and Z-Image drop what their encoder never uses)."""
    import diffusers

    from encoder_server.families import family_class
    from encoder_server.families.base import Encoder
    from encoder_server.families.qwen_image import LastHiddenStateEncoder
    from encoder_server.families.z_image import PenultimateTextEncoder

    cls = family_class(family)
    encoder = cls.__new__(cls)
    Encoder.__init__(encoder, f"bench-{family}", None, device, dtype)
    encoder._fingerprint = f"bench-{family}"
    tok = components["tokenizer"]
    if family == "sd3":
        encoder.pipe = diffusers.StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None, **{k: components[k] for k in (
                "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")})
        held = [components["text_encoder"], components["text_encoder_2"], components["text_encoder_3"]]
    elif family == "qwen-image":
        full = components["text_encoder"]
        language_model = full.model.language_model
        del full.model.visual, full.lm_head  # the vision tower and lm_head: never loaded by the server
        encoder.text_encoder = LastHiddenStateEncoder(language_model)
        encoder.text_model, encoder.tokenizer = language_model, tok
        encoder.pipe = diffusers.QwenImagePipeline(None, None, encoder.text_encoder, tok, None)
        held = [language_model]
    elif family == "z-image":
        text_model = components["text_encoder"]
        layers = len(text_model.layers) - 1
        del text_model.layers[layers:]  # the last layer: never loaded by the server
        text_model.config.num_hidden_layers = layers
        encoder.hidden_states_layers = (layers,)
        encoder.text_encoder = PenultimateTextEncoder(text_model, (layers,))
        encoder.text_model, encoder.tokenizer = text_model, tok
        encoder.pipe = diffusers.ZImagePipeline(None, None, encoder.text_encoder, tok, None)
        held = [text_model]
    else:
        encoder.pipe = diffusers.WanPipeline(tokenizer=tok, text_encoder=components["text_encoder"], vae=None,
                                             scheduler=None, transformer=None)
        held = [components["text_encoder"]]
    return encoder, held


def rate(fn, items, device, iters: int) -> float:
    """Prompts per second of `fn(item)` over `items`, median of `iters` passes."""
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        for item in items:
            fn(item)
        sync(device)
        times.append(time.perf_counter() - start)
    return round(len(items) / statistics.median(times), 2)


def same(a: dict, b: dict) -> tuple[bool, float]:
    """Whether two prompts' rows are the same bits (NaN included), and their largest difference."""
    assert set(a) == set(b)
    identical = all(a[k].shape == b[k].shape and torch.equal(a[k].contiguous().view(torch.uint8),
                                                              b[k].contiguous().view(torch.uint8)) for k in a)
    diff = max((a[k].float() - b[k].float()).nan_to_num().abs().max().item() if a[k].shape == b[k].shape
               else float("inf") for k in a)
    return identical, diff


@torch.inference_mode()
def bench_family(family, args, tiny_dir, device, dtype) -> dict:
    import diffusers

    from shared.collate import batch_of, collate, rows_of
    from shared.families import FAMILIES as RECORDS

    record = RECORDS[family]
    pipeline_class = getattr(diffusers, record.pipeline)
    length = 64 if args.tiny else LENGTHS[family]
    start = time.perf_counter()
    if args.tiny:
        components = pipeline_class.from_pretrained(tiny_dir, dtype=dtype).components
        components = {k: v.to(device) if isinstance(v, torch.nn.Module) else v for k, v in components.items()}
    else:
        components = real_components(family, tokenizers_of(tiny_dir), device, dtype)
    out = {"build_s": round(time.perf_counter() - start, 1), "max_sequence_length": length}
    text = [k for k in record.text_components if k.startswith("text_encoder")]
    full_pipe = pipeline_class(**components)
    full_pipe.set_progress_bar_config(disable=True)
    sample = prompts(args.prompts)

    # 1. encoder: diffusers' loop at batch 1 (whole text encoders), then the server's encoder on the same weights
    reference = diffusers_encode(family, full_pipe, device, length)
    for prompt in sample[:2]:  # warm-up: kernels, allocator, tokenizer caches
        reference(prompt)
    diffusers_rate = rate(reference, sample, device, args.iters)
    expected = reference(sample[0])
    diffusers_weights = param_bytes(*(components[k] for k in text))
    # The node part needs the plain pipeline with its whole text encoders: run it before the server's cut.
    node = None if args.skip_node else node_memory(family, full_pipe, components, text, device, args)
    encoder, held = promptcast_encoder(family, components, device, dtype)
    encode_one = lambda p: encoder.encode([p], None, length)  # noqa: E731
    for prompt in sample[:2]:
        encode_one(prompt)
    encoder.encode(sample, None, length)
    identical, max_diff = same(expected, rows_of(encode_one(sample[0]))[0])
    promptcast_rate = rate(encode_one, sample, device, args.iters)
    batched = rate(lambda chunk: encoder.encode(chunk, None, length), [sample], device, args.iters) * len(sample)
    out["encoder"] = {
        "diffusers": {"prompts_per_s_b1": diffusers_rate, "weights_gib": gib(diffusers_weights),
                      "weights_bytes": diffusers_weights},
        "promptcast": {"prompts_per_s_b1": promptcast_rate, f"prompts_per_s_b{len(sample)}": round(batched, 2),
                       "weights_gib": gib(param_bytes(*held)), "weights_bytes": param_bytes(*held)},
        "bit_identical": identical, "max_abs_diff": max_diff,
        "outputs": {o.name: {"shape": list(o.at_length(length)), "collate": o.layout.collate} for o in encoder.outputs},
    }
    if node is not None:
        out["node"] = node
    # The collated batch is what `pipe(**embeds)` takes (checked here on every family's layout).
    collate(batch_of(rows_of(encoder.encode(sample[:2], None, length))), {o.name: o.layout for o in encoder.outputs})
    del full_pipe, components, encoder, held, reference, expected
    reset_peak(device)
    return out


def node_memory(family, full_pipe, components, text, device, args) -> dict:
    """Peak memory of one CFG image (Wan: a short video) with the text encoders on the card, and without them."""
    import diffusers

    size = dict(height=32, width=32) if args.tiny else (dict(height=480, width=832) if family == "wan" else
                                                         dict(height=1024, width=1024))
    call = dict(size, num_inference_steps=2, output_type="np", max_sequence_length=64 if args.tiny else None)
    call = {k: v for k, v in call.items() if v is not None}
    cfg = {"sd3": {"guidance_scale": 4.5}, "qwen-image": {"true_cfg_scale": 4.0},
           "z-image": {"guidance_scale": 3.0}, "wan": {"guidance_scale": 5.0, "num_frames": 5 if args.tiny else 17}}
    call.update(cfg[family])
    text_bytes = param_bytes(*(components[k] for k in text))
    reset_peak(device)
    full_pipe(prompt=PROMPTS[0], negative_prompt="blurry", generator=torch.Generator().manual_seed(0), **call)
    with_encoders = peak(device)
    # Embeddings as the node gets them, then the same call without text encoders.
    embeds = full_pipe.encode_prompt(**encode_kwargs(family, call))
    embeds = named(family, embeds)
    node_pipe = getattr(diffusers, type(full_pipe).__name__)(
        **{k: (None if k in text or k.startswith("tokenizer") else v) for k, v in components.items()})
    node_pipe.set_progress_bar_config(disable=True)
    on_card = {k: components[k].to("cpu") for k in text}  # the node holds no text encoder: off the card
    reset_peak(device)
    node_pipe(**embeds, generator=torch.Generator().manual_seed(0), **call)
    without = peak(device)
    for k, module in on_card.items():
        module.to(device)
    del node_pipe, embeds
    return {"size": size, "steps": 2, "text_encoder_weights_gib": gib(text_bytes),
            "transformer_weights_gib": gib(param_bytes(components["transformer"])),
            "peak_with_text_encoders_gib": gib(with_encoders), "peak_node_gib": gib(without),
            "saved_gib": gib(with_encoders - without) if with_encoders and without else None}


def encode_kwargs(family, call):
    length = call.get("max_sequence_length", LENGTHS[family])
    if family == "sd3":
        return dict(prompt=PROMPTS[0], prompt_2=None, prompt_3=None, negative_prompt="blurry",
                    max_sequence_length=length)
    if family == "wan":
        return dict(prompt=PROMPTS[0], negative_prompt="blurry", max_sequence_length=length)
    if family == "z-image":
        return dict(prompt=[PROMPTS[0]], negative_prompt=["blurry"], max_sequence_length=length)
    return dict(prompt=[PROMPTS[0], "blurry"], max_sequence_length=length)


def named(family, out):
    """`encode_prompt`'s tuple as the `__call__` arguments it feeds."""
    if family == "sd3":
        return dict(zip(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                         "negative_pooled_prompt_embeds"), out))
    if family == "qwen-image":  # both in one call: padded together, masks kept
        embeds, mask = out
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
        return {"prompt_embeds": embeds[:1], "prompt_embeds_mask": mask[:1],
                "negative_prompt_embeds": embeds[1:], "negative_prompt_embeds_mask": mask[1:]}
    return {"prompt_embeds": out[0], "negative_prompt_embeds": out[1]}


def run(args) -> dict:
    from promptcast.tiny_models import make_tiny_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
              "prompts": args.prompts, "iters": args.iters, "families": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            tiny_dir = make_tiny_model(pathlib.Path(tmp) / family, family)
            report["families"][family] = bench_family(family, args, tiny_dir, device, dtype)
            print(f"{family}: done in {time.perf_counter() - started:.0f}s: {json.dumps(report['families'][family])}",
                  flush=True)
            if args.out is not None:  # after each family: a run cut short keeps what it measured
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def table(report: dict) -> str:
    lines = [f"{report['device']}, {report['dtype']}{' (tiny models)' if report['tiny'] else ''}, "
             f"{report['prompts']} prompts, {report['seconds']}s",
             f"{'family':11}{'diffusers b1':>13}{'promptcast b1':>14}{'promptcast b%d' % report['prompts']:>15}"
             f"{'weights GiB':>17}{'bit-equal':>10}{'node peak GiB':>22}{'saved':>8}"]
    for family, res in report["families"].items():
        enc = res["encoder"]
        d, p = enc["diffusers"], enc["promptcast"]
        node = res.get("node") or {}
        node_cell = (f"{node['peak_with_text_encoders_gib']:.2f} -> {node['peak_node_gib']:.2f}"
                     if node.get("peak_node_gib") is not None else "n/a")
        saved = f"{node['saved_gib']:.2f}" if node.get("saved_gib") is not None else "n/a"
        lines.append(f"{family:11}{d['prompts_per_s_b1']:>13.2f}{p['prompts_per_s_b1']:>14.2f}"
                     f"{p['prompts_per_s_b%d' % report['prompts']]:>15.2f}"
                     f"{'%.2f -> %.2f' % (d['weights_gib'], p['weights_gib']):>17}{str(enc['bit_identical']):>10}"
                     f"{node_cell:>22}{saved:>8}")
    lines.append("prompts/s: encode_prompt per prompt (diffusers' whole text encoders) vs the server's encoder; "
                 "weights: text encoders held; node: peak with the text encoders on the card -> without")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="default: bench/results/families_encoders.json (--tiny: families_encoders_tiny.json)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test models on CPU (smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--prompts", type=int, default=16, help="prompts a pass encodes")
    parser.add_argument("--iters", type=int, default=3, help="passes; the median counts")
    parser.add_argument("--skip-node", action="store_true", help="measure the encoders only")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available() and args.device in (None, "cpu"):
        parser.error("real shapes need a CUDA device (tens of GB of bf16 weights); pass --tiny to smoke-test on CPU")
    args.out = args.out or pathlib.Path(f"bench/results/families_encoders{'_tiny' if args.tiny else ''}.json")
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    print(table(report))


if __name__ == "__main__":
    main()
