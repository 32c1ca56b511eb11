"""personalize.ui: the local web UI (`personalize ui`, needs the `ui` extra: gradio).

    from personalize.ui.app import serve
    serve("personalize-out", port=7860)          # 127.0.0.1 unless host= says otherwise

Modules: cli.py (the command, --listen/--auth checks), app.py (the Gradio page), workspace.py (what its
buttons do, no Gradio), jobs.py (the background queue: one child `personalize` process per device),
intake.py (the photo folder as training sees it), runs.py (reading run folders), safety.py (paths and uploads).
Only app.py imports gradio.
"""
