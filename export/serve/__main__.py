"""python -m export.serve: the caption server (export/serve/server.py)."""

from export.serve.server import main

if __name__ == "__main__":
    raise SystemExit(main())
