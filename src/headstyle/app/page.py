"""The Gradio page: tabs of inputs and outputs wired to headstyle.app.handlers through the job queue.

Nothing here computes: a button checks its inputs, puts a job on the queue (one at a time) and follows
it, streaming its progress, preview and finally its files to the page. Training runs are followed by a
timer reading their folders, so a reload of the page or a closed tab loses nothing.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from headstyle.app import handlers, training
from headstyle.app.config import TAB_TITLES, AppConfig, with_workdir
from headstyle.app.jobs import FINISHED, AppError, Job, JobQueue, JobState, job_folder_name, run_in_folder
from headstyle.app.models import Lab, Models

POLL_SECONDS = 0.4
TIMER_SECONDS = 2.0
MEDIA_HEIGHT = 320
CSS = """
.hs-job {font-size: 0.95em; padding: 4px 0}
.hs-job progress {width: 100%; height: 14px}
.hs-error {color: #b42318; font-weight: 600}
.hs-note {color: #555}
/* Lab renders are 64 px: scale results up to the panel, below its label, without blurring. */
.hs-result img {width: 100%; height: 100%; padding-top: 28px; box-sizing: border-box; object-fit: contain;
                image-rendering: pixelated}
"""
INTRO = """# headstyle
Identity-preserving 3D head stylisation, on this computer. **Photo** turns a face photo into a stylised 3D head;
**Generate** draws new heads through a stylised generator; **Style image** stylises rendered views from a picture;
**Train a style** makes a new stylised generator. **The lab** runs all of it on a synthetic head world, with no
weights to download. Jobs run one at a time; every result is a file you can download."""


# ---------------------------------------------------------------------------------------------- job display


def status_html(state: JobState | None) -> str:
    """A job's progress as HTML: a bar, its percentage and line of text, the queue position or the error."""
    if state is None:
        return ""
    text = html.escape(state.text)
    if state.status == "failed":
        return f'<div class="hs-job hs-error">error: {html.escape(state.error)}</div>'
    if state.status == "queued":
        return f'<div class="hs-job">waiting: {state.queued_ahead} job(s) ahead</div>'
    if state.status == "stopped":
        return f'<div class="hs-job hs-note">{text}</div>'
    percent = round(100 * state.fraction)
    return (f'<div class="hs-job" data-status="{state.status}"><progress value="{state.fraction:.3f}" max="1">'
            f"</progress> {percent}% · {text}</div>")  # fmt: skip


def _preview(state: JobState) -> Any:
    p = state.preview
    return str(p) if isinstance(p, Path) else p if isinstance(p, np.ndarray) else gr.skip()


def follow(job: Job, finish: Callable[[Any], list[Any]], n_outputs: int) -> Iterator[list[Any]]:
    """Stream [status, preview, *outputs] while ``job`` runs; when done, ``finish(result)`` gives the outputs."""
    skip = [gr.skip()] * n_outputs
    while not job.wait(POLL_SECONDS):
        state = job.state()
        yield [status_html(state), _preview(state), *skip]
    state = job.state()
    if state.status != "done":
        if state.status == "failed":
            gr.Warning(state.error)
        yield [status_html(state), _preview(state), *skip]
        return
    yield [status_html(state), _preview(state), *finish(state.result)]


def failed(message: str, n_outputs: int) -> list[Any]:
    """What a button shows when its inputs are refused before any job starts."""
    gr.Warning(message)
    return [f'<div class="hs-job hs-error">error: {html.escape(message)}</div>', gr.skip(), *[gr.skip()] * n_outputs]


def result_image(label: str, **kwargs: Any) -> gr.Image:
    """An output picture, scaled up to the panel (lab renders are small)."""
    return gr.Image(label=label, interactive=False, elem_classes="hs-result", height=MEDIA_HEIGHT, **kwargs)


def turntable_video(label: str, **kwargs: Any) -> gr.Video:
    return gr.Video(label=label, autoplay=True, loop=True, height=MEDIA_HEIGHT, **kwargs)


def show_mesh(path: str | None) -> Any:
    """The mesh viewer's value, set by a plain (non-streaming) event: Gradio's Model3D does not mount its viewer
    when a streaming event sets its value."""
    return path if path else gr.skip()


def _files(paths: list[Path]) -> list[str]:
    return [str(p) for p in paths]


def _first(paths: list[Path]) -> str | None:
    return str(paths[0]) if paths else None


# ---------------------------------------------------------------------------------------------- panels


class Page:
    """Builds the tabs; holds the models, the lab and the job queue the handlers run on."""

    def __init__(self, cfg: AppConfig, jobs: JobQueue) -> None:
        # Absolute, so the files handed to the browser lie under the served folder whatever the working directory.
        cfg = with_workdir(cfg, str(Path(cfg.server.workdir).resolve()))
        self.cfg = cfg
        self.jobs = jobs
        self._ticks: list[Callable[[], Any]] = []
        self.models = Models(cfg)
        self.lab = Lab(cfg)
        self.workdir = Path(cfg.server.workdir)
        self.style_dropdowns: dict[str, list[gr.Dropdown]] = {"models": [], "lab": []}
        self.training_jobs: dict[str, Job] = {}  # by run folder

    def world(self, name: str) -> Models | Lab:
        return self.lab if name == "lab" else self.models

    def _job_folder(self, world: str, kind: str) -> Path:
        root = self.workdir / "lab" / "jobs" if world == "lab" else self.workdir / "jobs"
        return root / job_folder_name(kind)

    def style_dropdown(self, world: str, elem_id: str) -> gr.Dropdown:
        choices = list(self.world(world).styles())
        dd = gr.Dropdown(choices=choices, value=choices[0] if choices else None, label="Style", elem_id=elem_id,
                         info="stylised generators: trained here, configured (and, in the lab, the ground truth)")
        self.style_dropdowns[world].append(dd)
        return dd

    # -- photo -------------------------------------------------------------------------------------------------

    def photo_panel(self) -> None:
        gr.Markdown("Drop a photo with a face. Check the crop and camera, then project it into the base generator "
                    "(PanoHead's projector) and render the chosen stylised generator with that code.")
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label="Photo", sources=["upload", "webcam"], type="numpy", height=300,
                                 elem_id="photo-input")  # fmt: skip
                with gr.Row():
                    crop = gr.Image(label="Aligned crop (512 px)", interactive=False, height=220,
                                    elem_id="photo-crop")  # fmt: skip
                    camera = gr.Markdown(elem_id="photo-camera")
            with gr.Column():
                style = self.style_dropdown("models", "photo-style")
                steps = gr.Number(value=self.cfg.photo.steps, precision=0, label="Projection steps", minimum=1)
                go = gr.Button("Project and stylise", variant="primary", elem_id="photo-run")
                status = gr.HTML(elem_id="photo-status")
                preview = result_image("Projection: photo | render (live)", elem_id="photo-preview")
        with gr.Row():
            video = turntable_video("Stylised turntable", elem_id="photo-video")
            views = result_image("The five views", elem_id="photo-views")
        with gr.Row():
            sheet = result_image("Photo | reconstruction | stylised")
            mesh = gr.Model3D(label="Stylised mesh (GLB)", elem_id="photo-mesh", height=MEDIA_HEIGHT)
        files = gr.File(label="Downloads: W+ code, mesh, PNGs, turntable", file_count="multiple",
                        elem_id="photo-files")  # fmt: skip
        face = gr.State(None)
        mesh_path = gr.State(None)

        def on_photo(image: np.ndarray | None):
            if image is None:
                return None, "", None
            try:
                aligned = handlers.align(image)
            except AppError as exc:
                gr.Warning(str(exc))
                return None, f'<span class="hs-error">error: {html.escape(str(exc))}</span>', None
            return aligned.crop, handlers.camera_summary(aligned), aligned

        photo.change(on_photo, photo, [crop, camera, face], concurrency_limit=2)
        outputs = [video, views, sheet, files, mesh_path]

        def on_run(aligned, style_name: str, n_steps: float):
            if aligned is None:
                yield failed("no aligned face yet: drop a photo with a face first", len(outputs))
                return
            if not style_name:
                yield failed("no style: choose a stylised generator", len(outputs))
                return
            settings = replace(self.cfg.photo, steps=max(1, int(n_steps or 1)))

            def work(job: Job) -> handlers.PhotoResult:
                base = self.models.base(projection=True)
                stylised, perceptual = self.models.stylised(style_name), self.models.perceptual()
                return run_in_folder(self._job_folder("models", "photo"), lambda out: handlers.photo_to_head(
                    aligned, base, stylised, perceptual, settings, self.models.render, out, job.report))

            def finish(r: handlers.PhotoResult) -> list[Any]:
                for note in r.notes:
                    gr.Info(note)
                return [_first(r.turntable), str(r.views_sheet), str(r.sheet), _files(r.downloads),
                        r.mesh and str(r.mesh)]  # fmt: skip

            yield from follow(self.jobs.submit("photo", work), finish, len(outputs))

        go.click(on_run, [face, style, steps], [status, preview, *outputs], concurrency_limit=None).then(
            show_mesh, mesh_path, mesh)

    # -- generate ----------------------------------------------------------------------------------------------

    def generate_panel(self, world: str) -> None:
        with gr.Row():
            with gr.Column(scale=1):
                seeds = gr.Textbox(value="0", label="Seeds", info="comma-separated, e.g. 0,1,2 (at most 8)",
                                   elem_id=f"{world}-gen-seeds")  # fmt: skip
                truncation = gr.Slider(0.0, 1.0, value=0.7, step=0.05, label="Truncation psi")
                style = self.style_dropdown(world, f"{world}-gen-style")
                go = gr.Button("Generate", variant="primary", elem_id=f"{world}-gen-run")
                status = gr.HTML(elem_id=f"{world}-gen-status")
                preview = gr.Image(visible=False)
            with gr.Column(scale=2):
                sheet = result_image("Base (upper row) vs stylised (lower row), per seed",
                                     elem_id=f"{world}-gen-sheet")
                with gr.Row():
                    video = turntable_video("Turntable: base | stylised", elem_id=f"{world}-gen-video")
                    mesh = gr.Model3D(label="Meshes: base and stylised (GLB)", elem_id=f"{world}-gen-mesh",
                                       height=MEDIA_HEIGHT)
                files = gr.File(label="Downloads: meshes, sheet, turntable", file_count="multiple",
                                elem_id=f"{world}-gen-files")  # fmt: skip
        mesh_path = gr.State(None)
        outputs = [sheet, video, files, mesh_path]

        def on_run(seed_text: str, psi: float, style_name: str):
            try:
                seed_list = handlers.parse_seed_list(seed_text)
                if not style_name:
                    raise AppError("no style: choose a stylised generator")
            except AppError as exc:
                yield failed(str(exc), len(outputs))
                return
            w = self.world(world)

            def work(job: Job) -> handlers.GenerateResult:
                base, stylised = w.base(), w.stylised(style_name)
                return run_in_folder(self._job_folder(world, "generate"), lambda out: handlers.generate(
                    base, stylised, seed_list, float(psi), w.render, out, job.report))

            def finish(r: handlers.GenerateResult) -> list[Any]:
                for note in r.notes:
                    gr.Info(note)
                return [str(r.sheet), _first(r.turntable), _files(r.downloads), _first(r.meshes)]

            yield from follow(self.jobs.submit(f"{world} generate", work), finish, len(outputs))

        go.click(on_run, [seeds, truncation, style], [status, preview, *outputs], concurrency_limit=None).then(
            show_mesh, mesh_path, mesh)

    # -- style image -------------------------------------------------------------------------------------------

    def style_panel(self, world: str) -> None:
        gr.Markdown("Style Fusion Attention (DiffStyle360): each rendered view is re-noised and denoised with the "
                    "style picture's attention keys and values; the render's depth keeps the head's shape.")
        with gr.Row():
            with gr.Column():
                style = gr.Image(label="Style picture", type="numpy", height=220, elem_id=f"{world}-sfa-style")
                with gr.Accordion("Second style (blended by alpha)", open=False):
                    style_2 = gr.Image(label="Second style picture", type="numpy", height=200)
                    alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="alpha (0 = first style, 1 = second)")
                tau = gr.Slider(0.8, 1.5, value=1.05, step=0.01, label="tau (stronger style, weaker identity)")
                strength = gr.Slider(0.1, 1.0, value=0.6, step=0.05, label="strength (share of the schedule)")
                steps = gr.Number(value=30, precision=0, minimum=1, label="DDIM steps")
            with gr.Column():
                seeds = gr.Textbox(value="0", label="Seeds", info="comma-separated")
                truncation = gr.Slider(0.0, 1.0, value=0.7, step=0.05, label="Truncation psi")
                mask = gr.ImageEditor(label="Mask (optional): paint where to stylise", type="numpy", height=260,
                                      brush=gr.Brush(colors=["#ffffff"], default_size=12),
                                      sources=["upload"])  # fmt: skip
                canvas = gr.Button("Show the first head to paint on")
                go = gr.Button("Stylise views", variant="primary", elem_id=f"{world}-sfa-run")
                status = gr.HTML(elem_id=f"{world}-sfa-status")
                preview = gr.Image(visible=False)
        with gr.Row():
            sheet = result_image("Renders (upper row) and stylised views (lower row)")
            video = turntable_video("Stylised turntable")
        files = gr.File(label="Downloads", file_count="multiple")
        outputs = [sheet, video, files]
        w = self.world(world)

        def on_canvas(seed_text: str, psi: float):
            try:
                seed = handlers.parse_seed_list(seed_text)[0]
            except AppError as exc:
                gr.Warning(str(exc))
                return gr.skip()
            job = self.jobs.submit(f"{world} canvas", lambda job: handlers.front_view(w.base(), seed, psi, w.render))
            job.wait()
            state = job.state()
            if state.status != "done":
                gr.Warning(state.error or state.text)
                return gr.skip()
            return {"background": state.result, "layers": [], "composite": state.result}

        canvas.click(on_canvas, [seeds, truncation], mask, concurrency_limit=None)

        def on_run(style_image, second, a, t, s, n_steps, seed_text, psi, mask_value):
            try:
                seed_list = handlers.parse_seed_list(seed_text, most=4)
                if style_image is None:
                    raise AppError("no style picture: drop one into 'Style picture'")
            except AppError as exc:
                yield failed(str(exc), len(outputs))
                return

            def work(job: Job) -> handlers.StyleResult:
                prior, *unets = w.sfa_parts(w.sfa_prior())
                base = w.base()
                style_mask = handlers.mask_from_editor(mask_value, prior.image_size)
                return run_in_folder(self._job_folder(world, "style-image"), lambda out: handlers.style_views(
                    base, prior, seed_list, float(psi), style_image, second, style_mask, float(t), float(a), float(s),
                    int(n_steps or 1), w.render, out, job.report, tuple(unets)))  # fmt: skip

            def finish(r: handlers.StyleResult) -> list[Any]:
                return [_first(r.sheets), _first(r.turntable), _files(r.downloads)]

            yield from follow(self.jobs.submit(f"{world} style image", work), finish, len(outputs))

        go.click(on_run, [style, style_2, alpha, tau, strength, steps, seeds, truncation, mask],
                 [status, preview, *outputs], concurrency_limit=None)  # fmt: skip

    # -- train -------------------------------------------------------------------------------------------------

    def train_panel(self, world: str) -> None:
        from headstyle.stylize.presets import preset_names

        w = self.world(world)
        with gr.Row():
            with gr.Column():
                if world == "lab":
                    from headstyle.lab.world.heads import STYLES

                    gr.Markdown("Stylise the lab's generator towards one of its styles with the paper's recipe "
                                "(LD + mirror + grid + rank re-weighting) and the lab's prior.")
                    lab_style = gr.Dropdown(list(STYLES), value=next(iter(STYLES)), label="Lab style",
                                            elem_id="lab-train-style")  # fmt: skip
                    target: list[gr.components.Component] = [lab_style]
                    iterations_default = self.cfg.lab.iterations
                else:
                    gr.Markdown("Fine-tune the base generator towards a preset, a text prompt or a style picture "
                                "(`headstyle stylize` in the background).")
                    preset = gr.Dropdown(["", *preset_names()], value="", label="Preset (the LD paper's styles)")
                    prompt = gr.Textbox(label="Prompt (overrides the preset's)", placeholder="Portrait of a werewolf")
                    picture = gr.Image(label="...or a style picture (SDS with Style Fusion Attention)",
                                       type="filepath", height=160)  # fmt: skip
                    target = [preset, prompt, picture]
                    iterations_default = 1000
                iterations = gr.Number(value=iterations_default, precision=0, minimum=1, label="Iterations",
                                       elem_id=f"{world}-train-iterations")  # fmt: skip
                name = gr.Textbox(label="Name of the new style", placeholder="e.g. werewolf-1",
                                  elem_id=f"{world}-train-name")  # fmt: skip
                start = gr.Button("Start training", variant="primary", elem_id=f"{world}-train-start")
            with gr.Column():
                runs = gr.Dropdown(training.runs_in(w.styles_dir), label="Runs", elem_id=f"{world}-train-runs",
                                   info="the selected run is followed here; Stop and Resume act on it")  # fmt: skip
                with gr.Row():
                    stop = gr.Button("Stop", elem_id=f"{world}-train-stop")
                    resume = gr.Button("Resume", elem_id=f"{world}-train-resume")
                status = gr.HTML(elem_id=f"{world}-train-status")
                preview = result_image("Preview grid: frozen (upper) vs training (lower) rows, per identity",
                                       elem_id=f"{world}-train-preview")
        timer = gr.Timer(TIMER_SECONDS)
        known = gr.State(list(w.styles()))
        lab = self.cfg.lab if world == "lab" else None

        def submit(spec: training.TrainSpec) -> list[Any]:
            job = self.jobs.submit(f"{world} train {Path(spec.run_dir).name}", training.training_job(spec))
            self.training_jobs[spec.run_dir] = job
            run_list = training.runs_in(w.styles_dir)
            return [status_html(job.state()), gr.update(choices=[Path(spec.run_dir).name, *run_list],
                                                        value=Path(spec.run_dir).name)]

        def default_name(target_values: list[Any]) -> str:
            first = next((str(v) for v in target_values if v), "style")
            return f"{Path(first).stem if os.sep in first else first}-{time.strftime('%m%d-%H%M%S')}"

        def on_start(*values):
            *target_values, n, text = values
            try:
                run_dir = w.styles_dir / training.run_name(text or default_name(target_values))
                if world == "lab":
                    spec = training.lab_spec(self.cfg.lab, target_values[0], int(n or 1), run_dir)
                else:
                    reason = self.models.reasons()["train"]
                    if reason:
                        raise AppError(reason)
                    spec = training.models_spec(self.cfg, run_dir, int(n or 1), *target_values)
            except AppError as exc:
                return failed(str(exc), 0)[0], gr.skip()
            return submit(spec)

        start.click(on_start, [*target, iterations, name], [status, runs])

        def on_stop(run: str | None):
            job = self.training_jobs.get(str(w.styles_dir / run)) if run else None
            if job is None or job.state().status in FINISHED:
                gr.Info("no running training for the selected run")
                return gr.skip()
            job.request_stop()
            return '<div class="hs-job">stopping: the run writes a checkpoint after its current iteration</div>'

        stop.click(on_stop, runs, status)

        def on_resume(run: str | None, n: float):
            try:
                if not run:
                    raise AppError("no run selected: choose one under Runs")
                job = self.training_jobs.get(str(w.styles_dir / run))
                if job is not None and job.state().status in ("queued", "running"):
                    raise AppError(f"{run} is training already")
                spec = training.resume_spec(w.styles_dir / run, int(n or 1), lab)
            except AppError as exc:
                return failed(str(exc), 0)[0], gr.skip()
            return submit(spec)

        resume.click(on_resume, [runs, iterations], [status, runs])

        dropdowns = self.style_dropdowns[world]

        def on_tick(run: str | None, styles_before: list[str]):
            job = self.training_jobs.get(str(w.styles_dir / run)) if run else None
            if job is not None and job.state().status in ("queued", "running"):
                state = job.state()
                html_, image = status_html(state), _preview(state)
            elif run:
                r = training.read_run(w.styles_dir / run)
                finished = job.state() if job is not None and job.state().status in ("failed", "stopped") else None
                html_ = status_html(finished) if finished else f'<div class="hs-job">{html.escape(r.summary)}</div>'
                image = str(r.sample) if r.sample else gr.skip()
            else:
                html_, image = gr.skip(), gr.skip()
            styles_now = list(w.styles())
            if styles_now == styles_before:
                return [html_, image, styles_before, *[gr.skip()] * len(dropdowns)]
            return [html_, image, styles_now, *[gr.update(choices=styles_now) for _ in dropdowns]]

        # Registered after every panel of this world exists, so the style lists of all its tabs refresh.
        self._ticks.append(lambda: timer.tick(on_tick, [runs, known], [status, preview, known, *dropdowns],
                                              concurrency_limit=None, show_progress="hidden"))

    # -- the page ----------------------------------------------------------------------------------------------

    def availability(self) -> str:
        reasons = self.models.reasons()
        lines = [f"- **{TAB_TITLES[tab]}**: " + ("ready" if reason is None else f"unavailable: {reason}")
                 for tab, reason in reasons.items()]  # fmt: skip
        sfa = self.lab.sfa_reason()
        lines.append("- **The lab**: ready (no weights needed)" + (f"; its Style image waits: {sfa}" if sfa else ""))
        return "\n".join(lines)

    def build(self) -> gr.Blocks:
        reasons = self.models.reasons()
        first = next((tab for tab, reason in reasons.items() if reason is None), "lab")
        # Offline and private: no usage reports or version checks.
        with gr.Blocks(title="headstyle", analytics_enabled=False) as page:
            gr.Markdown(INTRO)
            with gr.Accordion("Models", open=any(reasons.values())):
                gr.Markdown(self.availability(), elem_id="availability")
            with gr.Tabs(selected=first):
                with gr.Tab("Photo → stylised head", id="photo", interactive=reasons["photo"] is None):
                    self.photo_panel()
                with gr.Tab("Generate", id="generate", interactive=reasons["generate"] is None):
                    self.generate_panel("models")
                with gr.Tab("Style image", id="style_image", interactive=reasons["style_image"] is None):
                    self.style_panel("models")
                with gr.Tab("Train a style", id="train", interactive=reasons["train"] is None):
                    self.train_panel("models")
                with gr.Tab("The lab", id="lab", elem_id="lab-tab"):
                    gr.Markdown("The synthetic head world: procedural identities with ground-truth styles, a "
                                "generator with PanoHead's interface and the lab's prior. Train a style, then "
                                "generate with it (or with a ground-truth style right away).")
                    with gr.Tabs():
                        with gr.Tab("Generate", id="lab-generate"):
                            self.generate_panel("lab")
                        with gr.Tab("Train a style", id="lab-train"):
                            self.train_panel("lab")
                        with gr.Tab("Style image", id="lab-style", interactive=self.lab.sfa_reason() is None):
                            self.style_panel("lab")
            for register in self._ticks:
                register()
        return page


def build_page(cfg: AppConfig, jobs: JobQueue) -> gr.Blocks:
    return Page(cfg, jobs).build()


def launch(cfg: AppConfig, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True) -> tuple[gr.Blocks, JobQueue]:  # fmt: skip
    """Serve the page on host:port (127.0.0.1 unless asked otherwise); with ``block`` until interrupted."""
    jobs = JobQueue()
    page = build_page(cfg, jobs)
    workdir = Path(cfg.server.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    page.queue(default_concurrency_limit=4)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # fmt: skip
    page.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block, quiet=True,
                allowed_paths=[str(workdir)], show_error=True, theme=theme, css=CSS, footer_links=[])  # fmt: skip
    return page, jobs
