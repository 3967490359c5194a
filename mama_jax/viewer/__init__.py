"""Local web viewer of an export package: `python -m mama_jax.viewer --model EXPORT_DIR`.

  analysis.py      crops, probabilities and similarity maps of uploaded DICOMs
  server.py        the standard-library HTTP server (127.0.0.1 only) and its JSON API
  static/index.html  the one page (inline script and style; no external request)
"""
