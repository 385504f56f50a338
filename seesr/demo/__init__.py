"""The web demo behind `seesr demo`: `runner` (pipeline folders, their settings and presets, runs; no gradio)
and `page` (the gradio page; needs the demo extra)."""
