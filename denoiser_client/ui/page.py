"""The console's Gradio page: the form, the result, the history and the encoder server's state.

Every element a person (or a browser test) looks for carries a visible label: "Prompt", "Style", "Seed", "Steps",
"Width", "Height", "Guidance", "Generate", "Result", "Info", "History", "Encoder server" and, where the model takes
them, "Negative", "True CFG scale", "Reference images" and (video families) "Frames" and "FPS". Labels and hints never
contain another element's label, so that a search by label (which matches parts of labels) finds one element. A video
shows in a video player when it is an MP4, as an animated image when it is a GIF. Generate runs through Gradio's queue
one request at a time; the page turns every failure into a message in "Info" (and a notice) and stays usable.
"""

from __future__ import annotations

import logging
import os
import socket

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by Gradio at import: no telemetry, no version check
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402

from denoiser_client.errors import OutOfGpuMemory, PromptcastError, ServerUnavailable  # noqa: E402
from denoiser_client.ui.console import RANDOM_SEED, Console, ConsoleRequest, Rendered  # noqa: E402

logger = logging.getLogger(__name__)

# The result fills its frame, whatever the image size (a tiny test model makes 32 px images).
CSS = "#result img, #result video { width: 100%; height: 100%; object-fit: contain; }"
STATUS_SECONDS = 5.0  # how often an open page asks for the encoder server's health
FRAMES_HINT = "4k+1: the video VAE packs 4 into each latent frame after the first."
# System fonts only: Gradio's default theme loads its fonts from a web font service, and a node may be offline.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "monospace"])


# Gradio names a slider's number box "number input for Steps" and its range "range slider for Steps", so a search
# for the label "Steps" finds two controls, neither named exactly "Steps"; an image or gallery has no label a search
# finds at all. This names the number box by the visible label (and points the label at it), gives the range the
# label as its title (its role's name), and labels the result and history blocks; it runs again whenever the page
# re-renders, and only touches controls it has not handled yet.
LABELS_SCRIPT = """<script>
(() => {
  const PREFIX = "range slider for ";
  const label = () => {
    for (const range of document.querySelectorAll(`input[type=range][aria-label^="${PREFIX}"]`)) {
      const name = range.getAttribute("aria-label").slice(PREFIX.length);
      const head = range.closest(".wrap");
      const box = head && head.querySelector("input[type=number]");
      const tag = head && head.querySelector("label[for]");
      if (!box || !tag) continue;
      box.id = box.id || `${range.id}-value`;
      box.setAttribute("aria-label", name);
      tag.htmlFor = box.id;
      range.removeAttribute("aria-label");
      range.title = name;
    }
    for (const [id, name] of [["result", "Result"], ["history", "History"]]) {
      const block = document.getElementById(id);
      if (block && !block.hasAttribute("aria-label")) block.setAttribute("aria-label", name);
    }
  };
  new MutationObserver(label).observe(document.documentElement,
                                      {childList: true, subtree: true, attributes: true, attributeFilter: ["aria-label"]});
})();
</script>"""


def build_page(console: Console) -> gr.Blocks:
    """The page of `console` (not yet launched)."""
    facts = console.facts
    with gr.Blocks(title="promptcast", analytics_enabled=False) as page:
        gr.Markdown("## promptcast console")
        status = gr.Textbox(label="Encoder server", value=console.encoder_line, interactive=False, max_lines=2)
        if console.problems:
            gr.Markdown("\n".join(f"- **{problem}**" for problem in console.problems), elem_id="style-problems")
        history = gr.State([])
        fields = {}
        with gr.Row():
            with gr.Column(scale=2):
                hint = ("Plain text, or a JSON object (a structured prompt, sent as compact JSON)."
                        if facts.structured_prompts else None)
                fields["prompt"] = gr.Textbox(label="Prompt", lines=3, info=hint,
                                              placeholder="a red fox in a snowy forest at dusk")
                if facts.negative_prompt:
                    fields["negative_prompt"] = gr.Textbox(label="Negative", lines=1,
                                                           info=_negative_hint(facts.family, facts.media))
                fields["style"] = gr.Dropdown(label="Style", choices=console.style_names, value=console.style_names[0],
                                              info="LoRA styles loaded once at start; switching does not reload.")
                with gr.Row():
                    fields["seed"] = gr.Number(label="Seed", value=RANDOM_SEED, precision=0, info="-1: a random seed")
                    fields["steps"] = gr.Slider(1, max(100, facts.steps), value=facts.steps, step=1, label="Steps")
                with gr.Row():
                    fields["width"] = gr.Slider(16, max(2048, facts.width), value=facts.width, step=16, label="Width")
                    fields["height"] = gr.Slider(16, max(2048, facts.height), value=facts.height, step=16,
                                                 label="Height")
                with gr.Row():
                    if facts.guidance is not None:
                        fields["guidance"] = gr.Slider(0, 20, value=facts.guidance, step=0.1, label="Guidance")
                    if facts.true_cfg_scale is not None and facts.negative_prompt:
                        fields["true_cfg_scale"] = gr.Slider(1, 20, value=facts.true_cfg_scale, step=0.1,
                                                             label="True CFG scale",
                                                             info="Above 1, what to leave out counts too (two "
                                                                  "passes per denoising step).")
                if facts.video:
                    with gr.Row():
                        fields["num_frames"] = gr.Slider(1, max(161, facts.num_frames), value=facts.num_frames, step=4,
                                                         label="Frames", info=FRAMES_HINT)
                        fields["fps"] = gr.Number(label="FPS", value=facts.fps, precision=0,
                                                  info="Playback rate of the saved file, per second.")
                if facts.max_reference_images:
                    fields["reference_images"] = gr.File(label="Reference images", file_count="multiple",
                                                         file_types=["image"], type="filepath")
                generate = gr.Button("Generate", variant="primary")
            with gr.Column(scale=3):
                if console.suffix == ".mp4":
                    result = gr.Video(label="Result", format=None, interactive=False, elem_id="result", height=512,
                                      autoplay=True, loop=True, buttons=["download"])
                else:  # a PNG, or a video as GIF: browsers animate it
                    result = gr.Image(label="Result", type="filepath", format="png", interactive=False,
                                      elem_id="result", height=512, buttons=["download", "fullscreen"])
                info = gr.Textbox(label="Info", lines=6, interactive=False)
        gallery = gr.Gallery(label="History", columns=8, height=240, fit_columns=False, object_fit="contain",
                             allow_preview=False, type="filepath", interactive=False, elem_id="history",
                             buttons=["download"])
        names = list(fields)

        def on_generate(values: dict, progress=gr.Progress()):
            form = {name: values[fields[name]] for name in names}
            entries = values[history]
            progress(0, desc="encoding the prompt")
            try:
                rendered = console.render(request_from(form),
                                          progress=lambda step, steps: progress((step, steps), desc="denoising"))
            except (PromptcastError, ValueError, OSError) as e:
                return failure(str(e) + FOLLOW_UP.get(type(e), ""))
            except Exception as e:  # noqa: BLE001 - the page must survive anything
                logger.exception("render failed")
                return failure(f"unexpected {type(e).__name__}: {e}")
            entries = [entry_of(rendered)] + entries
            return {result: str(rendered.path), info: rendered.info(), gallery: gallery_of(entries),
                    history: entries, status: console.encoder_line()}

        def failure(message: str):
            gr.Warning(message.splitlines()[0], duration=10)
            return {result: None, info: f"error: {message}", status: console.encoder_line()}

        def on_pick(entries: list, event: gr.SelectData):
            entry = entries[event.index]
            form = entry["form"]
            return {**{fields[name]: form.get(name) for name in names}, result: entry["path"], info: entry["info"]}

        generate.click(on_generate, inputs={history, *fields.values()},
                       outputs=[result, info, gallery, history, status], concurrency_limit=1,
                       concurrency_id="render")
        gallery.select(on_pick, inputs=history, outputs=[*fields.values(), result, info], queue=False)
        gr.Timer(STATUS_SECONDS).tick(console.encoder_line, outputs=status, show_progress="hidden",
                                      concurrency_id="status")
    return page


FOLLOW_UP = {  # what a person at the page can do next
    ServerUnavailable: "\nThe page keeps working: press Generate again once the encoder server is back.",
    OutOfGpuMemory: "\nA smaller Width and Height may fit; another memory plan needs promptcast ui restarted with it.",
}


def _negative_hint(family: str, media: str) -> str:
    if family == "flux1":
        return f"What the {media} should not show; counts once true CFG is above 1."
    return f"What the {media} should not show; counts when the CFG scale is above 1."


def request_from(form: dict) -> ConsoleRequest:
    """The form's values as a request (empty boxes: None; the seed a whole number)."""
    seed = form.get("seed")
    refs = form.get("reference_images") or ()
    return ConsoleRequest(prompt=form.get("prompt") or "", style=form.get("style") or "",
                          seed=RANDOM_SEED if seed is None else seed, steps=_int(form.get("steps")),
                          width=_int(form.get("width")), height=_int(form.get("height")),
                          guidance=form.get("guidance"), negative_prompt=form.get("negative_prompt") or None,
                          true_cfg_scale=form.get("true_cfg_scale"),
                          reference_images=tuple(refs if isinstance(refs, (list, tuple)) else [refs]),
                          num_frames=_int(form.get("num_frames")), fps=_int(form.get("fps")))


def _int(value):
    return None if value is None else int(value) if float(value).is_integer() else value


def entry_of(rendered: Rendered) -> dict:
    """A history entry: the file, the form as it was rendered (the drawn seed, so picking it gives the same image or
    video)."""
    r = rendered.request
    form = {"prompt": r.prompt, "style": r.style, "seed": r.seed, "steps": r.steps, "width": r.width,
            "height": r.height, "guidance": r.guidance, "negative_prompt": r.negative_prompt or "",
            "true_cfg_scale": r.true_cfg_scale, "reference_images": list(r.reference_images) or None,
            "num_frames": r.num_frames, "fps": r.fps}
    frames = "" if r.num_frames is None else f" · {r.num_frames} frames"
    caption = f"{r.style} · seed {r.seed} · {r.steps} steps · {r.width}x{r.height}{frames} · {r.prompt[:60]}"
    return {"path": str(rendered.path), "form": form, "info": rendered.info(), "caption": caption}


def gallery_of(entries: list) -> list:
    return [(entry["path"], entry["caption"]) for entry in entries]


def launch(page: gr.Blocks, console: Console, host: str, port: int) -> str:
    """Serve `page` on `host:port` (0: a free port) without blocking; returns its URL."""
    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    page.queue(default_concurrency_limit=1)
    page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                inbrowser=False, ssr_mode=False, mcp_server=False, pwa=False, enable_monitoring=False,
                run_history=False, allowed_paths=[str(console.out_dir)], theme=THEME, css=CSS, head=LABELS_SCRIPT,
                max_file_size="64mb")
    return page.local_url or f"http://{host}:{port}/"


def start_console(node, encoder, styles: list, *, out_dir, host: str = "127.0.0.1", port: int = 7860,
                  connect=None) -> tuple[gr.Blocks, Console, str]:
    r"""
    Load the styles' LoRAs into `node`, build the page and serve it without blocking.

    Args:
        node ([`DenoiserNode`]): the loaded node.
        encoder ([`RemoteTextEncoder`]): the encoder server's client (`connect` makes a fresh one after an outage).
        styles (`list[Style]`): from `styles.load_styles`; a style whose LoRA fails its check is left out and
            reported on the page and in the log.
        out_dir (`str` or `os.PathLike`): where the images (or videos) are saved.
        host (`str`), port (`int`): where to listen (port 0: a free one).

    Returns:
        `(page, console, url)`; `page.close()` stops serving.
    """
    console = Console(node, encoder, styles, out_dir, connect=connect)
    console.load_styles()
    page = build_page(console)
    return page, console, launch(page, console, host, port)
