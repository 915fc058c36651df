"""``normdino serve``: a REST API (FastAPI + uvicorn) and a browser viewer for fitted models, in one process.

Install with ``pip install "normdino[serve]"``. The pieces:

* :mod:`normdino.serving.settings` - limits and knobs (upload size, queue, result lifetime, token);
* :mod:`normdino.serving.uploads` - what an upload is, sniffed from its bytes, checked before any work;
* :mod:`normdino.serving.results` - per-request temporary folders, result lifetime, the viewer's arrays;
* :mod:`normdino.serving.models` - models loaded once, each with its own inference queue;
* :mod:`normdino.serving.app` - the FastAPI application and ``serve()``;
* ``static/`` - the viewer (plain HTML, CSS and JavaScript; no build step, no third-party scripts).
"""
