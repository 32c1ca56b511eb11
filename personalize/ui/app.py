"""The Gradio page: four tabs wired to Workspace (what buttons do) and runs (what runs left on disk).

Handlers never train or generate here: they queue `personalize` commands (personalize/ui/jobs.py) and
show the files those commands write. A 1-second timer refreshes the views; outputs that did not change
since the last tick are skipped, so galleries and plots do not flicker.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from personalize.errors import UserError
from personalize.ui import runs
from personalize.ui.intake import intake_view, save_captions
from personalize.ui.jobs import RUNNING, personalize_command
from personalize.ui.safety import MAX_UPLOAD_BYTES
from personalize.ui.workspace import GenerateOptions, TrainOptions, Workspace, importlib_spec

MODELS = [
    "tiny-sd15",
    "tiny-sdxl",
    "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-xl-base-1.0",
]
METHODS = ["", "lora", "locon", "dora", "loha", "lokr", "krona", "ia3", "bitfit", "norm", "full"]
METHODS += ["textual-inversion", "pivotal", "controlnet", "controlnext", "t2i-adapter", "ip-adapter"]
JOB_HEADERS = ["id", "kind", "what", "status", "device", "time", "note"]
INTAKE_HEADERS = ["file", "status", "detail", "caption"]


def presets() -> list[str]:
    folder = Path(__file__).resolve().parents[2] / "configs"
    try:
        from importlib.resources import files

        names = [entry.name for entry in files("personalize.configs").iterdir() if entry.name.endswith(".yaml")]
    except (ImportError, OSError):
        names = [path.name for path in folder.glob("*.yaml")]
    return [""] + sorted(name[: -len(".yaml")] for name in names)


def default_resolution(model: str) -> int:
    """What the Train tab proposes (the CLI's default is the model's own): tiny 64, SDXL 1024, else 512."""
    model = (model or "").lower()
    return 64 if model.startswith("tiny-") else 1024 if "xl" in model else 512


def _error(error: Exception) -> str:
    return f"**error:** {error}"


def _loss_frame(points: list[tuple[int, float]]) -> Any:
    import pandas as pd

    return pd.DataFrame({"step": [step for step, _ in points], "loss": [loss for _, loss in points]})


def memory_plan(model: str, method: str, resolution: float, vram: str) -> str:
    """`personalize plan` (personalize.plan, when this version has it) for the chosen model and method."""
    if importlib_spec("personalize.plan") is None:
        return "The memory planner (`personalize plan`) is not part of this version."
    arguments = ["plan", "--model", model or "tiny-sd15", "--method", method or "lora"]
    arguments += ["--resolution", str(int(resolution or default_resolution(model)))]
    if vram and vram.strip():
        arguments += ["--vram", vram.strip()]
    try:
        done = subprocess.run(personalize_command(*arguments), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "the memory planner took more than 5 minutes; try again"
    text = (done.stdout + done.stderr).strip()
    return f"```\n{text}\n```"


class Page:
    """The handlers of one page; the Workspace (and its queue) is shared by every open browser tab."""

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace

    # -- Train -------------------------------------------------------------------------------------------
    def upload(self, files: list[str] | None, run: str, token: str, class_word: str, resolution: float) -> tuple:
        try:
            images, refused = self.ws.upload(files or [], run)
        except UserError as error:
            return "", _error(error), [], []
        lines = [f"- `{name}`: {reason}" for name, reason in refused]
        note = ("**Rejected uploads**\n" + "\n".join(lines)) if lines else ""
        rows, crops, intake_note = self.intake(images, run, token, class_word, resolution)
        return images, "\n\n".join(part for part in (note, intake_note) if part), rows, crops

    def intake(self, images: str, run: str, token: str, class_word: str, resolution: float) -> tuple[list, list, str]:
        if not images:
            return [], [], ""
        class_word = self.ws.class_word(images, run, class_word)
        try:
            rows, crops = intake_view(self.ws.path(images), token, class_word, int(resolution or 512))
        except UserError as error:
            return [], [], _error(error)
        skipped = [row for row in rows if row.status == "skipped"]
        note = "\n".join(
            [f"**Skipped by the intake** ({len(skipped)})"] + [f"- `{r.file}`: {r.detail}" for r in skipped]
        )
        table = [[row.file, row.status, row.detail, row.caption] for row in rows]
        return table, crops, note if skipped else f"{len(rows)} photos ready"

    def pick_folder(self, folder: str, run: str, token: str, class_word: str, resolution: float) -> tuple:
        rows, crops, note = self.intake(folder, run, token, class_word, resolution)
        return folder, note, rows, crops

    def save_captions(
        self, images: str, table: list[list[Any]], run: str, token: str, class_word: str, resolution: float
    ):
        if not images:
            return "no photos yet", [], []
        _rows, _crops, _ = self.intake(images, run, token, class_word, resolution)
        before = {row[0]: row[3] for row in _rows}
        changed = {row[0]: str(row[3]) for row in table or [] if row and row[0] in before and row[3] != before[row[0]]}
        try:
            written = save_captions(self.ws.path(images), changed)
        except UserError as error:
            return _error(error), _rows, _crops
        rows, crops, _note = self.intake(images, run, token, class_word, resolution)
        return f"{written} caption(s) saved beside the images", rows, crops

    def train(
        self,
        resume: bool,
        images: str,
        run: str,
        model: str,
        preset: str,
        method: str,
        token: str,
        class_word: str,
        resolution: float,
        steps: float,
        sample_every: float,
        overwrite: bool,
    ) -> str:
        options = TrainOptions(
            images=images,
            run=run,
            model=model,
            preset=preset or "",
            method=method or "",
            token=token,
            class_word=class_word,
            resolution=int(resolution or 0),
            steps=int(steps or 0),
            sample_every=int(sample_every or 0),
            overwrite=bool(overwrite),
        )
        try:
            job = self.ws.start_training(options, resume=resume)
        except UserError as error:
            return _error(error)
        return f"job {job.id} queued: {job.title}"

    def stop(self, run: str) -> str:
        try:
            job = self.ws.latest_job("train", self.ws.run_folder(run))
        except UserError as error:
            return _error(error)
        return self.ws.queue.stop(job.id) if job else "nothing is running for this run"

    def train_view(self, run: str, seen: str) -> tuple:
        """(status, loss plot, samples, downloads, signature): unchanged parts skipped."""
        import gradio as gr

        try:
            folder = self.ws.run_folder(run)
        except UserError:
            return "", gr.skip(), gr.skip(), gr.skip(), seen
        job = self.ws.latest_job("train", folder)
        log = Path(job.log) if job else None
        points = runs.losses(folder, log)
        sample_paths = runs.samples(folder)
        files = runs.adapter_files(folder) if (job is None or job.status != RUNNING) else []
        status = self.status_line(job, points)
        signature = repr((points[-1:], len(points), sample_paths, files, status))
        if signature == seen:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), seen
        gallery = [(str(path), path.stem) for path in sample_paths]
        return status, _loss_frame(points), gallery, [str(path) for path in files] or None, signature

    @staticmethod
    def status_line(job: Any, points: list[tuple[int, float]]) -> str:
        if job is None:
            return "No training job for this run yet."
        where = f" on {job.device}" if job.device else ""
        loss = f", step {points[-1][0]}, loss {points[-1][1]:.4f}" if points else ""
        note = f"\n\n`{job.error_line()}`" if job.status in ("failed", "stopped") else ""
        return f"Job {job.id} ({job.title}): **{job.status}**{where}{loss}{note}"

    def latest_run(self) -> str:
        """The run of the newest training job, so that a reopened page shows it."""
        job = self.ws.latest_job("train")
        return Path(job.output).name if job else "my-subject"

    # -- Generate ----------------------------------------------------------------------------------------
    def adapter_table(self) -> list[list[Any]]:
        return [[name, 0.0] for name in self.ws.run_names()]

    def generate(
        self,
        model: str,
        prompt: str,
        negative: str,
        seed: float,
        count: float,
        steps: float,
        guidance: float,
        table: list[list[Any]],
    ) -> tuple[str, int]:
        adapters = [(str(row[0]), float(row[1])) for row in table or [] if row and row[0] and float(row[1] or 0)]
        options = GenerateOptions(
            model=model,
            prompt=prompt or "",
            adapters=adapters,
            negative_prompt=negative or "",
            seed=int(seed or 0),
            num_images=max(1, int(count or 1)),
            steps=max(1, int(steps or 1)),
            guidance=float(guidance) if guidance else None,
        )
        try:
            job = self.ws.start_generation(options)
        except UserError as error:
            return _error(error), 0
        return f"job {job.id} queued: {job.title}", job.id

    def generate_view(self, job_id: int, seen: str) -> tuple:
        import gradio as gr

        job = self.ws.queue.get(int(job_id or 0))
        if job is None:
            return gr.skip(), gr.skip(), seen
        folder = Path(job.output)
        images = sorted(folder.glob("*.png")) if folder.is_dir() else []
        grid = [path for path in images if path.name == "grid.png"]
        shown = grid + [path for path in images if path.name != "grid.png"]
        status = self.status_line(job, [])
        signature = repr((status, shown))
        if signature == seen:
            return gr.skip(), gr.skip(), seen
        return status, [(str(path), path.stem) for path in shown], signature

    # -- Batch -------------------------------------------------------------------------------------------
    def load_job_file(self, name: str) -> tuple[str, str]:
        try:
            return self.ws.path(name).read_text(encoding="utf-8"), name.split("/")[-1]
        except (UserError, OSError) as error:
            return "", _error(error)

    def save_job_file(self, name: str, text: str) -> tuple[str, Any]:
        import gradio as gr

        try:
            saved = self.ws.save_job_file(name, text or "")
        except UserError as error:
            return _error(error), gr.skip()
        return f"saved {saved}", gr.update(choices=self.ws.batch_files(), value=saved)

    def run_batch(self, name: str, dry_run: bool) -> str:
        try:
            job = self.ws.start_batch(name, dry_run=dry_run)
        except UserError as error:
            return _error(error)
        return f"job {job.id} queued: {job.title}"

    def batch_view(self, name: str) -> tuple[list[list[Any]], str, str]:
        """(the queue, the batch's batch.md table, the log of its newest job)."""
        table, log = "", ""
        try:
            output = self.ws.path(name).with_suffix("") if name else None
        except UserError:
            output = None
        if output is not None:
            report = output / "batch.md"
            table = report.read_text(errors="replace") if report.is_file() else ""
            job = self.ws.latest_job("batch", output)
            if job is not None and Path(job.log).is_file():
                log = "\n".join(Path(job.log).read_text(errors="replace").replace("\r", "\n").splitlines()[-40:])
        return self.ws.job_rows(), table, log

    # -- Results -----------------------------------------------------------------------------------------
    def result(self, name: str) -> tuple:
        try:
            folder = self.ws.path(name) if name else None
        except UserError as error:
            return _error(error), None, [], None, "", [], ""
        if folder is None or not folder.is_dir():
            return "", None, [], None, "", [], ""
        figures, pictures, table = runs.eval_figures(folder)
        summary = ""
        if figures:
            import json

            summary = table or f"```json\n{json.dumps(figures, indent=1)[:4000]}\n```"
        loss_png = [folder / "loss.png"] if (folder / "loss.png").is_file() else []
        return (
            runs.model_card(folder) or "(no model card: the run has not finished)",
            _loss_frame(runs.losses(folder)),
            [(str(path), path.stem) for path in runs.samples(folder)],
            [str(path) for path in runs.adapter_files(folder)] or None,
            summary or "No `personalize eval` figures for this run (OUT/eval/eval.json).",
            [(str(path), path.name) for path in [*loss_png, *pictures]],
            "",
        )


def build(workspace: Workspace) -> Any:
    import gradio as gr

    page = Page(workspace)
    with gr.Blocks(title="personalize") as demo:
        gr.Markdown(f"# personalize\nEverything below is read and written under `{workspace.root}`.")
        with gr.Tab("Train", elem_id="tab-train"):
            with gr.Row():
                run = gr.Textbox(value="my-subject", label="Run name (folder under runs/)", elem_id="run-name")
                token = gr.Textbox(value="sks", label="Trigger token", elem_id="token")
                class_word = gr.Textbox(value="", label="Class word (cat, person, ...)", elem_id="class-word")
            with gr.Row():
                photos = gr.File(
                    file_count="multiple",
                    type="filepath",
                    label=f"Drop photos (images only, up to {MAX_UPLOAD_BYTES // 2**20} MB each)",
                    elem_id="photos",
                )
                with gr.Column():
                    folder = gr.Dropdown(
                        choices=workspace.image_folders(), label="...or pick a folder under the root", elem_id="folder"
                    )
                    images = gr.Textbox(label="Training images", interactive=False, elem_id="images")
            intake_note = gr.Markdown(elem_id="intake-note")
            intake_table = gr.Dataframe(
                headers=INTAKE_HEADERS,
                type="array",
                interactive=True,
                label="As the intake sees them (captions editable)",
                elem_id="intake",
            )
            save_captions_button = gr.Button("Save captions", elem_id="save-captions")
            crops = gr.Gallery(label="Training crops and buckets", columns=8, height=220, elem_id="crops")
            with gr.Row():
                model = gr.Dropdown(
                    MODELS, value="tiny-sd15", allow_custom_value=True, label="Base model", elem_id="model"
                )
                preset = gr.Dropdown(presets(), value="", label="Preset", elem_id="preset")
                method = gr.Dropdown(METHODS, value="", label="Method (default: the preset's)", elem_id="method")
            with gr.Row():
                resolution = gr.Number(value=64, precision=0, label="Resolution (px)", elem_id="resolution")
                steps = gr.Number(value=0, precision=0, label="Steps (0: the method's default)", elem_id="steps")
                sample_every = gr.Number(
                    value=0, precision=0, label="Sample every N steps (0: at the end)", elem_id="sample-every"
                )
                overwrite = gr.Checkbox(label="Replace a finished run (--overwrite)", elem_id="overwrite")
            with gr.Accordion("Memory plan (personalize plan: SD3 and Flux bases)", open=False):
                vram = gr.Textbox(label="GPU memory to fit (e.g. 16GB, optional)", elem_id="vram")
                plan_button = gr.Button("Plan", elem_id="plan")
                plan_text = gr.Markdown(elem_id="plan-text")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="start")
                stop = gr.Button("Stop", elem_id="stop")
                resume = gr.Button("Resume", elem_id="resume")
            train_status = gr.Markdown(elem_id="train-status")
            with gr.Row():
                loss = gr.LinePlot(x="step", y="loss", label="Loss", elem_id="loss-plot")
                samples = gr.Gallery(label="Samples", columns=3, height=300, elem_id="samples")
            downloads = gr.File(label="Adapter files", file_count="multiple", interactive=False, elem_id="downloads")
            seen_train = gr.State("")

        with gr.Tab("Batch", elem_id="tab-batch"):
            available = importlib_spec("personalize.batch") is not None
            gr.Markdown(
                "One subject per job: defaults plus a `jobs:` list (see README, batch training). "
                "Folders it names must be under the root."
                if available
                else "Batch training (`personalize batch`) is not part of this version."
            )
            with gr.Row():
                job_files = gr.Dropdown(workspace.batch_files(), label="Job files (batch/)", elem_id="job-files")
                job_name = gr.Textbox(value="jobs.yaml", label="Save as", elem_id="job-name")
            job_text = gr.Code(language="yaml", label="Job file", elem_id="job-text")
            with gr.Row():
                save_job = gr.Button("Save", elem_id="save-job")
                dry_run = gr.Button("Check (--dry-run)", elem_id="dry-run", interactive=available)
                run_job = gr.Button("Run batch", variant="primary", elem_id="run-batch", interactive=available)
            batch_note = gr.Markdown(elem_id="batch-note")
            queue_table = gr.Dataframe(
                headers=JOB_HEADERS, type="array", interactive=False, label="Queue", elem_id="queue"
            )
            batch_table = gr.Markdown(elem_id="batch-table")
            batch_log = gr.Textbox(label="Log", lines=10, max_lines=10, interactive=False, elem_id="batch-log")

        with gr.Tab("Generate", elem_id="tab-generate"):
            with gr.Row():
                gen_model = gr.Dropdown(
                    MODELS, value="tiny-sd15", allow_custom_value=True, label="Base", elem_id="gen-model"
                )
                gen_prompt = gr.Textbox(value="a photo of sks cat", label="Prompt", elem_id="gen-prompt")
                gen_negative = gr.Textbox(label="Negative prompt", elem_id="gen-negative")
            adapters = gr.Dataframe(
                value=page.adapter_table(),
                headers=["adapter (run folder)", "weight (0: off)"],
                type="array",
                interactive=True,
                label="Adapters",
                elem_id="gen-adapters",
            )
            with gr.Row():
                gen_seed = gr.Number(value=0, precision=0, label="Seed of the first image", elem_id="gen-seed")
                gen_count = gr.Number(value=4, precision=0, label="Images", elem_id="gen-count")
                gen_steps = gr.Number(value=30, precision=0, label="Steps", elem_id="gen-steps")
                gen_guidance = gr.Number(value=None, label="Guidance (empty: the model's)", elem_id="gen-guidance")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                refresh_adapters = gr.Button("Refresh adapters", elem_id="refresh-adapters")
            gen_status = gr.Markdown(elem_id="gen-status")
            gen_gallery = gr.Gallery(label="Images (grid first)", columns=4, height=400, elem_id="gen-gallery")
            gen_job = gr.State(0)
            seen_gen = gr.State("")

        with gr.Tab("Results", elem_id="tab-results"):
            with gr.Row():
                result_run = gr.Dropdown(workspace.run_names(), label="Run", elem_id="result-run")
                refresh_runs = gr.Button("Refresh", elem_id="refresh-runs")
            with gr.Row():
                result_loss = gr.LinePlot(x="step", y="loss", label="Loss", elem_id="result-loss")
                result_samples = gr.Gallery(label="Samples", columns=3, height=300, elem_id="result-samples")
            result_files = gr.File(
                label="Adapter files", file_count="multiple", interactive=False, elem_id="result-files"
            )
            result_eval = gr.Markdown(elem_id="result-eval")
            result_figures = gr.Gallery(label="Loss and eval figures", columns=3, height=300, elem_id="result-figures")
            result_card = gr.Markdown(elem_id="result-card")
            result_spare = gr.Markdown(visible=False)

        # -- wiring --------------------------------------------------------------------------------------
        view = [run, token, class_word, resolution]
        photos.upload(page.upload, [photos, *view], [images, intake_note, intake_table, crops])
        folder.select(page.pick_folder, [folder, *view], [images, intake_note, intake_table, crops])
        model.change(default_resolution, model, resolution)
        save_captions_button.click(
            page.save_captions, [images, intake_table, *view], [intake_note, intake_table, crops]
        )
        plan_button.click(memory_plan, [model, method, resolution, vram], plan_text)
        settings = [images, run, model, preset, method, token, class_word, resolution, steps, sample_every, overwrite]
        start.click(lambda *values: page.train(False, *values), settings, train_status)
        resume.click(lambda *values: page.train(True, *values), settings, train_status)
        stop.click(page.stop, run, train_status)

        save_job.click(page.save_job_file, [job_name, job_text], [batch_note, job_files])
        job_files.select(page.load_job_file, job_files, [job_text, job_name])
        dry_run.click(lambda name: page.run_batch(name, True), job_files, batch_note)
        run_job.click(lambda name: page.run_batch(name, False), job_files, batch_note)

        generate.click(
            page.generate,
            [gen_model, gen_prompt, gen_negative, gen_seed, gen_count, gen_steps, gen_guidance, adapters],
            [gen_status, gen_job],
        )
        refresh_adapters.click(page.adapter_table, None, adapters)

        result_outputs = [result_card, result_loss, result_samples, result_files, result_eval, result_figures]
        result_run.select(page.result, result_run, [*result_outputs, result_spare])
        refresh_runs.click(lambda: gr.update(choices=workspace.run_names()), None, result_run)

        timer = gr.Timer(1.0)
        timer.tick(page.train_view, [run, seen_train], [train_status, loss, samples, downloads, seen_train])
        timer.tick(page.generate_view, [gen_job, seen_gen], [gen_status, gen_gallery, seen_gen])
        timer.tick(page.batch_view, job_files, [queue_table, batch_table, batch_log])
        demo.load(page.latest_run, None, run)
    return demo


def serve(
    root: Path, port: int = 7860, host: str = "127.0.0.1", auth: tuple[str, str] | None = None, block: bool = True
) -> Any:
    """Start the page on host:port; everything it reads and writes stays under root."""
    root = Path(root).expanduser().resolve()
    state = root / runs.STATE_DIR
    # Gradio stages uploads and served files in its temp folder: keep that under the root as well, and
    # keep it from calling home (analytics, version checks).
    os.environ["GRADIO_TEMP_DIR"] = str(state / "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    workspace = Workspace(root)
    demo = build(workspace)
    demo.queue(default_concurrency_limit=4)
    print(
        f"personalize ui: http://{host}:{port} (root {root}); Ctrl-C here stops the page and asks running jobs "
        "to stop (each saves its adapter and a checkpoint: Resume continues it)",
        flush=True,
    )
    demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=False,
        inbrowser=False,
        allowed_paths=[str(root)],
        max_file_size=MAX_UPLOAD_BYTES,
        ssr_mode=False,
        show_error=True,
        quiet=True,
        prevent_thread_lock=not block,
    )
    return demo
