"""HTTP load generator and report for adsa-serve.

Talks to the server over HTTP only (httpx): it never imports the server or the engine, so it
measures exactly what a client sees. `python -m loadtest --help` for the run, and
`python -m loadtest compare RUN_A RUN_B --out DIR` to put two runs side by side.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
