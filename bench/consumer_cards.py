"""Consumer cards: the memory plan `--vram auto` picks under 8, 12, 16 and 24 GiB, and what every plan costs.

For FLUX.1-dev (12B), FLUX.2 klein 4B and 9B and FLUX.2-dev (32B), at their real shapes with random weights built
in GPU memory (FLUX.2-dev's 64 GB bf16 checkpoint would not fit the machine's disk; timings do not depend on weight
values), at 1024x1024:

1. every plan of `denoiser_client.vram.PLANS`, uncapped: weights resident once loaded, the peak the caching
   allocator reserved for one image, seconds per denoising step and for the decode; seconds per image at the
   model's usual step count (FLUX.1-dev 28, klein 4, FLUX.2-dev 50) is steps x step + decode, steps timed after a
   warm-up step. Plans are applied with the node's own code (`vram.cast_fp8`, `vram.offload`, VAE tiling); nf4
   replaces each transformer Linear with bitsandbytes' `Linear4bit` in memory, layer by layer from the host copy (the
   node gets the same layers from `from_pretrained(quantization_config=...)`). Loading runs uncapped and its bf16
   staging is freed; the cap then holds for the image, with the loaded weights counting against it.
2. per cap (`torch.cuda.set_per_process_memory_fraction`): the plan `vram_plans.pick_plan` picks from those figures,
   run under the cap to show it fits; the next faster plan run under the cap to show it does not; every plan whose
   uncapped peak fits; auto against the fastest that fits.
3. baselines under each cap, same run: plain diffusers with its text encoder and `enable_model_cpu_offload` (one full
   call timed, the text encoder moved in and out for its prompt), and the two-phase recipe (text encoder in 8 bit via
   bitsandbytes, the job's 10 prompts encoded, freed, the transformer moved in, 10 images under the node's plan).
   The node denoises only; its embeddings come from the server (that costs +2% on a 20-prompt job,
   denoiser_node.json). The 8-bit copy is quantized from GPU weights, faster than any load from disk, and the
   transformer's move from host memory is faster than a load: both favour the baseline. A baseline whose smallest
   part cannot fit a cap is reported as not running, with the size, without being run.

    python bench/consumer_cards.py --models flux1-dev flux2-klein-4b --out bench/results/consumer_cards_a.json
    python bench/consumer_cards.py --models flux2-klein-9b flux2-dev --out bench/results/consumer_cards_b.json
    python bench/consumer_cards.py --write-table bench/results/consumer_cards_a.json bench/results/consumer_cards_b.json
    python bench/consumer_cards.py --tiny --out /tmp/cards.json      # tiny shapes on CPU: the code paths
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

GIB = 1 << 30
CAPS = (8, 12, 16, 24)
SIZE = 1024
JOB = 10
MODELS = {
    "flux1-dev": {"family": "flux1", "steps": 28, "pipeline": "FluxPipeline",
                  "transformer": ("FluxTransformer2DModel", dict(
                      num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                      joint_attention_dim=4096, pooled_projection_dim=768, in_channels=64, guidance_embeds=True,
                      axes_dims_rope=[16, 56, 56])),
                  "embeds": {"prompt_embeds": (512, 4096), "pooled_prompt_embeds": (768,)},
                  "text_encoder": ("T5EncoderModel", dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                                          num_layers=24, num_heads=64,
                                                          feed_forward_proj="gated-gelu"))},
    "flux2-klein-4b": {"family": "flux2-klein", "steps": 4, "pipeline": "Flux2KleinPipeline",
                       "transformer": ("Flux2Transformer2DModel", dict(
                           num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                           guidance_embeds=False)),
                       "embeds": {"prompt_embeds": (512, 7680)},
                       "text_encoder": ("Qwen3ForCausalLM", dict(vocab_size=151936, hidden_size=2560,
                                                                 intermediate_size=9728, num_hidden_layers=36,
                                                                 num_attention_heads=32, num_key_value_heads=8,
                                                                 head_dim=128, tie_word_embeddings=True))},
    "flux2-klein-9b": {"family": "flux2-klein", "steps": 4, "pipeline": "Flux2KleinPipeline",
                       "transformer": ("Flux2Transformer2DModel", dict(
                           num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                           guidance_embeds=False)),
                       "embeds": {"prompt_embeds": (512, 12288)},
                       "text_encoder": ("Qwen3ForCausalLM", dict(vocab_size=151936, hidden_size=4096,
                                                                 intermediate_size=12288, num_hidden_layers=36,
                                                                 num_attention_heads=32, num_key_value_heads=8,
                                                                 head_dim=128, tie_word_embeddings=False))},
    "flux2-dev": {"family": "flux2", "steps": 50, "pipeline": "Flux2Pipeline",
                  "transformer": ("Flux2Transformer2DModel", dict()),  # diffusers' defaults are FLUX.2-dev's
                  "embeds": {"prompt_embeds": (512, 15360)},
                  # Mistral Small 3.1's language model (its 0.4B vision tower, also loaded by diffusers, is left out)
                  "text_encoder": ("MistralForCausalLM", dict(vocab_size=131072, hidden_size=5120,
                                                              intermediate_size=32768, num_hidden_layers=40,
                                                              num_attention_heads=32, num_key_value_heads=8,
                                                              head_dim=128))},
}


HOST_COPY_LIMIT = 0.3  # of host memory


def _host_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cap(gib: float | None) -> None:
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * GIB / total))


def _in_dtype(dtype, build):
    """Build with parameters made in `dtype` directly (no fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build()
    finally:
        torch.set_default_dtype(previous)


def _from_weights(cls, config: dict, weights: dict, on: str):
    with torch.device("meta"):
        model = cls.from_config(config)
    model.load_state_dict(weights, assign=True)  # shares the host copy: nothing is copied yet
    return model.eval().to(on)


class Model:
    """One model's transformer and VAE weights kept in host memory, and node pipelines built from them per plan."""

    def __init__(self, name: str, spec: dict, device: torch.device, tiny: bool):
        import diffusers

        from promptcast.tiny_models.parts import scheduler

        self.name, self.spec, self.device, self.tiny = name, spec, device, tiny
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.scheduler = scheduler()
        if tiny:
            from promptcast.tiny_models import flux1, flux2, flux2_klein

            builder = {"flux1": flux1, "flux2": flux2, "flux2-klein": flux2_klein}[spec["family"]].build
            tiny_pipe, _ = builder(lambda build, *a, **k: build(*a, **k).eval())
            transformer, vae = tiny_pipe.transformer, tiny_pipe.vae
            self.embed_shapes = {"prompt_embeds": (16, transformer.config.joint_attention_dim)}
            if "pooled_projection_dim" in transformer.config:
                self.embed_shapes["pooled_prompt_embeds"] = (transformer.config.pooled_projection_dim,)
            self.size, self.steps = 64, 2
        else:
            cls_name, config = spec["transformer"]
            transformer = self._build_transformer(getattr(diffusers, cls_name), config)
            with torch.device(device):
                vae = _in_dtype(self.dtype, lambda: self._vae().eval())
            self.embed_shapes, self.size, self.steps = spec["embeds"], SIZE, spec["steps"]
        self.transformer_class, self.transformer_config = type(transformer), dict(transformer.config)
        self.params = sum(p.numel() for p in transformer.parameters())
        # A host copy is kept where it leaves room for the offload plans' own host copies (fp8 weights, and their
        # pinned twins); FLUX.2-dev's 64 GB would not: its transformer is rebuilt on the GPU from the seed per plan.
        self.weights = None
        if tiny or self.params * 2 < HOST_COPY_LIMIT * _host_memory():
            self.weights = {k: v.to("cpu", self.dtype) for k, v in transformer.state_dict().items()}
        # Offloading hooks leave a module's weights on the meta device when removed: every pipeline gets its own VAE.
        self.vae_class, self.vae_config = type(vae), dict(vae.config)
        self.vae_weights = {k: v.to("cpu", self.dtype) for k, v in vae.state_dict().items()}
        del transformer, vae
        free()

    def _vae(self):
        from diffusers import AutoencoderKL, AutoencoderKLFlux2

        if self.spec["family"] == "flux1":  # black-forest-labs/FLUX.1-dev vae/config.json
            return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                                 block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                                 up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2, act_fn="silu",
                                 norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                                 use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
        return AutoencoderKLFlux2()

    def _build_transformer(self, cls, config: dict):
        """Random weights made on the device, from the same seed each time."""
        torch.manual_seed(0)
        with torch.device(self.device):
            return _in_dtype(self.dtype, lambda: cls.from_config(config).eval())

    def transformer(self, on: str):
        if self.weights is None:
            return self._build_transformer(self.transformer_class, self.transformer_config).to(on)
        return _from_weights(self.transformer_class, self.transformer_config, self.weights, on)

    def vae(self, on: str):
        return _from_weights(self.vae_class, self.vae_config, self.vae_weights, on)

    def pipeline(self, plan_name: str, text_encoder=None):
        """The node's pipeline (no text encoder unless given) under a plan, applied with the node's own code."""
        import diffusers

        from denoiser_client.vram import PLANS, cast_fp8, enable_vae_tiling, offload

        plan = PLANS[plan_name]
        device = str(self.device)
        on_gpu = plan.offload is None
        # fp8 is cast on the GPU (the same result as the node's cast on the host, far faster); nf4 quantizes layer by
        # layer from the host copy.
        transformer = self.transformer(device if plan.quantize == "fp8" or (on_gpu and plan.quantize is None)
                                       or self.weights is None else "cpu")
        if plan.quantize == "fp8":
            cast_fp8(transformer, self.dtype)
            if not on_gpu:
                transformer.to("cpu")
        elif plan.quantize == "nf4":
            to_nf4(transformer, self.dtype)
        elif not on_gpu:
            transformer.to("cpu")  # rebuilt on the GPU: the offload plans start from the host
        vae = self.vae("cpu" if plan.offload else device)
        cls = getattr(diffusers, self.spec["pipeline"])
        extra = {"is_distilled": True} if self.spec["pipeline"] == "Flux2KleinPipeline" else {}
        components = {n: None for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
                      if n in cls._get_signature_keys(cls)[0]}
        pipe = cls(scheduler=self.scheduler, vae=vae, transformer=transformer, **components, **extra)
        if plan.vae_tiling:
            enable_vae_tiling(vae)
        if plan.offload is not None:
            offload(pipe, plan.offload, device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def embeddings(self):
        g = torch.Generator("cpu").manual_seed(0)
        return {k: torch.randn((1, *shape), generator=g).to(self.device, self.dtype)
                for k, shape in self.embed_shapes.items()}


def to_nf4(module, dtype) -> None:
    """Every Linear of `module` as a bitsandbytes nf4 Linear4bit, each quantized on the GPU as it is moved there."""
    import bitsandbytes as bnb

    def convert(parent):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=dtype, compress_statistics=False, quant_type="nf4",
                                          device="meta")
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=False,
                                                 quant_type="nf4", module=layer)._quantize(torch.device("cuda"))
                if child.bias is not None:
                    layer.bias = torch.nn.Parameter(child.bias.data.to("cuda"), requires_grad=False)
                setattr(parent, name, layer)
            else:
                convert(child)

    convert(module)
    module.to("cuda")


def render(pipe, model: Model, steps: int) -> dict:
    """One image; per-step and decode seconds (steps after the first, which warms kernels up)."""
    marks = []

    def mark(pipeline, step, timestep, callback_kwargs):
        sync()
        marks.append(time.perf_counter())
        return callback_kwargs

    extra = {"guidance_scale": 3.5} if model.spec["family"] == "flux1" else {}
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        pipe(**model.embeddings(), num_inference_steps=steps, width=model.size, height=model.size,
             generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=mark, **extra)
    sync()
    finished = time.perf_counter()
    step = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else marks[0] - started
    return {"step_s": step, "decode_s": finished - marks[-1], "call_s": finished - started}


def _rounded(out: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def measure(model: Model, plan: str, steps: int, cap_gib: float | None = None) -> dict:
    """Load `plan` uncapped, then make one image under `cap_gib` (if given): memory and time, or the error."""
    free()
    out = {"plan": plan}
    pipe = None
    try:
        pipe = model.pipeline(plan)
        free()
        out["resident_gib"] = torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None
        cap(cap_gib)
        timing = render(pipe, model, steps)
        out.update(step_s=timing["step_s"], decode_s=timing["decode_s"],
                   s_per_image=model.steps * timing["step_s"] + timing["decode_s"])
        if torch.cuda.is_available():
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    except torch.OutOfMemoryError:
        out["error"] = "out of memory"
    except Exception as e:  # noqa: BLE001 - one plan's failure is a result, not the end of the run
        out["error"] = f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc()
    finally:
        if pipe is not None:
            pipe.remove_all_hooks()
        del pipe
        cap(None)
        free()
    return _rounded(out)


def plan_costs(results: dict, params: int) -> dict:
    from denoiser_client.vram_plans import PlanCost

    return {name: PlanCost(round(r["resident_gib"] * GIB / params, 4),
                           round((r["peak_allocated_gib"] - r["resident_gib"]) * GIB, -6), r["s_per_image"])
            for name, r in results.items() if "error" not in r and r.get("peak_allocated_gib") is not None}


def run_model(name: str, args, device, report: dict, save) -> dict:
    """Fill `report` plan by plan and cap by cap, calling `save()` after each (a run cut short keeps them)."""
    from denoiser_client import vram_plans
    from denoiser_client.vram import PLANS

    spec = MODELS[name]
    started = time.perf_counter()
    model = Model(name, spec, device, args.tiny)
    report.update({"model": name, "family": spec["family"], "params": model.params, "steps": model.steps,
                   "size": model.size, "build_s": round(time.perf_counter() - started, 1), "plans": {}, "caps": {},
                   "host_copy": model.weights is not None})
    cuda = device.type == "cuda"
    for plan in [p for p in PLANS if cuda or PLANS[p].usable("cpu")]:
        report["plans"][plan] = measure(model, plan, 2 if args.tiny or "offload" in plan else 3)
        print(f"[{name}] {plan}: {report['plans'][plan]}", flush=True)
        save()
    if not cuda:
        return report
    # `pick_plan` reads these figures for this model (the table `--write-table` writes holds the same).
    entry = {"model": name, "params": model.params, "gpu": torch.cuda.get_device_name(),
             "plans": plan_costs(report["plans"], model.params)}
    vram_plans.MEASURED[spec["family"]] = [e for e in vram_plans.MEASURED.get(spec["family"], [])
                                           if e.get("model") != name and e.get("model") != "flux1-dev-seed"] + [entry]
    pixels = model.size * model.size
    baselines = Baselines(model, report)
    for gib in args.caps:
        choice = vram_plans.pick_plan(spec["family"], model.params, pixels, gib * GIB, "cuda")
        order = vram_plans.ordered_plans(spec["family"], "cuda", model.params)
        row = {"auto": choice.name, "predicted_gib": round(choice.predicted_bytes / GIB, 2),
               "auto_run": measure(model, choice.name, 2, gib)}
        faster = order[:order.index(choice.name)]
        if faster:  # the fastest plan auto turned down, under the same cap
            row["next_faster"] = measure(model, faster[-1], 2, gib)
        fits = {p: r["s_per_image"] for p, r in report["plans"].items()
                if "error" not in r and r.get("peak_reserved_gib", 1e9) <= gib}
        row["fits_uncapped_peak"] = fits
        ok = "error" not in row["auto_run"]
        row["auto_s_per_image"] = report["plans"][choice.name].get("s_per_image") if ok else None
        if fits and ok:
            row["fastest_that_fits"] = min(fits, key=fits.get)
            row["auto_vs_fastest"] = round(row["auto_s_per_image"] / min(fits.values()), 3)
        row["node_images_per_min"] = round(60 / row["auto_s_per_image"], 2) if ok else 0.0
        row["plain_model_offload"] = baselines.model_offload(gib)
        row["two_phase"] = baselines.two_phase(gib, choice.name if ok else None)
        report["caps"][str(gib)] = row
        print(f"[{name}] cap {gib} GiB: {json.dumps(row)}", flush=True)
        save()
    baselines.close()
    return report


class Baselines:
    """What users run without promptcast, under a cap: the plain pipeline with model offload, and two phases."""

    def __init__(self, model: Model, report: dict):
        import transformers

        self.model = model
        self.report = report
        cls_name, config = model.spec["text_encoder"]
        self.cls = getattr(transformers, cls_name)
        self.config = self.cls.config_class(**config)
        with torch.device("meta"):
            self.params = sum(p.numel() for p in self.cls(self.config).parameters())
        self.gib = {"bf16": self.params * 2 / GIB, "int8": self.params / GIB}
        report["text_encoder"] = {"class": cls_name, "params": self.params, "bf16_gib": round(self.gib["bf16"], 2),
                                  "int8_gib": round(self.gib["int8"], 2)}
        self.host = None  # the bf16 text encoder in host memory, for model offload (only where it could fit)
        if self.gib["bf16"] < max(CAPS):
            self.host = self.build("cuda").to("cpu")
            free()

    def build(self, on: str):
        with torch.device(on):
            return _in_dtype(torch.bfloat16, lambda: self.cls(self.config).eval())

    def close(self):
        self.host = None
        free()

    def encode_once(self, te) -> None:
        ids = torch.ones((1, 512), dtype=torch.long, device="cuda")
        with torch.inference_mode():
            te(input_ids=ids)

    def model_offload(self, gib: float) -> dict:
        transformer_gib = self.model.params * 2 / GIB
        largest = max(transformer_gib, self.gib["bf16"])
        if self.host is None or largest >= gib:
            return {"runs": False, "why": f"its largest part needs {largest:.1f} GiB in bf16 (transformer "
                                          f"{transformer_gib:.1f}, text encoder {self.gib['bf16']:.1f})"}
        pipe = None
        try:
            pipe = self.model.pipeline("full")
            pipe.transformer.to("cpu")
            pipe.vae.to("cpu")
            free()
            pipe.enable_model_cpu_offload()
            cap(gib)
            started = time.perf_counter()
            self.host.to("cuda")  # model offload moves the text encoder in for each call's prompt, then out
            self.encode_once(self.host)
            self.host.to("cpu")
            encode_s = time.perf_counter() - started
            timing = render(pipe, self.model, self.model.steps)  # one whole call at the usual steps
            s = encode_s + timing["call_s"]
            return {"runs": True, "s_per_image": round(s, 3), "images_per_min": round(60 / s, 2),
                    "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3)}
        except torch.OutOfMemoryError:
            return {"runs": False, "why": "out of memory"}
        finally:
            if pipe is not None:
                pipe.remove_all_hooks()
            self.host.to("cpu")
            del pipe
            cap(None)
            free()

    def two_phase(self, gib: float, plan: str | None) -> dict:
        if plan is None:
            return {"runs": False, "why": "no plan fits the transformer"}
        if self.gib["int8"] >= gib:
            return {"runs": False, "why": f"the text encoder needs {self.gib['int8']:.1f} GiB in 8 bit"}
        import bitsandbytes as bnb

        try:
            te = self.build("cuda")  # quantized from GPU weights below: faster than the load from disk users wait for
            sync()
            started = time.perf_counter()
            _to_int8(te, bnb)
            sync()
            load_s = time.perf_counter() - started
            free()
            cap(gib)
            started = time.perf_counter()
            for _ in range(JOB):
                self.encode_once(te)
            sync()
            encode_s = time.perf_counter() - started
        except torch.OutOfMemoryError:
            return {"runs": False, "why": "the 8-bit text encoder ran out of memory"}
        finally:
            te = None
            cap(None)
            free()
        move_s = self.move_transformer_seconds()
        image_s = self.report["plans"][plan]["s_per_image"]
        total = load_s + encode_s + move_s + JOB * image_s
        return {"runs": True, "plan": plan, "int8_load_s": round(load_s, 2), "encode_s": round(encode_s, 2),
                "transformer_move_s": round(move_s, 2), "job_s": round(total, 2),
                "images_per_min": round(60 * JOB / total, 2)}

    def move_transformer_seconds(self) -> float:
        """Host-to-GPU time of the bf16 transformer (from an eighth of it): phase 2 begins with it."""
        if self.model.weights is None:  # no host copy kept: an eighth of the bytes, faulted in
            part = [("part", torch.zeros(self.model.params // 8, dtype=self.model.dtype))]
        else:
            items = list(self.model.weights.items())
            part = items[: max(1, len(items) // 8)]
        sync()
        started = time.perf_counter()
        moved = [v.to("cuda") for _, v in part]
        sync()
        seconds = time.perf_counter() - started
        fraction = sum(v.numel() for v in moved) / self.model.params
        del moved
        free()
        return seconds / fraction


def _to_int8(module, bnb) -> None:
    """Every Linear of `module` as a bitsandbytes int8 Linear8bitLt, as `load_in_8bit=True` makes it."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0, device="meta")
            # `Int8Params.to` quantizes only weights coming from the host: these are on the GPU already.
            layer.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False,
                                             has_fp16_weights=False)._quantize(torch.device("cuda"))
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, layer)
        else:
            _to_int8(child, bnb)


def write_table(paths: list[str]) -> None:
    """Rewrite `MEASURED` in denoiser_client/vram_plans.py from consumer_cards results."""
    from denoiser_client.vram_plans import MEASURED

    by_family: dict[str, list[str]] = {}
    gpu = ""
    for path in paths:
        result = json.loads(pathlib.Path(path).read_text())
        gpu = result["gpu"]
        for name, model in result["models"].items():
            if "plans" not in model:
                continue
            costs = plan_costs(model["plans"], model["params"])
            rows = "".join(f'            "{plan}": PlanCost({c.weight_bytes_per_param}, {c.extra_bytes / GIB:.3f} * GIB, '
                           f'{c.seconds_per_image}),\n' for plan, c in costs.items())
            by_family.setdefault(model["family"], []).append(
                f'        {{"model": "{name}", "params": {model["params"]:.4g}, "gpu": "{gpu}", "plans": {{\n'
                f'{rows}        }}}},\n')
    for family in MEASURED:
        by_family.setdefault(family, [])
    body = "".join(f'    "{family}": [\n{"".join(entries)}    ],\n' for family, entries in by_family.items() if entries)
    target = pathlib.Path(__file__).resolve().parents[1] / "denoiser_client" / "vram_plans.py"
    text = target.read_text()
    start, end = text.index("# BEGIN MEASURED"), text.index("# END MEASURED")
    header = text[start:text.index("\n", start) + 1]
    sources = ", ".join(pathlib.Path(p).name for p in paths)
    new = f"{header}MEASURED: dict[str, list[dict]] = {{\n    # bench/consumer_cards.py on {gpu}: {sources}\n{body}}}\n"
    target.write_text(text[:start] + new + text[end:])
    print(f"wrote {target}")


def print_table(result: dict) -> None:
    print(f"\n{'model':15} {'cap':>4} {'auto plan':18} {'peak':>6} {'s/img':>6} {'img/min':>7} {'vs best':>7} "
          f"{'offload':>8} {'2-phase':>8}  (images/min; peaks GiB)")
    for name, model in result["models"].items():
        for gib, row in model.get("caps", {}).items():
            run = row["auto_run"]
            peak = run.get("peak_reserved_gib", run.get("error", "-"))
            print(f"{name:15} {gib:>4} {row['auto']:18} {peak!s:>6} {row.get('auto_s_per_image') or '-'!s:>6} "
                  f"{row['node_images_per_min']:>7} {row.get('auto_vs_fastest', '-')!s:>7} "
                  f"{row['plain_model_offload'].get('images_per_min', 0.0)!s:>8} "
                  f"{row['two_phase'].get('images_per_min', 0.0)!s:>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--caps", nargs="+", type=float, default=list(CAPS))
    parser.add_argument("--out", default="bench/results/consumer_cards.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: the code paths, a smoke test")
    parser.add_argument("--write-table", nargs="+", metavar="RESULTS", help="regenerate vram_plans.MEASURED")
    args = parser.parse_args()
    if args.write_table:
        write_table(args.write_table)
        return
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    result = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "size": SIZE if not args.tiny else 64, "caps_gib": args.caps, "tiny": args.tiny, "models": {}}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    def save():
        out.write_text(json.dumps(result, indent=1) + "\n")

    for name in args.models:
        result["models"][name] = report = {}
        try:
            run_model(name, args, device, report, save)
        except Exception as e:  # noqa: BLE001 - keep what the other models measured
            traceback.print_exc()
            report["error"] = f"{type(e).__name__}: {e}"[:500]
        free()
        save()
    print_table(result)


if __name__ == "__main__":
    main()
