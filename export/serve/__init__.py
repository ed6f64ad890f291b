"""Serving captions over HTTP: the FastAPI app, upload checks, dynamic batching, Prometheus metrics, the web page.

    python -m export.serve --model runs/demo/exported        # http://127.0.0.1:8000/ (export/serve/server.py)

The model is loaded and run only through the runtime's public API (``export.runtime``).
"""
