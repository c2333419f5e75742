"""Generate: images from a base model with any number of adapters at their scales (`lora-sd generate`), each
adapter's fit badge against the base model, and the base model's detected SD architecture."""
from __future__ import annotations

import gradio as gr

from lora_core.fields import field_specs
from lora_sd.adapter_formats import embedding_path
from lora_sd.config import AUTO_SAMPLER

from .. import job_kinds
from ..forms import sampler_choices
from ..services.fit import badge
from ..widgets import guard, workspace_browser
from .adapters import fit_badge, quick_badge


def schedulers() -> list[str]:
    """The sampler names the SD config declares (sample.scheduler), the ones `lora-sd generate` accepts."""
    spec = next(s for s in field_specs(job_kinds.get("sd-train").config_class()) if s.path == "sample.scheduler")
    return list(spec.choices)


def build(page) -> None:
    ctrl = page.ctrl
    with gr.Tab("Generate", id="generate") as tab:
        with gr.Row():
            with gr.Column():
                model = gr.Textbox(label="Base model", value="tiny", elem_id="gen-model",
                                   info="'tiny' (pretrained on synthetic shapes), 'tiny-random' / 'tiny-sd2' / 'tiny-sdxl' / 'tiny-sd3', a diffusers folder / .safetensors / "
                                        ".ckpt in the workspace (SD 1.x, 2.x, SDXL, SD 3.5), or a hub id")
                arch = gr.Markdown(elem_id="gen-model-note")
                pick, scale, add, table = adapter_picker(ctrl)
                emb_from = gr.Dropdown(choices=[], value=[], multiselect=True, label="Word embedding from",
                                       elem_id="gen-embedding-from",
                                       info="when two adapters bring an embedding for the same word: the one whose "
                                            "embedding the word uses (the other keeps only its LoRA)")
                with gr.Row():
                    fit = gr.Button("Fits the base model?", size="sm", elem_id="gen-fit", scale=1)
                    fit_html = gr.HTML(badge(None), elem_id="gen-badge")
                with gr.Accordion("Load report", open=False):
                    report = gr.JSON(elem_id="gen-fit-report")
                params = settings()
                go = gr.Button("Generate", variant="primary", elem_id="gen-go")
            with gr.Column():
                gallery = gr.Gallery(label="Results", columns=3, height=420, elem_id="gen-gallery")
                message = gr.Markdown(elem_id="gen-message")
    page.adapter_pickers.append(pick)
    page.refresh_adapters_on_select(tab)

    @guard
    def add_adapter(rows, chosen, value, base):
        if not chosen:
            raise gr.Error("choose an adapter file first", print_exception=False)
        rows = [r for r in (rows or []) if r and str(r[0]).strip()]
        path = ctrl.ws.resolve(chosen, must_exist=True)
        return rows + [[chosen, float(value if value is not None else 1.0), embedding_path(path).is_file(),
                        ctrl.adapters.fit_label(chosen, base, True)]]

    @guard
    def row_badge(base, evt: gr.SelectData):   # a row clicked: its fit badge and report
        file = evt.row_value[0] if getattr(evt, "row_value", None) else None
        return quick_badge(ctrl, file, base) if file else (gr.skip(), gr.skip())

    @guard
    def generate(base, rows, chosen, *values):
        return ctrl.generation.images(base, rows, *values, embedding_from=chosen or ())

    @guard
    def embedding_choices(rows, chosen):   # the table's adapters with a word embedding; a removed one is unpicked
        names = ctrl.generation.embedding_choices(rows)
        return gr.update(choices=names, value=[c for c in chosen or [] if c in names])

    def arch_view(text, chosen):   # the detected architecture, and the samplers that fit it (forms.sampler_choices)
        kind, line = ctrl.configs.arch_note(text)
        names = sampler_choices(kind)
        return line, gr.update(choices=names, value=chosen if chosen in names else AUTO_SAMPLER)

    sampler = params[7]
    model.change(arch_view, [model, sampler], [arch, sampler])
    page.on_load([arch, sampler], lambda: list(arch_view(model.value, sampler.value)))
    add.click(add_adapter, [table, pick, scale, model], [table])
    table.select(row_badge, [model], [fit_html, report])
    fit.click(guard(lambda f, b: fit_badge(ctrl, f, b)), [pick, model], [fit_html, report])
    quick = guard(lambda f, b: quick_badge(ctrl, f, b) if f else (badge(None), None))
    pick.change(quick, [pick, model], [fit_html, report])    # the picked adapter's badge, without a model load
    table.change(embedding_choices, [table, emb_from], [emb_from], show_progress="hidden")
    go.click(generate, [model, table, emb_from, *params], [gallery, message])


def adapter_picker(ctrl):
    with gr.Row():
        pick = gr.Dropdown(choices=ctrl.adapters.entries(), label="Adapter", scale=3, elem_id="gen-adapter-pick",
                           allow_custom_value=True,
                           info="one entry per adapter: a run's kohya file, with the other formats it also wrote")
        scale = gr.Number(value=1.0, label="Scale", scale=1, elem_id="gen-adapter-scale")
        add = gr.Button("Add adapter", scale=1, elem_id="gen-adapter-add")
    with gr.Accordion("Adapter: choose from the workspace", open=False):
        browse = workspace_browser(ctrl.ws.root, "the workspace (choose an adapter .safetensors: it becomes the "
                                   "Adapter above)", "gen-adapter-browser")
    browse.change(guard(lambda chosen: ctrl.browse.adapter(chosen) if chosen else gr.skip()), [browse], [pick])
    table = gr.Dataframe(headers=["adapter", "scale", "with its word embedding", "fit"], value=[], type="array",
                         datatype=["str", "number", "bool", "str"], interactive=True, elem_id="gen-adapters",
                         label="Adapters (edit the scale; clear a row to drop it; untick the embedding of an adapter "
                               "trained with a word (<name>_emb.safetensors) to leave that word out)")
    return pick, scale, add, table


def settings() -> list:
    """prompt, negative, seed, steps, guidance, width, height, scheduler, images (GenerationService.images order)."""
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="gen-prompt", value="a red circle on a grey background")
    negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
    with gr.Row():
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id="gen-seed")
        steps = gr.Number(value=4, precision=0, label="Steps", elem_id="gen-steps")
        guidance = gr.Number(value=7.5, label="Guidance", elem_id="gen-guidance")
    with gr.Row():
        width = gr.Number(value=64, precision=0, label="Width", elem_id="gen-width")
        height = gr.Number(value=64, precision=0, label="Height", elem_id="gen-height")
        scheduler = gr.Dropdown(schedulers(), value=AUTO_SAMPLER, label="Scheduler", elem_id="gen-scheduler")
        n = gr.Number(value=1, precision=0, label="Images", elem_id="gen-n")
    return [prompt, negative, seed, steps, guidance, width, height, scheduler, n]
